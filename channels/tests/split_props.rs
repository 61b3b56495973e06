//! Property tests for the exact proportional split (`channels::split`).
//!
//! Inputs: 1..=10_000 contributors (mostly few), weights from zero to `u64::MAX` (tiny, huge,
//! all-equal, mostly-zero mixes) and pools up to `u128::MAX`. Every allocation is checked
//! against the exact rational shares in 256-bit arithmetic and against an independent
//! reference (full sort instead of selection). Failures are persisted under
//! `tests/proptest-regressions/` and those files are committed.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use bitcoin::secp256k1::{Keypair, SecretKey};
use ethnum::U256;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use tribute_channels::split::{split, SplitError, SplitScratch, Weights};
use tribute_channels::{Nsat, PublicKey};

const KEY_POOL_SIZE: usize = 10_000;

/// `KEY_POOL_SIZE` distinct valid keys from secret keys `1..=KEY_POOL_SIZE`, made once per
/// test process (slow-ish in debug builds).
fn key_pool() -> &'static [PublicKey] {
    static KEYS: OnceLock<Vec<PublicKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (1..=KEY_POOL_SIZE as u32)
            .map(|i| {
                let mut secret = [0u8; 32];
                secret[28..].copy_from_slice(&i.to_be_bytes());
                let sk = SecretKey::from_slice(&secret).unwrap();
                let kp = Keypair::from_secret_key(tribute_channels::sign::secp(), &sk);
                PublicKey::from(kp.x_only_public_key().0)
            })
            .collect()
    })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/split_props.txt"
        )))),
        ..ProptestConfig::default()
    }
}

/// Mostly small party counts, sometimes up to 10_000.
fn party_count() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 1usize..=8,
        3 => 9usize..=300,
        1 => 301usize..=KEY_POOL_SIZE,
    ]
}

fn weight() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 1u64..=10, 1u64..=1_000_000, any::<u64>(), (u64::MAX - 10)..=u64::MAX,]
}

fn weights(n: usize) -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        4 => proptest::collection::vec(weight(), n),
        // All equal: every remainder ties, so the key tie-break decides.
        1 => weight().prop_map(move |w| vec![w; n]),
        // Mostly zeros and ties.
        1 => proptest::collection::vec(0u64..=2, n),
    ]
}

fn pool() -> impl Strategy<Value = u128> {
    prop_oneof![
        0u128..=100,
        Just(1_234_567_891u128),
        0u128..=u128::from(u64::MAX),
        any::<u128>(),
        (u128::MAX - 100)..=u128::MAX,
    ]
}

/// Distinct keys (a window of the key pool, in counter order, which is not byte order) with
/// weights; may have a zero total.
fn entries() -> impl Strategy<Value = Vec<(PublicKey, u64)>> {
    party_count().prop_flat_map(|n| (0..KEY_POOL_SIZE, weights(n))).prop_map(|(start, ws)| {
        let keys = key_pool();
        ws.into_iter().enumerate().map(|(i, w)| (keys[(start + i) % KEY_POOL_SIZE], w)).collect()
    })
}

/// Entries with a non-zero total weight.
fn valid_entries() -> impl Strategy<Value = Vec<(PublicKey, u64)>> {
    entries().prop_map(|mut es| {
        if es.iter().all(|&(_, w)| w == 0) {
            es[0].1 = 1;
        }
        es
    })
}

/// Deterministic Fisher–Yates shuffle driven by splitmix64.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

fn total(entries: &[(PublicKey, u64)]) -> u128 {
    entries.iter().map(|&(_, w)| u128::from(w)).sum()
}

/// Independent reference: all arithmetic in U256, full sort of (remainder desc, key asc).
fn reference(pool: u128, entries: &[(PublicKey, u64)]) -> BTreeMap<PublicKey, u128> {
    let t = U256::new(total(entries));
    let mut rows: Vec<(PublicKey, U256, U256)> = entries
        .iter()
        .map(|&(k, w)| {
            let product = U256::new(pool) * U256::new(u128::from(w));
            (k, product / t, product % t)
        })
        .collect();
    let floor_sum: U256 = rows.iter().fold(U256::ZERO, |acc, r| acc + r.1);
    let leftover = (U256::new(pool) - floor_sum).as_usize();
    rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    rows.iter()
        .enumerate()
        .map(|(i, &(k, q, _))| (k, q.as_u128() + u128::from(i < leftover)))
        .collect()
}

