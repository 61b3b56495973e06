//! The one place where daemon errors become gRPC statuses.
//!
//! Every non-OK status carries a `google.rpc.ErrorInfo` (through `tonic-types`) whose
//! `reason` is the name of a `tribute.v1.ErrorReason` and whose `domain` is `tribute.v1`,
//! plus metadata naming the offending field or records. Clients act on the reason, not on
//! the message text.

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};
use tribute_proto::v1::ErrorReason;

/// An error as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// gRPC status code.
    pub code: Code,
    /// Stable reason.
    pub reason: ErrorReason,
    /// Human-readable message.
    pub message: String,
    /// Extra facts (e.g. `field`, `datasets`).
    pub metadata: Vec<(String, String)>,
}

impl ApiError {
    /// An error with no metadata.
    pub fn new(code: Code, reason: ErrorReason, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), metadata: Vec::new() }
    }

    /// Adds a metadata entry.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.metadata.push((key.to_owned(), value.into()));
        self
    }

    /// `INVALID_ARGUMENT` + `MALFORMED_FIELD` naming `field`.
    pub fn malformed(field: &str, message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, ErrorReason::MalformedField, message).with("field", field)
    }

    /// `INTERNAL` + `STORAGE_ERROR`: the call had no effect.
    pub fn storage(err: impl std::fmt::Display) -> Self {
        Self::new(Code::Internal, ErrorReason::StorageError, format!("storage failed: {err}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}: {}", self.code, self.reason.as_str_name(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        let metadata: std::collections::HashMap<String, String> = e.metadata.into_iter().collect();
        let details = ErrorDetails::with_error_info(
            e.reason.as_str_name(),
            tribute_proto::ERROR_DOMAIN,
            metadata,
        );
        tonic::Status::with_error_details(e.code, e.message, details)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::storage(e)
    }
}
