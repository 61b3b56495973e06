//! `tributed`, the payer-side daemon. It owns everything that does I/O on the provider's
//! side: storage, the metering pipeline, the channel manager, settlement and Lightning.
//! The protocol rules themselves live in `tribute-channels`.

pub use tribute_channels as channels;

pub mod admission;
pub mod auth;
pub mod config;
pub mod dashboard;
pub mod devchain;
pub mod error;
pub mod faults;
pub mod grpc;
pub mod hub;
pub mod keeper;
pub mod keys;
pub mod ledger;
pub mod lightning;
pub mod meter;
pub mod metrics;
pub mod reconcile;
pub mod registry;
pub mod report;
pub mod reputation;
pub mod server;
pub mod settlement;
pub mod store;
