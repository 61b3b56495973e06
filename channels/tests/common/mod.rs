//! Deterministic keys for tests.
#![allow(dead_code)]

use bitcoin::secp256k1::{Keypair, SecretKey};
use tribute_channels::sign::secp;
use tribute_channels::PublicKey;

/// The key pair whose secret key is `n` (big-endian), `n >= 1`.
pub fn keypair(n: u64) -> Keypair {
    let mut sk = [0u8; 32];
    sk[24..].copy_from_slice(&n.to_be_bytes());
    let sk = SecretKey::from_slice(&sk).expect("valid secret key");
    Keypair::from_secret_key(secp(), &sk)
}

/// The x-only public key of [`keypair`]`(n)`.
pub fn pubkey(n: u64) -> PublicKey {
    PublicKey::from(keypair(n).x_only_public_key().0)
}
