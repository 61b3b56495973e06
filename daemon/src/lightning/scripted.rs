//! [`ScriptedBackend`]: a fake Lightning backend for fault injection. Each pay call that
//! passes validation and the duplicate check takes the next [`ScriptStep`] (default:
//! succeed at once), so a test can play "timeout, then the payment turns out to have
//! succeeded", "refused, then paid on retry", "node unavailable at start", and check that
//! the code under test paid exactly once ([`ScriptedBackend::times_paid`]).
//!
//! It keeps the rules of a real node: keysend ids are `sha256(preimage)`; a payment id that
//! is pending or succeeded is refused as a duplicate (a failed one may be paid again, as
//! ldk-node allows — see [`ScriptStep::Duplicate`] to play LDK's refusal window); a payment
//! whose call timed out after reaching the node is `Pending` and resolves later.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::bitcoin::{Address, Network, ScriptBuf, WPubkeyHash};

use super::events::EventQueue;
use super::{
    payment_hash, ChannelId, ChannelInfo, ChannelsSummary, FailureReason, KeysendRequest,
    LightningBackend, LightningError, LightningEvent, NodeInfo, OfferRequest, OnchainBalance,
    OpenChannelRequest, PaymentId, PaymentRef, PaymentStatus, UserChannelId,
    DEFAULT_EVENT_QUEUE_CAPACITY,
};

/// The node id the fake reports: the secp256k1 generator point, a valid public key.
pub const SCRIPTED_NODE_ID: [u8; 33] = [
    0x02, 0x79, 0xbe, 0x66, 0x7e, 0xf9, 0xdc, 0xbb, 0xac, 0x55, 0xa0, 0x62, 0x95, 0xce, 0x87, 0x0b,
    0x07, 0x02, 0x9b, 0xfc, 0xdb, 0x2d, 0xce, 0x28, 0xd9, 0x59, 0xf2, 0x81, 0x5b, 0x16, 0xf8, 0x17,
    0x98,
];
/// Block height the fake reports.
const SCRIPTED_BLOCK_HEIGHT: u32 = 101;
/// On-chain balance the fake starts with, in sat.
const SCRIPTED_ONCHAIN_SAT: u64 = 10_000_000;

/// How a payment that is in flight ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// It succeeds.
    Succeed,
    /// It definitely fails.
    Fail(FailureReason),
}

/// What one pay call does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptStep {
    /// Sent and succeeded at once: `Ok`, status `Succeeded`, a success event.
    Succeed,
    /// Sent (`Ok`) and in flight: status `Pending` for the backend's pending-poll count of
    /// status queries (or until [`ScriptedBackend::resolve_pending`]), then `resolution`.
    Pending(Resolution),
    /// The call times out after the payment reached the node: `Err(Transient)`, status
    /// `Pending`, later `resolution` (as for [`ScriptStep::Pending`]).
    Timeout(Resolution),
    /// The call times out before reaching the node: `Err(Transient)`, nothing sent, status
    /// `Unknown`.
    TimeoutBeforeSend,
    /// The node refuses to send: `Err(PaymentFailed)`, status `Failed`, nothing sent.
    RefuseToSend(FailureReason),
    /// The node cannot be reached for this call: `Err(Unavailable)`, nothing sent.
    Unavailable,
    /// The node refuses the id as a duplicate (as LDK does for ~7 min after a payment with
    /// the id failed): `Err(Duplicate)`, nothing sent.
    Duplicate,
}

impl ScriptStep {
    /// A timeout whose payment turns out to have succeeded.
    pub fn timeout_then_success() -> ScriptStep {
        ScriptStep::Timeout(Resolution::Succeed)
    }

    /// A timeout whose payment turns out to have failed.
    pub fn timeout_then_failure() -> ScriptStep {
        ScriptStep::Timeout(Resolution::Fail(FailureReason::RetriesExhausted))
    }

    /// A definite failure at send time (no route).
    pub fn refused() -> ScriptStep {
        ScriptStep::RefuseToSend(FailureReason::SendFailed("scripted: no route".into()))
    }
}

