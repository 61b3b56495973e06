//! Reputation: what signed evaluation records say about datasets and their contributors,
//! and the quality factor a model may apply to its attribution weights.
//!
//! Everything here is exact integer arithmetic (ppb fixed point, 256-bit sums), so the
//! result of [`aggregate`] is a function of the *set* of records, `as_of` and [`Params`]:
//! the same bits for any order of the input. The formula is in `docs/REPUTATION.md`:
//!
//! 1. Each measurement becomes a **contribution** `c` in ppb of the full model's score:
//!    leave-one-out `s·(full − ablation)/|full|`, a valuation estimate `s·value/|full|`,
//!    with `s = +1` when higher is better and `−1` otherwise; clamped to
//!    `±max_abs_contribution_ppb`. Its **half-width** `h` is the valuation interval's half
//!    width on the same scale, or `loo_half_width_ppb` for ablations, clamped to
//!    `[min_half_width_ppb, max_half_width_ppb]`.
//! 2. Its **weight** is `w = decay · 10^24 / h²`: inverse variance times a time decay that
//!    halves every `half_life_secs` (linear between whole half-lives, zero after 30).
//!    Records made after `as_of` do not count.
//! 3. A dataset's (or a contributor's, over all its datasets) **reputation** is the weighted
//!    mean `Σ w·c / Σ w` (rounded toward zero), with half-width `sqrt(10^33 / Σ w)`.
//!
//! Records are deduplicated by evaluation id before anything is summed, so a record given
//! twice counts once.

use crate::codec::Encode;
use crate::evaluation::{Evaluation, MeasurementKind, LEAVE_ONE_OUT, PPB};
use crate::ids::{BenchmarkId, DatasetHash, EvaluationId, Timestamp};
use crate::keys::PublicKey;
use ethnum::{I256, U256};
use std::collections::{BTreeMap, BTreeSet};

/// Aggregation parameters (see the module docs; defaults in [`Params::DEFAULT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Time for a record's weight to halve; 0 = no decay.
    pub half_life_secs: u64,
    /// Half-width given to a leave-one-out contribution (it carries no interval), ppb.
    pub loo_half_width_ppb: u64,
    /// Smallest half-width any contribution is credited with, ppb (no record is
    /// infinitely sure).
    pub min_half_width_ppb: u64,
    /// Largest half-width, ppb (bounds the arithmetic).
    pub max_half_width_ppb: u64,
    /// Largest magnitude of one contribution, ppb.
    pub max_abs_contribution_ppb: i64,
}

impl Params {
    /// 90-day half-life; ablations ±1 % of the full score; half-widths in
    /// [0.1 %, 1000 ×]; contributions within ±10 × the full score.
    pub const DEFAULT: Params = Params {
        half_life_secs: 90 * 24 * 3600,
        loo_half_width_ppb: 10_000_000,
        min_half_width_ppb: 1_000_000,
        max_half_width_ppb: 1_000_000_000_000,
        max_abs_contribution_ppb: 10 * PPB,
    };
}

impl Default for Params {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One measurement as it enters the aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contribution {
    /// The record.
    pub evaluation_id: EvaluationId,
    /// Its benchmark.
    pub benchmark_id: BenchmarkId,
    /// The dataset measured.
    pub dataset: DatasetHash,
    /// Its owner in the evaluated attribution version (if known).
    pub contributor: Option<PublicKey>,
    /// `leave-one-out` or the valuation method.
    pub method: String,
    /// When the record was made.
    pub evaluated_at: Timestamp,
    /// Normalised marginal contribution, ppb of the full score (positive = helps).
    pub contribution_ppb: i64,
    /// Normalised half-width, ppb.
    pub half_width_ppb: u64,
    /// Time decay at `as_of`, ppb (10^9 = fresh).
    pub decay_ppb: u64,
    /// `decay · 10^24 / h²`.
    pub weight: u128,
}

/// An aggregated reputation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reputation {
    /// Weighted mean contribution, ppb of the full score.
    pub score_ppb: i64,
    /// Half-width of the combined estimate, ppb.
    pub half_width_ppb: u64,
    /// Distinct evaluation records behind it.
    pub evaluations: u64,
    /// Measurements behind it.
    pub measurements: u64,
    /// `Σ w`.
    pub total_weight: u128,
}

