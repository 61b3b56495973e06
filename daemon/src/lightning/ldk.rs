//! [`LdkBackend`]: the Lightning backend over an embedded `ldk-node` (=0.7.1) node.
//!
//! ldk-node's API is synchronous and some calls block on its runtime with
//! `block_in_place`: every call that can block (sends, store writes, wallet, peers) runs on
//! tokio's blocking pool through `spawn_blocking`, and the node must be started on a
//! multi-thread runtime (checked at start). Cheap in-memory reads are called directly.
//!
//! One task drains the node's events: it translates each, records payment outcomes in
//! memory, hands the event to the caller's [`LightningEventHandler`] (if any) and to the
//! `next_event` queue, and only then acknowledges it to the node (`event_handled`), so an
//! event whose handler failed is offered again — after a restart too.
//!
//! The node's seed lives in `<data_dir>/keys_seed` (64 random bytes, mode 0600), created on
//! first start with a write-temp-fsync-rename-fsync-dir sequence.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ldk_node::bitcoin::constants::ChainHash;
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::bitcoin::{Address, Network};
use ldk_node::config::{Config, WALLET_KEYS_SEED_LEN};
use ldk_node::lightning::events::PaymentFailureReason;
use ldk_node::lightning::ln::channelmanager::PaymentId as LdkPaymentId;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning::offers::offer::Offer;
use ldk_node::lightning::routing::gossip::NodeId;
use ldk_node::lightning::routing::router::RouteParametersConfig;
use ldk_node::lightning_types::payment::PaymentPreimage;
use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus as LdkPaymentStatus};
use ldk_node::{BuildError, Builder, ChannelDetails, CustomTlvRecord, Event, Node, NodeError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::events::{hand_to_handler, stopped, EventQueue, LightningEventHandler};
use super::{
    ChannelId, ChannelInfo, ChannelsSummary, FailureReason, KeysendRequest, LightningBackend,
    LightningError, LightningEvent, NodeInfo, OfferRequest, OnchainBalance, OpenChannelRequest,
    PaymentId, PaymentRef, PaymentStatus, UserChannelId, DEFAULT_EVENT_QUEUE_CAPACITY,
};
use crate::devchain::DevChain;

/// Name of the seed file inside the data dir (the name ldk-node itself would use).
pub const SEED_FILE_NAME: &str = "keys_seed";
/// Most payment outcomes remembered in memory (oldest forgotten first). Forgetting one only
/// loses a failure's reason: the node's store keeps the status.
const MAX_REMEMBERED_OUTCOMES: usize = 100_000;
/// Wait before taking the next event after `event_handled` failed (a store write).
const ACK_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the node reads the chain.
#[derive(Clone, PartialEq, Eq)]
pub enum ChainSourceConfig {
    /// A bitcoind JSON-RPC endpoint (also what the dev chain serves).
    BitcoindRpc {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
        /// RPC user.
        user: String,
        /// RPC password.
        password: String,
    },
    /// An Esplora HTTP server, e.g. `https://blockstream.info/api`.
    Esplora {
        /// Base URL.
        url: String,
    },
    /// An Electrum server, e.g. `ssl://electrum.blockstream.info:50002`.
    Electrum {
        /// Server URL.
        url: String,
    },
}

impl ChainSourceConfig {
    /// The dev chain's RPC endpoint.
    pub fn dev_chain(chain: &DevChain) -> ChainSourceConfig {
        ChainSourceConfig::BitcoindRpc {
            host: chain.rpc_addr().ip().to_string(),
            port: chain.rpc_addr().port(),
            user: chain.rpc_user().to_owned(),
            password: chain.rpc_password().to_owned(),
        }
    }
}

impl std::fmt::Debug for ChainSourceConfig {
    // By hand, so the RPC password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainSourceConfig::BitcoindRpc { host, port, user, .. } => f
                .debug_struct("BitcoindRpc")
                .field("host", host)
                .field("port", port)
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            ChainSourceConfig::Esplora { url } => {
                f.debug_struct("Esplora").field("url", url).finish()
            }
            ChainSourceConfig::Electrum { url } => {
                f.debug_struct("Electrum").field("url", url).finish()
            }
        }
    }
}

/// How to build an [`LdkBackend`].
#[derive(Clone, Debug)]
pub struct LdkBackendConfig {
    /// The node's own directory: seed, SQLite store, logs (`logs/ldk_node_latest.log`).
    /// Created (mode 0700) if missing. One node per directory.
    pub data_dir: PathBuf,
    /// The chain.
    pub network: Network,
    /// Where to accept peer connections, `host:port` (none: outbound connections only).
    pub listening_addresses: Vec<String>,
    /// The addresses announced to the network, `host:port` (none: the listening addresses).
    pub announcement_addresses: Vec<String>,
    /// The alias announced to the network; needed (with listening or announcement
    /// addresses) to open announced channels — and an announced channel is what lets a node
    /// with several peers pay BOLT12 offers (see [`LdkBackend::is_announced`]).
    pub node_alias: Option<String>,
    /// Where to read the chain.
    pub chain_source: ChainSourceConfig,
    /// Peers for whose channels we keep no on-chain anchor reserve (a receiving node lists
    /// the payer here; see DESIGN.md "Lightning").
    pub trusted_peers_no_reserve: Vec<[u8; 33]>,
    /// Peers to keep connected, `(node id, host:port)`: connected at start and again
    /// whenever the connection drops (a receiving node lists its payer, whose channel is
    /// inbound and so has no address the node would otherwise reconnect to).
    pub peers: Vec<([u8; 33], String)>,
    /// Capacity of the `next_event` queue.
    pub event_queue_capacity: usize,
}

