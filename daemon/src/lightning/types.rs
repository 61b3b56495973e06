//! The values that cross the [`LightningBackend`](super::LightningBackend) trait: ids,
//! requests, payment statuses, events and the operator views of the node. They carry no
//! ldk-node types, so a later LND or CLN backend speaks the same language; chain types come
//! from `ldk_node::bitcoin` (the one `bitcoin` copy in the graph).

use std::fmt;

use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::bitcoin::{Network, Txid};

use super::error::LightningError;

/// Smallest custom TLV type a keysend may carry: lower types belong to the BOLTs.
pub const MIN_CUSTOM_TLV_TYPE: u64 = 1 << 16;
/// Custom TLV types LDK reserves for itself (the keysend preimage record is even, so the odd
/// rule refuses it already; 77 777 is the async-payments invoice request record).
pub const RESERVED_CUSTOM_TLV_TYPES: [u64; 2] = [5_482_373_484, 77_777];
/// Most custom TLV records one keysend may carry.
pub const MAX_CUSTOM_TLVS: usize = 16;
/// Most custom TLV value bytes one keysend may carry in total. The onion has 1300 bytes for
/// every hop's payload; this leaves room for a route of several hops, so an oversized record
/// set is refused here rather than failing inside the node as an opaque send failure.
pub const MAX_CUSTOM_TLV_VALUE_BYTES: usize = 512;
/// Longest BOLT12 payer note, in bytes: LDK truncates longer notes
/// (`PAYER_NOTE_LIMIT`), which would break finding the payment again by its note.
pub const MAX_PAYER_NOTE_BYTES: usize = 512;

/// Writes `bytes` as lower-case hex.
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// The id under which a backend tracks an outbound payment.
///
/// For keysend it is the payment hash, `sha256(preimage)`, so the caller knows it before
/// paying and a repeat is refused as a duplicate. For BOLT12 the node picks it at random and
/// returns it from [`pay_offer`](super::LightningBackend::pay_offer).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PaymentId(pub [u8; 32]);

impl PaymentId {
    /// The id of a keysend paying with `preimage`: its payment hash.
    pub fn for_preimage(preimage: &[u8; 32]) -> PaymentId {
        PaymentId(payment_hash(preimage))
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PaymentId({self})")
    }
}

/// `sha256(preimage)`: the payment hash a preimage unlocks.
pub fn payment_hash(preimage: &[u8; 32]) -> [u8; 32] {
    sha256::Hash::hash(preimage).to_byte_array()
}

/// A Lightning channel id (the funding outpoint folded into 32 bytes once funded).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub [u8; 32]);

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({self})")
    }
}

/// The local, stable id a channel gets when we open it (the [`ChannelId`] changes once, when
/// the funding transaction is known).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserChannelId(pub u128);

/// A keysend payment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeysendRequest {
    /// The payee's node id (a compressed secp256k1 public key).
    pub dest_node_id: [u8; 33],
    /// What the payee receives, in msat; above zero.
    pub amount_msat: u64,
    /// The preimage; the payment id is `sha256(preimage)`. Derive it deterministically from
    /// the settlement so a repeat is refused as [`LightningError::Duplicate`].
    pub preimage: [u8; 32],
    /// Custom TLV records: types at least [`MIN_CUSTOM_TLV_TYPE`], odd, unique, not
    /// reserved; at most [`MAX_CUSTOM_TLVS`] records and [`MAX_CUSTOM_TLV_VALUE_BYTES`] bytes.
    pub custom_tlvs: Vec<(u64, Vec<u8>)>,
    /// Most routing fees this payment may cost, in msat, across all retries.
    pub max_fee_msat: u64,
}

impl KeysendRequest {
    /// The payment id this request pays under.
    pub fn payment_id(&self) -> PaymentId {
        PaymentId::for_preimage(&self.preimage)
    }

    /// Checks everything a backend can check before touching the node, so that every
    /// backend refuses the same requests the same way.
    pub fn validate(&self) -> Result<(), LightningError> {
        if self.amount_msat == 0 {
            return Err(LightningError::Permanent("keysend amount must be above zero".into()));
        }
        validate_custom_tlvs(&self.custom_tlvs)
    }
}

