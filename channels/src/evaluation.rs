//! Evaluation records: what an evaluator measured about the datasets behind one attribution
//! version of a model on one benchmark, signed by the evaluator's key
//! (`tribute/evaluation/v1`).
//!
//! Scores are signed as fixed-point integers, **parts per billion** of the metric's unit
//! ([`Score`], an `i64`): `0.83` is `830_000_000`. Floats never enter the signed bytes, so a
//! record has one encoding and every verifier reads the same numbers; [`Score::from_f64`]
//! refuses NaN, infinities and magnitudes above [`MAX_SCORE_ABS`].
//!
//! Decoding checks the canonical form (sorted unique datasets, known kinds, bounded
//! counts); [`Evaluation::validate`] checks the meaning (intervals, ranges), so a receiver
//! can tell a malformed interval from a malformed encoding.

use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::ids::{BenchmarkId, DatasetHash, EvaluationId, Label, ModelId, Timestamp};
use crate::keys::{Network, PublicKey};
use crate::sign::Message;

const VERSION: u8 = 1;
/// Most per-dataset measurements one record may carry.
pub const MAX_MEASUREMENTS: usize = 10_000;
/// Parts per billion in one unit of a metric.
pub const PPB: i64 = 1_000_000_000;
/// Largest magnitude of a score, in metric units (`10^9`, i.e. `10^18` ppb).
pub const MAX_SCORE_ABS: f64 = 1e9;
/// The method name a leave-one-out measurement is shown under.
pub const LEAVE_ONE_OUT: &str = "leave-one-out";

/// A score in parts per billion of the metric's unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Score(pub i64);

/// Why a float could not become a [`Score`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScoreError {
    /// NaN or an infinity.
    #[error("score is not a finite number")]
    NotFinite,
    /// Magnitude above [`MAX_SCORE_ABS`].
    #[error("score magnitude exceeds 1e9")]
    OutOfRange,
}

impl Score {
    /// The largest magnitude allowed, in ppb.
    pub const MAX_ABS_PPB: i64 = 1_000_000_000 * PPB;

    /// `x` in ppb, rounded to the nearest (half away from zero).
    pub fn from_f64(x: f64) -> Result<Score, ScoreError> {
        if !x.is_finite() {
            return Err(ScoreError::NotFinite);
        }
        if x.abs() > MAX_SCORE_ABS {
            return Err(ScoreError::OutOfRange);
        }
        // |x| <= 1e9, so x * 1e9 <= 1e18 < i64::MAX: the cast is exact after rounding.
        Ok(Score((x * 1e9).round() as i64))
    }

    /// The score in metric units (for display only; never signed).
    pub fn to_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    fn in_range(self) -> bool {
        self.0.unsigned_abs() <= Self::MAX_ABS_PPB.unsigned_abs()
    }
}

/// What was measured about one dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeasurementKind {
    /// The model retrained without the dataset scored `ablation_score`.
    LeaveOneOut {
        /// Score of the model trained without this dataset.
        ablation_score: Score,
    },
    /// A data-valuation estimate (Shapley, influence, …) in the metric's units, with the
    /// sample count and an interval around it.
    Valuation {
        /// The method, e.g. `knn-shapley`, `tmc-shapley`, `influence`.
        method: Label,
        /// The estimate.
        value: Score,
        /// Samples (permutations, test points, …) behind it; at least 1.
        samples: u64,
        /// Interval low end (`<= value`).
        ci_low: Score,
        /// Interval high end (`>= value`).
        ci_high: Score,
    },
}

/// One dataset's measurement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// The dataset (must be in the evaluated attribution version).
    pub dataset: DatasetHash,
    /// What was measured.
    pub kind: MeasurementKind,
}

/// An evaluation record, signed by the evaluator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// Network of the model's payouts.
    pub network: Network,
    /// Unique id: resubmitting the same record is idempotent.
    pub evaluation_id: EvaluationId,
    /// The evaluator, and signer.
    pub evaluator_key: PublicKey,
    /// The model evaluated.
    pub model_id: ModelId,
    /// The attribution version evaluated (its datasets are the ones measured).
    pub attribution_version: u64,
    /// The benchmark.
    pub benchmark_id: BenchmarkId,
    /// SHA-256 of the benchmark's content.
    pub benchmark_sha256: [u8; 32],
    /// The metric.
    pub metric: Label,
    /// Whether a higher score is better (accuracy) or worse (loss, perplexity).
    pub higher_is_better: bool,
    /// When the evaluation was made (time decay counts from here).
    pub evaluated_at: Timestamp,
    /// The full model's score.
    pub full_score: Score,
    /// Per-dataset measurements, sorted by dataset hash, unique.
    pub measurements: Vec<Measurement>,
}