/// The aggregate of a set of records at `as_of`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Reference time.
    pub as_of: Timestamp,
    /// Parameters used.
    pub params: Params,
    /// Per dataset (only datasets with a counting measurement).
    pub datasets: BTreeMap<DatasetHash, Reputation>,
    /// Per contributor, over all its datasets.
    pub contributors: BTreeMap<PublicKey, Reputation>,
    /// Every counting contribution, sorted by (dataset, evaluation id).
    pub contributions: Vec<Contribution>,
}

#[derive(Default)]
struct Acc {
    sum_w: U256,
    sum_wc: I256,
    evaluations: BTreeSet<EvaluationId>,
    measurements: u64,
}

impl Acc {
    fn add(&mut self, c: &Contribution) {
        self.sum_w += U256::from(c.weight);
        self.sum_wc += I256::from(c.weight) * I256::from(c.contribution_ppb);
        self.evaluations.insert(c.evaluation_id.clone());
        self.measurements += 1;
    }

    fn finish(self) -> Option<Reputation> {
        if self.sum_w == U256::ZERO {
            return None;
        }
        let total = self.sum_w.as_i256();
        // |Σwc / Σw| <= max |c| <= i64::MAX, and division truncates toward zero.
        let score_ppb = (self.sum_wc / total).as_i64();
        let half_width_ppb = isqrt(U256::from(10u8).pow(33) / self.sum_w);
        Some(Reputation {
            score_ppb,
            half_width_ppb: u64::try_from(half_width_ppb).unwrap_or(u64::MAX),
            evaluations: self.evaluations.len() as u64,
            measurements: self.measurements,
            total_weight: u128::try_from(self.sum_w).unwrap_or(u128::MAX),
        })
    }
}

/// Integer square root (floor).
fn isqrt(n: U256) -> U256 {
    if n < U256::from(2u8) {
        return n;
    }
    let bits = 256 - n.leading_zeros();
    let mut x = U256::ONE << bits.div_ceil(2);
    loop {
        let y = (x + n / x) >> 1;
        if y >= x {
            return x;
        }
        x = y;
    }
}

/// Time decay in ppb after `age_secs`: halves every `half_life_secs`, linear in between,
/// zero from 30 half-lives on.
pub fn decay_ppb(age_secs: u64, half_life_secs: u64) -> u64 {
    if half_life_secs == 0 {
        return PPB as u64;
    }
    let halvings = age_secs / half_life_secs;
    if halvings >= 30 {
        return 0;
    }
    let frac = u128::from(age_secs % half_life_secs);
    let hl = u128::from(half_life_secs);
    let base = u128::from((PPB as u64) >> halvings);
    // base · (1 − frac/(2·hl)): base at frac = 0, base/2 at frac = hl.
    (base * (2 * hl - frac) / (2 * hl)) as u64
}

