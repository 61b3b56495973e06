//! The dev chain: an in-process regtest simulator for tests and the demo, since these
//! machines have no bitcoind.
//!
//! It owns an in-memory chain (blocks, UTXO set, mempool) and serves the subset of bitcoind's
//! JSON-RPC that ldk-node 0.7.1's bitcoind chain source (lightning-block-sync + BDK) calls,
//! over HTTP with basic auth on a loopback port. Every Lightning node — in this process or
//! another — therefore runs the real `bitcoind` chain-source code path:
//!
//! | method | answer |
//! |---|---|
//! | `getblockchaininfo` | object: `chain`, `blocks`, `bestblockhash`, `chainwork`, … |
//! | `getblockhash height` | block hash hex |
//! | `getblockheader hash [verbose=true]` | object (`version merkleroot time nonce bits chainwork height previousblockhash` …) or header hex |
//! | `getblock hash [verbosity=1]` | 0: block hex (what lightning-block-sync asks for); 1: object with txids |
//! | `gettxout txid n [include_mempool=true]` | object (`value` in BTC, `scriptPubKey`, `confirmations`, `coinbase`) or `null` if spent or unknown |
//! | `sendrawtransaction hex` | txid; bitcoind's error codes (-25, -26, -27) on rejection |
//! | `getrawtransaction txid [verbose=false]` | tx hex (mempool and chain, as with `-txindex`), or error -5 |
//! | `getrawmempool [verbose=false]` | txids in arrival order |
//! | `getmempoolentry txid` | object: `time`, `height`, `vsize`, `fees` …, or error -5 |
//! | `getmempoolinfo` | object: `mempoolminfee` (BTC/kvB) … |
//! | `estimatesmartfee target [mode]` | `{ "feerate": BTC/kvB, "blocks": target }`, one rate for all targets |
//! | `generatetoaddress n address` | mines n blocks paying `address`; block hashes |
//! | `sendtoaddress address amount_btc` | the faucet (below); txid |
//! | `getblockcount`, `getbestblockhash` | as bitcoind |
//!
//! **What it does not do.** It validates no scripts or signatures and does no real proof of
//! work: blocks meet regtest's trivial target (`0x207fffff`, about two hashes each). The
//! faucet pays an address by spending a *made-up outpoint* that no block created — accepted
//! only because nothing checks it; no real node would. There are no reorgs, no
//! replace-by-fee (a conflicting spend is rejected) and no peer-to-peer network. What it does
//! check: blocks carry a correct merkle root and BIP141 witness commitment (lightning-block-sync
//! verifies both), `gettxout` answers truthfully from the UTXO set (LDK's gossip verification
//! needs it), and mempool transactions spend existing unspent outputs without double spends,
//! overspending, immature coinbases or unreached lock times. Production uses a real chain
//! source.
//!
//! Errors are answered with HTTP 200 and a JSON-RPC error object (see `server.rs` for why).

#![deny(missing_docs)]

mod chain;
mod rpc;
mod server;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use ldk_node::bitcoin::script::ScriptBuf;
use ldk_node::bitcoin::{Address, Amount, BlockHash, OutPoint, TxOut, Txid};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use chain::RejectReason;
use chain::{anyone_can_spend_script, Chain};

/// Most blocks one `mine_blocks` call or `generatetoaddress` request may mine.
pub const MAX_BLOCKS_PER_CALL: u32 = 1_000;
/// Blocks mined at start by default: 101 makes the first coinbase spendable, as in the
/// usual regtest set-up.
pub const DEFAULT_INITIAL_BLOCKS: u32 = 101;
/// Shortest auto-mining period; shorter ones are raised to it.
pub const MIN_AUTO_MINING_PERIOD: Duration = Duration::from_millis(10);

/// How to start a dev chain. `Default` binds `127.0.0.1:0` (a free port).
#[derive(Debug, Clone)]
pub struct DevChainConfig {
    /// Where the RPC server listens. Must be a loopback address: the chain checks nothing,
    /// so it is never offered to the network.
    pub rpc_bind_addr: SocketAddr,
    /// Basic-auth user the RPC server requires.
    pub rpc_user: String,
    /// Basic-auth password the RPC server requires.
    pub rpc_password: String,
    /// Blocks mined on top of the genesis block before the server starts.
    pub initial_blocks: u32,
    /// The fee rate `estimatesmartfee` answers for every target, in sat/vB.
    pub fee_rate_sat_per_vb: u64,
    /// The `mempoolminfee` that `getmempoolinfo` reports, in sat/vB.
    pub min_fee_rate_sat_per_vb: u64,
}