/// Why an evaluation record is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluationError {
    /// No measurements, or more than [`MAX_MEASUREMENTS`].
    #[error("a record carries 1..={MAX_MEASUREMENTS} measurements")]
    MeasurementCount,
    /// Measurements not strictly sorted by dataset (duplicates included).
    #[error("measurements must be sorted by dataset without duplicates")]
    Unsorted,
    /// A score beyond ±10^18 ppb.
    #[error("a score is out of range")]
    ScoreOutOfRange,
    /// `ci_low <= value <= ci_high` does not hold, or `samples` is zero (dataset named).
    #[error("malformed interval for dataset {0}")]
    MalformedInterval(DatasetHash),
    /// The valuation method is named `leave-one-out` (reserved for ablations).
    #[error("method name `leave-one-out` is reserved for ablation scores")]
    ReservedMethod,
}

impl Evaluation {
    /// Sorts measurements into canonical order (callers may give them in any order).
    pub fn canonicalize(&mut self) {
        self.measurements.sort_by_key(|m| m.dataset);
    }

    /// Checks the record's meaning: counts, order, score ranges and intervals.
    pub fn validate(&self) -> Result<(), EvaluationError> {
        if self.measurements.is_empty() || self.measurements.len() > MAX_MEASUREMENTS {
            return Err(EvaluationError::MeasurementCount);
        }
        if !self.measurements.windows(2).all(|w| w[0].dataset < w[1].dataset) {
            return Err(EvaluationError::Unsorted);
        }
        if !self.full_score.in_range() {
            return Err(EvaluationError::ScoreOutOfRange);
        }
        for m in &self.measurements {
            match &m.kind {
                MeasurementKind::LeaveOneOut { ablation_score } => {
                    if !ablation_score.in_range() {
                        return Err(EvaluationError::ScoreOutOfRange);
                    }
                }
                MeasurementKind::Valuation { method, value, samples, ci_low, ci_high } => {
                    if method.as_str() == LEAVE_ONE_OUT {
                        return Err(EvaluationError::ReservedMethod);
                    }
                    if ![value, ci_low, ci_high].iter().all(|s| s.in_range()) {
                        return Err(EvaluationError::ScoreOutOfRange);
                    }
                    if *samples == 0 || ci_low > value || value > ci_high {
                        return Err(EvaluationError::MalformedInterval(m.dataset));
                    }
                }
            }
        }
        Ok(())
    }
}

const KIND_LEAVE_ONE_OUT: u8 = 1;
const KIND_VALUATION: u8 = 2;

impl Encode for Evaluation {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(VERSION);
        self.network.encode_into(w);
        self.evaluation_id.encode_into(w);
        self.evaluator_key.encode_into(w);
        self.model_id.encode_into(w);
        w.u64(self.attribution_version);
        self.benchmark_id.encode_into(w);
        w.bytes(&self.benchmark_sha256);
        self.metric.encode_into(w);
        w.u8(u8::from(self.higher_is_better));
        w.u64(self.evaluated_at.0);
        w.u64(self.full_score.0 as u64);
        w.u32(self.measurements.len() as u32);
        for m in &self.measurements {
            w.bytes(&m.dataset.0);
            match &m.kind {
                MeasurementKind::LeaveOneOut { ablation_score } => {
                    w.u8(KIND_LEAVE_ONE_OUT);
                    w.u64(ablation_score.0 as u64);
                }
                MeasurementKind::Valuation { method, value, samples, ci_low, ci_high } => {
                    w.u8(KIND_VALUATION);
                    method.encode_into(w);
                    w.u64(value.0 as u64);
                    w.u64(*samples);
                    w.u64(ci_low.0 as u64);
                    w.u64(ci_high.0 as u64);
                }
            }
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(VERSION)?;
        let network = Network::decode_from(r)?;
        let evaluation_id = EvaluationId::decode_from(r)?;
        let evaluator_key = PublicKey::decode_from(r)?;
        let model_id = ModelId::decode_from(r)?;
        let attribution_version = r.u64()?;
        let benchmark_id = BenchmarkId::decode_from(r)?;
        let benchmark_sha256 = r.array()?;
        let metric = Label::decode_from(r)?;
        let higher_is_better = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::InvalidField("higher_is_better")),
        };
        let evaluated_at = Timestamp(r.u64()?);
        let full_score = Score(r.u64()? as i64);
        let count = r.u32()? as usize;
        if count == 0 || count > MAX_MEASUREMENTS {
            return Err(DecodeError::InvalidField("measurements"));
        }
        let mut measurements = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let dataset = DatasetHash(r.array()?);
            let kind = match r.u8()? {
                KIND_LEAVE_ONE_OUT => {
                    MeasurementKind::LeaveOneOut { ablation_score: Score(r.u64()? as i64) }
                }
                KIND_VALUATION => MeasurementKind::Valuation {
                    method: Label::decode_from(r)?,
                    value: Score(r.u64()? as i64),
                    samples: r.u64()?,
                    ci_low: Score(r.u64()? as i64),
                    ci_high: Score(r.u64()? as i64),
                },
                _ => return Err(DecodeError::InvalidField("measurement kind")),
            };
            measurements.push(Measurement { dataset, kind });
        }
        if !measurements.windows(2).all(|w| w[0].dataset < w[1].dataset) {
            return Err(DecodeError::InvalidField("measurements"));
        }
        Ok(Evaluation {
            network,
            evaluation_id,
            evaluator_key,
            model_id,
            attribution_version,
            benchmark_id,
            benchmark_sha256,
            metric,
            higher_is_better,
            evaluated_at,
            full_score,
            measurements,
        })
    }
}

