//! The client side of Tribute: the provider SDK ([`provider::Provider`]), what a
//! contributor does against the daemon ([`contributor`]), dataset manifests
//! ([`manifest`]), the contributor key ([`keys`]), the built-in data valuator
//! ([`valuation`]) and the `tribute` command-line tool's configuration ([`config`]).

#![deny(missing_docs)]

pub use tribute_channels as channels;

pub mod admin;
pub mod amounts;
pub mod config;
pub mod connect;
pub mod contributor;
pub mod demo;
pub mod devnet;
pub mod error;
pub mod keys;
pub mod manifest;
pub mod node;
pub mod payments;
pub mod provider;
pub mod report;
pub mod reputation;
pub mod time;
pub mod valuation;

pub use connect::DaemonEndpoint;
pub use error::{ClientError, RpcError};
pub use provider::{Meter, Metered, Price, Provider, ProviderConfig, RetryPolicy};
