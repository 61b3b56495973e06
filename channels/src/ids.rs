//! Identifiers and timestamps: dataset hashes, channel ids, model / run / request ids.

use crate::codec::{DecodeError, Reader, Writer};
use core::fmt;

/// Seconds since the Unix epoch (UTC). Passed in by the caller: this crate reads no clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty identifier.
    #[error("identifier is empty")]
    Empty,
    /// Longer than the bound.
    #[error("identifier is longer than {max} bytes")]
    TooLong {
        /// The bound.
        max: usize,
    },
    /// A byte outside printable ASCII (0x21..=0x7e).
    #[error("identifier contains a byte outside printable ASCII")]
    BadCharacter,
    /// Not valid hex of the right length.
    #[error("expected {expected_len} hex digits")]
    BadHex {
        /// Required number of hex digits.
        expected_len: usize,
    },
}

macro_rules! bytes32_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Parses 64 hex digits.
            pub fn from_hex(s: &str) -> Result<Self, IdError> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| IdError::BadHex { expected_len: 64 })?;
                Ok($name(out))
            }
            /// Lower-case hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
    };
}

bytes32_id!(
    /// SHA-256 of a dataset's manifest.
    DatasetHash
);
bytes32_id!(
    /// A channel's id: a tagged hash of provider key, contributor key and nonce
    /// (see [`crate::channel::derive_channel_id`]).
    ChannelId
);

/// Longest model, run or request id, in bytes.
pub const MAX_ID_LEN: usize = 64;

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates: 1..=64 bytes of printable ASCII without spaces.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate_text_id(&s)?;
                Ok($name(s))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub(crate) fn encode_into(&self, w: &mut Writer) {
                w.short_bytes(self.0.as_bytes());
            }
            pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                let raw = r.short_bytes(stringify!($name), MAX_ID_LEN)?;
                let s = core::str::from_utf8(raw)
                    .map_err(|_| DecodeError::InvalidField(stringify!($name)))?;
                $name::new(s).map_err(|_| DecodeError::InvalidField(stringify!($name)))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_id!(
    /// A model's id, chosen by the provider.
    ModelId
);
text_id!(
    /// A training run's id, chosen by the provider.
    RunId
);
text_id!(
    /// An inference request's id: the provider's idempotency key.
    RequestId
);
text_id!(
    /// An evaluation record's id, chosen by the evaluator (unique; the idempotency key).
    EvaluationId
);
text_id!(
    /// A benchmark's name (its content is pinned by a SHA-256 beside it).
    BenchmarkId
);
text_id!(
    /// A metric's or a data-valuation method's name, e.g. `accuracy`, `knn-shapley`.
    Label
);

fn validate_text_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { max: MAX_ID_LEN });
    }
    if !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_ids_are_bounded() {
        assert_eq!(ModelId::new(""), Err(IdError::Empty));
        assert_eq!(ModelId::new("a".repeat(65)), Err(IdError::TooLong { max: 64 }));
        assert_eq!(RequestId::new("a b"), Err(IdError::BadCharacter));
        assert_eq!(RequestId::new("é"), Err(IdError::BadCharacter));
        assert!(RunId::new("a".repeat(64)).is_ok());
    }

    #[test]
    fn hex_ids_round_trip() {
        let h = DatasetHash([0xab; 32]);
        assert_eq!(DatasetHash::from_hex(&h.to_hex()), Ok(h));
        assert!(DatasetHash::from_hex("abc").is_err());
    }
}
