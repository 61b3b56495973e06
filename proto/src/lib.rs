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