/// The contributions of one record at `as_of` (empty if it was made after `as_of` or has
/// fully decayed). `owner` names the contributor of a dataset in the evaluated version.
pub fn contributions(
    e: &Evaluation,
    owner: impl Fn(&DatasetHash) -> Option<PublicKey>,
    as_of: Timestamp,
    params: &Params,
) -> Vec<Contribution> {
    if e.evaluated_at > as_of {
        return Vec::new();
    }
    let decay = decay_ppb(as_of.0 - e.evaluated_at.0, params.half_life_secs);
    if decay == 0 {
        return Vec::new();
    }
    let denom = i128::from(e.full_score.0).abs().max(1);
    let sign: i128 = if e.higher_is_better { 1 } else { -1 };
    let scale = |v: i128| v * i128::from(PPB) / denom;
    let (min_h, max_h) = (params.min_half_width_ppb.max(1), params.max_half_width_ppb.max(1));
    e.measurements
        .iter()
        .map(|m| {
            let (method, raw, half_width) = match &m.kind {
                MeasurementKind::LeaveOneOut { ablation_score } => (
                    LEAVE_ONE_OUT.to_owned(),
                    i128::from(e.full_score.0) - i128::from(ablation_score.0),
                    i128::from(params.loo_half_width_ppb),
                ),
                MeasurementKind::Valuation { method, value, ci_low, ci_high, .. } => (
                    method.as_str().to_owned(),
                    i128::from(value.0),
                    scale((i128::from(ci_high.0) - i128::from(ci_low.0)) / 2),
                ),
            };
            let max_c = i128::from(params.max_abs_contribution_ppb.max(0));
            let c = (sign * scale(raw)).clamp(-max_c, max_c) as i64;
            let h = (half_width.max(0) as u128).clamp(u128::from(min_h), u128::from(max_h));
            // h <= max_half_width; with h² > 10^24 the precision rounds to at least 1.
            let precision =
                (U256::from(10u8).pow(24) / (U256::from(h) * U256::from(h))).max(U256::ONE);
            let weight = u128::try_from(precision * U256::from(decay)).unwrap_or(u128::MAX);
            Contribution {
                evaluation_id: e.evaluation_id.clone(),
                benchmark_id: e.benchmark_id.clone(),
                dataset: m.dataset,
                contributor: owner(&m.dataset),
                method,
                evaluated_at: e.evaluated_at,
                contribution_ppb: c,
                half_width_ppb: h as u64,
                decay_ppb: decay,
                weight,
            }
        })
        .collect()
}

/// Aggregates `records` at `as_of`. `owner(record, dataset)` names the dataset's
/// contributor in the record's attribution version. A record whose evaluation id appears
/// more than once counts once (the one with the smallest canonical encoding, should they
/// differ).
pub fn aggregate<'a>(
    records: impl IntoIterator<Item = &'a Evaluation>,
    owner: impl Fn(&Evaluation, &DatasetHash) -> Option<PublicKey>,
    as_of: Timestamp,
    params: &Params,
) -> Report {
    let mut unique: BTreeMap<&EvaluationId, (Vec<u8>, &Evaluation)> = BTreeMap::new();
    for e in records {
        let bytes = e.encode();
        match unique.get(&e.evaluation_id) {
            Some((kept, _)) if *kept <= bytes => {}
            _ => {
                unique.insert(&e.evaluation_id, (bytes, e));
            }
        }
    }
    let mut all: Vec<Contribution> = unique
        .values()
        .flat_map(|(_, e)| contributions(e, |d| owner(e, d), as_of, params))
        .collect();
    all.sort_by(|a, b| (a.dataset, &a.evaluation_id).cmp(&(b.dataset, &b.evaluation_id)));
    let mut by_dataset: BTreeMap<DatasetHash, Acc> = BTreeMap::new();
    let mut by_contributor: BTreeMap<PublicKey, Acc> = BTreeMap::new();
    for c in &all {
        by_dataset.entry(c.dataset).or_default().add(c);
        if let Some(k) = c.contributor {
            by_contributor.entry(k).or_default().add(c);
        }
    }
    Report {
        as_of,
        params: *params,
        datasets: by_dataset.into_iter().filter_map(|(k, a)| Some((k, a.finish()?))).collect(),
        contributors: by_contributor
            .into_iter()
            .filter_map(|(k, a)| Some((k, a.finish()?)))
            .collect(),
        contributions: all,
    }
}

/// A quality-weighting policy: `f(reputation)` as a factor in ppm,
/// `clamp(10^6 + gain_ppm · score_ppb / 10^9, floor_ppm, cap_ppm)`; a dataset without a
/// reputation gets the neutral factor `10^6` (clamped the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QualityPolicy {
    /// Change of the factor per whole full-score of contribution, ppm.
    pub gain_ppm: u32,
    /// Lowest factor, ppm (0 lets a harmful dataset be floored to nothing).
    pub floor_ppm: u32,
    /// Highest factor, ppm.
    pub cap_ppm: u32,
}

