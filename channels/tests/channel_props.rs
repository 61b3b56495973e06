//! State-machine property tests: whatever the payer does, the payee accepts every state it
//! signs, in order, and rejects regressions, replays, foreign channels and networks, and
//! every tampered byte.

mod common;

use common::{keypair, pubkey};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tribute_channels::channel::{
    ChannelParams, ChannelState, ChannelStatus, PayeeChannel, PayerChannel, Rejection,
};
use tribute_channels::codec::Encode;
use tribute_channels::{Msat, Network, Nsat, Signed, NSAT_PER_MSAT};

#[derive(Clone, Debug)]
enum Op {
    Accrue(u128),
    /// Settle this many parts per 256 of what is payable.
    Settle(u8),
    Sign,
    BeginClose,
    FinishClose,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop_oneof![0u128..2_000_000, 0u128..u64::MAX as u128].prop_map(Op::Accrue),
        2 => any::<u8>().prop_map(Op::Settle),
        4 => Just(Op::Sign),
        1 => Just(Op::BeginClose),
        1 => Just(Op::FinishClose),
    ]
}

fn params(nonce: u8, network: Network) -> ChannelParams {
    ChannelParams {
        network,
        provider_key: pubkey(1),
        contributor_key: pubkey(2),
        nonce: [nonce; 32],
    }
}

fn payment_hash(n: u64) -> [u8; 32] {
    let mut h = [0xa5u8; 32];
    h[..8].copy_from_slice(&n.to_be_bytes());
    h
}

/// Runs `ops` on the payer, feeding every signed state to a payee. Returns the states
/// signed, and the payee as it was before each was accepted.
fn run(ops: &[Op], p: &ChannelParams) -> (Vec<Signed<ChannelState>>, Vec<PayeeChannel>) {
    let provider = keypair(1);
    let mut payer = PayerChannel::open(p);
    let mut payee = PayeeChannel::new(p);
    let (mut states, mut payees) = (Vec::new(), Vec::new());
    for (i, op) in ops.iter().enumerate() {
        let next = match op {
            Op::Accrue(n) => payer.accrue(Nsat(*n)),
            Op::Settle(part) => {
                let payable = payer.payable_msat().expect("payable fits");
                let amount = Msat(((u128::from(payable.0) * u128::from(*part)) / 255) as u64);
                payer.settle(amount, payment_hash(i as u64))
            }
            Op::Sign if !payer.needs_signature() => Ok(payer.clone()),
            Op::Sign => {
                let (signed_payer, signed) = payer.sign(&provider, &[i as u8; 32]).expect("signs");
                payees.push(payee.clone());
                payee = payee.accept(signed).unwrap_or_else(|e| panic!("payee refused: {e}"));
                states.push(signed);
                Ok(signed_payer)
            }
            Op::BeginClose => payer.begin_close().map(|(c, rounding)| {
                assert!(rounding.0 < NSAT_PER_MSAT);
                c
            }),
            Op::FinishClose => payer.finish_close(),
        };
        // A refused transition changes nothing: we simply keep the old value.
        if let Ok(next) = next {
            payer = next;
        }
        let head = payer.head();
        assert!(head.settled_msat.to_nsat() <= head.accrued_nsat);
        assert_eq!(head.check_invariants(), Ok(()));
    }
    (states, payees)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/channel_props.txt"
        )))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn payee_accepts_every_state_in_order_and_rejects_the_rest(ops in prop::collection::vec(op(), 1..40)) {
        let p = params(7, Network::Regtest);
        let (states, payees) = run(&ops, &p);
        let Some(last) = states.last() else { return Ok(()) };
        let final_payee = payees.last().expect("one per state").accept(*last).expect("accepted again");

        // Every earlier state is a regression; the latest itself is a replay.
        for old in &states[..states.len() - 1] {
            let r = final_payee.accept(*old).expect_err("old state accepted");
            prop_assert!(matches!(r, Rejection::Regression { field: "seq" } | Rejection::Equivocation(_)) , "{r:?}");
        }
        prop_assert_eq!(final_payee.accept(*last), Err(Rejection::Replay));

        // The same operations on another channel (other nonce) and on another network.
        let (foreign, _) = run(&ops, &params(8, Network::Regtest));
        for s in &foreign {
            prop_assert_eq!(final_payee.accept(*s), Err(Rejection::WrongChannel));
        }
        let (other_net, _) = run(&ops, &params(7, Network::Signet));
        for s in &other_net {
            prop_assert_eq!(final_payee.accept(*s), Err(Rejection::WrongNetwork));
        }

        // Every single-bit change of every byte of every signed state is refused by the
        // payee that accepted the original.
        for (s, payee) in states.iter().zip(&payees) {
            let bytes = s.encode();
            for i in 0..bytes.len() {
                let mut t = bytes.clone();
                t[i] ^= 1 << (i % 8);
                if let Ok(tampered) = Signed::<ChannelState>::decode(&t) {
                    prop_assert!(payee.accept(tampered).is_err(), "tampered byte {i} accepted");
                }
            }
        }
    }
}

