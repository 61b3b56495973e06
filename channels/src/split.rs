//! The exact proportional split of a pool among weighted contributors.
//!
//! This module owns the one rule by which a pool of nanosatoshis is divided, so that the
//! shares of every request sum to its pool and no nsat is created or lost (DESIGN.md, "Units
//! and exact arithmetic"). It is **largest remainder** (Hamilton) allocation: each party first
//! gets `floor(pool * w_i / T)`; the `leftover = pool - Σ floor(...)` nsat (always fewer than
//! the number of parties) go one each to the parties with the largest remainders
//! `pool * w_i mod T`. Ties are broken by contributor key, smaller key bytes first, so the
//! result depends only on the set of `(key, weight)` pairs and never on input order.
//!
//! Nothing here can overflow or panic: `pool * w_i` needs up to 192 bits and is done in
//! 256-bit arithmetic when it does not fit `u128`.

use crate::amount::Nsat;
use crate::keys::PublicKey;
use ethnum::U256;

/// Hard bound on parties in one split.
pub const MAX_SPLIT_PARTIES: usize = 100_000;

/// Why a set of weights cannot be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// There are no parties.
    #[error("no parties to split among")]
    Empty,
    /// A key appears more than once (the smallest such key is named).
    #[error("duplicate key {0} in split")]
    DuplicateKey(PublicKey),
    /// Every weight is zero, so no proportion is defined.
    #[error("total split weight is zero")]
    ZeroTotalWeight,
    /// More parties than [`MAX_SPLIT_PARTIES`].
    #[error("more than {max} parties in one split")]
    TooManyParties {
        /// The bound that was exceeded.
        max: usize,
    },
}

/// Validated weights: sorted by key ascending, unique keys, total precomputed (`u128`).
/// Zero weights are allowed (they get zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    /// Sorted by key, keys unique, at most [`MAX_SPLIT_PARTIES`], at least one non-zero weight.
    entries: Vec<(PublicKey, u64)>,
    /// Σ weights; `> 0`, and `< 2^81` because of the party bound.
    total: u128,
}

/// Reusable working memory for [`Weights::split_into_with`], so that repeated splits
/// allocate nothing once it has grown to the largest split seen.
#[derive(Debug, Clone, Default)]
pub struct SplitScratch {
    /// `(remainder, index)` of the parties with a non-zero remainder.
    candidates: Vec<(u128, usize)>,
}