impl LdkBackendConfig {
    /// A config with no listening address, no alias, no trusted peers.
    pub fn new(data_dir: PathBuf, network: Network, chain_source: ChainSourceConfig) -> Self {
        LdkBackendConfig {
            data_dir,
            network,
            listening_addresses: Vec::new(),
            announcement_addresses: Vec::new(),
            node_alias: None,
            chain_source,
            trusted_peers_no_reserve: Vec::new(),
            peers: Vec::new(),
            event_queue_capacity: DEFAULT_EVENT_QUEUE_CAPACITY,
        }
    }
}

/// A payment outcome the event task saw.
#[derive(Clone, Debug)]
enum Outcome {
    Succeeded { preimage: [u8; 32], fee_paid_msat: Option<u64> },
    Failed(FailureReason),
}

/// Outcomes by payment id, bounded, oldest forgotten first.
#[derive(Debug, Default)]
struct Outcomes {
    by_id: HashMap<PaymentId, Outcome>,
    order: VecDeque<PaymentId>,
}

impl Outcomes {
    fn record(&mut self, id: PaymentId, outcome: Outcome) {
        // A success is final: LDK may report a late failure after it (ldk-node drops those,
        // this guards the same rule here).
        if let Some(Outcome::Succeeded { .. }) = self.by_id.get(&id) {
            return;
        }
        if self.by_id.insert(id, outcome).is_none() {
            self.order.push_back(id);
            if self.order.len() > MAX_REMEMBERED_OUTCOMES {
                if let Some(oldest) = self.order.pop_front() {
                    self.by_id.remove(&oldest);
                }
            }
        }
    }

    fn get(&self, id: &PaymentId) -> Option<&Outcome> {
        self.by_id.get(id)
    }
}

/// What the event task and the backend share.
#[derive(Debug)]
struct Shared {
    outcomes: Mutex<Outcomes>,
    queue: EventQueue,
}

impl Shared {
    fn outcomes(&self) -> MutexGuard<'_, Outcomes> {
        self.outcomes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Inner {
    node: Arc<Node>,
    network: Network,
    shared: Arc<Shared>,
    /// `true` stops the event task; dropping it does too.
    stop_tx: watch::Sender<bool>,
    event_task: Mutex<Option<JoinHandle<()>>>,
}

/// A Lightning backend over an embedded ldk-node. Cheap to clone; clones share one node.
///
/// Call [`LdkBackend::stop`] before dropping the last clone and before the tokio runtime
/// shuts down: dropping a running `ldk_node::Node` stops it from its `Drop`, which blocks.
#[derive(Clone)]
pub struct LdkBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LdkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdkBackend")
            .field("node_id", &self.inner.node.node_id())
            .field("network", &self.inner.network)
            .finish()
    }
}

impl LdkBackend {
    /// Builds and starts the node, and starts the event task. Events reach only the
    /// `next_event` queue.
    pub async fn start(config: LdkBackendConfig) -> Result<LdkBackend, LightningError> {
        LdkBackend::start_with_handler(config, None).await
    }