fn as_map(shares: &[(PublicKey, Nsat)]) -> BTreeMap<PublicKey, u128> {
    shares.iter().map(|&(k, s)| (k, s.0)).collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn shares_sum_to_pool_and_round_the_exact_share(
        entries in valid_entries(),
        pool in pool(),
    ) {
        let shares = split(Nsat(pool), &entries).unwrap();
        prop_assert_eq!(shares.len(), entries.len());
        prop_assert!(shares.windows(2).all(|p| p[0].0 < p[1].0), "shares not in key order");

        let sum = shares.iter().fold(U256::ZERO, |acc, s| acc + U256::new(s.1 .0));
        prop_assert_eq!(sum, U256::new(pool));

        let t = U256::new(total(&entries));
        let weight_of: BTreeMap<PublicKey, u64> = entries.iter().copied().collect();
        for &(k, share) in &shares {
            let exact = U256::new(pool) * U256::new(u128::from(weight_of[&k]));
            let scaled = U256::new(share.0) * t;
            // share is floor or ceil of pool*w/T: |share*T - pool*w| < T.
            let gap = if scaled >= exact { scaled - exact } else { exact - scaled };
            prop_assert!(gap < t, "share {} of {} is not floor/ceil of {}*w/{}", share.0, k, pool, t);
        }
    }

    #[test]
    fn shares_match_the_reference_allocation(
        entries in valid_entries(),
        pool in pool(),
    ) {
        let shares = split(Nsat(pool), &entries).unwrap();
        prop_assert_eq!(as_map(&shares), reference(pool, &entries));
    }

    #[test]
    fn input_order_does_not_matter(
        entries in valid_entries(),
        pool in pool(),
        seed in any::<u64>(),
    ) {
        let first = split(Nsat(pool), &entries).unwrap();
        let mut permuted = entries.clone();
        shuffle(&mut permuted, seed);
        let second = split(Nsat(pool), &permuted).unwrap();
        prop_assert_eq!(as_map(&first), as_map(&second));

        // Reusing output and scratch across splits changes nothing either.
        let w = Weights::new(permuted).unwrap();
        let mut out = Vec::new();
        let mut scratch = SplitScratch::new();
        w.split_into_with(Nsat(pool / 3), &mut out, &mut scratch);
        w.split_into_with(Nsat(pool), &mut out, &mut scratch);
        prop_assert_eq!(out, first.iter().map(|s| s.1).collect::<Vec<_>>());
    }

    #[test]
    fn zero_weights_get_zero(
        entries in valid_entries(),
        pool in pool(),
    ) {
        let shares = as_map(&split(Nsat(pool), &entries).unwrap());
        for &(k, w) in &entries {
            if w == 0 {
                prop_assert_eq!(shares[&k], 0);
            }
        }
    }

    #[test]
    fn invalid_input_is_an_error_not_a_panic(
        entries in entries(),
        pool in pool(),
        dup in any::<proptest::sample::Index>(),
        dup_weight in weight(),
        seed in any::<u64>(),
    ) {
        // Zero total (or not) as generated.
        let result = split(Nsat(pool), &entries);
        if total(&entries) == 0 {
            prop_assert_eq!(result, Err(SplitError::ZeroTotalWeight));
        } else {
            prop_assert!(result.is_ok());
        }

        // One key repeated, anywhere in the input: named, whatever the weights.
        let mut with_dup = entries.clone();
        let dup_key = dup.get(&entries).0;
        with_dup.push((dup_key, dup_weight));
        shuffle(&mut with_dup, seed);
        prop_assert_eq!(split(Nsat(pool), &with_dup), Err(SplitError::DuplicateKey(dup_key)));

        prop_assert_eq!(split(Nsat(pool), &[]), Err(SplitError::Empty));
    }
}
