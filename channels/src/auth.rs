//! Contributor login by signed challenge (`tribute/auth-challenge/v1`).
//!
//! The daemon issues a challenge naming itself (its provider key), the contributor, a
//! random nonce and an expiry; the contributor signs it with its key. Binding the audience
//! and network keeps an answer for one daemon from opening another.

use crate::codec::{DecodeError, Encode, Reader, Writer};
use crate::ids::Timestamp;
use crate::keys::{Network, PublicKey};
use crate::sign::{Message, Signed};

const VERSION: u8 = 1;

/// A login challenge; the contributor's signature over it is the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthChallenge {
    /// The daemon's network.
    pub network: Network,
    /// The daemon's provider key: who the login is for.
    pub audience: PublicKey,
    /// The contributor logging in, and signer.
    pub contributor_key: PublicKey,
    /// Random bytes chosen by the daemon.
    pub nonce: [u8; 32],
    /// When the challenge was issued.
    pub issued_at: Timestamp,
    /// Last moment the answer is accepted.
    pub expires_at: Timestamp,
}

/// Why a login answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The answer is for a different challenge (nonce, audience, network or contributor).
    #[error("answer does not match the challenge issued")]
    ChallengeMismatch,
    /// Too late.
    #[error("challenge expired")]
    Expired,
    /// The signature is bad.
    #[error("bad signature")]
    BadSignature,
}

impl AuthChallenge {
    /// Checks a signed answer against the challenge that was issued, at time `now`.
    pub fn check_answer(
        &self,
        answer: &Signed<AuthChallenge>,
        now: Timestamp,
    ) -> Result<PublicKey, AuthError> {
        if answer.message != *self {
            return Err(AuthError::ChallengeMismatch);
        }
        if now > self.expires_at {
            return Err(AuthError::Expired);
        }
        answer.verify().map_err(|_| AuthError::BadSignature)?;
        Ok(self.contributor_key)
    }
}

impl Encode for AuthChallenge {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(VERSION);
        self.network.encode_into(w);
        self.audience.encode_into(w);
        self.contributor_key.encode_into(w);
        w.bytes(&self.nonce);
        w.u64(self.issued_at.0);
        w.u64(self.expires_at.0);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.version(VERSION)?;
        let c = AuthChallenge {
            network: Network::decode_from(r)?,
            audience: PublicKey::decode_from(r)?,
            contributor_key: PublicKey::decode_from(r)?,
            nonce: r.array()?,
            issued_at: Timestamp(r.u64()?),
            expires_at: Timestamp(r.u64()?),
        };
        if c.expires_at < c.issued_at {
            return Err(DecodeError::InvalidField("expires_at"));
        }
        Ok(c)
    }
}

impl Message for AuthChallenge {
    const TAG: &'static str = "tribute/auth-challenge/v1";
    fn signer(&self) -> PublicKey {
        self.contributor_key
    }
}
