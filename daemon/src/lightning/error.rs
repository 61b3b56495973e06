//! The one error type of the Lightning backend layer. Its variants say what the caller must
//! do, in the manner of LDK's `BlockSourceErrorKind { Persistent, Transient }`: above all,
//! whether money may be in flight.

use super::types::{FailureReason, PaymentId};

/// Why a backend call did not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LightningError {
    /// The outcome is unknown: the request may have reached the node (a timeout, a lost
    /// reply, a store write that failed after the send started). For a payment: ask
    /// [`payment_status`](super::LightningBackend::payment_status) about the **same** id
    /// (BOLT12: [`find_offer_payments`](super::LightningBackend::find_offer_payments) by payer
    /// note) before anything else; repeating a keysend with the same preimage is safe because
    /// the node refuses duplicates, repeating a BOLT12 payment is not.
    #[error("outcome unknown: {0}")]
    Transient(String),
    /// The payment definitely failed and nothing is in flight: the amount is still owed.
    /// Retrying later (with backoff) may succeed.
    #[error("payment failed: {0}")]
    PaymentFailed(FailureReason),
    /// Refused before anything was sent, and the same request will always be refused: bad
    /// input (zero amount, invalid TLV type, unparsable or expired offer, wrong chain),
    /// insufficient funds for a channel, an unknown channel. Do not retry unchanged.
    #[error("refused: {0}")]
    Permanent(String),
    /// A payment with this id is already pending or succeeded: this call sent nothing. Ask
    /// [`payment_status`](super::LightningBackend::payment_status) about the id.
    #[error("duplicate payment {0}")]
    Duplicate(PaymentId),
    /// The backend is not running or cannot be reached; nothing was sent. Retry later.
    #[error("lightning backend unavailable: {0}")]
    Unavailable(String),
}

impl LightningError {
    /// `true` when money may be moving because of the failed call: only
    /// [`LightningError::Transient`]. (A [`LightningError::Duplicate`] sent nothing itself,
    /// but an earlier payment with the id exists.)
    pub fn may_be_in_flight(&self) -> bool {
        matches!(self, LightningError::Transient(_))
    }

    /// `true` when retrying later can help: transient, definite payment failure,
    /// unavailable.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LightningError::Transient(_)
                | LightningError::PaymentFailed(_)
                | LightningError::Unavailable(_)
        )
    }

    /// A stable name for logs, metrics and wire reason codes.
    pub fn kind_name(&self) -> &'static str {
        match self {
            LightningError::Transient(_) => "transient",
            LightningError::PaymentFailed(_) => "payment_failed",
            LightningError::Permanent(_) => "permanent",
            LightningError::Duplicate(_) => "duplicate",
            LightningError::Unavailable(_) => "unavailable",
        }
    }
}