/// Why a quality policy is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QualityPolicyError {
    /// `floor_ppm > cap_ppm`, or the cap above [`MAX_QUALITY_FACTOR_PPM`].
    #[error("quality policy needs floor <= cap <= {MAX_QUALITY_FACTOR_PPM} ppm")]
    Clamps,
}

/// Highest factor a policy may set: 10 ×.
pub const MAX_QUALITY_FACTOR_PPM: u32 = 10_000_000;

impl QualityPolicy {
    /// Checks the clamps.
    pub fn validate(&self) -> Result<(), QualityPolicyError> {
        if self.floor_ppm > self.cap_ppm || self.cap_ppm > MAX_QUALITY_FACTOR_PPM {
            return Err(QualityPolicyError::Clamps);
        }
        Ok(())
    }

    /// The factor for a reputation (or none), ppm.
    pub fn factor_ppm(&self, reputation: Option<&Reputation>) -> u32 {
        let raw = match reputation {
            None => 1_000_000i128,
            Some(r) => {
                1_000_000 + i128::from(self.gain_ppm) * i128::from(r.score_ppb) / i128::from(PPB)
            }
        };
        raw.clamp(i128::from(self.floor_ppm), i128::from(self.cap_ppm)) as u32
    }

    /// `floor(weight · factor / 10^6)`; the factor is at most 10 ×, so it fits `u128` and
    /// saturates at `u64::MAX`.
    pub fn adjusted_weight(weight: u64, factor_ppm: u32) -> u64 {
        let w = u128::from(weight) * u128::from(factor_ppm) / 1_000_000;
        u64::try_from(w).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::tests::{keypair, sample};
    use crate::evaluation::{Measurement, Score};
    use crate::ids::Label;
    use proptest::prelude::*;

    fn owner_of(d: &DatasetHash) -> Option<PublicKey> {
        Some(PublicKey::from(keypair(d.0[0].max(1)).x_only_public_key().0))
    }

    #[test]
    fn formula_on_a_known_record() {
        let e = sample(&keypair(9));
        let cs = contributions(&e, owner_of, e.evaluated_at, &Params::DEFAULT);
        // LOO: (0.83 − 0.80) / 0.83 = 36144578 ppb, half-width 1 %.
        assert_eq!(cs[0].contribution_ppb, 30_000_000 * PPB / 830_000_000);
        assert_eq!(cs[0].half_width_ppb, 10_000_000);
        assert_eq!(cs[0].weight, 10u128.pow(24) / 10u128.pow(14) * 10u128.pow(9));
        // Shapley 0.12 ± 0.02 → 0.12/0.83 and 0.02/0.83.
        assert_eq!(cs[1].contribution_ppb, 120_000_000 * PPB / 830_000_000);
        assert_eq!(cs[1].half_width_ppb, (20_000_000 * PPB / 830_000_000) as u64);
        // Lower-is-better flips the sign.
        let mut loss = e.clone();
        loss.higher_is_better = false;
        let cs2 = contributions(&loss, owner_of, e.evaluated_at, &Params::DEFAULT);
        assert_eq!(cs2[0].contribution_ppb, -cs[0].contribution_ppb);
        // Future records do not count.
        assert!(contributions(&e, owner_of, Timestamp(e.evaluated_at.0 - 1), &Params::DEFAULT)
            .is_empty());
    }

    #[test]
    fn decay_halves_per_half_life() {
        assert_eq!(decay_ppb(0, 100), 1_000_000_000);
        assert_eq!(decay_ppb(50, 100), 750_000_000);
        assert_eq!(decay_ppb(100, 100), 500_000_000);
        assert_eq!(decay_ppb(200, 100), 250_000_000);
        assert_eq!(decay_ppb(3000, 100), 0);
        assert_eq!(decay_ppb(u64::MAX, 0), 1_000_000_000);
        for age in 0..400 {
            assert!(decay_ppb(age + 1, 100) <= decay_ppb(age, 100), "monotone at {age}");
        }
    }

    #[test]
    fn single_record_reputation_is_its_contribution() {
        let e = sample(&keypair(9));
        let r = aggregate([&e], |_, d| owner_of(d), e.evaluated_at, &Params::DEFAULT);
        let d1 = r.datasets[&DatasetHash([1; 32])];
        assert_eq!(d1.score_ppb, 30_000_000 * PPB / 830_000_000);
        assert_eq!(d1.half_width_ppb, 10_000_000);
        assert_eq!((d1.evaluations, d1.measurements), (1, 1));
        assert_eq!(r.contributors.len(), 2);
    }

    #[test]
    fn quality_factor_clamps() {
        let p = QualityPolicy { gain_ppm: 2_000_000, floor_ppm: 0, cap_ppm: 1_500_000 };
        let rep = |score_ppb| Reputation { score_ppb, ..Reputation::default() };
        assert_eq!(p.factor_ppm(None), 1_000_000);
        assert_eq!(p.factor_ppm(Some(&rep(100_000_000))), 1_200_000);
        assert_eq!(p.factor_ppm(Some(&rep(PPB))), 1_500_000);
        assert_eq!(p.factor_ppm(Some(&rep(-PPB))), 0);
        assert_eq!(QualityPolicy::adjusted_weight(7, 1_200_000), 8);
        assert!(QualityPolicy { gain_ppm: 0, floor_ppm: 2, cap_ppm: 1 }.validate().is_err());
    }

    fn record(id: usize, seed: u64, datasets: &[u8], at: u64) -> Evaluation {
        let mut e = sample(&keypair(9));
        e.evaluation_id = EvaluationId::new(format!("e{id}")).expect("id");
        e.evaluated_at = Timestamp(at);
        e.higher_is_better = seed % 3 != 0;
        e.full_score = Score(500_000_000 + (seed % 1000) as i64 * 1_000_000);
        e.measurements = datasets
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let v = ((seed >> (i % 32)) % 200) as i64 * 1_000_000 - 100_000_000;
                Measurement {
                    dataset: DatasetHash([*d; 32]),
                    kind: if (seed + i as u64) % 2 == 0 {
                        MeasurementKind::LeaveOneOut { ablation_score: Score(v + 400_000_000) }
                    } else {
                        MeasurementKind::Valuation {
                            method: Label::new("knn-shapley").expect("label"),
                            value: Score(v),
                            samples: 10,
                            ci_low: Score(v - (seed % 50) as i64 * 1_000_000),
                            ci_high: Score(v + (seed % 70) as i64 * 1_000_000),
                        }
                    },
                }
            })
            .collect();
        e.canonicalize();
        e.measurements.dedup_by_key(|m| m.dataset);
        e
    }

    proptest! {
        /// Bit-identical for any permutation, and a resubmitted record counts once.
        #[test]
        fn order_independent_and_idempotent(
            specs in prop::collection::vec(
                (any::<u64>(), prop::collection::vec(1u8..8, 1..5), 0u64..400_000_000),
                1..25,
            ),
            perm_seed in any::<u64>(),
            dup in any::<prop::sample::Index>(),
        ) {
            let as_of = Timestamp(1_800_000_000);
            let records: Vec<Evaluation> = specs
                .iter()
                .enumerate()
                .map(|(i, (seed, ds, back))| record(i, *seed, ds, as_of.0 - back))
                .collect();
            let owner = |_: &Evaluation, d: &DatasetHash| owner_of(d);
            let base = aggregate(&records, owner, as_of, &Params::DEFAULT);
            // A deterministic shuffle (Fisher–Yates from the seed) plus a duplicate.
            let mut shuffled = records.clone();
            let mut s = perm_seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            shuffled.push(dup.get(&records).clone());
            let again = aggregate(&shuffled, owner, as_of, &Params::DEFAULT);
            prop_assert_eq!(&base, &again);
            let total: u64 = base.datasets.values().map(|r| r.measurements).sum();
            prop_assert_eq!(total as usize, base.contributions.len());
        }
    }
}