    /// Like [`LdkBackend::start`], with a handler that takes every event before the node's
    /// event is acknowledged (see [`LightningEventHandler`]).
    pub async fn start_with_handler(
        config: LdkBackendConfig,
        handler: Option<Arc<dyn LightningEventHandler>>,
    ) -> Result<LdkBackend, LightningError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| LightningError::Permanent("LdkBackend needs a tokio runtime".into()))?;
        if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            // ldk-node blocks with `block_in_place`, which panics on a current-thread runtime.
            return Err(LightningError::Permanent(
                "LdkBackend needs a multi-thread tokio runtime".into(),
            ));
        }
        let network = config.network;
        let queue_capacity = config.event_queue_capacity;
        let peers = config.peers.clone();
        let node =
            tokio::task::spawn_blocking(move || build_and_start(&config, runtime)).await.map_err(
                |e| LightningError::Unavailable(format!("starting the node failed: {e}")),
            )??;
        let node = Arc::new(node);
        tracing::info!(node_id = %node.node_id(), ?network, "ldk node started");

        let shared = Arc::new(Shared {
            outcomes: Mutex::new(Outcomes::default()),
            queue: EventQueue::new(queue_capacity),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let peers = peers
            .iter()
            .map(|(id, addr)| Ok((parse_node_id(id)?, parse_socket_address(addr)?)))
            .collect::<Result<Vec<_>, LightningError>>()?;
        if !peers.is_empty() {
            tokio::spawn(keep_connected(Arc::clone(&node), peers, stop_rx.clone()));
        }
        let task =
            tokio::spawn(run_events(Arc::clone(&node), Arc::clone(&shared), handler, stop_rx));
        Ok(LdkBackend {
            inner: Arc::new(Inner {
                node,
                network,
                shared,
                stop_tx,
                event_task: Mutex::new(Some(task)),
            }),
        })
    }

    /// Stops the event task (the event being handled, if any, stays unacknowledged and is
    /// offered again at the next start), closes the `next_event` queue and stops the node.
    /// Idempotent.
    pub async fn stop(&self) -> Result<(), LightningError> {
        // Fails only when the event task is gone already.
        let _ = self.inner.stop_tx.send(true);
        let task = self.inner.event_task.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::warn!("lightning event task ended badly: {e}");
            }
        }
        self.inner.shared.queue.close();
        match self.on_node("stop", |node| node.stop()).await? {
            Ok(()) | Err(NodeError::NotRunning) => Ok(()),
            Err(e) => Err(node_error("stop", e)),
        }
    }

    /// The embedded node, for what the trait does not cover (creating offers and invoices
    /// on a receiving node, gossip, diagnostics).
    pub fn node(&self) -> &Arc<Node> {
        &self.inner.node
    }

    /// Our node id.
    pub fn node_id(&self) -> [u8; 33] {
        self.inner.node.node_id().serialize()
    }

    /// Syncs the wallets with the chain now instead of at the next background poll.
    pub async fn sync_wallets(&self) -> Result<(), LightningError> {
        self.on_node("sync_wallets", |node| node.sync_wallets())
            .await?
            .map_err(|e| node_error("sync_wallets", e))
    }

    /// Events dropped because the `next_event` queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.inner.shared.queue.dropped()
    }

    /// Outbound payments the node's store holds as pending (diagnostics).
    pub fn pending_outbound_payments(&self) -> usize {
        self.inner
            .node
            .list_payments_with_filter(|p| {
                p.direction == PaymentDirection::Outbound && p.status == LdkPaymentStatus::Pending
            })
            .len()
    }

    /// Whether our node is in its own gossip graph, i.e. has at least one announced channel
    /// whose announcement the node has taken in. Only then can it pay BOLT12 offers while it
    /// has several peers: LDK 0.2 (`DefaultMessageRouter`) builds the reply path of an
    /// invoice request through an announced node — ourselves, or a peer in the graph — and
    /// through an unannounced peer only when it is our only peer.
    pub fn is_announced(&self) -> bool {
        let node = &self.inner.node;
        node.network_graph().node(&NodeId::from_pubkey(&node.node_id())).is_some()
    }

    /// Why LDK cannot build a reply path for an invoice request, if that is the case (see
    /// [`LdkBackend::is_announced`]); `None` if it could.
    fn reply_path_problem(&self) -> Option<String> {
        if self.is_announced() {
            return None;
        }
        let node = &self.inner.node;
        let graph = node.network_graph();
        let connected: Vec<PublicKey> =
            node.list_peers().into_iter().filter(|p| p.is_connected).map(|p| p.node_id).collect();
        let announced_peers =
            connected.iter().filter(|p| graph.node(&NodeId::from_pubkey(p)).is_some()).count();
        if connected.len() == 1 || announced_peers > 0 {
            return None;
        }
        Some(format!(
            "no reply path for the invoice request (LDK: MissingPaths): this node has no \
             announced channel and {} connected peers, none of them announced, and LDK routes \
             the offer's invoice back only through an announced node or a node's only peer; \
             open an announced channel from this node (it needs lightning.node_alias and a \
             listening or announcement address)",
            connected.len()
        ))
    }

    /// Runs `f` on the blocking pool. A panic or a runtime shutting down leaves the outcome
    /// unknown, hence `Transient`.
    async fn on_node<T, F>(&self, what: &'static str, f: F) -> Result<T, LightningError>
    where
        F: FnOnce(&Node) -> T + Send + 'static,
        T: Send + 'static,
    {
        let node = Arc::clone(&self.inner.node);
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| LightningError::Transient(format!("{what} did not complete: {e}")))
    }

    fn status_of(&self, id: &PaymentId) -> PaymentStatus {
        let recorded = self.inner.shared.outcomes().get(id).cloned();
        if let Some(Outcome::Succeeded { preimage, fee_paid_msat }) = recorded {
            return PaymentStatus::Succeeded { preimage, fee_paid_msat };
        }
        let details = self
            .inner
            .node
            .payment(&LdkPaymentId(id.0))
            .filter(|d| d.direction == PaymentDirection::Outbound);
        let Some(details) = details else {
            return match recorded {
                // Seen failing (e.g. a BOLT12 send refused before a record was kept).
                Some(Outcome::Failed(reason)) => PaymentStatus::Failed { reason },
                _ => PaymentStatus::Unknown,
            };
        };
        match details.status {
            LdkPaymentStatus::Pending => PaymentStatus::Pending,
            LdkPaymentStatus::Succeeded => match preimage_of(&details.kind) {
                Some(preimage) => {
                    PaymentStatus::Succeeded { preimage, fee_paid_msat: details.fee_paid_msat }
                }
                // Only records written by ldk-node before 0.5 lack it; without the proof the
                // payment cannot be finalised, so it is reported as still open.
                None => {
                    tracing::error!(payment_id = %id, "succeeded payment has no preimage");
                    PaymentStatus::Pending
                }
            },
            LdkPaymentStatus::Failed => PaymentStatus::Failed {
                reason: match recorded {
                    Some(Outcome::Failed(reason)) => reason,
                    _ => FailureReason::NotRecorded,
                },
            },
        }
    }

    /// Views of a stopped node would be stale: say it is unavailable instead.
    fn ensure_running(&self) -> Result<(), LightningError> {
        if self.inner.node.status().is_running {
            Ok(())
        } else {
            Err(LightningError::Unavailable("the node is not running".into()))
        }
    }

    fn record_failure(&self, id: PaymentId, reason: FailureReason) {
        self.inner.shared.outcomes().record(id, Outcome::Failed(reason));
    }
}

