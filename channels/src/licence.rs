//! Dataset licences and their revocations, and the rules that decide whether a licence
//! allows a given use at a given time.
//!
//! A licence is signed by the contributor who owns the dataset (`tribute/licence/v1`); a
//! revocation is signed by the same key (`tribute/licence-revocation/v1`) and names the
//! licence it ends by the licence's id (its signing digest).

use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::ids::{DatasetHash, Timestamp};
use crate::keys::{Network, PublicKey};
use crate::sign::Message;

const VERSION: u8 = 1;
/// Longest SPDX licence expression accepted, in bytes.
pub const MAX_SPDX_LEN: usize = 128;

/// One kind of use a licence may permit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Use {
    /// Training models on the dataset.
    Training,
    /// Retrieving from the dataset at inference time (citations, RAG).
    Retrieval,
}

impl Use {
    fn bit(self) -> u8 {
        match self {
            Use::Training => 0b01,
            Use::Retrieval => 0b10,
        }
    }
}

/// The set of uses a licence permits (a bit set with fixed bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Uses(u8);

impl Uses {
    const KNOWN: u8 = 0b11;

    /// The set of the given uses.
    pub fn of(uses: &[Use]) -> Uses {
        Uses(uses.iter().fold(0, |acc, u| acc | u.bit()))
    }
    /// Whether `u` is permitted.
    pub fn contains(self, u: Use) -> bool {
        self.0 & u.bit() != 0
    }
    /// The raw bits (training = 1, retrieval = 2).
    pub fn bits(self) -> u8 {
        self.0
    }
    /// Parses raw bits; unknown bits and the empty set are refused.
    pub fn from_bits(bits: u8) -> Option<Uses> {
        (bits != 0 && bits & !Self::KNOWN == 0).then_some(Uses(bits))
    }
}

/// A dataset licence, signed by the contributor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Licence {
    /// Network of the payouts this licence earns.
    pub network: Network,
    /// SHA-256 of the dataset's manifest.
    pub dataset_hash: DatasetHash,
    /// The owner, and signer.
    pub contributor_key: PublicKey,
    /// SPDX licence expression, e.g. `CC-BY-4.0` or `MIT OR Apache-2.0`.
    pub spdx_license_id: String,
    /// Permitted uses.
    pub uses: Uses,
    /// Start of validity (inclusive).
    pub not_before: Timestamp,
    /// End of validity (inclusive); [`Timestamp::MAX`] for none.
    pub not_after: Timestamp,
    /// When the contributor signed it; a training run that started earlier cannot rely on it.
    pub signed_at: Timestamp,
}

impl Timestamp {
    /// The far future: "no end".
    pub const MAX: Timestamp = Timestamp(u64::MAX);
}

/// Ends a licence from `revoked_at` on. Signed by the licence's contributor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// Network of the licence.
    pub network: Network,
    /// The dataset.
    pub dataset_hash: DatasetHash,
    /// The owner, and signer.
    pub contributor_key: PublicKey,
    /// [`Licence::id`] of the licence revoked.
    pub licence_id: [u8; 32],
    /// From when the licence no longer holds (inclusive).
    pub revoked_at: Timestamp,
}

/// Why a licence does not allow a use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenceProblem {
    /// No licence is registered for the dataset.
    #[error("no licence")]
    NotFound,
    /// The licence does not permit this use.
    #[error("use {0:?} not permitted")]
    UseNotPermitted(Use),
    /// Used before `not_before`.
    #[error("licence not yet valid")]
    NotYetValid,
    /// Used after `not_after`.
    #[error("licence expired")]
    Expired,
    /// The licence was signed after the moment it is needed for.
    #[error("licence signed after the use began")]
    SignedAfterUse,
    /// Revoked at or before the moment of use.
    #[error("licence revoked")]
    Revoked,
    /// The licence is for another network.
    #[error("licence is for another network")]
    WrongNetwork,
}

/// Why a licence or revocation is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenceError {
    /// SPDX id empty, too long, or with characters outside `[A-Za-z0-9.+:() -]`.
    #[error("bad SPDX licence expression")]
    BadSpdx,
    /// `not_before > not_after`.
    #[error("validity window is empty")]
    EmptyWindow,
    /// The revocation names a different licence.
    #[error("revocation does not match the licence")]
    RevocationMismatch,
}