#[test]
fn equivocation_is_detected_with_proof() {
    let p = params(1, Network::Regtest);
    let provider = keypair(1);
    let base = PayerChannel::open(&p).accrue(Nsat(10)).expect("accrue");
    let (base, s0) = base.sign(&provider, &[0; 32]).expect("sign");
    let payee = PayeeChannel::new(&p).accept(s0).expect("first");
    let (_, a) = base.accrue(Nsat(5)).expect("a").sign(&provider, &[1; 32]).expect("sign a");
    let (_, b) = base.accrue(Nsat(6)).expect("b").sign(&provider, &[2; 32]).expect("sign b");
    assert_eq!(a.message.seq, b.message.seq);
    let payee = payee.accept(a).expect("a accepted");
    match payee.accept(b) {
        Err(Rejection::Equivocation(proof)) => {
            assert!(proof.is_valid());
            assert_eq!((proof.first, proof.second), (a, b));
        }
        other => panic!("expected equivocation, got {other:?}"),
    }
    assert_eq!(payee.latest(), Some(&a), "stored state unchanged");
}

#[test]
fn a_state_signed_by_another_key_is_refused() {
    let p = params(1, Network::Regtest);
    let head = *PayerChannel::open(&p).accrue(Nsat(10)).expect("accrue").head();
    let mut forged = Signed::sign(head, &keypair(1), &[0; 32]).expect("sign");
    let other =
        Signed::sign(ChannelState { provider_key: pubkey(3), ..head }, &keypair(3), &[0; 32])
            .expect("sign");
    forged.signature = other.signature;
    assert_eq!(PayeeChannel::new(&p).accept(forged), Err(Rejection::BadSignature));
    assert_eq!(PayeeChannel::new(&p).accept(other), Err(Rejection::WrongProvider));
}

#[test]
fn close_rounds_up_for_the_contributor_and_ends_fully_settled() {
    let p = params(1, Network::Regtest);
    let provider = keypair(1);
    let c = PayerChannel::open(&p).accrue(Nsat(2_500_001)).expect("accrue");
    let (c, rounding) = c.begin_close().expect("close");
    assert_eq!(rounding, Nsat(499_999));
    assert_eq!(c.head().accrued_nsat, Nsat(3_000_000));
    assert!(c.accrue(Nsat(1)).is_err(), "no accruals while closing");
    assert!(c.finish_close().is_err(), "3 msat still owed");
    let c = c.settle(Msat(3), [9; 32]).expect("settle");
    let c = c.finish_close().expect("closed");
    assert_eq!(c.head().status, ChannelStatus::Closed);
    let (_, last) = c.sign(&provider, &[0; 32]).expect("sign");
    let payee = PayeeChannel::new(&p).accept(last).expect("final state");
    let mut after = last.message;
    after.seq += 1;
    let after = Signed::sign(after, &provider, &[0; 32]).expect("sign");
    assert_eq!(payee.accept(after), Err(Rejection::AfterClose));
}

#[test]
fn settlement_rules() {
    let p = params(1, Network::Regtest);
    let c = PayerChannel::open(&p).accrue(Nsat(5_999_999)).expect("accrue");
    assert_eq!(c.payable_msat(), Ok(Msat(5)));
    assert!(c.settle(Msat(6), [1; 32]).is_err());
    assert!(c.settle(Msat(0), [1; 32]).is_err());
    assert!(c.settle(Msat(1), [0; 32]).is_err());
    let c = c.settle(Msat(5), [1; 32]).expect("settle");
    assert_eq!(c.head().outstanding_nsat(), Ok(Nsat(999_999)), "sub-msat remainder stays");
    assert!(c.settle(Msat(1), [2; 32]).is_err());
}
