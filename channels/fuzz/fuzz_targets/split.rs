//! The split on arbitrary input: a 16-byte pool, then 9-byte entries (key index, u64
//! weight). Valid input must give shares that sum to the pool, each the floor or ceiling of
//! its exact share, independent of input order; invalid input must give an error.
#![no_main]

use bitcoin::secp256k1::{Keypair, SecretKey};
use ethnum::U256;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tribute_channels::split::split;
use tribute_channels::{sign::secp, Nsat, PublicKey};

fn keys() -> &'static [PublicKey] {
    static KEYS: OnceLock<Vec<PublicKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (1u64..=256)
            .map(|n| {
                let mut sk = [0u8; 32];
                sk[24..].copy_from_slice(&n.to_be_bytes());
                let sk = SecretKey::from_slice(&sk).expect("valid");
                PublicKey::from(Keypair::from_secret_key(secp(), &sk).x_only_public_key().0)
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let pool = Nsat(u128::from_be_bytes(data[..16].try_into().expect("16 bytes")));
    let entries: Vec<(PublicKey, u64)> = data[16..]
        .chunks_exact(9)
        .map(|c| {
            (keys()[usize::from(c[0])], u64::from_be_bytes(c[1..].try_into().expect("8 bytes")))
        })
        .collect();
    let Ok(shares) = split(pool, &entries) else { return };
    let total: u128 = entries.iter().map(|(_, w)| u128::from(*w)).sum();
    let mut sum = U256::ZERO;
    for ((key, share), (k2, w)) in shares.iter().zip({
        let mut sorted = entries.clone();
        sorted.sort();
        sorted
    }) {
        assert_eq!(*key, k2);
        let exact_num = U256::from(pool.0) * U256::from(w);
        let s = U256::from(share.0) * U256::from(total);
        assert!(s <= exact_num + U256::from(total) && s + U256::from(total) >= exact_num);
        if w == 0 {
            assert_eq!(share.0, 0);
        }
        sum += U256::from(share.0);
    }
    assert_eq!(sum, U256::from(pool.0));
    let mut reversed = entries.clone();
    reversed.reverse();
    assert_eq!(split(pool, &reversed).ok(), Some(shares));
});