fn preimage_of(kind: &PaymentKind) -> Option<[u8; 32]> {
    match kind {
        PaymentKind::Spontaneous { preimage, .. }
        | PaymentKind::Bolt11 { preimage, .. }
        | PaymentKind::Bolt11Jit { preimage, .. }
        | PaymentKind::Bolt12Offer { preimage, .. }
        | PaymentKind::Bolt12Refund { preimage, .. } => preimage.map(|p| p.0),
        PaymentKind::Onchain { .. } => None,
    }
}

fn parse_node_id(node_id: &[u8; 33]) -> Result<PublicKey, LightningError> {
    PublicKey::from_slice(node_id)
        .map_err(|e| LightningError::Permanent(format!("invalid node id: {e}")))
}

fn parse_socket_address(addr: &str) -> Result<SocketAddress, LightningError> {
    SocketAddress::from_str(addr)
        .map_err(|e| LightningError::Permanent(format!("invalid address {addr:?}: {e:?}")))
}

fn route_params(max_fee_msat: u64) -> RouteParametersConfig {
    RouteParametersConfig::default().with_max_total_routing_fee_msat(max_fee_msat)
}

/// What a node error means for the caller, for calls with no more specific mapping.
fn node_error(what: &str, e: NodeError) -> LightningError {
    let message = format!("{what}: {e}");
    match e {
        NodeError::NotRunning | NodeError::ConnectionFailed => LightningError::Unavailable(message),
        NodeError::InsufficientFunds
        | NodeError::InvalidAddress
        | NodeError::InvalidSocketAddress
        | NodeError::InvalidPublicKey
        | NodeError::InvalidNodeId
        | NodeError::InvalidPaymentId
        | NodeError::InvalidAmount
        | NodeError::InvalidInvoice
        | NodeError::InvalidOffer
        | NodeError::InvalidNetwork
        | NodeError::InvalidChannelId
        | NodeError::InvalidCustomTlvs
        | NodeError::InvalidQuantity
        | NodeError::InvalidNodeAlias
        | NodeError::InvalidFeeRate
        | NodeError::UnsupportedCurrency
        | NodeError::ChannelCreationFailed => LightningError::Permanent(message),
        // Store writes, syncs, timeouts and anything unexpected: the effect is unknown.
        _ => LightningError::Transient(message),
    }
}

fn build_error(e: BuildError) -> LightningError {
    let message = format!("building the node failed: {e}");
    match e {
        BuildError::InvalidSeedBytes
        | BuildError::InvalidSeedFile
        | BuildError::InvalidListeningAddresses
        | BuildError::InvalidAnnouncementAddresses
        | BuildError::InvalidNodeAlias
        | BuildError::NetworkMismatch
        | BuildError::AsyncPaymentsConfigMismatch => LightningError::Permanent(message),
        _ => LightningError::Unavailable(message),
    }
}

fn build_and_start(
    config: &LdkBackendConfig,
    runtime: tokio::runtime::Handle,
) -> Result<Node, LightningError> {
    let seed = load_or_create_seed(&config.data_dir)?;
    let storage_dir_path = config
        .data_dir
        .to_str()
        .ok_or_else(|| {
            LightningError::Permanent(format!("data dir {:?} is not UTF-8", config.data_dir))
        })?
        .to_owned();
    let mut ldk_config = Config { storage_dir_path, network: config.network, ..Config::default() };
    if let Some(anchors) = ldk_config.anchor_channels_config.as_mut() {
        anchors.trusted_peers_no_reserve =
            config.trusted_peers_no_reserve.iter().map(parse_node_id).collect::<Result<_, _>>()?;
    }
    let mut builder = Builder::from_config(ldk_config);
    builder.set_entropy_seed_bytes(seed);
    builder.set_runtime(runtime);
    if !config.listening_addresses.is_empty() {
        let addresses = config
            .listening_addresses
            .iter()
            .map(|a| parse_socket_address(a))
            .collect::<Result<Vec<_>, _>>()?;
        builder.set_listening_addresses(addresses).map_err(build_error)?;
    }
    if !config.announcement_addresses.is_empty() {
        let addresses = config
            .announcement_addresses
            .iter()
            .map(|a| parse_socket_address(a))
            .collect::<Result<Vec<_>, _>>()?;
        builder.set_announcement_addresses(addresses).map_err(build_error)?;
    }
    if let Some(alias) = &config.node_alias {
        builder.set_node_alias(alias.clone()).map_err(build_error)?;
    }
    match &config.chain_source {
        ChainSourceConfig::BitcoindRpc { host, port, user, password } => {
            builder.set_chain_source_bitcoind_rpc(
                host.clone(),
                *port,
                user.clone(),
                password.clone(),
            );
        }
        ChainSourceConfig::Esplora { url } => {
            builder.set_chain_source_esplora(url.clone(), None);
        }
        ChainSourceConfig::Electrum { url } => {
            builder.set_chain_source_electrum(url.clone(), None);
        }
    }
    let node = builder.build().map_err(build_error)?;
    node.start().map_err(|e| node_error("starting the node", e))?;
    Ok(node)
}

