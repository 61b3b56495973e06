//! Lightning backends: one trait, [`LightningBackend`] (with the [`DynLightningBackend`]
//! alias), that the settlement engine pays through, and its implementations:
//!
//! - [`LdkBackend`]: an embedded `ldk-node` (=0.7.1) node;
//! - [`ScriptedBackend`]: a fake that plays a script of outcomes, for fault-injection tests;
//! - [`conformance`]: the suite every backend runs.
//!
//! # What the settlement engine can rely on
//!
//! - **Keysend ids are deterministic.** The payment id is `sha256(preimage)`. Paying again
//!   with the same preimage while the first payment is pending or after it succeeded is
//!   refused with [`LightningError::Duplicate`], and nothing is sent.
//! - **Definite failure vs unknown outcome.** [`PaymentStatus::Failed`] and
//!   [`LightningError::PaymentFailed`] mean no money moved and none is in flight.
//!   [`LightningError::Transient`] means the outcome is unknown: resolve it by asking
//!   [`LightningBackend::payment_status`] about the **same** id — never by paying under a
//!   new id. [`PaymentStatus::Unknown`] means the backend has no record of the id.
//! - **Retrying after a definite failure with the same preimage**: ldk-node allows it, but
//!   LDK keeps a failed payment id for about 7 timer ticks (~7 min) after it gave up, and
//!   refuses the id as a duplicate meanwhile ([`LightningError::Duplicate`] while the status
//!   says `Failed`). Derive a fresh preimage per attempt (e.g. from settlement id + attempt
//!   number) if a retry must not wait.
//! - **BOLT12 ids are random.** [`LightningBackend::pay_offer`] returns the id the node
//!   picked: persist it. If the call itself ends in [`LightningError::Transient`], the id is
//!   lost; find the payment by its payer note with [`LightningBackend::find_offer_payments`]
//!   before paying again.
//! - **Records after a crash.** The node's payment records have known gaps around crashes
//!   (ldk-node issues #966, #1083, #171). The settlement engine keeps its own durable record
//!   (intent before paying, outcome after) and reconciles every pending settlement with
//!   `payment_status` on start-up. Outcomes also arrive as [`LightningEvent`]s: give the
//!   backend a [`LightningEventHandler`] that records them durably; the node's event is
//!   acknowledged only after the handler returns `Ok` (events replay after a restart until
//!   acknowledged, so the handler must be idempotent).

mod error;
mod events;
mod ldk;
mod scripted;
mod types;

pub mod conformance;

use std::sync::Arc;

use ldk_node::bitcoin::Address;

pub use error::LightningError;
pub use events::{EventHandlerError, LightningEventHandler, DEFAULT_EVENT_QUEUE_CAPACITY};
pub use ldk::{ChainSourceConfig, LdkBackend, LdkBackendConfig, SEED_FILE_NAME};
pub use scripted::{
    AttemptRequest, PaymentAttempt, Resolution, ScriptStep, ScriptedBackend, SentPayment,
};
pub use types::*;

/// A Lightning backend shared across tasks.
pub type DynLightningBackend = Arc<dyn LightningBackend>;

/// Everything the daemon asks of a Lightning node.
///
/// Payments: [`pay_keysend`](Self::pay_keysend), [`pay_offer`](Self::pay_offer), then
/// [`payment_status`](Self::payment_status) (or [`next_event`](Self::next_event)) for the
/// outcome. Operator operations: addresses, balances, peers and channels.
#[tonic::async_trait]
pub trait LightningBackend: Send + Sync {
    /// Our node id, network, height and a channel summary.
    async fn node_info(&self) -> Result<NodeInfo, LightningError>;

    /// Starts a keysend under the id `sha256(request.preimage)`. `Ok` means the payment is in
    /// flight (or already done): follow it with [`payment_status`](Self::payment_status).
    /// Invalid requests (zero amount, bad TLV types) are refused with
    /// [`LightningError::Permanent`] before the node sees them.
    async fn pay_keysend(&self, request: KeysendRequest) -> Result<PaymentRef, LightningError>;

    /// Starts paying a BOLT12 offer; the node picks the payment id and it is returned here.
    async fn pay_offer(&self, request: OfferRequest) -> Result<PaymentRef, LightningError>;

    /// Where the outbound payment `id` stands. Only `Succeeded` and `Failed` are final.
    async fn payment_status(&self, id: &PaymentId) -> Result<PaymentStatus, LightningError>;

    /// Outbound BOLT12 payments whose payer note is exactly `payer_note`, with their status,
    /// for finding a payment whose id was lost.
    async fn find_offer_payments(
        &self,
        payer_note: &str,
    ) -> Result<Vec<(PaymentId, PaymentStatus)>, LightningError>;

    /// The next event, waiting for one; `None` once the backend has stopped. Meant for one
    /// consumer. The queue is bounded and drops (and counts) events when nobody reads it; use
    /// a [`LightningEventHandler`] for events that must not be missed.
    async fn next_event(&self) -> Option<LightningEvent>;

    /// A fresh address of the node's on-chain wallet, to fund it.
    async fn onchain_address(&self) -> Result<Address, LightningError>;

    /// The on-chain wallet's balances.
    async fn onchain_balance(&self) -> Result<OnchainBalance, LightningError>;

    /// Connects to a peer (and reconnects after restarts).
    async fn connect(&self, node_id: [u8; 33], addr: &str) -> Result<(), LightningError>;

    /// Opens a channel, funded from the on-chain wallet. The channel is usable once the
    /// funding confirms ([`LightningEvent::ChannelReady`]).
    async fn open_channel(
        &self,
        request: OpenChannelRequest,
    ) -> Result<UserChannelId, LightningError>;

    /// Closes a channel: cooperatively, or by broadcasting our latest state when `force`.
    async fn close_channel(
        &self,
        channel_id: &ChannelId,
        force: bool,
    ) -> Result<(), LightningError>;

    /// The node's channels with their balances.
    async fn list_channels(&self) -> Result<Vec<ChannelInfo>, LightningError>;
}