impl Default for DevChainConfig {
    fn default() -> Self {
        DevChainConfig {
            rpc_bind_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            rpc_user: "devchain".to_owned(),
            rpc_password: "devchain".to_owned(),
            initial_blocks: DEFAULT_INITIAL_BLOCKS,
            fee_rate_sat_per_vb: 2,
            min_fee_rate_sat_per_vb: 1,
        }
    }
}

/// Why a dev chain operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DevChainError {
    /// The configured bind address is not loopback.
    #[error("the dev chain binds loopback addresses only, not {0}")]
    NotLoopback(SocketAddr),
    /// The RPC listener could not be bound.
    #[error("cannot bind the dev chain RPC server to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// More than [`MAX_BLOCKS_PER_CALL`] blocks asked for at once.
    #[error("at most {MAX_BLOCKS_PER_CALL} blocks per call, asked for {0}")]
    TooManyBlocks(u32),
    /// A faucet amount of zero or above 21 million BTC.
    #[error("faucet amount must be above zero and at most 21 million BTC, got {0}")]
    InvalidAmount(Amount),
    /// The mempool refused the transaction.
    #[error("transaction rejected: {0}")]
    Rejected(#[from] RejectReason),
}

/// State shared by the handle, the RPC server and the auto-miner.
#[derive(Debug)]
pub(crate) struct Shared {
    chain: Mutex<Chain>,
    settings: Settings,
    /// The exact `Authorization` header value a request must carry.
    auth_header: String,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) fee_rate_sat_per_vb: u64,
    pub(crate) min_fee_rate_sat_per_vb: u64,
}

impl Shared {
    /// A fresh chain holding only the genesis block.
    pub(crate) fn new(config: &DevChainConfig) -> Shared {
        let credentials = format!("{}:{}", config.rpc_user, config.rpc_password);
        Shared {
            chain: Mutex::new(Chain::new()),
            settings: Settings {
                fee_rate_sat_per_vb: config.fee_rate_sat_per_vb,
                min_fee_rate_sat_per_vb: config.min_fee_rate_sat_per_vb,
            },
            auth_header: format!("Basic {}", BASE64_STANDARD.encode(credentials)),
        }
    }

    /// Locks the chain. A panic while holding the lock cannot leave the chain half-updated
    /// in a way that matters for a test chain, so a poisoned lock is used as is.
    pub(crate) fn lock_chain(&self) -> MutexGuard<'_, Chain> {
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mines `n` blocks, taking the lock per block so RPC clients are not stalled.
    pub(crate) fn mine(
        &self,
        n: u32,
        coinbase_script: ScriptBuf,
        now_unix_secs: u64,
    ) -> Vec<BlockHash> {
        (0..n)
            .map(|_| self.lock_chain().mine_block(coinbase_script.clone(), now_unix_secs))
            .collect()
    }
}

/// A running dev chain. Cheap to clone: clones share one chain and one server.
///
/// The server and the auto-miner run on the tokio runtime that called
/// [`DevChain::start`]; they stop on [`DevChain::shutdown`] or when the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub struct DevChain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    rpc_addr: SocketAddr,
    rpc_user: String,
    rpc_password: String,
    runtime: tokio::runtime::Handle,
    /// `true` (or dropping it) stops the server and the auto-miner.
    shutdown_tx: watch::Sender<bool>,
    server_task: Mutex<Option<JoinHandle<()>>>,
    auto_miner_task: Mutex<Option<JoinHandle<()>>>,
}

impl DevChain {
    /// Starts a dev chain with [`DevChainConfig::default`]: RPC on a free loopback port,
    /// 101 blocks mined.
    pub async fn start() -> Result<DevChain, DevChainError> {
        DevChain::start_with(DevChainConfig::default()).await
    }