impl Message for Evaluation {
    const TAG: &'static str = "tribute/evaluation/v1";
    fn signer(&self) -> PublicKey {
        self.evaluator_key
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sign::{secp, Signed};
    use bitcoin::secp256k1::{Keypair, SecretKey};

    pub(crate) fn keypair(n: u8) -> Keypair {
        let mut sk = [0u8; 32];
        sk[31] = n;
        Keypair::from_secret_key(secp(), &SecretKey::from_slice(&sk).expect("secret"))
    }

    pub(crate) fn sample(evaluator: &Keypair) -> Evaluation {
        Evaluation {
            network: Network::Regtest,
            evaluation_id: EvaluationId::new("eval-1").expect("id"),
            evaluator_key: PublicKey::from(evaluator.x_only_public_key().0),
            model_id: ModelId::new("m").expect("id"),
            attribution_version: 1,
            benchmark_id: BenchmarkId::new("mmlu").expect("id"),
            benchmark_sha256: [7; 32],
            metric: Label::new("accuracy").expect("label"),
            higher_is_better: true,
            evaluated_at: Timestamp(1_800_000_000),
            full_score: Score::from_f64(0.83).expect("score"),
            measurements: vec![
                Measurement {
                    dataset: DatasetHash([1; 32]),
                    kind: MeasurementKind::LeaveOneOut {
                        ablation_score: Score::from_f64(0.80).expect("score"),
                    },
                },
                Measurement {
                    dataset: DatasetHash([2; 32]),
                    kind: MeasurementKind::Valuation {
                        method: Label::new("knn-shapley").expect("label"),
                        value: Score::from_f64(0.12).expect("score"),
                        samples: 1000,
                        ci_low: Score::from_f64(0.10).expect("score"),
                        ci_high: Score::from_f64(0.14).expect("score"),
                    },
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_verifies() {
        let kp = keypair(9);
        let e = sample(&kp);
        e.validate().expect("valid");
        let signed = Signed::sign(e.clone(), &kp, &[0; 32]).expect("sign");
        let bytes = signed.encode();
        let back = Signed::<Evaluation>::decode_verified(&bytes).expect("decodes");
        assert_eq!(back.message, e);
        assert_eq!(back.encode(), bytes);
        // Any flipped bit in the message breaks the signature or the decoding.
        let mut bad = bytes.clone();
        bad[bytes.len() - 70] ^= 1;
        assert!(Signed::<Evaluation>::decode_verified(&bad).is_err());
    }

    #[test]
    fn scores_are_fixed_point_and_refuse_non_finite() {
        assert_eq!(Score::from_f64(0.83), Ok(Score(830_000_000)));
        assert_eq!(Score::from_f64(-1.5), Ok(Score(-1_500_000_000)));
        assert_eq!(Score::from_f64(f64::NAN), Err(ScoreError::NotFinite));
        assert_eq!(Score::from_f64(f64::INFINITY), Err(ScoreError::NotFinite));
        assert_eq!(Score::from_f64(2e9), Err(ScoreError::OutOfRange));
    }

    #[test]
    fn intervals_and_order_are_checked() {
        let kp = keypair(9);
        let mut e = sample(&kp);
        if let MeasurementKind::Valuation { ci_low, .. } = &mut e.measurements[1].kind {
            *ci_low = Score(200_000_000);
        }
        assert_eq!(e.validate(), Err(EvaluationError::MalformedInterval(DatasetHash([2; 32]))));
        let mut e = sample(&kp);
        if let MeasurementKind::Valuation { samples, .. } = &mut e.measurements[1].kind {
            *samples = 0;
        }
        assert!(matches!(e.validate(), Err(EvaluationError::MalformedInterval(_))));
        let mut e = sample(&kp);
        e.measurements.swap(0, 1);
        assert_eq!(e.validate(), Err(EvaluationError::Unsorted));
        // Unsorted measurements do not decode either: one signed form per record.
        assert_eq!(Evaluation::decode(&e.encode()), Err(DecodeError::InvalidField("measurements")));
        e.canonicalize();
        assert_eq!(e.validate(), Ok(()));
    }
}
