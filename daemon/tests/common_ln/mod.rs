//! Shared support for the tests that run real ldk-node nodes on the dev chain.
#![allow(dead_code)]

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ldk_node::bitcoin::Txid;
use tribute_daemon::devchain::DevChain;

/// Upper bound of every wait on the nodes or the chain.
pub const WAIT: Duration = Duration::from_secs(60);
/// How often a condition is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A node's data dir; kept after the test when `TRIBUTE_KEEP_TEST_DIRS` is set.
pub struct TestDir {
    /// Deletes the dir on drop; `None` when kept.
    _guard: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("temp dir");
        if std::env::var_os("TRIBUTE_KEEP_TEST_DIRS").is_some() {
            let path = dir.keep();
            eprintln!("keeping {}", path.display());
            TestDir { _guard: None, path }
        } else {
            let path = dir.path().to_path_buf();
            TestDir { _guard: Some(dir), path }
        }
    }
}

/// A free loopback port for a node to listen on (there is a small window in which another
/// process could take it; on a test machine that is acceptable).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`].
pub async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until `txid` is in the dev chain's mempool.
pub async fn wait_in_mempool(chain: &DevChain, txid: Txid, what: &str) {
    wait_until(what, || async { chain.mempool_txids().contains(&txid).then_some(()) }).await;
}
