//! Criterion benchmarks for tribute-channels. Figures and method: `docs/PERFORMANCE.md`.
//!
//! `cargo bench -p tribute-channels --bench channels -- split`

#![allow(missing_docs)]
#![allow(clippy::unwrap_used)] // set-up failures abort the benchmark

use bitcoin::secp256k1::{Keypair, SecretKey};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use tribute_channels::channel::{ChannelParams, PayeeChannel, PayerChannel};
use tribute_channels::split::{SplitScratch, Weights};
use tribute_channels::{Network, Signed};
use tribute_channels::{Nsat, PublicKey};

/// A realistic contributor pool for one request, in nsat.
const POOL_NSAT: u128 = 1_234_567_891;

/// The key pair with secret key `i + 1`.
fn keypair(i: u32) -> Keypair {
    let mut secret = [0u8; 32];
    secret[28..].copy_from_slice(&(i + 1).to_be_bytes());
    let sk = SecretKey::from_slice(&secret).expect("valid secret key");
    Keypair::from_secret_key(tribute_channels::sign::secp(), &sk)
}

/// A valid key from secret key `i + 1`.
fn key(i: u32) -> PublicKey {
    keypair(i).x_only_public_key().0.into()
}

/// `n` contributors with random-ish full-range `u64` weights (splitmix64, fixed seed).
fn weights(n: u32) -> Weights {
    let mut state: u64 = 0x5EED;
    Weights::new((0..n).map(|i| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (key(i), z ^ (z >> 31))
    }))
    .unwrap()
}

fn split_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("split");
    for n in [10u32, 100, 1000] {
        let w = weights(n);
        let mut out = Vec::with_capacity(w.len());
        let mut scratch = SplitScratch::new();
        group.throughput(Throughput::Elements(u64::from(n)));
        // The metering path: output and scratch reused, no allocation.
        group.bench_with_input(BenchmarkId::new("split_into_with", n), &w, |b, w| {
            b.iter(|| {
                w.split_into_with(black_box(Nsat(POOL_NSAT)), &mut out, &mut scratch);
                black_box(&out);
            })
        });
        // The convenience path: allocates the (key, share) vector and scratch each time.
        group.bench_with_input(BenchmarkId::new("split", n), &w, |b, w| {
            b.iter(|| black_box(w.split(black_box(Nsat(POOL_NSAT)))))
        });
        // Worst case: pool u128::MAX forces the 256-bit path for most parties.
        group.bench_with_input(BenchmarkId::new("split_into_with_max_pool", n), &w, |b, w| {
            b.iter(|| {
                w.split_into_with(black_box(Nsat(u128::MAX)), &mut out, &mut scratch);
                black_box(&out);
            })
        });
    }
    group.finish();
}

/// BIP340 signing and verification of a channel state, the per-flush cost of streaming:
/// `sign` (tagged hash + sign), `verify` (tagged hash + verify), and `payee_accept` (the
/// contributor's whole check of an incoming state, signature included).
fn sign_verify_benches(c: &mut Criterion) {
    let kp = keypair(1);
    let params = ChannelParams {
        network: Network::Regtest,
        provider_key: PublicKey::from(kp.x_only_public_key().0),
        contributor_key: key(2),
        nonce: [7; 32],
    };
    let payer = PayerChannel::open(&params).accrue(Nsat(1_234_567_891)).expect("accrue");
    let (payer, first) = payer.sign(&kp, &[1; 32]).expect("sign");
    let payee = PayeeChannel::new(&params).accept(first).expect("accept");
    let next = payer.accrue(Nsat(1)).expect("accrue");
    let (_, second) = next.sign(&kp, &[2; 32]).expect("sign");

    let mut group = c.benchmark_group("channel_state");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| {
        b.iter(|| Signed::sign(black_box(*next.head()), &kp, &[3; 32]).expect("sign"))
    });
    group.bench_function("verify", |b| b.iter(|| black_box(&second).verify().expect("valid")));
    group.bench_function("payee_accept", |b| {
        b.iter(|| payee.accept(black_box(second)).expect("accepted"))
    });
    group.finish();
}

criterion_group!(benches, split_benches, sign_verify_benches);
criterion_main!(benches);
