//! The off-chain channel: one per (provider, contributor), unidirectional.
//!
//! The provider (payer) signs cumulative states; the contributor (payee) verifies each and
//! keeps the latest. Both sides are pure values here: every transition returns a new value
//! and the caller persists it.
//!
//! Payer side ([`PayerChannel`]): accruals and settlements change the *head*; signing the
//! head fixes its `seq`. Many accruals between two signatures share one `seq` bump, which
//! is what keeps signing cost proportional to flushes, not to requests.
//!
//! Payee side ([`PayeeChannel`]): a state is accepted only if it is signed by the
//! provider, is for this channel and network, keeps the invariants, and moves strictly
//! forward. The same `seq` with different content is equivocation, returned with both
//! signed states as proof.

use crate::amount::{AmountError, Msat, Nsat};
use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::ids::ChannelId;
use crate::keys::{Network, PublicKey};
use crate::sign::{tagged_hash, Message, SignError, Signed};
use bitcoin::secp256k1::Keypair;

const VERSION: u8 = 1;
/// Tag of the channel-id derivation.
pub const CHANNEL_ID_TAG: &str = "tribute/channel-id/v1";
/// Encoded length of a [`ChannelState`] in bytes.
pub const CHANNEL_STATE_LEN: usize = 1 + 1 + 32 + 32 + 8 + 16 + 8 + 32 + 1;

/// `tagged_hash("tribute/channel-id/v1", provider key || contributor key || nonce)`.
pub fn derive_channel_id(
    provider: &PublicKey,
    contributor: &PublicKey,
    nonce: &[u8; 32],
) -> ChannelId {
    let mut buf = [0u8; 96];
    buf[..32].copy_from_slice(&provider.to_bytes());
    buf[32..64].copy_from_slice(&contributor.to_bytes());
    buf[64..].copy_from_slice(nonce);
    ChannelId(tagged_hash(CHANNEL_ID_TAG, &buf))
}

/// Where a channel is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChannelStatus {
    /// Accruing and settling.
    Active,
    /// No more accruals; the remaining whole msat are being settled.
    Closing,
    /// Final: everything accrued is settled.
    Closed,
}

impl ChannelStatus {
    fn to_byte(self) -> u8 {
        match self {
            ChannelStatus::Active => 0,
            ChannelStatus::Closing => 1,
            ChannelStatus::Closed => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(ChannelStatus::Active),
            1 => Ok(ChannelStatus::Closing),
            2 => Ok(ChannelStatus::Closed),
            _ => Err(DecodeError::InvalidField("status")),
        }
    }
}

/// A channel's cumulative state, signed by the provider (`tribute/channel-state/v1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelState {
    /// Network.
    pub network: Network,
    /// The channel.
    pub channel_id: ChannelId,
    /// The provider's state-signing key (not its Lightning node key).
    pub provider_key: PublicKey,
    /// Strictly increasing per signed state.
    pub seq: u64,
    /// Everything ever accrued to the contributor.
    pub accrued_nsat: Nsat,
    /// Everything ever paid over Lightning.
    pub settled_msat: Msat,
    /// Payment hash of the newest settlement, zeros before the first.
    pub last_settlement_hash: [u8; 32],
    /// Lifecycle status.
    pub status: ChannelStatus,
}

impl ChannelState {
    /// The rules every state keeps: `settled_msat * 10^6 <= accrued_nsat`; a closed
    /// channel is fully settled; the settlement hash is zero exactly when nothing is settled.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let settled = self.settled_msat.to_nsat();
        if settled > self.accrued_nsat {
            return Err("settled exceeds accrued");
        }
        if self.status == ChannelStatus::Closed && settled != self.accrued_nsat {
            return Err("closed with an unsettled balance");
        }
        if self.settled_msat.is_zero() != (self.last_settlement_hash == [0u8; 32]) {
            return Err("settlement hash inconsistent with settled amount");
        }
        Ok(())
    }

    /// Whole msat accrued but not yet settled: `floor(accrued / 10^6) - settled`.
    pub fn payable_msat(&self) -> Result<Msat, AmountError> {
        self.accrued_nsat.floor_msat()?.checked_sub(self.settled_msat)
    }

    /// Accrued but not yet settled, to the nsat.
    pub fn outstanding_nsat(&self) -> Result<Nsat, AmountError> {
        self.accrued_nsat.checked_sub(self.settled_msat.to_nsat())
    }
}