/// Checks custom TLV records against the rules of [`KeysendRequest::custom_tlvs`].
pub fn validate_custom_tlvs(tlvs: &[(u64, Vec<u8>)]) -> Result<(), LightningError> {
    if tlvs.len() > MAX_CUSTOM_TLVS {
        return Err(LightningError::Permanent(format!(
            "{} custom TLV records, at most {MAX_CUSTOM_TLVS} allowed",
            tlvs.len()
        )));
    }
    let value_bytes: usize = tlvs.iter().map(|(_, value)| value.len()).sum();
    if value_bytes > MAX_CUSTOM_TLV_VALUE_BYTES {
        return Err(LightningError::Permanent(format!(
            "{value_bytes} bytes of custom TLV values, at most {MAX_CUSTOM_TLV_VALUE_BYTES} allowed"
        )));
    }
    let mut types: Vec<u64> = tlvs.iter().map(|(t, _)| *t).collect();
    for &t in &types {
        if t < MIN_CUSTOM_TLV_TYPE {
            return Err(LightningError::Permanent(format!(
                "custom TLV type {t} is below {MIN_CUSTOM_TLV_TYPE}"
            )));
        }
        if t % 2 == 0 {
            // The payee fails back unknown even types ("it's OK to be odd").
            return Err(LightningError::Permanent(format!("custom TLV type {t} is even")));
        }
        if RESERVED_CUSTOM_TLV_TYPES.contains(&t) {
            return Err(LightningError::Permanent(format!("custom TLV type {t} is reserved")));
        }
    }
    types.sort_unstable();
    if let Some(pair) = types.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(LightningError::Permanent(format!(
            "custom TLV type {} appears more than once",
            pair[0]
        )));
    }
    Ok(())
}

/// A payment to a BOLT12 offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferRequest {
    /// The offer, bech32 (`lno1…`).
    pub offer: String,
    /// What to pay, in msat; above zero and at least the offer's own amount, if it has one.
    pub amount_msat: u64,
    /// A note the payee sees and the node stores with the payment; name the settlement in it
    /// so the payment can be found again with
    /// [`find_offer_payments`](super::LightningBackend::find_offer_payments). At most
    /// [`MAX_PAYER_NOTE_BYTES`] bytes.
    pub payer_note: String,
    /// Most routing fees this payment may cost, in msat, across all retries.
    pub max_fee_msat: u64,
}

impl OfferRequest {
    /// Checks what a backend can check without parsing the offer.
    pub fn validate(&self) -> Result<(), LightningError> {
        if self.amount_msat == 0 {
            return Err(LightningError::Permanent("offer amount must be above zero".into()));
        }
        if self.offer.trim().is_empty() {
            return Err(LightningError::Permanent("empty offer".into()));
        }
        if self.payer_note.len() > MAX_PAYER_NOTE_BYTES {
            return Err(LightningError::Permanent(format!(
                "payer note of {} bytes, at most {MAX_PAYER_NOTE_BYTES} allowed",
                self.payer_note.len()
            )));
        }
        Ok(())
    }
}

/// What a successful pay call returns: the payment is in flight (or already done).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaymentRef {
    /// The id to ask [`payment_status`](super::LightningBackend::payment_status) about.
    pub payment_id: PaymentId,
    /// The payment hash when known at send time (keysend); `None` for BOLT12 until the
    /// payee's invoice arrives.
    pub payment_hash: Option<[u8; 32]>,
}

/// Where an outbound payment stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentStatus {
    /// In flight: neither outcome is final yet. Ask again later; never pay again.
    Pending,
    /// Paid. `sha256(preimage)` is the payment hash (the proof of payment).
    Succeeded {
        /// The preimage the payee released.
        preimage: [u8; 32],
        /// Routing fees paid, when the node knows them.
        fee_paid_msat: Option<u64>,
    },
    /// Definitely not paid: nothing is in flight and no money moved. The amount is still
    /// owed and may be paid again (see the module docs on retrying with the same id).
    Failed {
        /// Why.
        reason: FailureReason,
    },
    /// The backend has no record of this id: it was never handed to the node, or the node's
    /// record is gone. Distinct from `Failed`: it says nothing about money that may have
    /// moved under another id.
    Unknown,
}

impl PaymentStatus {
    /// `true` for `Succeeded` and `Failed`: the outcome will not change.
    pub fn is_final(&self) -> bool {
        matches!(self, PaymentStatus::Succeeded { .. } | PaymentStatus::Failed { .. })
    }
}