/// Reads the 64-byte seed from `<data_dir>/keys_seed`, creating it (mode 0600) if missing,
/// and makes sure an existing one is mode 0600 (ldk-node itself creates it 0400).
fn load_or_create_seed(data_dir: &Path) -> Result<[u8; WALLET_KEYS_SEED_LEN], LightningError> {
    let io_error =
        |what: &str, e: std::io::Error| LightningError::Unavailable(format!("{what}: {e}"));
    create_private_dir(data_dir).map_err(|e| io_error("creating the data dir", e))?;
    let path = data_dir.join(SEED_FILE_NAME);
    match fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; WALLET_KEYS_SEED_LEN] = bytes.as_slice().try_into().map_err(|_| {
                LightningError::Permanent(format!(
                    "{} holds {} bytes, a seed has {WALLET_KEYS_SEED_LEN}",
                    path.display(),
                    bytes.len()
                ))
            })?;
            restrict_to_owner(&path).map_err(|e| io_error("restricting the seed file", e))?;
            Ok(seed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; WALLET_KEYS_SEED_LEN];
            getrandom::getrandom(&mut seed).map_err(|e| {
                LightningError::Unavailable(format!("no randomness for the seed: {e}"))
            })?;
            write_private_file(&path, &seed).map_err(|e| io_error("writing the seed file", e))?;
            tracing::info!(path = %path.display(), "created a new node seed");
            Ok(seed)
        }
        Err(e) => Err(io_error("reading the seed file", e)),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes `bytes` to `path` crash-safely: a temp file (mode 0600), fsync, rename, fsync of