    /// Starts a dev chain: mines the configured initial blocks, binds the RPC listener and
    /// spawns the server on the current tokio runtime.
    pub async fn start_with(config: DevChainConfig) -> Result<DevChain, DevChainError> {
        if !config.rpc_bind_addr.ip().is_loopback() {
            return Err(DevChainError::NotLoopback(config.rpc_bind_addr));
        }
        if config.initial_blocks > MAX_BLOCKS_PER_CALL {
            return Err(DevChainError::TooManyBlocks(config.initial_blocks));
        }
        let shared = Arc::new(Shared::new(&config));
        shared.mine(config.initial_blocks, anyone_can_spend_script(), now_unix_secs());

        let listener = TcpListener::bind(config.rpc_bind_addr)
            .await
            .map_err(|source| DevChainError::Bind { addr: config.rpc_bind_addr, source })?;
        let rpc_addr = listener
            .local_addr()
            .map_err(|source| DevChainError::Bind { addr: config.rpc_bind_addr, source })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let runtime = tokio::runtime::Handle::current();
        let server_task = runtime.spawn(server::serve(listener, Arc::clone(&shared), shutdown_rx));
        tracing::info!(%rpc_addr, height = config.initial_blocks, "dev chain started");
        Ok(DevChain {
            inner: Arc::new(Inner {
                shared,
                rpc_addr,
                rpc_user: config.rpc_user,
                rpc_password: config.rpc_password,
                runtime,
                shutdown_tx,
                server_task: Mutex::new(Some(server_task)),
                auto_miner_task: Mutex::new(None),
            }),
        })
    }