/// Why a payment definitely failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The node refused to start the payment, so nothing was sent: usually no usable route
    /// (payee offline, channel not ready, not enough outbound liquidity or fee budget).
    SendFailed(String),
    /// The payee rejected the payment (e.g. it does not accept keysend, or an unknown even
    /// TLV).
    RecipientRejected,
    /// No route could be found (when retrying inside the node).
    RouteNotFound,
    /// The node's retry budget (time or attempts) ran out.
    RetriesExhausted,
    /// The payment or invoice expired before it could complete.
    PaymentExpired,
    /// BOLT12: the payee never answered the invoice request.
    InvoiceRequestExpired,
    /// BOLT12: the payee refused the invoice request.
    InvoiceRequestRejected,
    /// BOLT12: no blinded path to the payee could be built.
    BlindedPathCreationFailed,
    /// The payee's invoice needs features the node does not support.
    UnknownRequiredFeatures,
    /// The payment was abandoned by the node's user.
    UserAbandoned,
    /// Anything else the node reported.
    Other(String),
    /// The node reports the payment failed but the reason was not recorded (the backend was
    /// restarted since, or the record is older than its memory).
    NotRecorded,
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::SendFailed(why) => write!(f, "the node refused to send: {why}"),
            FailureReason::RecipientRejected => f.write_str("the recipient rejected the payment"),
            FailureReason::RouteNotFound => f.write_str("no route found"),
            FailureReason::RetriesExhausted => f.write_str("retries exhausted"),
            FailureReason::PaymentExpired => f.write_str("payment expired"),
            FailureReason::InvoiceRequestExpired => f.write_str("invoice request expired"),
            FailureReason::InvoiceRequestRejected => f.write_str("invoice request rejected"),
            FailureReason::BlindedPathCreationFailed => f.write_str("no blinded path to the payee"),
            FailureReason::UnknownRequiredFeatures => f.write_str("unknown required features"),
            FailureReason::UserAbandoned => f.write_str("payment abandoned"),
            FailureReason::Other(why) => f.write_str(why),
            FailureReason::NotRecorded => f.write_str("failed (reason not recorded)"),
        }
    }
}

/// Something the node reports. Payment outcomes are also visible through
/// [`payment_status`](super::LightningBackend::payment_status), which is the source of truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LightningEvent {
    /// An outbound payment succeeded.
    PaymentSucceeded {
        /// Its id.
        payment_id: PaymentId,
        /// Its payment hash, `sha256(preimage)`.
        payment_hash: [u8; 32],
        /// The proof of payment.
        preimage: [u8; 32],
        /// Routing fees paid, when known.
        fee_paid_msat: Option<u64>,
    },
    /// An outbound payment definitely failed.
    PaymentFailed {
        /// Its id.
        payment_id: PaymentId,
        /// Its payment hash; `None` for a BOLT12 payment that failed before an invoice came.
        payment_hash: Option<[u8; 32]>,
        /// Why.
        reason: FailureReason,
    },
    /// An inbound payment was received (claimed).
    PaymentReceived {
        /// Its payment hash.
        payment_hash: [u8; 32],
        /// What arrived, in msat.
        amount_msat: u64,
        /// The custom TLV records the payer attached, sorted by type.
        custom_tlvs: Vec<(u64, Vec<u8>)>,
    },
    /// A channel's funding transaction was broadcast; it waits for confirmations.
    ChannelPending {
        /// The channel (funded id).
        channel_id: ChannelId,
        /// Our local id for it.
        user_channel_id: UserChannelId,
        /// The peer.
        counterparty: [u8; 33],
        /// The funding transaction.
        funding_txid: Txid,
    },
    /// A channel can carry payments.
    ChannelReady {
        /// The channel.
        channel_id: ChannelId,
        /// Our local id for it.
        user_channel_id: UserChannelId,
        /// The peer, when known.
        counterparty: Option<[u8; 33]>,
    },
    /// A channel closed.
    ChannelClosed {
        /// The channel.
        channel_id: ChannelId,
        /// Our local id for it.
        user_channel_id: UserChannelId,
        /// The peer, when known.
        counterparty: Option<[u8; 33]>,
        /// Why, as the node words it.
        reason: String,
    },
}

/// A summary of the node's channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelsSummary {
    /// All channels, in any state.
    pub total: u32,
    /// Channels that can carry a payment now (ready and peer connected).
    pub usable: u32,
    /// Sum of what we can send now, in msat.
    pub outbound_capacity_msat: u64,
    /// Sum of what we can receive now, in msat.
    pub inbound_capacity_msat: u64,
}

impl ChannelsSummary {
    /// Sums a channel list.
    pub fn of(channels: &[ChannelInfo]) -> ChannelsSummary {
        let mut summary = ChannelsSummary::default();
        for c in channels {
            summary.total = summary.total.saturating_add(1);
            summary.usable = summary.usable.saturating_add(u32::from(c.usable));
            summary.outbound_capacity_msat =
                summary.outbound_capacity_msat.saturating_add(c.outbound_capacity_msat);
            summary.inbound_capacity_msat =
                summary.inbound_capacity_msat.saturating_add(c.inbound_capacity_msat);
        }
        summary
    }
}