/// the directory — a crash leaves either no seed file or the whole one.
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    // The umask may have narrowed the mode; set it exactly.
    restrict_to_owner(&tmp)?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(unix)]
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    if mode != 0o600 {
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "seed file was mode {mode:o}; setting 0600");
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict_to_owner(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// The event task: take, translate, record, hand over, acknowledge — until stopped.
/// How often [`keep_connected`] looks at its peers.
const PEER_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Connects to each of `peers` that is not connected, every [`PEER_CHECK_INTERVAL`], until
/// `stop` turns true.
async fn keep_connected(
    node: Arc<Node>,
    peers: Vec<(PublicKey, SocketAddress)>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let connected: Vec<PublicKey> =
            node.list_peers().into_iter().filter(|p| p.is_connected).map(|p| p.node_id).collect();
        for (id, addr) in &peers {
            if connected.contains(id) {
                continue;
            }
            let (n, id, addr) = (Arc::clone(&node), *id, addr.clone());
            match tokio::task::spawn_blocking(move || n.connect(id, addr, true)).await {
                Ok(Ok(())) => tracing::info!(peer = %id, "connected to peer"),
                Ok(Err(e)) => tracing::debug!(peer = %id, "connecting to peer failed: {e}"),
                Err(e) => tracing::debug!(peer = %id, "connecting to peer did not complete: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PEER_CHECK_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn run_events(
    node: Arc<Node>,
    shared: Arc<Shared>,
    handler: Option<Arc<dyn LightningEventHandler>>,
    mut stop_rx: watch::Receiver<bool>,
) {
    loop {
        // `next_event_async` only peeks: abandoning it on stop loses nothing.
        let event = tokio::select! {
            biased;
            _ = stopped(&mut stop_rx) => return,
            event = node.next_event_async() => event,
        };
        if let Some(translated) = translate_event(&node, &event) {
            record_outcome(&shared, &translated);
            if let Some(handler) = &handler {
                if !hand_to_handler(handler, &translated, &mut stop_rx).await {
                    return;
                }
            }
            shared.queue.push(translated);
        }
        let acking = Arc::clone(&node);
        match tokio::task::spawn_blocking(move || acking.event_handled()).await {
            Ok(Ok(())) => {}
            failed => {
                // The node offers the same event again; handlers are idempotent.
                tracing::warn!(?event, "event_handled failed ({failed:?}); retrying");
                tokio::select! {
                    _ = tokio::time::sleep(ACK_RETRY_DELAY) => {}
                    _ = stopped(&mut stop_rx) => return,
                }
            }
        }
    }
}

fn record_outcome(shared: &Shared, event: &LightningEvent) {
    match event {
        LightningEvent::PaymentSucceeded { payment_id, preimage, fee_paid_msat, .. } => {
            shared.outcomes().record(
                *payment_id,
                Outcome::Succeeded { preimage: *preimage, fee_paid_msat: *fee_paid_msat },
            );
        }
        LightningEvent::PaymentFailed { payment_id, reason, .. } => {
            shared.outcomes().record(*payment_id, Outcome::Failed(reason.clone()));
        }
        _ => {}
    }
}

fn failure_reason(reason: Option<PaymentFailureReason>) -> FailureReason {
    match reason {
        None => FailureReason::NotRecorded,
        Some(PaymentFailureReason::RecipientRejected) => FailureReason::RecipientRejected,
        Some(PaymentFailureReason::UserAbandoned) => FailureReason::UserAbandoned,
        Some(PaymentFailureReason::RetriesExhausted) => FailureReason::RetriesExhausted,
        Some(PaymentFailureReason::PaymentExpired) => FailureReason::PaymentExpired,
        Some(PaymentFailureReason::RouteNotFound) => FailureReason::RouteNotFound,
        Some(PaymentFailureReason::UnexpectedError) => {
            FailureReason::Other("unexpected error in the node".into())
        }
        Some(PaymentFailureReason::UnknownRequiredFeatures) => {
            FailureReason::UnknownRequiredFeatures
        }
        Some(PaymentFailureReason::InvoiceRequestExpired) => FailureReason::InvoiceRequestExpired,
        Some(PaymentFailureReason::InvoiceRequestRejected) => FailureReason::InvoiceRequestRejected,
        Some(PaymentFailureReason::BlindedPathCreationFailed) => {
            FailureReason::BlindedPathCreationFailed
        }
    }
}

/// The backend's view of a node event; `None` for events it does not report (they are
/// still acknowledged).
fn translate_event(node: &Node, event: &Event) -> Option<LightningEvent> {
    match event {
        Event::PaymentSuccessful { payment_id, payment_hash, payment_preimage, fee_paid_msat } => {
            let Some(payment_id) = payment_id else {
                tracing::warn!(?event, "payment event without an id (ldk-node <= 0.2.1)");
                return None;
            };
            // Events written before ldk-node 0.5 lack the preimage; the store may have it.
            let preimage = payment_preimage
                .map(|p| p.0)
                .or_else(|| node.payment(payment_id).and_then(|d| preimage_of(&d.kind)));
            let Some(preimage) = preimage else {
                tracing::error!(?event, "payment succeeded without a known preimage");
                return None;
            };
            Some(LightningEvent::PaymentSucceeded {
                payment_id: PaymentId(payment_id.0),
                payment_hash: payment_hash.0,
                preimage,
                fee_paid_msat: *fee_paid_msat,
            })
        }
        Event::PaymentFailed { payment_id, payment_hash, reason } => {
            let Some(payment_id) = payment_id else {
                tracing::warn!(?event, "payment event without an id (ldk-node <= 0.2.1)");
                return None;
            };
            Some(LightningEvent::PaymentFailed {
                payment_id: PaymentId(payment_id.0),
                payment_hash: payment_hash.map(|h| h.0),
                reason: failure_reason(*reason),
            })
        }
        Event::PaymentReceived { payment_hash, amount_msat, custom_records, .. } => {
            let mut custom_tlvs: Vec<(u64, Vec<u8>)> =
                custom_records.iter().map(|r| (r.type_num, r.value.clone())).collect();
            custom_tlvs.sort_by_key(|(t, _)| *t);
            Some(LightningEvent::PaymentReceived {
                payment_hash: payment_hash.0,
                amount_msat: *amount_msat,
                custom_tlvs,
            })
        }
        Event::ChannelPending {
            channel_id,
            user_channel_id,
            counterparty_node_id,
            funding_txo,
            ..
        } => Some(LightningEvent::ChannelPending {
            channel_id: ChannelId(channel_id.0),
            user_channel_id: UserChannelId(user_channel_id.0),
            counterparty: counterparty_node_id.serialize(),
            funding_txid: funding_txo.txid,
        }),
        Event::ChannelReady { channel_id, user_channel_id, counterparty_node_id, .. } => {
            Some(LightningEvent::ChannelReady {
                channel_id: ChannelId(channel_id.0),
                user_channel_id: UserChannelId(user_channel_id.0),
                counterparty: counterparty_node_id.map(|k| k.serialize()),
            })
        }
        Event::ChannelClosed { channel_id, user_channel_id, counterparty_node_id, reason } => {
            Some(LightningEvent::ChannelClosed {
                channel_id: ChannelId(channel_id.0),
                user_channel_id: UserChannelId(user_channel_id.0),
                counterparty: counterparty_node_id.map(|k| k.serialize()),
                reason: reason.as_ref().map_or_else(|| "unknown".to_owned(), |r| r.to_string()),
            })
        }
        _ => None,
    }
}

fn channel_info(c: &ChannelDetails) -> ChannelInfo {
    ChannelInfo {
        channel_id: ChannelId(c.channel_id.0),
        user_channel_id: UserChannelId(c.user_channel_id.0),
        counterparty: c.counterparty_node_id.serialize(),
        capacity_sat: c.channel_value_sats,
        outbound_capacity_msat: c.outbound_capacity_msat,
        inbound_capacity_msat: c.inbound_capacity_msat,
        ready: c.is_channel_ready,
        usable: c.is_usable,
        announced: c.is_announced,
        outbound: c.is_outbound,
        funding_txid: c.funding_txo.map(|o| o.txid),
        confirmations: c.confirmations,
    }
}

#[tonic::async_trait]
impl LightningBackend for LdkBackend {
    async fn node_info(&self) -> Result<NodeInfo, LightningError> {
        self.ensure_running()?;
        let node = &self.inner.node;
        let status = node.status();
        let channels: Vec<ChannelInfo> = node.list_channels().iter().map(channel_info).collect();
        Ok(NodeInfo {
            node_id: node.node_id().serialize(),
            network: self.inner.network,
            block_height: status.current_best_block.height,
            listening_addresses: node
                .listening_addresses()
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect(),
            channels: ChannelsSummary::of(&channels),
        })
    }

    async fn pay_keysend(&self, request: KeysendRequest) -> Result<PaymentRef, LightningError> {
        request.validate()?;
        let dest = parse_node_id(&request.dest_node_id)?;
        let id = request.payment_id();
        let KeysendRequest { amount_msat, preimage, custom_tlvs, max_fee_msat, .. } = request;
        let tlvs: Vec<CustomTlvRecord> = custom_tlvs
            .into_iter()
            .map(|(type_num, value)| CustomTlvRecord { type_num, value })
            .collect();
        let sent = self
            .on_node("keysend", move |node| {
                node.spontaneous_payment().send_with_preimage_and_custom_tlvs(
                    amount_msat,
                    dest,
                    tlvs,
                    PaymentPreimage(preimage),
                    Some(route_params(max_fee_msat)),
                )
            })
            .await?;
        match sent {
            Ok(ldk_id) => {
                debug_assert_eq!(ldk_id.0, id.0, "keysend payment id is the payment hash");
                Ok(PaymentRef { payment_id: id, payment_hash: Some(id.0) })
            }
            Err(NodeError::DuplicatePayment) => Err(LightningError::Duplicate(id)),
            Err(NodeError::PaymentSendingFailed) => {
                // ldk-node recorded the payment as failed; nothing went out.
                let reason = FailureReason::SendFailed(
                    "no usable route (payee offline, channel not ready, or not enough \
                     liquidity or fee budget)"
                        .into(),
                );
                self.record_failure(id, reason.clone());
                Err(LightningError::PaymentFailed(reason))
            }
            Err(e) => Err(node_error("keysend", e)),
        }
    }

    async fn pay_offer(&self, request: OfferRequest) -> Result<PaymentRef, LightningError> {
        request.validate()?;
        let offer = Offer::from_str(request.offer.trim())
            .map_err(|e| LightningError::Permanent(format!("invalid offer: {e:?}")))?;
        if !offer.supports_chain(ChainHash::using_genesis_block(self.inner.network)) {
            return Err(LightningError::Permanent(format!(
                "the offer is not for {}",
                self.inner.network
            )));
        }
        if offer.is_expired() {
            return Err(LightningError::Permanent("the offer has expired".into()));
        }
        let OfferRequest { amount_msat, payer_note, max_fee_msat, .. } = request;
        let sent = self
            .on_node("pay offer", move |node| {
                node.bolt12_payment().send_using_amount(
                    &offer,
                    amount_msat,
                    None,
                    Some(payer_note),
                    Some(route_params(max_fee_msat)),
                )
            })
            .await?;
        match sent {
            Ok(ldk_id) => Ok(PaymentRef { payment_id: PaymentId(ldk_id.0), payment_hash: None }),
            Err(
                e @ (NodeError::InvoiceRequestCreationFailed | NodeError::PaymentSendingFailed),
            ) => {
                // ldk-node recorded a failed payment under an id it does not return. Its error
                // does not say why; the usual cause is one the operator must fix.
                let why = self.reply_path_problem().unwrap_or_else(|| e.to_string());
                Err(LightningError::PaymentFailed(FailureReason::SendFailed(why)))
            }
            Err(e) => Err(node_error("pay offer", e)),
        }
    }

    /// Answers from the node's payment store even while the node is stopped (the store is
    /// loaded when the node is built), which is what start-up reconciliation needs.
    async fn payment_status(&self, id: &PaymentId) -> Result<PaymentStatus, LightningError> {
        Ok(self.status_of(id))
    }

    async fn find_offer_payments(
        &self,
        payer_note: &str,
    ) -> Result<Vec<(PaymentId, PaymentStatus)>, LightningError> {
        let ids: Vec<PaymentId> = self
            .inner
            .node
            .list_payments_with_filter(|p| {
                p.direction == PaymentDirection::Outbound
                    && matches!(&p.kind, PaymentKind::Bolt12Offer { payer_note: Some(note), .. }
                        if note.0 == payer_note)
            })
            .iter()
            .map(|p| PaymentId(p.id.0))
            .collect();
        Ok(ids.into_iter().map(|id| (id, self.status_of(&id))).collect())
    }

    async fn next_event(&self) -> Option<LightningEvent> {
        self.inner.shared.queue.next().await
    }

    async fn onchain_address(&self) -> Result<Address, LightningError> {
        self.on_node("new address", |node| node.onchain_payment().new_address())
            .await?
            .map_err(|e| node_error("new address", e))
    }

    async fn onchain_balance(&self) -> Result<OnchainBalance, LightningError> {
        self.ensure_running()?;
        let balances = self.inner.node.list_balances();
        Ok(OnchainBalance {
            total_sat: balances.total_onchain_balance_sats,
            spendable_sat: balances.spendable_onchain_balance_sats,
            anchor_reserve_sat: balances.total_anchor_channels_reserve_sats,
            lightning_sat: balances.total_lightning_balance_sats,
        })
    }

    async fn connect(&self, node_id: [u8; 33], addr: &str) -> Result<(), LightningError> {
        let node_id = parse_node_id(&node_id)?;
        let addr = parse_socket_address(addr)?;
        self.on_node("connect", move |node| node.connect(node_id, addr, true))
            .await?
            .map_err(|e| node_error("connect", e))
    }

    async fn open_channel(
        &self,
        request: OpenChannelRequest,
    ) -> Result<UserChannelId, LightningError> {
        if request.amount_sat == 0 {
            return Err(LightningError::Permanent("channel amount must be above zero".into()));
        }
        if request.push_msat > request.amount_sat.saturating_mul(1_000) {
            return Err(LightningError::Permanent("push amount exceeds the channel".into()));
        }
        let node_id = parse_node_id(&request.node_id)?;
        let addr = parse_socket_address(&request.addr)?;
        let OpenChannelRequest { amount_sat, push_msat, announce, .. } = request;
        let push = (push_msat > 0).then_some(push_msat);
        self.on_node("open channel", move |node| {
            if announce {
                node.open_announced_channel(node_id, addr, amount_sat, push, None)
            } else {
                node.open_channel(node_id, addr, amount_sat, push, None)
            }
        })
        .await?
        .map(|id| UserChannelId(id.0))
        .map_err(|e| node_error("open channel", e))
    }

    async fn close_channel(
        &self,
        channel_id: &ChannelId,
        force: bool,
    ) -> Result<(), LightningError> {
        let channel = self
            .inner
            .node
            .list_channels()
            .into_iter()
            .find(|c| c.channel_id.0 == channel_id.0)
            .ok_or_else(|| LightningError::Permanent(format!("no channel {channel_id}")))?;
        let (user_channel_id, counterparty) =
            (channel.user_channel_id, channel.counterparty_node_id);
        self.on_node("close channel", move |node| {
            if force {
                node.force_close_channel(&user_channel_id, counterparty, None)
            } else {
                node.close_channel(&user_channel_id, counterparty)
            }
        })
        .await?
        .map_err(|e| node_error("close channel", e))
    }

    async fn list_channels(&self) -> Result<Vec<ChannelInfo>, LightningError> {
        self.ensure_running()?;
        Ok(self.inner.node.list_channels().iter().map(channel_info).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_seed_file_is_created_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("node");
        let seed = load_or_create_seed(&data_dir).unwrap();
        let path = data_dir.join(SEED_FILE_NAME);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!path.with_extension("tmp").exists());
        assert_eq!(load_or_create_seed(&data_dir).unwrap(), seed);

        // A file ldk-node made (0400) or a careless copy (0644) ends up 0600.
        for mode in [0o400, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(load_or_create_seed(&data_dir).unwrap(), seed);
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }

        // A truncated seed is refused, not replaced.
        fs::write(&path, [1u8; 10]).unwrap();
        assert!(matches!(load_or_create_seed(&data_dir), Err(LightningError::Permanent(_))));
    }

    #[test]
    fn outcomes_keep_success_and_forget_the_oldest() {
        let mut outcomes = Outcomes::default();
        let id = PaymentId([1; 32]);
        outcomes.record(id, Outcome::Succeeded { preimage: [2; 32], fee_paid_msat: Some(0) });
        outcomes.record(id, Outcome::Failed(FailureReason::RouteNotFound));
        assert!(matches!(outcomes.get(&id), Some(Outcome::Succeeded { .. })));
        for n in 0..MAX_REMEMBERED_OUTCOMES as u32 {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            bytes[31] = 9;
            outcomes.record(PaymentId(bytes), Outcome::Failed(FailureReason::NotRecorded));
        }
        assert!(outcomes.get(&id).is_none());
        assert_eq!(outcomes.by_id.len(), MAX_REMEMBERED_OUTCOMES);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_current_thread_runtime_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = LdkBackendConfig::new(
            dir.path().to_path_buf(),
            Network::Regtest,
            ChainSourceConfig::Esplora { url: "http://127.0.0.1:1".into() },
        );
        let err = LdkBackend::start(config).await.unwrap_err();
        assert!(matches!(err, LightningError::Permanent(ref m) if m.contains("multi-thread")));
    }
}
