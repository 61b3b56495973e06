//! Tribute's wire API: the gRPC services and messages of `tribute.v1`, generated from
//! `proto/tribute/v1/*.proto`, and the file descriptor set for server reflection.

#![allow(missing_docs, clippy::all)]

/// The `tribute.v1` package.
pub mod v1 {
    tonic::include_proto!("tribute.v1");
}

/// Encoded `FileDescriptorSet` of every Tribute proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tribute_descriptor");

/// The `domain` of every `ErrorInfo` this API attaches.
pub const ERROR_DOMAIN: &str = "tribute.v1";

/// Reads the `ErrorReason` a Tribute status carries (its `ErrorInfo` in domain
/// `tribute.v1`), if any.
pub fn error_reason(status: &tonic::Status) -> Option<v1::ErrorReason> {
    use tonic_types::StatusExt;
    let info = status.get_details_error_info()?;
    if info.domain != ERROR_DOMAIN {
        return None;
    }
    v1::ErrorReason::from_str_name(&info.reason)
}
