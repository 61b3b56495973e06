//! The conformance suite every [`LightningBackend`] runs (as ldk-node runs one store test
//! suite against every store, and CDK one database suite against every database).
//!
//! Each check is a public async fn taking a [`ConformanceTarget`]: a backend and a payee it
//! can pay by keysend. [`run_all`] runs them in sequence (for real nodes, set up once);
//! [`lightning_backend_conformance!`](crate::lightning_backend_conformance) expands to one
//! `#[tokio::test]` per check (for cheap backends). Checks panic with a message on failure:
//! this module is test support, compiled into the library so integration tests can use it.

use std::time::{Duration, Instant};

use super::{
    payment_hash, DynLightningBackend, KeysendRequest, LightningBackend, LightningError,
    OfferRequest, PaymentId, PaymentStatus, MAX_CUSTOM_TLVS, MAX_CUSTOM_TLV_VALUE_BYTES,
};

/// Bound on every wait for a payment outcome.
pub const WAIT: Duration = Duration::from_secs(60);
/// How often a pending payment's status is asked again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A valid custom TLV type (≥ 2^16, odd).
const VALID_TLV_TYPE: u64 = 65_537;

/// Custom TLV records, `(type, value)`.
type Tlvs = Vec<(u64, Vec<u8>)>;

/// A backend under test and what it needs to make a payment succeed.
pub struct ConformanceTarget {
    /// The backend under test.
    pub backend: DynLightningBackend,
    /// A node the backend can pay by keysend now (e.g. a direct peer over a usable channel).
    pub payee_node_id: [u8; 33],
    /// Amount of each test payment, in msat.
    pub amount_msat: u64,
    /// Fee budget of each test payment, in msat.
    pub max_fee_msat: u64,
    /// Bound on waiting for one payment's outcome.
    pub wait: Duration,
}

impl ConformanceTarget {
    /// A target paying 10 sat per test payment with a 1 sat fee budget, waiting up to
    /// [`WAIT`].
    pub fn new(backend: DynLightningBackend, payee_node_id: [u8; 33]) -> ConformanceTarget {
        ConformanceTarget {
            backend,
            payee_node_id,
            amount_msat: 10_000,
            max_fee_msat: 1_000,
            wait: WAIT,
        }
    }

    /// A keysend to the payee under a fresh preimage.
    pub fn keysend(&self, custom_tlvs: Tlvs) -> KeysendRequest {
        KeysendRequest {
            dest_node_id: self.payee_node_id,
            amount_msat: self.amount_msat,
            preimage: fresh_preimage(),
            custom_tlvs,
            max_fee_msat: self.max_fee_msat,
        }
    }
}

/// 32 random bytes, so runs against a node that persists its payments never collide.
pub fn fresh_preimage() -> [u8; 32] {
    let mut preimage = [0u8; 32];
    getrandom::getrandom(&mut preimage).expect("the OS has no randomness");
    preimage
}

