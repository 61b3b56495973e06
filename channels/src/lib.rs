//! # tribute-channels
//!
//! The protocol core of Tribute. This crate owns amounts and units, the exact proportional
//! split, canonical encodings, domain-separated BIP340 signatures, licences, training runs,
//! attribution vectors, receipts with their Merkle tree, and the off-chain channel state
//! machine (payer side and payee side).
//!
//! It is pure: no I/O, no threads, no clock reads, no randomness. Time and randomness come in
//! as arguments; transitions return new values and the caller decides what to persist.

#![deny(missing_docs)]

pub mod amount;
pub mod attribution;
pub mod auth;
pub mod channel;
pub mod codec;
pub mod evaluation;
pub mod ids;
pub mod keys;
pub mod licence;
pub mod merkle;
pub mod pricing;
pub mod receipt;
pub mod registration;
pub mod reputation;
pub mod sign;
pub mod split;
pub mod training;

pub use amount::{AmountError, Msat, Nsat, NSAT_PER_MSAT, NSAT_PER_SAT};
pub use codec::DecodeError;
pub use ids::{ChannelId, DatasetHash, IdError, ModelId, RequestId, RunId, Timestamp};
pub use keys::{Network, PublicKey};
pub use sign::{Message, SignError, Signed, VerifyError};
