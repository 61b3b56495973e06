//! The client's errors. A failed call keeps the daemon's gRPC code, its stable
//! `tribute.v1.ErrorReason` and the metadata naming what was wrong, so a person reads a
//! clear line and a program acts on the reason, and every error says whether retrying the
//! same call (with the same request id) can help.

use crate::keys::KeyError;
use crate::manifest::ManifestError;
use tonic::Code;
use tribute_proto::v1::ErrorReason;

/// A non-OK answer to one call.
#[derive(Debug, Clone)]
pub struct RpcError {
    /// The call, e.g. `Registry.RegisterLicence`.
    pub call: &'static str,
    /// gRPC status code.
    pub code: Code,
    /// The daemon's reason; `None` when the status did not come from the daemon (a broken
    /// connection, a proxy, a timeout).
    pub reason: Option<ErrorReason>,
    /// The status message.
    pub message: String,
    /// `ErrorInfo` metadata (`field`, `datasets`, …), sorted by key.
    pub metadata: Vec<(String, String)>,
}

impl RpcError {
    /// Reads code, reason and metadata from a status.
    pub fn from_status(call: &'static str, status: &tonic::Status) -> Self {
        use tonic_types::StatusExt;
        let info =
            status.get_details_error_info().filter(|i| i.domain == tribute_proto::ERROR_DOMAIN);
        let mut metadata: Vec<(String, String)> = info
            .as_ref()
            .map(|i| i.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        metadata.sort();
        RpcError {
            call,
            code: status.code(),
            reason: info.and_then(|i| ErrorReason::from_str_name(&i.reason)),
            message: status.message().to_owned(),
            metadata,
        }
    }

    /// Whether the same call may succeed later: overload, shutdown, a backend outage, or a
    /// failure that did not come from the daemon at all (connection dropped, timeout). A
    /// call that reached the daemon's verdict (bad input, auth, conflict) never is.
    pub fn is_transient(&self) -> bool {
        match self.reason {
            Some(ErrorReason::Overloaded)
            | Some(ErrorReason::ShuttingDown)
            | Some(ErrorReason::BackendUnavailable) => true,
            Some(_) => false,
            None => matches!(
                self.code,
                Code::Unavailable
                    | Code::Unknown
                    | Code::Internal
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
            ),
        }
    }
}

/// `NotFound` → `NOT_FOUND`, the name gRPC documentation uses.
pub fn code_name(code: Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.call, code_name(self.code))?;
        if let Some(r) = self.reason {
            write!(f, " {}", r.as_str_name())?;
        }
        write!(f, ": {}", self.message)?;
        for (k, v) in &self.metadata {
            write!(f, " [{k}={v}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for RpcError {}

/// Every way a client operation fails.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon (or the connection to it) refused a call.
    #[error(transparent)]
    Rpc(Box<RpcError>),
    /// Transient failures went on past the retry bound or the call's deadline.
    #[error("{call}: gave up after {attempts} attempts ({why}); last error: {last}")]
    GaveUp {
        /// The call.
        call: &'static str,
        /// Attempts made.
        attempts: u32,
        /// `deadline` or `retry limit`.
        why: &'static str,
        /// The last failure.
        last: Box<RpcError>,
    },
    /// The daemon could not be reached at all.
    #[error("cannot connect to the daemon at {url}: {detail}")]
    Connect {
        /// The URL tried.
        url: String,
        /// What failed.
        detail: String,
    },
    /// A setting or argument is not usable.
    #[error("{0}")]
    Config(String),
    /// The contributor key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The dataset or manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// `tribute demo` stopped or its summary's checks failed.
    #[error(transparent)]
    Demo(#[from] crate::demo::DemoError),
    /// A valuation's inputs or outputs.
    #[error(transparent)]
    Valuation(#[from] crate::valuation::ValuationError),
    /// The daemon sent something that does not decode or does not check out.
    #[error("the daemon sent an invalid answer to {call}: {detail}")]
    Protocol {
        /// The call.
        call: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl ClientError {
    /// The error of a failed call.
    pub fn rpc(call: &'static str, status: &tonic::Status) -> Self {
        ClientError::Rpc(Box::new(RpcError::from_status(call, status)))
    }

    /// A protocol error.
    pub fn protocol(call: &'static str, detail: impl Into<String>) -> Self {
        ClientError::Protocol { call, detail: detail.into() }
    }

    /// The daemon's reason, if the daemon gave one.
    pub fn reason(&self) -> Option<ErrorReason> {
        match self {
            ClientError::Rpc(e) => e.reason,
            ClientError::GaveUp { last, .. } => last.reason,
            _ => None,
        }
    }

    /// The gRPC code, if a call failed.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rpc(e) => Some(e.code),
            ClientError::GaveUp { last, .. } => Some(last.code),
            _ => None,
        }
    }

    /// Whether retrying later (with the same request id) may help.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Rpc(e) => e.is_transient(),
            ClientError::GaveUp { .. } | ClientError::Connect { .. } => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_style() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }

    #[test]
    fn transport_failures_are_transient_verdicts_are_not() {
        let plain = tonic::Status::unavailable("connection reset");
        assert!(RpcError::from_status("x", &plain).is_transient());
        let bad = tonic::Status::invalid_argument("nope");
        assert!(!RpcError::from_status("x", &bad).is_transient());
    }
}