impl SplitScratch {
    /// Empty scratch space.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Weights {
    /// Validates `entries` in any order: at least one, at most [`MAX_SPLIT_PARTIES`], no
    /// duplicate key, and a non-zero total.
    pub fn new(entries: impl IntoIterator<Item = (PublicKey, u64)>) -> Result<Self, SplitError> {
        // Take one past the bound, so an oversized input is rejected without collecting it.
        let mut entries: Vec<(PublicKey, u64)> =
            entries.into_iter().take(MAX_SPLIT_PARTIES + 1).collect();
        if entries.is_empty() {
            return Err(SplitError::Empty);
        }
        if entries.len() > MAX_SPLIT_PARTIES {
            return Err(SplitError::TooManyParties { max: MAX_SPLIT_PARTIES });
        }
        entries.sort_unstable_by_key(|&(key, _)| key);
        if let Some(pair) = entries.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(SplitError::DuplicateKey(pair[0].0));
        }
        // At most 100_000 * (2^64 - 1) < 2^81: cannot overflow.
        let total: u128 = entries.iter().map(|&(_, w)| u128::from(w)).sum();
        if total == 0 {
            return Err(SplitError::ZeroTotalWeight);
        }
        Ok(Weights { entries, total })
    }

    /// The entries, sorted by key ascending.
    pub fn entries(&self) -> &[(PublicKey, u64)] {
        &self.entries
    }

    /// The sum of all weights (never zero).
    pub fn total(&self) -> u128 {
        self.total
    }

    /// The number of parties (including zero-weight ones).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always `false`: validated weights have at least one party.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the shares of `pool` into `out` (cleared first), aligned with
    /// [`entries`](Self::entries) and summing exactly to `pool`. Allocates only for `out`
    /// and a temporary scratch; use [`split_into_with`](Self::split_into_with) to reuse one.
    pub fn split_into(&self, pool: Nsat, out: &mut Vec<Nsat>) {
        self.split_into_with(pool, out, &mut SplitScratch::new());
    }

    /// As [`split_into`](Self::split_into), reusing `scratch` between calls.
    pub fn split_into_with(&self, pool: Nsat, out: &mut Vec<Nsat>, scratch: &mut SplitScratch) {
        let total = self.total;
        out.clear();
        out.reserve(self.entries.len());
        let candidates = &mut scratch.candidates;
        candidates.clear();

        // pool = a*T + b with b < T, so pool*w = a*w*T + b*w and
        //   floor(pool*w / T) = a*w + floor(b*w / T),   pool*w mod T = b*w mod T.
        // a*w <= pool*w/T <= pool (w <= T), and b*w < T * 2^64, which fits u128 whenever
        // T <= 2^64; only larger totals can need the 256-bit path.
        let whole = pool.0 / total;
        let rest = pool.0 % total;
        let mut floor_sum: u128 = 0;
        for (index, &(_, weight)) in self.entries.iter().enumerate() {
            let weight = u128::from(weight);
            let (quotient, remainder) = match rest.checked_mul(weight) {
                // Weights and pools of everyday size keep both operands in u64, where the
                // division is a single instruction instead of a call into the u128 routine.
                Some(product) => match (u64::try_from(product), u64::try_from(total)) {
                    (Ok(p), Ok(t)) => (u128::from(p / t), u128::from(p % t)),
                    _ => {
                        let q = product / total;
                        (q, product - q * total)
                    }
                },
                None => {
                    let (q, r) = (U256::new(rest) * U256::new(weight)).div_rem(U256::new(total));
                    // q <= rest*w/T < 2^64 and r < T: both fit u128.
                    (q.as_u128(), r.as_u128())
                }
            };
            let share = whole * weight + quotient;
            // Σ floor shares <= Σ pool*w_i/T = pool: cannot overflow.
            floor_sum += share;
            out.push(Nsat(share));
            if remainder != 0 {
                candidates.push((remainder, index));
            }
        }

        // Σ remainders = T * leftover and each remainder < T, so leftover is smaller than the
        // number of non-zero remainders: every winner has one, and zero weights never win.
        let leftover = pool.0 - floor_sum;
        debug_assert!(leftover < candidates.len() as u128 || leftover == 0);
        let winners = usize::try_from(leftover).unwrap_or(usize::MAX).min(candidates.len());
        if winners == 0 {
            return;
        }
        // Largest remainder first; equal remainders by key ascending, which is index
        // ascending because entries are sorted by key. A total order, so the chosen set is
        // unique even though the selection is unstable.
        let by_rank = |a: &(u128, usize), b: &(u128, usize)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
        if winners < candidates.len() {
            candidates.select_nth_unstable_by(winners - 1, by_rank);
        }
        for &(_, index) in &candidates[..winners] {
            if let Some(share) = out.get_mut(index) {
                share.0 += 1;
            }
        }
        debug_assert_eq!(out.iter().map(|s| s.0).sum::<u128>(), pool.0);
    }

    /// The shares of `pool` per key, in key order, summing exactly to `pool`.
    pub fn split(&self, pool: Nsat) -> Vec<(PublicKey, Nsat)> {
        let mut shares = Vec::with_capacity(self.entries.len());
        self.split_into(pool, &mut shares);
        self.entries.iter().map(|&(key, _)| key).zip(shares).collect()
    }
}

