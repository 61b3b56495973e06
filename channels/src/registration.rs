//! Contributor registration: a contributor's key announces where it wants to be paid.
//!
//! Signed by the contributor key under `tribute/contributor-registration/v1`. A later
//! registration (greater `registered_at`) replaces an earlier one.

use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::ids::Timestamp;
use crate::keys::{Network, PublicKey};
use crate::sign::Message;

const VERSION: u8 = 1;
/// Longest BOLT12 offer accepted, in bytes.
pub const MAX_OFFER_LEN: usize = 2048;

const HAS_NODE_ID: u8 = 0b01;
const HAS_OFFER: u8 = 0b10;

/// A contributor's payout destinations, signed by the contributor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContributorRegistration {
    /// Network the payouts happen on.
    pub network: Network,
    /// The contributor's identity.
    pub contributor_key: PublicKey,
    /// Lightning node id (33-byte compressed key) for keysend payouts.
    pub node_id: Option<[u8; 33]>,
    /// A BOLT12 offer (`lno1…`) for offer payouts.
    pub bolt12_offer: Option<String>,
    /// When the contributor signed this; later registrations replace earlier ones.
    pub registered_at: Timestamp,
}

/// Why a registration is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// Neither a node id nor an offer was given.
    #[error("a registration needs a node id or a BOLT12 offer")]
    NoPayoutDestination,
    /// The node id is not a valid compressed public key.
    #[error("node id is not a valid compressed public key")]
    BadNodeId,
    /// The offer is not a plausible BOLT12 offer string.
    #[error("BOLT12 offer must be 5..={MAX_OFFER_LEN} bech32 characters starting with `lno1`")]
    BadOffer,
}

impl ContributorRegistration {
    /// Checks the payout destinations' form (a full BOLT12 parse happens where Lightning
    /// code is available).
    pub fn validate(&self) -> Result<(), RegistrationError> {
        if self.node_id.is_none() && self.bolt12_offer.is_none() {
            return Err(RegistrationError::NoPayoutDestination);
        }
        if let Some(node_id) = &self.node_id {
            bitcoin::secp256k1::PublicKey::from_slice(node_id)
                .map_err(|_| RegistrationError::BadNodeId)?;
        }
        if let Some(offer) = &self.bolt12_offer {
            let bech32_body = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            if offer.len() < 5
                || offer.len() > MAX_OFFER_LEN
                || !offer.starts_with("lno1")
                || !offer.bytes().all(bech32_body)
            {
                return Err(RegistrationError::BadOffer);
            }
        }
        Ok(())
    }
}

impl Encode for ContributorRegistration {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(VERSION);
        self.network.encode_into(w);
        self.contributor_key.encode_into(w);
        let flags = if self.node_id.is_some() { HAS_NODE_ID } else { 0 }
            | if self.bolt12_offer.is_some() { HAS_OFFER } else { 0 };
        w.u8(flags);
        if let Some(node_id) = &self.node_id {
            w.bytes(node_id);
        }
        if let Some(offer) = &self.bolt12_offer {
            w.long_bytes(offer.as_bytes());
        }
        w.u64(self.registered_at.0);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(VERSION)?;
        let network = Network::decode_from(r)?;
        let contributor_key = PublicKey::decode_from(r)?;
        let flags = r.u8()?;
        if flags & !(HAS_NODE_ID | HAS_OFFER) != 0 {
            return Err(DecodeError::InvalidField("flags"));
        }
        let node_id = if flags & HAS_NODE_ID != 0 { Some(r.array::<33>()?) } else { None };
        let bolt12_offer = if flags & HAS_OFFER != 0 {
            let raw = r.long_bytes("bolt12_offer", MAX_OFFER_LEN)?;
            let s =
                core::str::from_utf8(raw).map_err(|_| DecodeError::InvalidField("bolt12_offer"))?;
            Some(s.to_owned())
        } else {
            None
        };
        let registered_at = Timestamp(r.u64()?);
        let reg = ContributorRegistration {
            network,
            contributor_key,
            node_id,
            bolt12_offer,
            registered_at,
        };
        reg.validate().map_err(|e| {
            DecodeError::InvalidField(match e {
                RegistrationError::BadOffer => "bolt12_offer",
                _ => "node_id",
            })
        })?;
        Ok(reg)
    }
}

impl Message for ContributorRegistration {
    const TAG: &'static str = "tribute/contributor-registration/v1";
    fn signer(&self) -> PublicKey {
        self.contributor_key
    }
}
