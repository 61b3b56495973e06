//! The payer and payee state machines driven together by a byte-encoded sequence of
//! actions (as rust-lightning's `chanmon_consistency`): accrue, settle, sign and deliver,
//! redeliver an old state, deliver a tampered one, close. Nothing panics; every honestly
//! signed new state is accepted; every replayed, regressing or tampered one is refused and
//! leaves the payee's state as it was; the payee always ends where the payer's last
//! delivered state is, and every state keeps its invariants.
#![no_main]

use bitcoin::secp256k1::{Keypair, SecretKey};
use libfuzzer_sys::fuzz_target;
use tribute_channels::channel::{ChannelParams, ChannelState, PayeeChannel, PayerChannel};
use tribute_channels::{sign::secp, Msat, Network, Nsat, PublicKey, Signed};

fn keypair(n: u8) -> Keypair {
    Keypair::from_secret_key(secp(), &SecretKey::from_slice(&[n; 32]).expect("valid"))
}

fn u64_of(bytes: &mut std::slice::Iter<'_, u8>) -> u64 {
    let mut b = [0u8; 8];
    for x in &mut b {
        *x = bytes.next().copied().unwrap_or(0);
    }
    u64::from_be_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let provider = keypair(1);
    let params = ChannelParams {
        network: Network::Regtest,
        provider_key: PublicKey::from(provider.x_only_public_key().0),
        contributor_key: PublicKey::from(keypair(2).x_only_public_key().0),
        nonce: [3; 32],
    };
    let mut payer = PayerChannel::open(&params);
    let mut payee = PayeeChannel::new(&params);
    let mut delivered: Vec<Signed<ChannelState>> = Vec::new();
    let mut hash_counter = 0u64;
    let mut bytes = data.iter();
    while let Some(&op) = bytes.next() {
        match op % 7 {
            0 => {
                // Accrue: errors (overflow, wrong status) leave the payer as it was.
                let amount = Nsat(u128::from(u64_of(&mut bytes)) << (op / 7 % 64));
                if let Ok(next) = payer.accrue(amount) {
                    assert_eq!(next.head().accrued_nsat.0, payer.head().accrued_nsat.0 + amount.0);
                    payer = next;
                }
            }
            1 => {
                // Beyond u64 msat there is nothing payable to express: no settlement.
                let Ok(payable) = payer.payable_msat() else { continue };
                let amount = u64_of(&mut bytes) % payable.0.saturating_add(1);
                hash_counter += 1;
                let mut hash = [0u8; 32];
                hash[..8].copy_from_slice(&hash_counter.to_be_bytes());
                if let Ok(next) = payer.settle(Msat(amount), hash) {
                    payer = next;
                }
            }
            2 => {
                if !payer.needs_signature() {
                    continue;
                }
                let (next, signed) =
                    payer.sign(&provider, &[op; 32]).expect("head keeps invariants");
                payer = next;
                payee =
                    payee.accept(signed).unwrap_or_else(|e| panic!("honest state refused: {e}"));
                delivered.push(signed);
            }
            3 => {
                // An old state again: refused, nothing changes.
                if delivered.is_empty() {
                    continue;
                }
                let i = usize::from(bytes.next().copied().unwrap_or(0)) % delivered.len();
                let before = payee.latest().copied();
                assert!(payee.accept(delivered[i]).is_err(), "old state accepted");
                assert_eq!(payee.latest().copied(), before);
            }
            4 => {
                // A tampered copy of the latest signed state (not re-signed): refused.
                let Some(mut forged) = delivered.last().copied() else { continue };
                forged.message.accrued_nsat.0 = forged.message.accrued_nsat.0.wrapping_add(1);
                forged.message.seq = forged.message.seq.wrapping_add(1);
                let before = payee.latest().copied();
                assert!(payee.accept(forged).is_err(), "unsigned content accepted");
                assert_eq!(payee.latest().copied(), before);
            }
            5 => {
                if let Ok((next, rounding)) = payer.begin_close() {
                    assert!(rounding.0 < 1_000_000, "rounding below one msat");
                    payer = next;
                }
            }
            _ => {
                if let Ok(next) = payer.finish_close() {
                    payer = next;
                }
            }
        }
        payer.head().check_invariants().expect("payer head keeps its invariants");
        if let Some(latest) = payee.latest() {
            latest.message.check_invariants().expect("accepted state keeps its invariants");
            assert_eq!(Some(latest), delivered.last(), "payee is at the last delivered state");
        }
    }
});
