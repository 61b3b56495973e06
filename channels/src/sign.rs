//! Domain-separated BIP340 signatures.
//!
//! Every signed message type has its own tag (`tribute/<kind>/v1`) and is signed over
//! `tagged_hash(tag, canonical_bytes)` as in BIP340, so a signature made for one kind of
//! message never verifies as another. A [`Signed`] value is the message plus the 64-byte
//! signature by the key the message names as its signer.

use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::keys::PublicKey;
use bitcoin::hashes::{sha256, Hash, HashEngine};
use bitcoin::secp256k1::{self, schnorr, All, Keypair, Secp256k1};
use std::sync::OnceLock;

/// `sha256(sha256(tag) || sha256(tag) || msg)`, the BIP340 tagged hash.
pub fn tagged_hash(tag: &str, msg: &[u8]) -> [u8; 32] {
    let tag_hash = sha256::Hash::hash(tag.as_bytes());
    let mut engine = sha256::Hash::engine();
    engine.input(tag_hash.as_ref());
    engine.input(tag_hash.as_ref());
    engine.input(msg);
    sha256::Hash::from_engine(engine).to_byte_array()
}

/// The process-wide secp256k1 context (built once; building one costs ~ms).
pub fn secp() -> &'static Secp256k1<All> {
    static SECP: OnceLock<Secp256k1<All>> = OnceLock::new();
    SECP.get_or_init(Secp256k1::new)
}

/// A message that is signed: its tag, its canonical bytes, and who must sign it.
pub trait Message: Encode {
    /// The domain-separation tag, e.g. `tribute/channel-state/v1`.
    const TAG: &'static str;

    /// The key whose signature makes this message valid.
    fn signer(&self) -> PublicKey;

    /// The 32-byte digest that is signed.
    fn signing_digest(&self) -> [u8; 32] {
        tagged_hash(Self::TAG, &self.encode())
    }
}

/// Why signing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The key pair is not the key the message names as its signer.
    #[error("key pair does not match the message's signer {expected}")]
    WrongKey {
        /// The signer the message names.
        expected: PublicKey,
    },
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature is not a valid BIP340 signature of this message by its signer.
    #[error("bad signature")]
    BadSignature,
}

/// A message with its BIP340 signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signed<M> {
    /// The message.
    pub message: M,
    /// The signature over `tagged_hash(M::TAG, message bytes)`.
    pub signature: schnorr::Signature,
}

impl<M: Message> Signed<M> {
    /// Signs `message` with `keypair`, which must be the message's signer. `aux_rand` is
    /// BIP340's auxiliary randomness (fresh random bytes in production; fixed in test vectors).
    pub fn sign(message: M, keypair: &Keypair, aux_rand: &[u8; 32]) -> Result<Self, SignError> {
        let expected = message.signer();
        if PublicKey::from(keypair.x_only_public_key().0) != expected {
            return Err(SignError::WrongKey { expected });
        }
        let digest = secp256k1::Message::from_digest(message.signing_digest());
        let signature = secp().sign_schnorr_with_aux_rand(&digest, keypair, aux_rand);
        Ok(Signed { message, signature })
    }

    /// Checks the signature against the message's signer.
    pub fn verify(&self) -> Result<(), VerifyError> {
        let digest = secp256k1::Message::from_digest(self.message.signing_digest());
        secp()
            .verify_schnorr(&self.signature, &digest, self.message.signer().xonly())
            .map_err(|_| VerifyError::BadSignature)
    }

    /// Decodes and verifies in one step: the only way untrusted bytes should become a
    /// `Signed` value.
    pub fn decode_verified(bytes: &[u8]) -> Result<Self, SignedDecodeError> {
        let signed = Self::decode(bytes)?;
        signed.verify()?;
        Ok(signed)
    }
}

/// Decoding or verification of a signed message failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedDecodeError {
    /// The bytes are malformed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The signature is bad.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// Wire form: the message's canonical bytes followed by the 64 signature bytes.
impl<M: Message> Encode for Signed<M> {
    fn encode_into(&self, w: &mut Writer) {
        self.message.encode_into(w);
        w.bytes(self.signature.as_ref());
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let message = M::decode_from(r)?;
        let raw: [u8; 64] = r.array()?;
        let signature = schnorr::Signature::from_slice(&raw)
            .map_err(|_| DecodeError::InvalidField("signature"))?;
        Ok(Signed { message, signature })
    }
}

/// Every tag this crate signs under; tests check that no signature crosses between them.
pub const ALL_TAGS: &[&str] = &[
    crate::registration::ContributorRegistration::TAG,
    crate::licence::Licence::TAG,
    crate::licence::Revocation::TAG,
    crate::training::TrainingRun::TAG,
    crate::channel::ChannelState::TAG,
    crate::receipt::ReceiptBatchRoot::TAG,
    crate::auth::AuthChallenge::TAG,
    crate::evaluation::Evaluation::TAG,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_hash_matches_bip340_construction() {
        // BIP340's own tag, checked against an independent computation.
        let tag = sha256::Hash::hash(b"BIP0340/challenge");
        let mut pre = Vec::new();
        pre.extend_from_slice(tag.as_ref());
        pre.extend_from_slice(tag.as_ref());
        pre.extend_from_slice(b"abc");
        assert_eq!(
            tagged_hash("BIP0340/challenge", b"abc"),
            sha256::Hash::hash(&pre).to_byte_array()
        );
    }

    #[test]
    fn tags_are_distinct() {
        let mut tags = ALL_TAGS.to_vec();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), ALL_TAGS.len());
    }
}