/// Who and where the node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Our node id.
    pub node_id: [u8; 33],
    /// The chain the node runs on.
    pub network: Network,
    /// Height of the best block the node has seen.
    pub block_height: u32,
    /// Addresses the node listens on (`host:port`).
    pub listening_addresses: Vec<String>,
    /// Its channels, summed.
    pub channels: ChannelsSummary,
}

/// One channel as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The channel id.
    pub channel_id: ChannelId,
    /// Our local id for it.
    pub user_channel_id: UserChannelId,
    /// The peer.
    pub counterparty: [u8; 33],
    /// The channel's size, in sat.
    pub capacity_sat: u64,
    /// What we can send over it now, in msat: our balance less the reserve the peer requires
    /// and less HTLCs in flight.
    pub outbound_capacity_msat: u64,
    /// What we can receive over it now, in msat.
    pub inbound_capacity_msat: u64,
    /// Both sides sent `channel_ready` (the funding is confirmed deeply enough).
    pub ready: bool,
    /// Ready and the peer is connected: it can carry a payment now.
    pub usable: bool,
    /// Announced to the network graph (public) rather than private.
    pub announced: bool,
    /// We opened it.
    pub outbound: bool,
    /// The funding transaction, once known.
    pub funding_txid: Option<Txid>,
    /// Confirmations of the funding transaction, when known.
    pub confirmations: Option<u32>,
}

/// The node's on-chain wallet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnchainBalance {
    /// Everything the wallet holds, confirmed or not, in sat.
    pub total_sat: u64,
    /// What can be spent now (less the anchor-channel reserve), in sat.
    pub spendable_sat: u64,
    /// Kept back for fee-bumping anchor channels' closing transactions, in sat.
    pub anchor_reserve_sat: u64,
    /// Our side of all channels, as the channel monitors count it, in sat.
    pub lightning_sat: u64,
}

/// A channel to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenChannelRequest {
    /// The peer's node id.
    pub node_id: [u8; 33],
    /// The peer's address, `host:port`.
    pub addr: String,
    /// The channel's size, in sat.
    pub amount_sat: u64,
    /// Given to the peer at opening, in msat (usually 0).
    pub push_msat: u64,
    /// Announce it to the network graph (public channel). Announcing needs a node alias and
    /// listening addresses, and takes ~30 s on the dev chain; private channels suffice for
    /// keysend to a direct peer.
    pub announce: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_id_of_a_preimage_is_its_sha256() {
        let preimage = [7u8; 32];
        let id = PaymentId::for_preimage(&preimage);
        assert_eq!(id.0, sha256::Hash::hash(&preimage).to_byte_array());
        assert_eq!(id.to_string().len(), 64);
        assert!(format!("{id:?}").starts_with("PaymentId("));
    }

    #[test]
    fn custom_tlv_rules() {
        let ok = |tlvs: Vec<(u64, Vec<u8>)>| validate_custom_tlvs(&tlvs).is_ok();
        assert!(ok(vec![]));
        assert!(ok(vec![(65_537, vec![1]), (65_539, vec![])]));
        assert!(!ok(vec![(1, vec![])]), "below 2^16");
        assert!(!ok(vec![(65_536, vec![])]), "even");
        assert!(!ok(vec![(77_777, vec![])]), "reserved");
        assert!(!ok(vec![(65_537, vec![]), (65_537, vec![])]), "repeated");
        assert!(!ok(vec![(65_537, vec![0; MAX_CUSTOM_TLV_VALUE_BYTES + 1])]), "too many bytes");
        let many = (0..=MAX_CUSTOM_TLVS as u64).map(|i| (65_537 + 2 * i, vec![])).collect();
        assert!(!ok(many), "too many records");
    }

    #[test]
    fn offer_request_rules() {
        let request = OfferRequest {
            offer: "lno1xyz".into(),
            amount_msat: 1,
            payer_note: "n".into(),
            max_fee_msat: 0,
        };
        assert!(request.validate().is_ok());
        assert!(OfferRequest { amount_msat: 0, ..request.clone() }.validate().is_err());
        assert!(OfferRequest { offer: " ".into(), ..request.clone() }.validate().is_err());
        let long_note = "x".repeat(MAX_PAYER_NOTE_BYTES + 1);
        assert!(OfferRequest { payer_note: long_note, ..request }.validate().is_err());
    }
}