/// Asks for `id`'s status until it is final; panics after `wait`. Transient and
/// unavailable answers are asked again.
pub async fn wait_final(
    backend: &dyn LightningBackend,
    id: &PaymentId,
    wait: Duration,
) -> PaymentStatus {
    let deadline = Instant::now() + wait;
    loop {
        let status = match backend.payment_status(id).await {
            Ok(status) if status.is_final() => return status,
            Ok(status) => format!("{status:?}"),
            Err(e) if e.is_retryable() => format!("{e}"),
            Err(e) => panic!("payment_status({id}) failed: {e}"),
        };
        assert!(
            Instant::now() < deadline,
            "payment {id} not final after {wait:?} (last status: {status})"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Runs every check in sequence.
pub async fn run_all(target: &ConformanceTarget) {
    unknown_payment_is_unknown(target).await;
    zero_amount_is_refused(target).await;
    invalid_tlv_types_are_refused(target).await;
    succeeded_payment_reports_its_preimage(target).await;
    duplicate_keysend_is_refused(target).await;
}

/// A payment id the backend never saw is `Unknown` — not `Failed`, not an error.
pub async fn unknown_payment_is_unknown(target: &ConformanceTarget) {
    let id = PaymentId(fresh_preimage());
    let status = target.backend.payment_status(&id).await.expect("payment_status");
    assert_eq!(status, PaymentStatus::Unknown, "status of a never-seen id");
}

/// A zero amount is refused as `Permanent` before anything is sent.
pub async fn zero_amount_is_refused(target: &ConformanceTarget) {
    let request = KeysendRequest { amount_msat: 0, ..target.keysend(Vec::new()) };
    let result = target.backend.pay_keysend(request.clone()).await;
    assert!(matches!(result, Err(LightningError::Permanent(_))), "zero keysend: {result:?}");
    assert_nothing_sent(target, &request.payment_id()).await;
    let offer = OfferRequest {
        offer: "lno1invalid".into(),
        amount_msat: 0,
        payer_note: "conformance zero amount".into(),
        max_fee_msat: target.max_fee_msat,
    };
    let result = target.backend.pay_offer(offer).await;
    assert!(matches!(result, Err(LightningError::Permanent(_))), "zero offer payment: {result:?}");
}

/// Custom TLV records that break the rules are refused as `Permanent` before anything is
/// sent: types below 2^16, even types, reserved types, repeated types, too many records,
/// too many bytes.
pub async fn invalid_tlv_types_are_refused(target: &ConformanceTarget) {
    let too_many: Tlvs =
        (0..=MAX_CUSTOM_TLVS as u64).map(|i| (VALID_TLV_TYPE + 2 * i, Vec::new())).collect();
    let cases: Vec<(&str, Tlvs)> = vec![
        ("a type below 2^16", vec![(1, vec![1])]),
        ("an odd type just below 2^16", vec![(65_535, vec![1])]),
        ("an even type", vec![(65_536, vec![1])]),
        ("a reserved type", vec![(77_777, vec![1])]),
        ("a repeated type", vec![(VALID_TLV_TYPE, vec![1]), (VALID_TLV_TYPE, vec![2])]),
        ("too many records", too_many),
        ("too many bytes", vec![(VALID_TLV_TYPE, vec![0; MAX_CUSTOM_TLV_VALUE_BYTES + 1])]),
    ];
    for (what, tlvs) in cases {
        let request = target.keysend(tlvs);
        let result = target.backend.pay_keysend(request.clone()).await;
        assert!(matches!(result, Err(LightningError::Permanent(_))), "{what}: {result:?}");
        assert_nothing_sent(target, &request.payment_id()).await;
    }
}

/// A keysend (with a valid custom TLV) succeeds, and its status carries the preimage that
/// was sent, whose sha256 is the payment id and hash.
pub async fn succeeded_payment_reports_its_preimage(target: &ConformanceTarget) {
    let request = target.keysend(vec![(VALID_TLV_TYPE, b"conformance".to_vec())]);
    let id = request.payment_id();
    let sent = target.backend.pay_keysend(request.clone()).await.expect("keysend");
    assert_eq!(sent.payment_id, id, "keysend payment id is sha256(preimage)");
    assert_eq!(sent.payment_hash, Some(id.0), "keysend payment hash is known at send time");
    match wait_final(&*target.backend, &id, target.wait).await {
        PaymentStatus::Succeeded { preimage, fee_paid_msat } => {
            assert_eq!(preimage, request.preimage, "the preimage that was sent");
            assert_eq!(payment_hash(&preimage), id.0, "sha256(preimage) is the payment hash");
            if let Some(fee) = fee_paid_msat {
                assert!(fee <= target.max_fee_msat, "fee {fee} msat over the budget");
            }
        }
        other => panic!("keysend {id} did not succeed: {other:?}"),
    }
}

/// Paying the same preimage again — while the first is in flight, after it succeeded, and
/// with a different amount — is refused as `Duplicate` with the same id; the first payment
/// stays the one that succeeded.
pub async fn duplicate_keysend_is_refused(target: &ConformanceTarget) {
    let request = target.keysend(Vec::new());
    let id = request.payment_id();
    target.backend.pay_keysend(request.clone()).await.expect("first keysend");
    let again = target.backend.pay_keysend(request.clone()).await;
    assert_eq!(again, Err(LightningError::Duplicate(id)), "repeat while in flight or done");
    let status = wait_final(&*target.backend, &id, target.wait).await;
    assert!(matches!(status, PaymentStatus::Succeeded { .. }), "first keysend: {status:?}");
    let again = target.backend.pay_keysend(request.clone()).await;
    assert_eq!(again, Err(LightningError::Duplicate(id)), "repeat after success");
    let bigger = KeysendRequest { amount_msat: request.amount_msat + 1, ..request };
    let again = target.backend.pay_keysend(bigger).await;
    assert_eq!(again, Err(LightningError::Duplicate(id)), "same preimage, other amount");
    let after = target.backend.payment_status(&id).await.expect("payment_status");
    assert_eq!(after, status, "a refused duplicate leaves the first payment as it was");
}

async fn assert_nothing_sent(target: &ConformanceTarget, id: &PaymentId) {
    let status = target.backend.payment_status(id).await.expect("payment_status");
    assert_eq!(status, PaymentStatus::Unknown, "a refused request left a record for {id}");
}

/// Expands to one `#[tokio::test]` per conformance check, in a module named
/// `lightning_backend_conformance`. The argument is an expression (evaluated in that
/// module, which imports the caller's module with `use super::*`) whose value is a future
/// of a [`ConformanceTarget`]; each test gets its own.
///
/// ```ignore
/// async fn target() -> ConformanceTarget { ConformanceTarget::new(Arc::new(ScriptedBackend::new()), PAYEE) }
/// tribute_daemon::lightning_backend_conformance!(target());
/// ```
#[macro_export]
macro_rules! lightning_backend_conformance {
    ($target:expr) => {
        mod lightning_backend_conformance {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread")]
            async fn unknown_payment_is_unknown() {
                let target = $target.await;
                $crate::lightning::conformance::unknown_payment_is_unknown(&target).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn zero_amount_is_refused() {
                let target = $target.await;
                $crate::lightning::conformance::zero_amount_is_refused(&target).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn invalid_tlv_types_are_refused() {
                let target = $target.await;
                $crate::lightning::conformance::invalid_tlv_types_are_refused(&target).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn succeeded_payment_reports_its_preimage() {
                let target = $target.await;
                $crate::lightning::conformance::succeeded_payment_reports_its_preimage(&target)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn duplicate_keysend_is_refused() {
                let target = $target.await;
                $crate::lightning::conformance::duplicate_keysend_is_refused(&target).await;
            }
        }
    };
}
