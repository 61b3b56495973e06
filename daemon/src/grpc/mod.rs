//! The gRPC services. Each handler authorizes (one policy table in `auth::policy`), decodes
//! and validates its input, calls the domain code, and maps the result; errors become
//! statuses only through `error.rs`.

mod channels;
pub(crate) mod metering;
mod operator;
mod receipts;
pub(crate) mod registry;
mod reputation;

pub use channels::ChannelsService;
pub use metering::MeteringService;
pub use operator::{remove_stale_backups, Database, OperatorService};
pub use receipts::ReceiptsService;
pub use registry::RegistryService;
pub use reputation::ReputationService;

use crate::error::ApiError;
use tribute_channels::{DatasetHash, PublicKey};

/// A 32-byte public key from a request field; empty → `None`.
pub(crate) fn optional_key(bytes: &[u8], field: &str) -> Result<Option<PublicKey>, ApiError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    key(bytes, field).map(Some)
}

/// A 32-byte public key from a request field.
pub(crate) fn key(bytes: &[u8], field: &str) -> Result<PublicKey, ApiError> {
    let arr: [u8; 32] =
        bytes.try_into().map_err(|_| ApiError::malformed(field, "must be 32 bytes"))?;
    PublicKey::from_bytes(arr)
        .map_err(|_| ApiError::malformed(field, "not a valid x-only public key"))
}

/// A 32-byte dataset hash from a request field.
pub(crate) fn dataset_hash(bytes: &[u8], field: &str) -> Result<DatasetHash, ApiError> {
    bytes.try_into().map(DatasetHash).map_err(|_| ApiError::malformed(field, "must be 32 bytes"))
}

/// How much larger than the configured limit tonic's own decoder limit is: messages between
/// the two get a clear MESSAGE_TOO_LARGE from [`check_size`]; beyond it tonic refuses them
/// before any decoding (with its own OUT_OF_RANGE status).
pub const HARD_LIMIT_FACTOR: usize = 4;

/// `OUT_OF_RANGE` + `MESSAGE_TOO_LARGE` if the message encodes to more than `max` bytes.
pub(crate) fn check_size<M: prost::Message>(m: &M, max: usize) -> Result<(), ApiError> {
    let len = m.encoded_len();
    if len > max {
        return Err(ApiError::new(
            tonic::Code::OutOfRange,
            tribute_proto::v1::ErrorReason::MessageTooLarge,
            format!("message of {len} bytes exceeds the limit of {max}"),
        )
        .with("limit_bytes", max.to_string()));
    }
    Ok(())
}

/// Runs blocking work (SQLite) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            tonic::Code::Internal,
            tribute_proto::v1::ErrorReason::Internal,
            format!("task failed: {e}"),
        )
    })?
}