/// What a pay call asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptRequest {
    /// A keysend.
    Keysend(KeysendRequest),
    /// A BOLT12 payment.
    Offer(OfferRequest),
}

/// One pay call and what it returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentAttempt {
    /// What was asked.
    pub request: AttemptRequest,
    /// What the call returned.
    pub result: Result<PaymentRef, LightningError>,
}

/// A payment that moved money (it succeeded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentPayment {
    /// Its id.
    pub payment_id: PaymentId,
    /// Amount paid, in msat.
    pub amount_msat: u64,
    /// Its preimage.
    pub preimage: [u8; 32],
    /// What was asked.
    pub request: AttemptRequest,
}

#[derive(Clone, Debug)]
enum PayState {
    Pending { resolution: Resolution, polls_left: u32 },
    Succeeded,
    Failed(FailureReason),
}

#[derive(Clone, Debug)]
struct Payment {
    request: AttemptRequest,
    amount_msat: u64,
    preimage: [u8; 32],
    state: PayState,
}

#[derive(Debug)]
struct State {
    available: bool,
    script: VecDeque<ScriptStep>,
    pending_polls: u32,
    payments: HashMap<PaymentId, Payment>,
    attempts: Vec<PaymentAttempt>,
    sent: Vec<SentPayment>,
    offer_seq: u64,
    onchain: OnchainBalance,
    channels: Vec<ChannelInfo>,
    peers: Vec<([u8; 33], String)>,
    channel_seq: u128,
}

/// A scripted fake Lightning backend. See the module docs.
#[derive(Debug)]
pub struct ScriptedBackend {
    state: Mutex<State>,
    queue: EventQueue,
}

impl Default for ScriptedBackend {
    fn default() -> Self {
        ScriptedBackend::new()
    }
}

impl ScriptedBackend {
    /// An available backend with an empty script (every payment succeeds at once), payments
    /// that are pending resolving at the second status query.
    pub fn new() -> ScriptedBackend {
        ScriptedBackend {
            state: Mutex::new(State {
                available: true,
                script: VecDeque::new(),
                pending_polls: 1,
                payments: HashMap::new(),
                attempts: Vec::new(),
                sent: Vec::new(),
                offer_seq: 0,
                onchain: OnchainBalance {
                    total_sat: SCRIPTED_ONCHAIN_SAT,
                    spendable_sat: SCRIPTED_ONCHAIN_SAT,
                    anchor_reserve_sat: 0,
                    lightning_sat: 0,
                },
                channels: Vec::new(),
                peers: Vec::new(),
                channel_seq: 0,
            }),
            queue: EventQueue::new(DEFAULT_EVENT_QUEUE_CAPACITY),
        }
    }