    /// The address the RPC server listens on.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.inner.rpc_addr
    }

    /// The RPC basic-auth user.
    pub fn rpc_user(&self) -> &str {
        &self.inner.rpc_user
    }

    /// The RPC basic-auth password.
    pub fn rpc_password(&self) -> &str {
        &self.inner.rpc_password
    }

    /// Mines `n` blocks on the tip, each taking as many mempool transactions as fit, and
    /// returns their hashes. Coinbases pay an anyone-can-spend script.
    pub fn mine_blocks(&self, n: u32) -> Result<Vec<BlockHash>, DevChainError> {
        if n > MAX_BLOCKS_PER_CALL {
            return Err(DevChainError::TooManyBlocks(n));
        }
        Ok(self.inner.shared.mine(n, anyone_can_spend_script(), now_unix_secs()))
    }

    /// Pays `amount` to `address` with a transaction that spends a made-up outpoint (see
    /// the module doc) and puts it in the mempool. It does **not** mine: call
    /// [`DevChain::mine_blocks`] (or run the auto-miner) to confirm it.
    pub fn faucet(&self, address: &Address, amount: Amount) -> Result<Txid, DevChainError> {
        if amount == Amount::ZERO || amount > Amount::MAX_MONEY {
            return Err(DevChainError::InvalidAmount(amount));
        }
        let txid = self.inner.shared.lock_chain().faucet(
            address.script_pubkey(),
            amount,
            now_unix_secs(),
        )?;
        Ok(txid)
    }

    /// Height of the tip.
    pub fn height(&self) -> u32 {
        self.inner.shared.lock_chain().tip_height()
    }

    /// Hash of the tip.
    pub fn tip_hash(&self) -> BlockHash {
        self.inner.shared.lock_chain().tip().hash
    }

    /// Number of transactions in the mempool.
    pub fn mempool_len(&self) -> usize {
        self.inner.shared.lock_chain().mempool_len()
    }

    /// Txids in the mempool, in arrival order.
    pub fn mempool_txids(&self) -> Vec<Txid> {
        self.inner.shared.lock_chain().mempool_txids()
    }

    /// `None` if the chain has never seen `txid`, `Some(0)` while it is in the mempool,
    /// else the number of confirmations.
    pub fn tx_confirmations(&self, txid: &Txid) -> Option<u32> {
        let chain = self.inner.shared.lock_chain();
        let (_, block) = chain.transaction(txid)?;
        Some(block.map_or(0, |b| chain.confirmations(b.height)))
    }

    /// The confirmed unspent output at `outpoint` (`gettxout` without the mempool), or
    /// `None` if it is spent or was never created.
    pub fn utxo(&self, outpoint: &OutPoint) -> Option<TxOut> {
        self.inner.shared.lock_chain().txout(outpoint, false).map(|info| info.txout)
    }

    /// Mines one block every `every` (at least [`MIN_AUTO_MINING_PERIOD`]), until
    /// [`DevChain::stop_auto_mining`] or shutdown. Replaces a running auto-miner.
    pub fn start_auto_mining(&self, every: Duration) {
        let period = every.max(MIN_AUTO_MINING_PERIOD);
        let shared = Arc::clone(&self.inner.shared);
        let mut shutdown = self.inner.shutdown_tx.subscribe();
        let task = self.inner.runtime.spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick completes at once; the first block comes one period later.
            ticks.tick().await;
            loop {
                tokio::select! {
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow() {
                            break;
                        }
                    }
                    _ = ticks.tick() => {
                        shared.mine(1, anyone_can_spend_script(), now_unix_secs());
                    }
                }
            }
        });
        let previous = lock(&self.inner.auto_miner_task).replace(task);
        if let Some(previous) = previous {
            previous.abort();
        }
    }

    /// Stops the auto-miner, if one runs.
    pub fn stop_auto_mining(&self) {
        if let Some(task) = lock(&self.inner.auto_miner_task).take() {
            task.abort();
        }
    }

    /// Stops the RPC server (closing its connections) and the auto-miner, and waits for
    /// them. Clones of this handle still read the chain but nothing serves it any more.
    pub async fn shutdown(self) {
        // Fails only if both tasks are gone already, which is the goal anyway.
        let _ = self.inner.shutdown_tx.send(true);
        let server = lock(&self.inner.server_task).take();
        let miner = lock(&self.inner.auto_miner_task).take();
        for task in [server, miner].into_iter().flatten() {
            // A task that was aborted or panicked is stopped as well.
            let _ = task.await;
        }
        tracing::info!(rpc_addr = %self.inner.rpc_addr, "dev chain stopped");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wall-clock unix seconds; 0 if the clock is before 1970 (block times then follow the
/// median-time rule alone).
pub(crate) fn now_unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_non_loopback_addresses_and_oversized_requests() {
        let config = DevChainConfig {
            rpc_bind_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            ..DevChainConfig::default()
        };
        assert!(matches!(DevChain::start_with(config).await, Err(DevChainError::NotLoopback(_))));
        let chain = DevChain::start().await.unwrap();
        assert!(matches!(
            chain.mine_blocks(MAX_BLOCKS_PER_CALL + 1),
            Err(DevChainError::TooManyBlocks(_))
        ));
        assert_eq!(chain.height(), DEFAULT_INITIAL_BLOCKS);
        chain.shutdown().await;
    }

    #[tokio::test]
    async fn faucet_waits_in_the_mempool_until_mined() {
        let chain = DevChain::start().await.unwrap();
        let address =
            Address::p2wsh(&anyone_can_spend_script(), ldk_node::bitcoin::Network::Regtest);
        assert!(matches!(
            chain.faucet(&address, Amount::ZERO),
            Err(DevChainError::InvalidAmount(_))
        ));
        let txid = chain.faucet(&address, Amount::from_sat(5_000)).unwrap();
        assert_eq!(chain.mempool_txids(), vec![txid]);
        assert_eq!(chain.tx_confirmations(&txid), Some(0));
        let hashes = chain.mine_blocks(2).unwrap();
        assert_eq!(hashes.len(), 2);
        assert_eq!(chain.tip_hash(), hashes[1]);
        assert_eq!(chain.mempool_len(), 0);
        assert_eq!(chain.tx_confirmations(&txid), Some(2));
        let out = chain.utxo(&OutPoint { txid, vout: 0 }).unwrap();
        assert_eq!(out.value, Amount::from_sat(5_000));
        assert_eq!(out.script_pubkey, address.script_pubkey());
        chain.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn auto_mining_adds_blocks_until_stopped() {
        let chain =
            DevChain::start_with(DevChainConfig { initial_blocks: 0, ..Default::default() })
                .await
                .unwrap();
        chain.start_auto_mining(Duration::from_millis(10));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while chain.height() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "auto-miner mined no blocks");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        chain.stop_auto_mining();
        chain.shutdown().await;
    }
}