impl Encode for ChannelState {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(VERSION);
        self.network.encode_into(w);
        w.bytes(&self.channel_id.0);
        self.provider_key.encode_into(w);
        w.u64(self.seq);
        w.u128(self.accrued_nsat.0);
        w.u64(self.settled_msat.0);
        w.bytes(&self.last_settlement_hash);
        w.u8(self.status.to_byte());
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(VERSION)?;
        Ok(ChannelState {
            network: Network::decode_from(r)?,
            channel_id: ChannelId(r.array()?),
            provider_key: PublicKey::decode_from(r)?,
            seq: r.u64()?,
            accrued_nsat: Nsat(r.u128()?),
            settled_msat: Msat(r.u64()?),
            last_settlement_hash: r.array()?,
            status: ChannelStatus::from_byte(r.u8()?)?,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(CHANNEL_STATE_LEN);
        self.encode_into(&mut w);
        w.finish()
    }
}

impl Message for ChannelState {
    const TAG: &'static str = "tribute/channel-state/v1";
    fn signer(&self) -> PublicKey {
        self.provider_key
    }
}

/// What identifies a channel: both parties, the network and the nonce its id is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelParams {
    /// Network.
    pub network: Network,
    /// The provider's state-signing key.
    pub provider_key: PublicKey,
    /// The contributor.
    pub contributor_key: PublicKey,
    /// Chosen at open; a re-opened channel gets a new nonce, so a new id.
    pub nonce: [u8; 32],
}

impl ChannelParams {
    /// The channel id these parameters derive.
    pub fn channel_id(&self) -> ChannelId {
        derive_channel_id(&self.provider_key, &self.contributor_key, &self.nonce)
    }
}