    /// A backend that plays `steps`, one per pay call, then succeeds.
    pub fn with_script(steps: impl IntoIterator<Item = ScriptStep>) -> ScriptedBackend {
        let backend = ScriptedBackend::new();
        backend.push_steps(steps);
        backend
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends steps to the script.
    pub fn push_steps(&self, steps: impl IntoIterator<Item = ScriptStep>) {
        self.state().script.extend(steps);
    }

    /// Steps not played yet.
    pub fn remaining_steps(&self) -> usize {
        self.state().script.len()
    }

    /// While `false`, every call fails with [`LightningError::Unavailable`] (a node that is
    /// down, e.g. at start-up) and nothing is sent or resolved.
    pub fn set_available(&self, available: bool) {
        self.state().available = available;
    }

    /// How many status queries a pending payment answers `Pending` before it resolves.
    pub fn set_pending_polls(&self, polls: u32) {
        self.state().pending_polls = polls;
    }

    /// Resolves every pending payment now; returns how many.
    pub fn resolve_pending(&self) -> usize {
        let mut state = self.state();
        let pending: Vec<PaymentId> = state
            .payments
            .iter()
            .filter(|(_, p)| matches!(p.state, PayState::Pending { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in &pending {
            self.resolve(&mut state, id);
        }
        pending.len()
    }

    /// Every pay call so far, in order, including refused ones.
    pub fn attempts(&self) -> Vec<PaymentAttempt> {
        self.state().attempts.clone()
    }

    /// Every payment that moved money, in order.
    pub fn sent_payments(&self) -> Vec<SentPayment> {
        self.state().sent.clone()
    }

    /// How many times a payment with `id` moved money (a correct caller sees 0 or 1).
    pub fn times_paid(&self, id: &PaymentId) -> usize {
        self.state().sent.iter().filter(|p| p.payment_id == *id).count()
    }

    /// Closes a channel as its peer (or a crash) would, without the operator asking; an
    /// error if there is no such channel.
    pub fn close_by_peer(&self, channel_id: &ChannelId) -> Result<(), LightningError> {
        self.remove_channel(channel_id, "force-closed by the peer")
    }

    fn remove_channel(&self, channel_id: &ChannelId, reason: &str) -> Result<(), LightningError> {
        let mut state = self.state();
        let index = state
            .channels
            .iter()
            .position(|c| c.channel_id == *channel_id)
            .ok_or_else(|| LightningError::Permanent(format!("no channel {channel_id}")))?;
        let channel = state.channels.remove(index);
        self.queue.push(LightningEvent::ChannelClosed {
            channel_id: channel.channel_id,
            user_channel_id: channel.user_channel_id,
            counterparty: Some(channel.counterparty),
            reason: reason.into(),
        });
        Ok(())
    }

    /// Sets the on-chain balance the fake reports.
    pub fn set_onchain_balance(&self, balance: OnchainBalance) {
        self.state().onchain = balance;
    }

    /// Peers connected so far (`node id`, `addr`).
    pub fn peers(&self) -> Vec<([u8; 33], String)> {
        self.state().peers.clone()
    }

    fn check_available(state: &State) -> Result<(), LightningError> {
        if state.available {
            Ok(())
        } else {
            Err(LightningError::Unavailable("scripted: node unavailable".into()))
        }
    }

    /// Moves a pending payment to its resolution, recording money moved and an event.
    fn resolve(&self, state: &mut State, id: &PaymentId) {
        let Some(payment) = state.payments.get_mut(id) else { return };
        let PayState::Pending { resolution, .. } = &payment.state else { return };
        match resolution.clone() {
            Resolution::Succeed => {
                payment.state = PayState::Succeeded;
                let sent = SentPayment {
                    payment_id: *id,
                    amount_msat: payment.amount_msat,
                    preimage: payment.preimage,
                    request: payment.request.clone(),
                };
                self.queue.push(LightningEvent::PaymentSucceeded {
                    payment_id: *id,
                    payment_hash: payment_hash(&payment.preimage),
                    preimage: payment.preimage,
                    fee_paid_msat: Some(0),
                });
                state.sent.push(sent);
            }
            Resolution::Fail(reason) => {
                payment.state = PayState::Failed(reason.clone());
                self.queue.push(LightningEvent::PaymentFailed {
                    payment_id: *id,
                    payment_hash: Some(payment_hash(&payment.preimage)),
                    reason,
                });
            }
        }
    }

    fn status(payment: &Payment) -> PaymentStatus {
        match &payment.state {
            PayState::Pending { .. } => PaymentStatus::Pending,
            PayState::Succeeded => {
                PaymentStatus::Succeeded { preimage: payment.preimage, fee_paid_msat: Some(0) }
            }
            PayState::Failed(reason) => PaymentStatus::Failed { reason: reason.clone() },
        }
    }

    /// Plays the next step for a payment that passed validation and the duplicate check.
    fn play(
        &self,
        state: &mut State,
        id: PaymentId,
        payment_hash_at_send: Option<[u8; 32]>,
        payment: Payment,
    ) -> Result<PaymentRef, LightningError> {
        let reference = PaymentRef { payment_id: id, payment_hash: payment_hash_at_send };
        let step = state.script.pop_front().unwrap_or(ScriptStep::Succeed);
        let polls_left = state.pending_polls;
        let pending = |resolution| PayState::Pending { resolution, polls_left };
        match step {
            ScriptStep::Unavailable => {
                Err(LightningError::Unavailable("scripted: node unavailable".into()))
            }
            ScriptStep::TimeoutBeforeSend => {
                Err(LightningError::Transient("scripted: timed out before sending".into()))
            }
            ScriptStep::Duplicate => Err(LightningError::Duplicate(id)),
            ScriptStep::RefuseToSend(reason) => {
                state
                    .payments
                    .insert(id, Payment { state: PayState::Failed(reason.clone()), ..payment });
                Err(LightningError::PaymentFailed(reason))
            }
            ScriptStep::Succeed => {
                let state_now = pending(Resolution::Succeed);
                state.payments.insert(id, Payment { state: state_now, ..payment });
                self.resolve(state, &id);
                Ok(reference)
            }
            ScriptStep::Pending(resolution) => {
                state.payments.insert(id, Payment { state: pending(resolution), ..payment });
                Ok(reference)
            }
            ScriptStep::Timeout(resolution) => {
                state.payments.insert(id, Payment { state: pending(resolution), ..payment });
                Err(LightningError::Transient("scripted: timed out waiting for the node".into()))
            }
        }
    }
}

/// A deterministic stand-in for the random values a node would pick.
fn derive(tag: &str, seq: u64) -> [u8; 32] {
    let mut engine = sha256::Hash::engine();
    ldk_node::bitcoin::hashes::HashEngine::input(&mut engine, tag.as_bytes());
    ldk_node::bitcoin::hashes::HashEngine::input(&mut engine, &seq.to_be_bytes());
    sha256::Hash::from_engine(engine).to_byte_array()
}

#[tonic::async_trait]
impl LightningBackend for ScriptedBackend {
    async fn node_info(&self) -> Result<NodeInfo, LightningError> {
        let state = self.state();
        Self::check_available(&state)?;
        Ok(NodeInfo {
            node_id: SCRIPTED_NODE_ID,
            network: Network::Regtest,
            block_height: SCRIPTED_BLOCK_HEIGHT,
            listening_addresses: Vec::new(),
            channels: ChannelsSummary::of(&state.channels),
        })
    }

    async fn pay_keysend(&self, request: KeysendRequest) -> Result<PaymentRef, LightningError> {
        let mut state = self.state();
        let id = request.payment_id();
        let result = Self::check_available(&state)
            .and_then(|()| request.validate())
            .and_then(|()| {
                PublicKey::from_slice(&request.dest_node_id)
                    .map(|_| ())
                    .map_err(|e| LightningError::Permanent(format!("invalid node id: {e}")))
            })
            .and_then(|()| match state.payments.get(&id).map(|p| &p.state) {
                Some(PayState::Pending { .. } | PayState::Succeeded) => {
                    Err(LightningError::Duplicate(id))
                }
                _ => Ok(()),
            })
            .and_then(|()| {
                let payment = Payment {
                    request: AttemptRequest::Keysend(request.clone()),
                    amount_msat: request.amount_msat,
                    preimage: request.preimage,
                    state: PayState::Succeeded,
                };
                self.play(&mut state, id, Some(id.0), payment)
            });
        state.attempts.push(PaymentAttempt {
            request: AttemptRequest::Keysend(request),
            result: result.clone(),
        });
        result
    }

    async fn pay_offer(&self, request: OfferRequest) -> Result<PaymentRef, LightningError> {
        let mut state = self.state();
        let result =
            Self::check_available(&state).and_then(|()| request.validate()).and_then(|()| {
                state.offer_seq += 1;
                let id = PaymentId(derive("scripted offer payment id", state.offer_seq));
                let payment = Payment {
                    request: AttemptRequest::Offer(request.clone()),
                    amount_msat: request.amount_msat,
                    preimage: derive("scripted offer preimage", state.offer_seq),
                    state: PayState::Succeeded,
                };
                self.play(&mut state, id, None, payment)
            });
        state.attempts.push(PaymentAttempt {
            request: AttemptRequest::Offer(request),
            result: result.clone(),
        });
        result
    }

    async fn payment_status(&self, id: &PaymentId) -> Result<PaymentStatus, LightningError> {
        let mut state = self.state();
        Self::check_available(&state)?;
        let Some(payment) = state.payments.get_mut(id) else {
            return Ok(PaymentStatus::Unknown);
        };
        if let PayState::Pending { polls_left, .. } = &mut payment.state {
            if *polls_left > 0 {
                *polls_left -= 1;
                return Ok(PaymentStatus::Pending);
            }
            self.resolve(&mut state, id);
        }
        Ok(state.payments.get(id).map_or(PaymentStatus::Unknown, Self::status))
    }

    async fn find_offer_payments(
        &self,
        payer_note: &str,
    ) -> Result<Vec<(PaymentId, PaymentStatus)>, LightningError> {
        let state = self.state();
        Self::check_available(&state)?;
        let mut found: Vec<(PaymentId, PaymentStatus)> = state
            .payments
            .iter()
            .filter(|(_, p)| {
                matches!(&p.request, AttemptRequest::Offer(r) if r.payer_note == payer_note)
            })
            .map(|(id, p)| (*id, Self::status(p)))
            .collect();
        found.sort_by_key(|(id, _)| *id);
        Ok(found)
    }

    async fn next_event(&self) -> Option<LightningEvent> {
        self.queue.next().await
    }

    async fn onchain_address(&self) -> Result<Address, LightningError> {
        Self::check_available(&self.state())?;
        let script = ScriptBuf::new_p2wpkh(&WPubkeyHash::from_byte_array([7; 20]));
        Address::from_script(&script, Network::Regtest)
            .map_err(|e| LightningError::Permanent(format!("scripted address: {e}")))
    }

    async fn onchain_balance(&self) -> Result<OnchainBalance, LightningError> {
        let state = self.state();
        Self::check_available(&state)?;
        Ok(state.onchain)
    }

    async fn connect(&self, node_id: [u8; 33], addr: &str) -> Result<(), LightningError> {
        let mut state = self.state();
        Self::check_available(&state)?;
        PublicKey::from_slice(&node_id)
            .map_err(|e| LightningError::Permanent(format!("invalid node id: {e}")))?;
        if !state.peers.iter().any(|(id, _)| *id == node_id) {
            state.peers.push((node_id, addr.to_owned()));
        }
        Ok(())
    }

    async fn open_channel(
        &self,
        request: OpenChannelRequest,
    ) -> Result<UserChannelId, LightningError> {
        let mut state = self.state();
        Self::check_available(&state)?;
        PublicKey::from_slice(&request.node_id)
            .map_err(|e| LightningError::Permanent(format!("invalid node id: {e}")))?;
        let capacity_msat = request.amount_sat.saturating_mul(1_000);
        if request.amount_sat == 0 || request.push_msat > capacity_msat {
            return Err(LightningError::Permanent("invalid channel amounts".into()));
        }
        if request.amount_sat > state.onchain.spendable_sat {
            return Err(LightningError::Permanent("insufficient funds".into()));
        }
        state.onchain.spendable_sat -= request.amount_sat;
        state.onchain.total_sat = state.onchain.total_sat.saturating_sub(request.amount_sat);
        state.channel_seq += 1;
        let user_channel_id = UserChannelId(state.channel_seq);
        let channel_id = ChannelId(derive("scripted channel id", state.channel_seq as u64));
        state.channels.push(ChannelInfo {
            channel_id,
            user_channel_id,
            counterparty: request.node_id,
            capacity_sat: request.amount_sat,
            outbound_capacity_msat: capacity_msat - request.push_msat,
            inbound_capacity_msat: request.push_msat,
            ready: true,
            usable: true,
            announced: request.announce,
            outbound: true,
            funding_txid: None,
            confirmations: Some(6),
        });
        self.queue.push(LightningEvent::ChannelReady {
            channel_id,
            user_channel_id,
            counterparty: Some(request.node_id),
        });
        Ok(user_channel_id)
    }

    async fn close_channel(
        &self,
        channel_id: &ChannelId,
        _force: bool,
    ) -> Result<(), LightningError> {
        Self::check_available(&self.state())?;
        self.remove_channel(channel_id, "closed by the operator")
    }

    async fn list_channels(&self) -> Result<Vec<ChannelInfo>, LightningError> {
        let state = self.state();
        Self::check_available(&state)?;
        Ok(state.channels.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::lightning::conformance::{self, ConformanceTarget};
    use crate::lightning::DynLightningBackend;

    /// Another valid public key (2·G), as the payee.
    const PAYEE: [u8; 33] = [
        0x02, 0xc6, 0x04, 0x7f, 0x94, 0x41, 0xed, 0x7d, 0x6d, 0x30, 0x45, 0x40, 0x6e, 0x95, 0xc0,
        0x7c, 0xd8, 0x5c, 0x77, 0x8e, 0x4b, 0x8c, 0xef, 0x3c, 0xa7, 0xab, 0xac, 0x09, 0xb9, 0x5c,
        0x70, 0x9e, 0xe5,
    ];

    async fn target() -> ConformanceTarget {
        ConformanceTarget::new(Arc::new(ScriptedBackend::new()), PAYEE)
    }

    crate::lightning_backend_conformance!(target());

    fn keysend(preimage: u8) -> KeysendRequest {
        KeysendRequest {
            dest_node_id: PAYEE,
            amount_msat: 1_000,
            preimage: [preimage; 32],
            custom_tlvs: vec![(65_537, b"settlement-1".to_vec())],
            max_fee_msat: 10,
        }
    }

    #[tokio::test]
    async fn timeout_then_success_resolves_to_succeeded_and_pays_once() {
        let backend = ScriptedBackend::with_script([ScriptStep::timeout_then_success()]);
        let request = keysend(1);
        let id = request.payment_id();
        let err = backend.pay_keysend(request.clone()).await.unwrap_err();
        assert!(err.may_be_in_flight(), "{err:?}");
        // Paying again with the same preimage is refused while the first is in flight.
        assert_eq!(backend.pay_keysend(request).await, Err(LightningError::Duplicate(id)));
        assert_eq!(backend.payment_status(&id).await.unwrap(), PaymentStatus::Pending);
        let status = backend.payment_status(&id).await.unwrap();
        assert_eq!(status, PaymentStatus::Succeeded { preimage: [1; 32], fee_paid_msat: Some(0) });
        assert_eq!(backend.times_paid(&id), 1);
        assert_eq!(backend.attempts().len(), 2);
        assert!(matches!(
            backend.next_event().await,
            Some(LightningEvent::PaymentSucceeded { payment_id, .. }) if payment_id == id
        ));
    }

    #[tokio::test]
    async fn timeout_then_failure_resolves_to_failed_and_may_then_be_paid_again() {
        let backend = ScriptedBackend::with_script([ScriptStep::timeout_then_failure()]);
        backend.set_pending_polls(0);
        let request = keysend(2);
        let id = request.payment_id();
        assert!(matches!(
            backend.pay_keysend(request.clone()).await,
            Err(LightningError::Transient(_))
        ));
        assert!(matches!(backend.payment_status(&id).await.unwrap(), PaymentStatus::Failed { .. }));
        assert_eq!(backend.times_paid(&id), 0);
        // A definite failure frees the id (as in ldk-node's store).
        backend.pay_keysend(request).await.unwrap();
        assert_eq!(backend.times_paid(&id), 1);
    }

    #[tokio::test]
    async fn failure_then_success_and_a_timeout_before_sending() {
        let backend = ScriptedBackend::with_script([
            ScriptStep::refused(),
            ScriptStep::TimeoutBeforeSend,
            ScriptStep::Duplicate,
        ]);
        let request = keysend(3);
        let id = request.payment_id();
        assert!(matches!(
            backend.pay_keysend(request.clone()).await,
            Err(LightningError::PaymentFailed(FailureReason::SendFailed(_)))
        ));
        assert!(matches!(backend.payment_status(&id).await.unwrap(), PaymentStatus::Failed { .. }));
        let other = keysend(4);
        assert!(backend.pay_keysend(other.clone()).await.unwrap_err().may_be_in_flight());
        assert_eq!(
            backend.payment_status(&other.payment_id()).await.unwrap(),
            PaymentStatus::Unknown
        );
        assert_eq!(backend.pay_keysend(request.clone()).await, Err(LightningError::Duplicate(id)));
        backend.pay_keysend(request).await.unwrap();
        assert_eq!(backend.times_paid(&id), 1);
        assert_eq!(backend.sent_payments().len(), 1);
        assert_eq!(backend.remaining_steps(), 0);
    }

    #[tokio::test]
    async fn unavailable_at_start_sends_nothing_until_available() {
        let backend = ScriptedBackend::new();
        backend.set_available(false);
        let request = keysend(5);
        let id = request.payment_id();
        assert!(matches!(backend.node_info().await, Err(LightningError::Unavailable(_))));
        assert!(matches!(
            backend.pay_keysend(request.clone()).await,
            Err(LightningError::Unavailable(_))
        ));
        assert!(matches!(backend.payment_status(&id).await, Err(LightningError::Unavailable(_))));
        backend.set_available(true);
        assert_eq!(backend.payment_status(&id).await.unwrap(), PaymentStatus::Unknown);
        backend.pay_keysend(request).await.unwrap();
        assert_eq!(backend.times_paid(&id), 1);
        // A single unavailable call in the script.
        backend.push_steps([ScriptStep::Unavailable]);
        assert!(matches!(
            backend.pay_keysend(keysend(6)).await,
            Err(LightningError::Unavailable(_))
        ));
        assert_eq!(backend.attempts().len(), 3);
    }

    #[tokio::test]
    async fn offers_get_distinct_ids_and_are_found_by_payer_note() {
        let backend: DynLightningBackend = Arc::new(ScriptedBackend::with_script([
            ScriptStep::Succeed,
            ScriptStep::Pending(Resolution::Succeed),
        ]));
        let request = |note: &str| OfferRequest {
            offer: "lno1scripted".into(),
            amount_msat: 5_000,
            payer_note: note.into(),
            max_fee_msat: 50,
        };
        let first = backend.pay_offer(request("settlement 1")).await.unwrap();
        let second = backend.pay_offer(request("settlement 2")).await.unwrap();
        assert_ne!(first.payment_id, second.payment_id);
        assert_eq!(first.payment_hash, None);
        let found = backend.find_offer_payments("settlement 2").await.unwrap();
        assert_eq!(found, vec![(second.payment_id, PaymentStatus::Pending)]);
        let status =
            conformance::wait_final(&*backend, &second.payment_id, conformance::WAIT).await;
        let PaymentStatus::Succeeded { preimage, .. } = status else { panic!("{status:?}") };
        assert_ne!(payment_hash(&preimage), [0; 32]);
        assert!(backend.find_offer_payments("nobody").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn operator_ops() {
        let backend = ScriptedBackend::new();
        backend.connect(PAYEE, "127.0.0.1:9735").await.unwrap();
        assert_eq!(backend.peers().len(), 1);
        let opened = backend
            .open_channel(OpenChannelRequest {
                node_id: PAYEE,
                addr: "127.0.0.1:9735".into(),
                amount_sat: 100_000,
                push_msat: 1_000,
                announce: false,
            })
            .await
            .unwrap();
        let channels = backend.list_channels().await.unwrap();
        assert_eq!(channels.len(), 1);
        assert_eq!(channels[0].user_channel_id, opened);
        assert_eq!(channels[0].outbound_capacity_msat, 99_999_000);
        let info = backend.node_info().await.unwrap();
        assert_eq!(info.channels.usable, 1);
        assert_eq!(
            backend.onchain_balance().await.unwrap().spendable_sat,
            SCRIPTED_ONCHAIN_SAT - 100_000
        );
        assert_eq!(backend.onchain_address().await.unwrap().to_string().get(..4), Some("bcrt"));
        backend.close_channel(&channels[0].channel_id, false).await.unwrap();
        assert!(backend.list_channels().await.unwrap().is_empty());
        assert!(matches!(
            backend.close_channel(&channels[0].channel_id, false).await,
            Err(LightningError::Permanent(_))
        ));
    }
}
