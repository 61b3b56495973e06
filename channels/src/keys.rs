//! Public keys (BIP340 x-only) and networks.

use crate::codec::{DecodeError, Reader, Writer};
use bitcoin::secp256k1::XOnlyPublicKey;
use core::cmp::Ordering;
use core::fmt;
use core::hash::{Hash, Hasher};

/// A BIP340 x-only public key: a contributor's identity, a provider's state-signing key, an
/// evaluator's key. Ordered, compared and hashed by its 32 serialized bytes, so orderings
/// (the split's tie-break) are the same everywhere.
#[derive(Clone, Copy)]
pub struct PublicKey {
    bytes: [u8; 32],
    key: XOnlyPublicKey,
}

impl PublicKey {
    /// Parses 32 bytes; fails unless they are the x coordinate of a curve point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, DecodeError> {
        let key = XOnlyPublicKey::from_slice(&bytes)
            .map_err(|_| DecodeError::InvalidField("public key"))?;
        Ok(PublicKey { bytes, key })
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, DecodeError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| DecodeError::InvalidField("public key"))?;
        Self::from_bytes(bytes)
    }

    /// The 32 serialized bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.bytes
    }

    /// Lower-case hex of the 32 bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// The secp256k1 key.
    pub fn xonly(&self) -> &XOnlyPublicKey {
        &self.key
    }

    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.bytes);
    }

    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Self::from_bytes(r.array()?)
    }
}

impl From<XOnlyPublicKey> for PublicKey {
    fn from(key: XOnlyPublicKey) -> Self {
        PublicKey { bytes: key.serialize(), key }
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}
impl Eq for PublicKey {}
impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.bytes.cmp(&other.bytes)
    }
}
impl Hash for PublicKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.bytes.hash(state)
    }
}
impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(self.bytes))
    }
}
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.bytes))
    }
}

/// The Bitcoin network a message belongs to. Encoded as one byte with fixed numbers, so a
/// message for one network never verifies as one for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    /// Bitcoin mainnet.
    Bitcoin,
    /// testnet3.
    Testnet,
    /// testnet4.
    Testnet4,
    /// signet.
    Signet,
    /// regtest (also the dev chain).
    Regtest,
}

impl Network {
    /// The fixed wire number.
    pub fn to_byte(self) -> u8 {
        match self {
            Network::Bitcoin => 0,
            Network::Testnet => 1,
            Network::Signet => 2,
            Network::Regtest => 3,
            Network::Testnet4 => 4,
        }
    }

    /// Parses the wire number.
    pub fn from_byte(b: u8) -> Result<Self, DecodeError> {
        Ok(match b {
            0 => Network::Bitcoin,
            1 => Network::Testnet,
            2 => Network::Signet,
            3 => Network::Regtest,
            4 => Network::Testnet4,
            _ => return Err(DecodeError::InvalidField("network")),
        })
    }

    /// The matching `bitcoin` crate network.
    pub fn to_bitcoin(self) -> bitcoin::Network {
        match self {
            Network::Bitcoin => bitcoin::Network::Bitcoin,
            Network::Testnet => bitcoin::Network::Testnet,
            Network::Testnet4 => bitcoin::Network::Testnet4,
            Network::Signet => bitcoin::Network::Signet,
            Network::Regtest => bitcoin::Network::Regtest,
        }
    }

    pub(crate) fn encode_into(self, w: &mut Writer) {
        w.u8(self.to_byte());
    }

    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Self::from_byte(r.u8()?)
    }
}