/// Why a payer-side transition was refused. Nothing changes when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The operation needs another status.
    #[error("channel is {0:?}")]
    WrongStatus(ChannelStatus),
    /// Amount arithmetic failed.
    #[error(transparent)]
    Amount(#[from] AmountError),
    /// A settlement larger than the whole msat owed.
    #[error("settlement of {amount} exceeds payable {payable}")]
    ExceedsPayable {
        /// Requested.
        amount: Msat,
        /// Payable now.
        payable: Msat,
    },
    /// Zero amount where a positive one is needed.
    #[error("amount must be positive")]
    ZeroAmount,
    /// Payment hash zero or equal to the previous settlement's.
    #[error("payment hash must be fresh and non-zero")]
    BadPaymentHash,
    /// Closing needs every whole msat settled first.
    #[error("channel still owes {0}")]
    Unsettled(Msat),
    /// `seq` would pass `u64::MAX`.
    #[error("sequence numbers exhausted")]
    SeqExhausted,
    /// A restored state breaks an invariant.
    #[error("invariant broken: {0}")]
    Invariant(&'static str),
    /// Signing failed (wrong key).
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// The provider's side of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayerChannel {
    /// The head: the last signed state, or the next one to sign if `signed` is false.
    head: ChannelState,
    signed: bool,
}

impl PayerChannel {
    /// A new channel: seq 0, nothing accrued, not yet signed.
    pub fn open(params: &ChannelParams) -> Self {
        PayerChannel {
            head: ChannelState {
                network: params.network,
                channel_id: params.channel_id(),
                provider_key: params.provider_key,
                seq: 0,
                accrued_nsat: Nsat::ZERO,
                settled_msat: Msat::ZERO,
                last_settlement_hash: [0; 32],
                status: ChannelStatus::Active,
            },
            signed: false,
        }
    }

    /// Rebuilds a channel from storage: `head` and whether that exact head was signed.
    pub fn restore(head: ChannelState, signed: bool) -> Result<Self, ChannelError> {
        head.check_invariants().map_err(ChannelError::Invariant)?;
        Ok(PayerChannel { head, signed })
    }

    /// The head state (signed or pending signature).
    pub fn head(&self) -> &ChannelState {
        &self.head
    }

    /// Whether the head has changed since the last signature.
    pub fn needs_signature(&self) -> bool {
        !self.signed
    }

    /// Whole msat owed now.
    pub fn payable_msat(&self) -> Result<Msat, AmountError> {
        self.head.payable_msat()
    }

    fn change(&self, f: impl FnOnce(&mut ChannelState)) -> Result<Self, ChannelError> {
        let mut head = self.head;
        if self.signed {
            head.seq = head.seq.checked_add(1).ok_or(ChannelError::SeqExhausted)?;
        }
        f(&mut head);
        head.check_invariants().map_err(ChannelError::Invariant)?;
        Ok(PayerChannel { head, signed: false })
    }

    /// Adds an accrual (e.g. one batch's sum for this contributor).
    pub fn accrue(&self, amount: Nsat) -> Result<Self, ChannelError> {
        if self.head.status != ChannelStatus::Active {
            return Err(ChannelError::WrongStatus(self.head.status));
        }
        if amount.is_zero() {
            return Ok(self.clone());
        }
        let accrued_nsat = self.head.accrued_nsat.checked_add(amount)?;
        self.change(|h| h.accrued_nsat = accrued_nsat)
    }

    /// Records a succeeded settlement of `amount` with `payment_hash`.
    pub fn settle(&self, amount: Msat, payment_hash: [u8; 32]) -> Result<Self, ChannelError> {
        if self.head.status == ChannelStatus::Closed {
            return Err(ChannelError::WrongStatus(self.head.status));
        }
        if amount.is_zero() {
            return Err(ChannelError::ZeroAmount);
        }
        if payment_hash == [0; 32] || payment_hash == self.head.last_settlement_hash {
            return Err(ChannelError::BadPaymentHash);
        }
        let payable = self.payable_msat()?;
        if amount > payable {
            return Err(ChannelError::ExceedsPayable { amount, payable });
        }
        let settled_msat = self.head.settled_msat.checked_add(amount)?;
        self.change(|h| {
            h.settled_msat = settled_msat;
            h.last_settlement_hash = payment_hash;
        })
    }

    /// Starts closing: no more accruals; the sub-msat remainder is rounded up in the
    /// contributor's favour. Returns the new channel and the rounding credited (`< 1 msat`),
    /// which the caller records so conservation can account for it.
    pub fn begin_close(&self) -> Result<(Self, Nsat), ChannelError> {
        if self.head.status != ChannelStatus::Active {
            return Err(ChannelError::WrongStatus(self.head.status));
        }
        let rounded = self.head.accrued_nsat.ceil_msat()?.to_nsat();
        let rounding = rounded.checked_sub(self.head.accrued_nsat)?;
        let next = self.change(|h| {
            h.accrued_nsat = rounded;
            h.status = ChannelStatus::Closing;
        })?;
        Ok((next, rounding))
    }

    /// Finishes closing once every msat is settled.
    pub fn finish_close(&self) -> Result<Self, ChannelError> {
        if self.head.status != ChannelStatus::Closing {
            return Err(ChannelError::WrongStatus(self.head.status));
        }
        let owed = self.payable_msat()?;
        if !owed.is_zero() {
            return Err(ChannelError::Unsettled(owed));
        }
        self.change(|h| h.status = ChannelStatus::Closed)
    }

    /// Signs the head. Returns the channel marked signed and the signed state.
    pub fn sign(
        &self,
        keypair: &Keypair,
        aux_rand: &[u8; 32],
    ) -> Result<(Self, Signed<ChannelState>), ChannelError> {
        self.head.check_invariants().map_err(ChannelError::Invariant)?;
        let signed = Signed::sign(self.head, keypair, aux_rand)?;
        Ok((PayerChannel { head: self.head, signed: true }, signed))
    }
}

/// Two validly signed states of one channel with the same `seq` and different content:
/// proof that the provider equivocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EquivocationProof {
    /// The state held first.
    pub first: Signed<ChannelState>,
    /// The conflicting state received.
    pub second: Signed<ChannelState>,
}

impl EquivocationProof {
    /// Whether this really proves equivocation: both signatures valid, same provider,
    /// channel and seq, different content.
    pub fn is_valid(&self) -> bool {
        let (a, b) = (&self.first.message, &self.second.message);
        a.provider_key == b.provider_key
            && a.channel_id == b.channel_id
            && a.network == b.network
            && a.seq == b.seq
            && a != b
            && self.first.verify().is_ok()
            && self.second.verify().is_ok()
    }
}

/// Why the payee refused a state. The payee's stored state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The state is for another network.
    #[error("state is for another network")]
    WrongNetwork,
    /// The state is for another channel.
    #[error("state is for another channel")]
    WrongChannel,
    /// The state names another provider key.
    #[error("state names another provider key")]
    WrongProvider,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The state breaks a rule every state keeps.
    #[error("invariant broken: {0}")]
    Invariant(&'static str),
    /// Exactly the latest state again.
    #[error("replay of the latest state")]
    Replay,
    /// Older `seq`, or a balance that went down.
    #[error("regression of {field}")]
    Regression {
        /// `seq`, `accrued_nsat`, `settled_msat` or `status`.
        field: &'static str,
    },
    /// The settlement hash changed without a settlement, or a settlement reused a hash.
    #[error("settlement hash inconsistent with the settled amount")]
    SettlementHash,
    /// A state after the channel closed.
    #[error("channel already closed")]
    AfterClose,
    /// Same `seq` as the latest with different content.
    #[error("equivocation at seq {}", .0.first.message.seq)]
    Equivocation(Box<EquivocationProof>),
}