/// Convenience: validate `weights` (any order) then split `pool`; shares are in key order.
pub fn split(
    pool: Nsat,
    weights: &[(PublicKey, u64)],
) -> Result<Vec<(PublicKey, Nsat)>, SplitError> {
    Ok(Weights::new(weights.iter().copied())?.split(pool))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use bitcoin::secp256k1::{Keypair, SecretKey};

    /// A valid key derived from a counter (secret key `i + 1`).
    fn key(i: u32) -> PublicKey {
        let mut secret = [0u8; 32];
        secret[28..].copy_from_slice(&(i + 1).to_be_bytes());
        let sk = SecretKey::from_slice(&secret).unwrap();
        Keypair::from_secret_key(crate::sign::secp(), &sk).x_only_public_key().0.into()
    }

    /// `n` distinct keys sorted ascending by bytes.
    fn sorted_keys(n: u32) -> Vec<PublicKey> {
        let mut keys: Vec<PublicKey> = (0..n).map(key).collect();
        keys.sort();
        keys
    }

    fn amounts(shares: &[(PublicKey, Nsat)]) -> Vec<u128> {
        shares.iter().map(|s| s.1 .0).collect()
    }

    #[test]
    fn zero_pool_gives_zero_to_everyone() {
        let keys = sorted_keys(3);
        let shares = split(Nsat::ZERO, &[(keys[0], 1), (keys[1], u64::MAX), (keys[2], 0)]).unwrap();
        assert_eq!(amounts(&shares), vec![0, 0, 0]);
    }

    #[test]
    fn one_party_gets_everything() {
        let k = key(7);
        for pool in [0, 1, 1_234_567_891, u128::MAX] {
            for w in [1, 3, u64::MAX] {
                assert_eq!(split(Nsat(pool), &[(k, w)]).unwrap(), vec![(k, Nsat(pool))]);
            }
        }
    }

    #[test]
    fn all_but_one_zero_weight() {
        let keys = sorted_keys(5);
        let entries: Vec<_> =
            keys.iter().enumerate().map(|(i, &k)| (k, if i == 3 { 42 } else { 0 })).collect();
        for pool in [1, 999, u128::MAX] {
            let shares = split(Nsat(pool), &entries).unwrap();
            assert_eq!(amounts(&shares), vec![0, 0, 0, pool, 0]);
        }
    }

    #[test]
    fn ties_go_to_smaller_keys() {
        let keys = sorted_keys(4);
        // Input in reverse key order: the result must not depend on it.
        let entries: Vec<_> = keys.iter().rev().map(|&k| (k, 5)).collect();
        let shares = split(Nsat(10), &entries).unwrap();
        assert_eq!(shares.iter().map(|s| s.0).collect::<Vec<_>>(), keys);
        assert_eq!(amounts(&shares), vec![3, 3, 2, 2]);
    }

    #[test]
    fn largest_remainder_wins_before_key() {
        let keys = sorted_keys(3);
        // pool 10, weights 1:1:3 → exact 2, 2, 6; weights 1:2:4 → 1.43, 2.86, 5.71 → 1, 3, 6.
        let shares = split(Nsat(10), &[(keys[0], 1), (keys[1], 2), (keys[2], 4)]).unwrap();
        assert_eq!(amounts(&shares), vec![1, 3, 6]);
        let shares = split(Nsat(10), &[(keys[0], 1), (keys[1], 1), (keys[2], 3)]).unwrap();
        assert_eq!(amounts(&shares), vec![2, 2, 6]);
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let keys = sorted_keys(3);
        assert_eq!(split(Nsat(1), &[]), Err(SplitError::Empty));
        assert_eq!(
            split(Nsat(1), &[(keys[2], 1), (keys[1], 2), (keys[2], 3), (keys[1], 4)]),
            Err(SplitError::DuplicateKey(keys[1]))
        );
        assert_eq!(split(Nsat(1), &[(keys[0], 0), (keys[1], 0)]), Err(SplitError::ZeroTotalWeight));
        let many = std::iter::repeat_n((keys[0], 1), MAX_SPLIT_PARTIES + 1);
        assert_eq!(Weights::new(many), Err(SplitError::TooManyParties { max: MAX_SPLIT_PARTIES }));
        // An endless input is rejected too, without being collected.
        assert_eq!(
            Weights::new(std::iter::repeat((keys[0], 1))),
            Err(SplitError::TooManyParties { max: MAX_SPLIT_PARTIES })
        );
    }

    #[test]
    fn max_weights_and_max_pool() {
        let keys = sorted_keys(3);
        let entries = [(keys[0], u64::MAX), (keys[1], u64::MAX), (keys[2], u64::MAX)];
        // u128::MAX = 3 * 0x5555…5555, so equal thirds with nothing left over.
        let shares = split(Nsat(u128::MAX), &entries).unwrap();
        assert_eq!(amounts(&shares), vec![u128::MAX / 3; 3]);

        let entries = [(keys[0], u64::MAX), (keys[1], u64::MAX - 1), (keys[2], 1)];
        let shares = split(Nsat(u128::MAX), &entries).unwrap();
        assert_eq!(amounts(&shares).iter().sum::<u128>(), u128::MAX);
        // T = 2^65 - 2 > 2^64 and pool mod T times u64::MAX needs more than 128 bits.
        let t = U256::new(2 * u128::from(u64::MAX));
        for ((_, w), share) in entries.iter().zip(amounts(&shares)) {
            let exact_floor = (U256::new(u128::MAX) * U256::new(u128::from(*w))) / t;
            let share = U256::new(share);
            assert!(share == exact_floor || share == exact_floor + 1);
        }
    }

    #[test]
    fn weights_accessors() {
        let keys = sorted_keys(3);
        let w = Weights::new([(keys[2], 3), (keys[0], 0), (keys[1], u64::MAX)]).unwrap();
        assert_eq!(w.entries(), &[(keys[0], 0), (keys[1], u64::MAX), (keys[2], 3)]);
        assert_eq!(w.total(), u128::from(u64::MAX) + 3);
        assert_eq!(w.len(), 3);
        assert!(!w.is_empty());

        let mut out = vec![Nsat(99); 10];
        let mut scratch = SplitScratch::new();
        w.split_into_with(Nsat(1_000), &mut out, &mut scratch);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], Nsat::ZERO);
        assert_eq!(out.iter().map(|s| s.0).sum::<u128>(), 1_000);
        let again: Vec<Nsat> = w.split(Nsat(1_000)).into_iter().map(|s| s.1).collect();
        assert_eq!(again, out);
    }
}