impl Licence {
    /// Checks the licence's own fields.
    pub fn validate(&self) -> Result<(), LicenceError> {
        let ok_char = |b: u8| b.is_ascii_alphanumeric() || b".+:()- ".contains(&b);
        if self.spdx_license_id.is_empty()
            || self.spdx_license_id.len() > MAX_SPDX_LEN
            || !self.spdx_license_id.bytes().all(ok_char)
        {
            return Err(LicenceError::BadSpdx);
        }
        if self.not_before > self.not_after {
            return Err(LicenceError::EmptyWindow);
        }
        Ok(())
    }

    /// The licence's id: its signing digest, which a revocation names.
    pub fn id(&self) -> [u8; 32] {
        self.signing_digest()
    }

    /// Whether this licence (with its revocation, if any) allows `use_` at `at` on `network`.
    /// The licence must also have been signed no later than `at`.
    pub fn allows(
        &self,
        revocation: Option<&Revocation>,
        network: Network,
        use_: Use,
        at: Timestamp,
    ) -> Result<(), LicenceProblem> {
        if self.network != network {
            return Err(LicenceProblem::WrongNetwork);
        }
        if !self.uses.contains(use_) {
            return Err(LicenceProblem::UseNotPermitted(use_));
        }
        if at < self.not_before {
            return Err(LicenceProblem::NotYetValid);
        }
        if at > self.not_after {
            return Err(LicenceProblem::Expired);
        }
        if self.signed_at > at {
            return Err(LicenceProblem::SignedAfterUse);
        }
        if let Some(rev) = revocation {
            if rev.matches(self) && rev.revoked_at <= at {
                return Err(LicenceProblem::Revoked);
            }
        }
        Ok(())
    }
}

impl Revocation {
    /// Whether this revocation is for `licence` (same dataset, owner, network and id).
    pub fn matches(&self, licence: &Licence) -> bool {
        self.network == licence.network
            && self.dataset_hash == licence.dataset_hash
            && self.contributor_key == licence.contributor_key
            && self.licence_id == licence.id()
    }

    /// Like [`Revocation::matches`], as an error.
    pub fn check_matches(&self, licence: &Licence) -> Result<(), LicenceError> {
        self.matches(licence).then_some(()).ok_or(LicenceError::RevocationMismatch)
    }
}

impl Encode for Licence {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(VERSION);
        self.network.encode_into(w);
        w.bytes(&self.dataset_hash.0);
        self.contributor_key.encode_into(w);
        w.short_bytes(self.spdx_license_id.as_bytes());
        w.u8(self.uses.bits());
        w.u64(self.not_before.0);
        w.u64(self.not_after.0);
        w.u64(self.signed_at.0);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(VERSION)?;
        let network = Network::decode_from(r)?;
        let dataset_hash = DatasetHash(r.array()?);
        let contributor_key = PublicKey::decode_from(r)?;
        let spdx = r.short_bytes("spdx_license_id", MAX_SPDX_LEN)?;
        let spdx_license_id = core::str::from_utf8(spdx)
            .map_err(|_| DecodeError::InvalidField("spdx_license_id"))?
            .to_owned();
        let uses = Uses::from_bits(r.u8()?).ok_or(DecodeError::InvalidField("uses"))?;
        let licence = Licence {
            network,
            dataset_hash,
            contributor_key,
            spdx_license_id,
            uses,
            not_before: Timestamp(r.u64()?),
            not_after: Timestamp(r.u64()?),
            signed_at: Timestamp(r.u64()?),
        };
        licence.validate().map_err(|e| {
            DecodeError::InvalidField(match e {
                LicenceError::BadSpdx => "spdx_license_id",
                _ => "not_after",
            })
        })?;
        Ok(licence)
    }
}

impl Message for Licence {
    const TAG: &'static str = "tribute/licence/v1";
    fn signer(&self) -> PublicKey {
        self.contributor_key
    }
}

impl Encode for Revocation {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(VERSION);
        self.network.encode_into(w);
        w.bytes(&self.dataset_hash.0);
        self.contributor_key.encode_into(w);
        w.bytes(&self.licence_id);
        w.u64(self.revoked_at.0);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(VERSION)?;
        Ok(Revocation {
            network: Network::decode_from(r)?,
            dataset_hash: DatasetHash(r.array()?),
            contributor_key: PublicKey::decode_from(r)?,
            licence_id: r.array()?,
            revoked_at: Timestamp(r.u64()?),
        })
    }
}

impl Message for Revocation {
    const TAG: &'static str = "tribute/licence-revocation/v1";
    fn signer(&self) -> PublicKey {
        self.contributor_key
    }
}