impl Rejection {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::WrongNetwork => "WRONG_NETWORK",
            Rejection::WrongChannel => "WRONG_CHANNEL",
            Rejection::WrongProvider => "WRONG_PROVIDER",
            Rejection::BadSignature => "BAD_SIGNATURE",
            Rejection::Invariant(_) => "INVARIANT_BROKEN",
            Rejection::Replay => "REPLAY",
            Rejection::Regression { .. } => "STATE_REGRESSION",
            Rejection::SettlementHash => "SETTLEMENT_HASH_INCONSISTENT",
            Rejection::AfterClose => "CHANNEL_CLOSED",
            Rejection::Equivocation(_) => "EQUIVOCATION",
        }
    }
}

/// The contributor's side of a channel: the latest verified state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayeeChannel {
    network: Network,
    provider_key: PublicKey,
    channel_id: ChannelId,
    latest: Option<Signed<ChannelState>>,
}

impl PayeeChannel {
    /// A channel with no state yet. The id is derived from `params`, so a channel whose id
    /// does not bind this contributor can't be constructed.
    pub fn new(params: &ChannelParams) -> Self {
        PayeeChannel {
            network: params.network,
            provider_key: params.provider_key,
            channel_id: params.channel_id(),
            latest: None,
        }
    }

    /// Rebuilds from storage; the stored state is checked like an incoming one.
    pub fn restore(
        params: &ChannelParams,
        latest: Signed<ChannelState>,
    ) -> Result<Self, Rejection> {
        Self::new(params).accept(latest)
    }

    /// The channel id.
    pub fn channel_id(&self) -> ChannelId {
        self.channel_id
    }

    /// The latest accepted state.
    pub fn latest(&self) -> Option<&Signed<ChannelState>> {
        self.latest.as_ref()
    }

    /// Verifies `incoming` and returns the channel with it as the latest state.
    pub fn accept(&self, incoming: Signed<ChannelState>) -> Result<Self, Rejection> {
        let s = &incoming.message;
        if s.network != self.network {
            return Err(Rejection::WrongNetwork);
        }
        if s.channel_id != self.channel_id {
            return Err(Rejection::WrongChannel);
        }
        if s.provider_key != self.provider_key {
            return Err(Rejection::WrongProvider);
        }
        incoming.verify().map_err(|_| Rejection::BadSignature)?;
        s.check_invariants().map_err(Rejection::Invariant)?;
        if let Some(prev) = &self.latest {
            check_successor(prev, &incoming)?;
        }
        Ok(PayeeChannel { latest: Some(incoming), ..self.clone() })
    }
}

fn check_successor(
    prev: &Signed<ChannelState>,
    next: &Signed<ChannelState>,
) -> Result<(), Rejection> {
    let (p, n) = (&prev.message, &next.message);
    if n.seq == p.seq {
        return Err(if n == p {
            Rejection::Replay
        } else {
            Rejection::Equivocation(Box::new(EquivocationProof { first: *prev, second: *next }))
        });
    }
    if n.seq < p.seq {
        return Err(Rejection::Regression { field: "seq" });
    }
    if p.status == ChannelStatus::Closed {
        return Err(Rejection::AfterClose);
    }
    if n.accrued_nsat < p.accrued_nsat {
        return Err(Rejection::Regression { field: "accrued_nsat" });
    }
    if n.settled_msat < p.settled_msat {
        return Err(Rejection::Regression { field: "settled_msat" });
    }
    if p.status == ChannelStatus::Closing && n.status == ChannelStatus::Active {
        return Err(Rejection::Regression { field: "status" });
    }
    if p.status == ChannelStatus::Closing && n.accrued_nsat != p.accrued_nsat {
        return Err(Rejection::Invariant("accrual after close began"));
    }
    let hash_changed = n.last_settlement_hash != p.last_settlement_hash;
    if hash_changed != (n.settled_msat != p.settled_msat) {
        return Err(Rejection::SettlementHash);
    }
    Ok(())
}
