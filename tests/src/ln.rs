//! Lightning on the dev chain for the end-to-end tests: the client's `devnet` helpers, with
//! a wait that fails the test.

use std::future::Future;
pub use tribute_client::devnet::{free_port as try_free_port, node_config, Peer, WAIT};

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    try_free_port().expect("a free port")
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`]; fails the test after.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    tribute_client::devnet::wait_until(what, check).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`tribute_client::devnet::fund_and_open`], failing the test on an error.
pub async fn fund_and_open(
    op: &tribute_proto::v1::operator_client::OperatorClient<crate::Authed>,
    chain: &tribute_daemon::devchain::DevChain,
    daemon_node: Option<&tribute_daemon::lightning::LdkBackend>,
    funding_sat: u64,
    channel_sat: u64,
    peers: &[Peer<'_>],
) {
    tribute_client::devnet::fund_and_open(op, chain, daemon_node, funding_sat, channel_sat, peers)
        .await
        .unwrap_or_else(|e| panic!("funding and opening channels: {e}"));
}
