//! `tribute demo`: the whole system on one machine, on embedded defaults.
//!
//! A dev chain, `tributed` (SQLite in a temp dir, its own ldk-node), one ldk-node per
//! contributor with a private channel from the daemon's node opened through the operator
//! RPCs, each contributor's receiving node verifying every signed state, datasets licensed
//! and a model trained on them, simulated inference traffic metered over `MeterStream`,
//! settlement rounds paid over Lightning, and a summary in which every figure comes from
//! its own source: accrued and outstanding from the daemon, paid from the contributors'
//! Lightning nodes, verified from the receiving nodes' records, pools from the provider's
//! receipts — and all of them checked against each other.
//!
//! Nothing here is a shortcut the real parts do not take: every call goes over gRPC on
//! loopback, every payment is a real keysend between ldk-nodes.

use crate::amounts::{grouped, msat_decimal};
use crate::connect::{error_chain, Authed, Bearer, DaemonEndpoint};
use crate::contributor::Contributor;
use crate::devnet;
use crate::keys::ContributorKey;
use crate::manifest::{Manifest, NoProgress};
use crate::node::{self, NodeConfig, NodeStore, PayoutDestination, NODE_DB_FILE};
use crate::payments;
use crate::provider::{Meter, Provider, ProviderConfig, RetryPolicy};
use crate::time::unix_now;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::transport::Channel;
use tribute_channels::licence::{Use, Uses};
use tribute_channels::{DatasetHash, Network, PublicKey, Timestamp};
use tribute_daemon::auth::Role;
use tribute_daemon::config::Config;
use tribute_daemon::devchain::DevChain;
use tribute_daemon::lightning::{DynLightningBackend, LdkBackend};
use tribute_daemon::reconcile;
use tribute_daemon::server::{self, RunningDaemon, StartOptions};
use tribute_daemon::settlement::EngineOptions;
use tribute_proto::v1 as pb;
use tribute_proto::v1::channels_client::ChannelsClient;
use tribute_proto::v1::operator_client::OperatorClient;
use tribute_proto::v1::registry_client::RegistryClient;

/// The demo's contributors, in order; `--contributors N` takes the first N.
pub const CONTRIBUTORS: [(&str, u64); 8] = [
    ("ada", 5),
    ("grace", 3),
    ("alan", 2),
    ("edsger", 4),
    ("barbara", 1),
    ("donald", 6),
    ("frances", 2),
    ("ken", 3),
];

/// The model the demo meters.
pub const MODEL: &str = "demo-llm";
/// The contributors' share of each request's price.
pub const SHARE_PPM: u32 = 200_000;
/// The model's tariff: about 1 sat per request plus per-token prices (odd numbers, so the
/// split leaves sub-msat remainders, as real prices do).
pub const TARIFF: (u64, u64, u64) = (1_000_000_007, 500_003, 1_500_011);

const CHANNEL_SATS: u64 = 500_000;
const WAIT: Duration = devnet::WAIT;
const POLL: Duration = Duration::from_millis(100);

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How many contributors (1..=8), each with its own Lightning and receiving node.
    pub contributors: usize,
    /// Inference requests to meter in all.
    pub requests: u64,
    /// Settlement rounds; the requests are spread over them.
    pub rounds: u32,
    /// Where everything is kept; a temp dir (deleted at the end) when `None`.
    pub data_dir: Option<PathBuf>,
    /// Seed of the simulated traffic (token counts).
    pub seed: u64,
    /// Draw progress bars and step lines on stderr.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            contributors: 3,
            requests: 20_000,
            rounds: 2,
            data_dir: None,
            seed: 1,
            progress: true,
        }
    }
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
#[error("demo: {step}: {detail}")]
pub struct DemoError {
    step: &'static str,
    detail: String,
}

impl DemoError {
    fn new(step: &'static str, detail: impl std::fmt::Display) -> Self {
        DemoError { step, detail: detail.to_string() }
    }
}

trait Context<T> {
    fn during(self, step: &'static str) -> Result<T, DemoError>;
}

impl<T, E: std::error::Error> Context<T> for Result<T, E> {
    fn during(self, step: &'static str) -> Result<T, DemoError> {
        self.map_err(|e| DemoError::new(step, error_chain(&e)))
    }
}

/// One contributor's line of the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContributorLine {
    /// Its name in the demo.
    pub name: String,
    /// Its contributor key.
    pub key: PublicKey,
    /// Its dataset's attribution weight.
    pub weight: u64,
    /// Accrued, as the daemon's channel says (nsat).
    pub accrued_nsat: u128,
    /// Settled, as the daemon's channel says (msat).
    pub settled_msat: u64,
    /// Outstanding (accrued - settled), as the daemon's channel says (nsat).
    pub outstanding_nsat: u128,
    /// What its receiving node's Lightning node received as payouts (msat), from the
    /// receiving node's own records (`tribute contributor status`).
    pub received_msat: u64,
    /// Payouts its receiving node recorded.
    pub payments: usize,
    /// Accrued as its receiving node's latest verified signed state says (nsat).
    pub verified_accrued_nsat: u128,
    /// Settled as its receiving node's latest verified signed state says (msat).
    pub verified_settled_msat: u64,
}

/// What the demo did and found.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Where everything was kept.
    pub data_dir: PathBuf,
    /// The daemon's database file.
    pub database: PathBuf,
    /// Requests metered (each acknowledged with a receipt).
    pub requests: u64,
    /// Metering wall time.
    pub metering: Duration,
    /// `Σ pool_nsat` over the provider's receipts.
    pub pools_nsat: u128,
    /// Settlement rounds run.
    pub rounds: u32,
    /// Settlements that succeeded, and their routing fees.
    pub settlements: usize,
    /// `Σ fee_msat` of the succeeded settlements.
    pub fees_msat: u64,
    /// Per contributor.
    pub lines: Vec<ContributorLine>,
    /// The daemon's gRPC address, metrics address and operator token (for `--keep-running`).
    pub grpc_addr: SocketAddr,
    /// `/metrics`, if served.
    pub metrics_addr: Option<SocketAddr>,
    /// An operator token for the running daemon.
    pub operator_token: String,
    /// `reconcile` of the daemon's database after the last round, with the provider key
    /// pinned: every invariant re-derived from the raw records.
    pub reconcile: reconcile::Report,
}

impl DemoReport {
    /// `Σ accrued` over the channels.
    pub fn accrued_nsat(&self) -> u128 {
        self.lines.iter().map(|l| l.accrued_nsat).sum()
    }

    /// `Σ (settled + outstanding)` over the channels, in nsat.
    pub fn settled_plus_outstanding_nsat(&self) -> u128 {
        self.lines.iter().map(|l| u128::from(l.settled_msat) * 1_000_000 + l.outstanding_nsat).sum()
    }

    /// The cross-checks the summary states, each with whether it holds.
    pub fn checks(&self) -> Vec<(String, bool)> {
        let paid: u64 = self.lines.iter().map(|l| l.settled_msat).sum();
        let received: u64 = self.lines.iter().map(|l| l.received_msat).sum();
        vec![
            (
                "Σ pools (provider's receipts) == Σ accrued (daemon's channels)".into(),
                self.pools_nsat == self.accrued_nsat(),
            ),
            (
                "Σ accrued == Σ (settled + outstanding), to the nsat".into(),
                self.accrued_nsat() == self.settled_plus_outstanding_nsat(),
            ),
            (
                "settled (daemon) == received (contributors' Lightning nodes), per contributor"
                    .into(),
                paid == received && self.lines.iter().all(|l| l.settled_msat == l.received_msat),
            ),
            (
                "every receiving node verified a signed state equal to its channel".into(),
                self.lines.iter().all(|l| {
                    l.verified_accrued_nsat == l.accrued_nsat
                        && l.verified_settled_msat == l.settled_msat
                }),
            ),
            (
                "only sub-msat remainders are left outstanding".into(),
                self.lines.iter().all(|l| l.outstanding_nsat < 1_000_000),
            ),
            (
                format!(
                    "reconcile: every invariant holds, re-derived from the raw records ({} \
                     events, {} signed batches, {} signed states, {} settlements)",
                    self.reconcile.checked.meter_events,
                    self.reconcile.checked.receipt_batches,
                    self.reconcile.checked.channel_states,
                    self.reconcile.checked.settlements
                ),
                self.reconcile.is_clean(),
            ),
            (
                "reconcile's figures equal the summary's, per contributor".into(),
                self.reconcile.totals.pools_nsat == self.pools_nsat
                    && self.reconcile.checked.meter_events == self.requests
                    && self.reconcile.channels.len() == self.lines.len()
                    && self.lines.iter().all(|l| {
                        self.reconcile.channels.iter().any(|c| {
                            c.contributor_key == l.key.to_string()
                                && c.accrued_nsat == l.accrued_nsat
                                && c.settled_msat == l.settled_msat
                                && c.outstanding_nsat == l.outstanding_nsat
                        })
                    }),
            ),
        ]
    }

    /// An error naming the first check that failed, if any did.
    pub fn ensure_checks(&self) -> Result<(), DemoError> {
        match self.checks().into_iter().find(|(_, ok)| !ok) {
            Some((what, _)) => Err(DemoError::new("summary", format!("check failed: {what}"))),
            None => Ok(()),
        }
    }

    /// The summary table and checks, as printed.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let total_weight: u64 = self.lines.iter().map(|l| l.weight).sum();
        let rate = self.requests as f64 / self.metering.as_secs_f64().max(1e-9);
        let _ = writeln!(
            s,
            "\nMetered {} requests in {:.2} s ({:.0}/s); {} settlement round(s), {} Lightning \
             payout(s), {} msat in routing fees.\n",
            self.requests,
            self.metering.as_secs_f64(),
            rate,
            self.rounds,
            self.settlements,
            self.fees_msat
        );
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>22} {:>16} {:>9} {:>16} {:>9}",
            "contributor",
            "weight",
            "accrued (msat)",
            "paid over LN",
            "payouts",
            "outstanding",
            "verified"
        );
        let _ = writeln!(s, "{}", "-".repeat(97));
        for l in &self.lines {
            let verified = l.verified_accrued_nsat == l.accrued_nsat
                && l.verified_settled_msat == l.settled_msat;
            let _ = writeln!(
                s,
                "{:<12} {:>7} {:>22} {:>16} {:>9} {:>16} {:>9}",
                l.name,
                format!("{}/{}", l.weight, total_weight),
                msat_decimal(l.accrued_nsat),
                grouped(u128::from(l.received_msat)),
                l.payments,
                msat_decimal(l.outstanding_nsat),
                if verified { "yes" } else { "NO" },
            );
        }
        let _ = writeln!(s, "{}", "-".repeat(97));
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>22} {:>16} {:>9} {:>16}",
            "total",
            "",
            msat_decimal(self.accrued_nsat()),
            grouped(self.lines.iter().map(|l| u128::from(l.received_msat)).sum()),
            self.lines.iter().map(|l| l.payments).sum::<usize>(),
            msat_decimal(self.lines.iter().map(|l| l.outstanding_nsat).sum()),
        );
        let _ = writeln!(s);
        for (what, ok) in self.checks() {
            let _ = writeln!(s, "  [{}] {what}", if ok { "ok" } else { "FAILED" });
        }
        s
    }
}

/// The whole msat of `nsat` (what a settlement pays).
fn whole_msat(nsat: u128) -> u64 {
    u64::try_from(nsat / 1_000_000).unwrap_or(u64::MAX)
}

/// Prints step lines and draws bars on stderr, or nothing.
struct Steps {
    on: bool,
    started: Instant,
}

impl Steps {
    fn say(&self, what: impl std::fmt::Display) {
        if self.on {
            eprintln!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
        }
    }

    fn bar(&self, len: u64, template: &str) -> ProgressBar {
        if !self.on {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }
}

/// Polls `check` until it gives `Some`, for at most [`devnet::WAIT`].
async fn wait_for<T, F, Fut>(what: &'static str, check: F) -> Result<T, DemoError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    devnet::wait_until(what, check).await.map_err(|e| DemoError::new(what, e))
}

fn free_port() -> Result<u16, DemoError> {
    devnet::free_port().during("finding a free port")
}

/// SplitMix64: a small deterministic generator, so a seed replays a run (the demo's
/// traffic, the crash loop's kill times).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The deterministic traffic generator: token counts of simulated requests.
struct Traffic(SplitMix64);

impl Traffic {
    /// (input, output) tokens: prompts of 50–4,000 tokens, answers of 10–1,200.
    fn request(&mut self) -> (u64, u64) {
        (self.0.between(50, 4_000), self.0.between(10, 1_200))
    }
}

struct Member {
    name: &'static str,
    weight: u64,
    home: PathBuf,
    key: PublicKey,
    dataset: DatasetHash,
    ln: LdkBackend,
    ln_addr: String,
    node: Option<tokio::task::JoinHandle<Result<(), node::NodeError>>>,
}

/// Everything the demo started, stopped in reverse order by [`World::shutdown`].
struct World {
    _temp: Option<tempfile::TempDir>,
    dir: PathBuf,
    chain: DevChain,
    daemon_ln: Arc<LdkBackend>,
    daemon: Option<RunningDaemon>,
    members: Vec<Member>,
    stop_nodes: watch::Sender<bool>,
    provider_token: String,
    operator_token: String,
    channel: Option<Channel>,
}

impl World {
    fn running(&self) -> &RunningDaemon {
        #[allow(clippy::expect_used)]
        self.daemon.as_ref().expect("the daemon runs until shutdown")
    }

    fn endpoint(&self) -> DaemonEndpoint {
        DaemonEndpoint::new(format!("http://{}", self.running().grpc_addr))
    }

    fn channel(&self) -> Result<Channel, DemoError> {
        self.channel.clone().ok_or_else(|| DemoError::new("connecting", "not connected yet"))
    }

    fn operator(&self) -> Result<OperatorClient<Authed>, DemoError> {
        Ok(OperatorClient::with_interceptor(
            self.channel()?,
            Bearer::new(Some(&self.operator_token)).during("operator token")?,
        ))
    }

    fn channels(&self) -> Result<ChannelsClient<Authed>, DemoError> {
        Ok(ChannelsClient::with_interceptor(
            self.channel()?,
            Bearer::new(Some(&self.operator_token)).during("operator token")?,
        ))
    }

    async fn shutdown(mut self) -> Result<(), DemoError> {
        let _ = self.stop_nodes.send(true);
        for m in &mut self.members {
            if let Some(h) = m.node.take() {
                match h.await {
                    Ok(r) => r.during("a receiving node")?,
                    Err(e) => return Err(DemoError::new("a receiving node", e)),
                }
            }
        }
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.during("stopping the daemon")?;
        }
        for m in &self.members {
            m.ln.stop().await.during("stopping a contributor's Lightning node")?;
        }
        self.daemon_ln.stop().await.during("stopping the daemon's Lightning node")?;
        self.chain.shutdown().await;
        Ok(())
    }
}

/// Runs the demo; prints its steps (if `options.progress`) and returns the report. When
/// `hold` is given, everything keeps running after the report until it completes (the
/// report is handed to `on_report` first, so it can be printed while waiting).
pub async fn run(
    options: DemoOptions,
    on_report: impl FnOnce(&DemoReport),
    hold: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
) -> Result<DemoReport, DemoError> {
    if options.contributors == 0 || options.contributors > CONTRIBUTORS.len() {
        return Err(DemoError::new(
            "options",
            format!("--contributors must be 1 to {}", CONTRIBUTORS.len()),
        ));
    }
    if options.rounds == 0 || options.requests < u64::from(options.rounds) {
        return Err(DemoError::new(
            "options",
            "--rounds must be at least 1 and at most --requests",
        ));
    }
    let steps = Steps { on: options.progress, started: Instant::now() };
    let world = start(&options, &steps).await?;
    let result = drive(&options, &steps, &world).await;
    match result {
        Ok(report) => {
            on_report(&report);
            if let Some(hold) = hold {
                hold.await;
            }
            steps.say("stopping");
            world.shutdown().await?;
            Ok(report)
        }
        Err(e) => {
            let _ = world.shutdown().await;
            Err(e)
        }
    }
}

/// Chain, nodes, daemon, channels and registrations.
async fn start(options: &DemoOptions, steps: &Steps) -> Result<World, DemoError> {
    let (temp, dir) = match &options.data_dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d).during("data dir")?.next().is_some() {
                return Err(DemoError::new(
                    "data dir",
                    format!("{} is not empty; the demo starts from nothing", d.display()),
                ));
            }
            std::fs::create_dir_all(d).during("data dir")?;
            (None, d.clone())
        }
        None => {
            let t =
                tempfile::Builder::new().prefix("tribute-demo-").tempdir().during("temp dir")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    steps.say(format!("data in {}", dir.display()));

    let chain = DevChain::start().await.during("starting the dev chain")?;
    steps.say(format!("dev chain (regtest simulator) on {}", chain.rpc_addr()));

    let node_config = |path: PathBuf, port: u16, trusted: Vec<[u8; 33]>| {
        devnet::node_config(&chain, &path, port, trusted)
    };
    // Each contributor: a key file and a dataset directory hashed into its manifest.
    let mut people = Vec::new();
    for (name, weight) in CONTRIBUTORS.iter().take(options.contributors) {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).during("contributor dir")?;
        let key =
            ContributorKey::create(&home.join("contributor.key")).during("contributor key")?;
        let dataset = write_dataset(&home.join("dataset"), name)?;
        people.push((*name, *weight, home, key.public(), dataset, free_port()?));
    }
    let daemon_dir = dir.join("daemon");
    server::prepare_data_dir(&daemon_dir).during("daemon data dir")?;
    let daemon_ln = Arc::new(
        LdkBackend::start(node_config(daemon_dir.join("ldk"), free_port()?, vec![]))
            .await
            .during("starting the daemon's Lightning node")?,
    );
    let daemon_node_id = daemon_ln.node_id();
    // Their Lightning nodes, started together.
    let starting = people.into_iter().map(|(name, weight, home, key, dataset, port)| {
        let cfg = node_config(payments::lightning_dir(&home), port, vec![daemon_node_id]);
        async move {
            // The receiving node's own Lightning node, recording payouts in its records.
            let ln = payments::start_lightning(&home.join(NODE_DB_FILE), cfg).await;
            (name, weight, home, ln, format!("127.0.0.1:{port}"), key, dataset)
        }
    });
    let mut nodes = Vec::new();
    let mut failed = None;
    for (name, weight, home, ln, addr, key, dataset) in
        futures::future::join_all(starting.collect::<Vec<_>>()).await
    {
        match ln {
            Ok(ln) => nodes.push((name, weight, home, ln, addr, key, dataset)),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    if let Some(e) = failed {
        for n in &nodes {
            let _ = n.3.stop().await;
        }
        let _ = daemon_ln.stop().await;
        chain.shutdown().await;
        return Err(DemoError::new("starting a contributor's Lightning node", e));
    }
    steps.say(format!("{} Lightning nodes up (ldk-node 0.7.1)", nodes.len() + 1));

    let mut world = World {
        _temp: temp,
        dir,
        chain,
        daemon_ln,
        daemon: None,
        members: Vec::new(),
        stop_nodes: watch::channel(false).0,
        provider_token: String::new(),
        operator_token: String::new(),
        channel: None,
    };
    for (name, weight, home, ln, ln_addr, key, dataset) in nodes {
        world.members.push(Member { name, weight, home, key, dataset, ln, ln_addr, node: None });
    }
    match bring_up(&mut world, steps).await {
        Ok(()) => Ok(world),
        Err(e) => {
            let _ = world.shutdown().await;
            Err(e)
        }
    }
}

/// Starts the daemon on the world's nodes, funds its node, opens the channels, registers
/// everyone and starts the receiving nodes.
async fn bring_up(world: &mut World, steps: &Steps) -> Result<(), DemoError> {
    let mut config = Config {
        data_dir: world.dir.join("daemon"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        metrics_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        ..Config::default()
    };
    // Rounds are started by the demo (Operator.SettleNow), from 1 msat on.
    config.settlement.settle_every_secs = 86_400;
    config.settlement.min_payout_msat = 1;
    config.settlement.settle_threshold_msat = u64::MAX / 2;
    config.settlement.max_outstanding_msat = u64::MAX / 2;
    let daemon = server::start_with(
        config,
        StartOptions {
            lightning: Some(world.daemon_ln.clone() as DynLightningBackend),
            settlement: EngineOptions {
                tick: Duration::from_millis(200),
                poll_interval: Duration::from_millis(100),
                round_patience: Duration::from_secs(30),
                failure_backoff: Duration::from_secs(1),
                ..EngineOptions::default()
            },
        },
    )
    .await
    .during("starting tributed")?;
    let now = unix_now();
    let token = |role| {
        daemon.tokens.create(role, None, "demo", None, now).map(|t| t.secret).during("token")
    };
    world.provider_token = token(Role::Provider)?;
    world.operator_token = token(Role::Operator)?;
    steps.say(format!("tributed on {} (provider key {})", daemon.grpc_addr, daemon.provider_key));
    world.daemon = Some(daemon);
    world.channel = Some(world.endpoint().connect().await.during("connecting to tributed")?);
    fund_and_open(world, steps).await?;
    register(world, steps).await?;
    let provider_key = world.running().provider_key;
    let endpoint = world.endpoint();
    for m in &mut world.members {
        let key =
            ContributorKey::load(&m.home.join("contributor.key")).during("contributor key")?;
        let config = NodeConfig {
            endpoint: endpoint.clone(),
            store_path: m.home.join(NODE_DB_FILE),
            network: Some(Network::Regtest),
            provider_key: Some(provider_key),
            reconnect: RetryPolicy {
                max_attempts: u32::MAX,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
            },
            payout: Some(PayoutDestination { node_id: m.ln.node_id(), offer: false }),
        };
        m.node = Some(tokio::spawn(node::run(config, key, world.stop_nodes.subscribe())));
    }
    steps.say(format!("{} receiving nodes following their channels", world.members.len()));
    Ok(())
}

/// Writes a small dataset for `name` and hashes it as `tribute contributor manifest` does.
fn write_dataset(dir: &Path, name: &str) -> Result<DatasetHash, DemoError> {
    std::fs::create_dir_all(dir).during("dataset dir")?;
    for (file, text) in [
        ("README.md", format!("# {name}'s corpus\n\nWritten by {name}; licensed CC-BY-4.0.\n")),
        ("notes/1.txt", format!("{name}: the first notebook, {} lines\n", name.len() * 17)),
        ("notes/2.txt", format!("{name}: the second notebook\n")),
    ] {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).during("dataset dir")?;
        }
        std::fs::write(&path, text).during("writing the dataset")?;
    }
    Ok(Manifest::build(dir, &mut NoProgress).during("hashing the dataset")?.dataset_hash())
}

/// Funds the daemon's node from the faucet and opens a private channel to each
/// contributor's node through `Operator.OpenLightningChannel`.
async fn fund_and_open(world: &World, steps: &Steps) -> Result<(), DemoError> {
    let funding = CHANNEL_SATS * world.members.len() as u64 + 1_000_000;
    let peers: Vec<devnet::Peer> = world
        .members
        .iter()
        .map(|m| devnet::Peer { node: &m.ln, address: m.ln_addr.clone(), announce: false })
        .collect();
    devnet::fund_and_open(
        &world.operator()?,
        &world.chain,
        Some(&world.daemon_ln),
        funding,
        CHANNEL_SATS,
        &peers,
    )
    .await
    .map_err(|e| DemoError::new("funding the daemon's node and opening channels", e))?;
    steps.say(format!("daemon's node funded with {funding} sat from the dev chain's faucet"));
    steps.say(format!("{} private channels of {CHANNEL_SATS} sat open and usable", peers.len()));
    Ok(())
}

/// Each contributor logs in, registers its node id and licenses its dataset; the provider
/// registers the model and a training run over the datasets.
async fn register(world: &World, steps: &Steps) -> Result<(), DemoError> {
    let endpoint = world.endpoint();
    for m in &world.members {
        let key =
            ContributorKey::load(&m.home.join("contributor.key")).during("contributor key")?;
        let c = Contributor::login(&endpoint, key, Some(Network::Regtest), None)
            .await
            .during("contributor login")?;
        c.register(Some(m.ln.node_id()), None, unix_now()).await.during("registering")?;
        let signed_at = unix_now();
        c.register_licence(
            m.dataset,
            "CC-BY-4.0",
            Uses::of(&[Use::Training, Use::Retrieval]),
            signed_at,
            Timestamp::MAX,
            signed_at,
        )
        .await
        .during("licensing a dataset")?;
    }
    steps.say(format!(
        "{} contributors registered their nodes and signed CC-BY-4.0 licences",
        world.members.len()
    ));
    let mut registry = RegistryClient::with_interceptor(
        world.channel()?,
        Bearer::new(Some(&world.provider_token)).during("provider token")?,
    );
    let (per_request, per_in, per_out) = TARIFF;
    registry
        .register_model(pb::RegisterModelRequest {
            model_id: MODEL.into(),
            contributor_share_ppm: SHARE_PPM,
            tariff: Some(pb::Tariff {
                per_request_nsat: per_request,
                per_input_token_nsat: per_in,
                per_output_token_nsat: per_out,
            }),
        })
        .await
        .during("Registry.RegisterModel")?;
    // The run starts after the licences were signed (a licence must predate the run).
    let started = unix_now().0 + 1;
    registry
        .register_training_run(pb::RegisterTrainingRunRequest {
            run_id: format!("{MODEL}-run-1"),
            model_id: MODEL.into(),
            started_at: started,
            finished_at: started + 3_600,
            datasets: world
                .members
                .iter()
                .map(|m| pb::DatasetWeight { dataset_hash: m.dataset.0.to_vec(), weight: m.weight })
                .collect(),
        })
        .await
        .during("Registry.RegisterTrainingRun")?;
    steps.say(format!(
        "model {MODEL} registered (contributors' share {}%), trained on their datasets",
        SHARE_PPM / 10_000
    ));
    Ok(())
}

/// The daemon's channels by contributor key: (accrued nsat, settled msat, outstanding nsat).
async fn balances(world: &World) -> Result<Vec<(PublicKey, u128, u64, u128)>, DemoError> {
    const CALL: &str = "Channels.ListChannels";
    let list = world
        .channels()?
        .list_channels(pb::ListChannelsRequest {})
        .await
        .during(CALL)?
        .into_inner()
        .channels;
    list.iter()
        .map(|c| {
            let key: [u8; 32] = c
                .contributor_key
                .as_slice()
                .try_into()
                .map_err(|_| DemoError::new(CALL, "a contributor key is not 32 bytes"))?;
            let key = PublicKey::from_bytes(key).during(CALL)?;
            let accrued = c.accrued_nsat.parse::<u128>().during(CALL)?;
            let outstanding = c.outstanding_nsat.parse::<u128>().during(CALL)?;
            Ok((key, accrued, c.settled_msat, outstanding))
        })
        .collect()
}

/// Every succeeded settlement.
async fn succeeded(world: &World) -> Result<Vec<pb::Settlement>, DemoError> {
    Ok(world
        .operator()?
        .list_settlements(pb::ListSettlementsRequest {
            status: "succeeded".into(),
            ..Default::default()
        })
        .await
        .during("Operator.ListSettlements")?
        .into_inner()
        .settlements)
}

/// Meters, settles, checks and reports.
async fn drive(
    options: &DemoOptions,
    steps: &Steps,
    world: &World,
) -> Result<DemoReport, DemoError> {
    let provider = Provider::connect(ProviderConfig::new(world.endpoint(), &world.provider_token))
        .await
        .during("connecting the provider")?;
    let mut traffic = Traffic(SplitMix64(options.seed));
    let (mut pools_nsat, mut metered, mut metering) = (0u128, 0u64, Duration::ZERO);
    let rounds = u64::from(options.rounds);
    for round in 0..rounds {
        let n = options.requests / rounds + u64::from(round < options.requests % rounds);
        let requests = (0..n)
            .map(|i| {
                let (input, output) = traffic.request();
                Meter::usage(&format!("demo-{round}-{i}"), MODEL, input, output)
            })
            .collect::<Result<Vec<_>, _>>()
            .during("building requests")?;
        let bar = steps.bar(n, "metering   [{bar:40}] {pos}/{len} requests  {per_sec}  eta {eta}");
        let started = Instant::now();
        let mut answers = provider.meter_stream(futures::stream::iter(requests));
        while let Some(answer) = answers.next().await {
            let m = answer.map_err(|e| {
                DemoError::new("metering", format!("{}: {}", e.request_id, error_chain(&e.error)))
            })?;
            pools_nsat += m.pool_nsat.0;
            metered += 1;
            bar.inc(1);
        }
        let took = started.elapsed();
        metering += took;
        bar.finish_and_clear();
        steps.say(format!(
            "round {}: metered {n} requests in {:.2} s ({:.0}/s), each acknowledged with a receipt",
            round + 1,
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64().max(1e-9)
        ));
        settle_round(world, steps, round + 1).await?;
    }

    // The contributors' own records catch up: the receiving nodes' verified states and the
    // Lightning nodes' payment stores.
    world.running().flush().await;
    let channels = balances(world).await?;
    let mut lines = Vec::new();
    for m in &world.members {
        let (_, accrued_nsat, settled_msat, outstanding_nsat) = channels
            .iter()
            .find(|c| c.0 == m.key)
            .copied()
            .ok_or_else(|| DemoError::new("summary", format!("{} has no channel", m.name)))?;
        let store = m.home.join(NODE_DB_FILE);
        let (verified_accrued_nsat, verified_settled_msat) =
            wait_for("a receiving node to verify the latest state", || async {
                let st = NodeStore::open(&store).ok()?.status().ok()?;
                let seen = (st.accrued_nsat().0, st.settled_msat().0);
                (seen == (accrued_nsat, settled_msat)).then_some(seen)
            })
            .await?;
        let (received_msat, payments) =
            wait_for("a contributor's node to record its payments", || async {
                let st = NodeStore::open(&store).ok()?.status().ok()?;
                let got = (st.received_msat().0, st.payouts().count());
                (got.0 == settled_msat).then_some(got)
            })
            .await?;
        lines.push(ContributorLine {
            name: m.name.to_owned(),
            key: m.key,
            weight: m.weight,
            accrued_nsat,
            settled_msat,
            outstanding_nsat,
            received_msat,
            payments,
            verified_accrued_nsat,
            verified_settled_msat,
        });
    }
    let paid = succeeded(world).await?;
    let d = world.running();
    let database = server::database_path(&world.dir.join("daemon"));
    let pinned = reconcile::Options { provider_key: Some(d.provider_key), ..Default::default() };
    let path = database.clone();
    let reconcile =
        tokio::task::spawn_blocking(move || reconcile::reconcile_file_with(&path, &pinned))
            .await
            .during("reconcile")?
            .during("reconcile")?;
    Ok(DemoReport {
        data_dir: world.dir.clone(),
        database,
        requests: metered,
        metering,
        pools_nsat,
        rounds: options.rounds,
        settlements: paid.len(),
        fees_msat: paid.iter().filter_map(|s| s.fee_msat).sum(),
        lines,
        grpc_addr: d.grpc_addr,
        metrics_addr: d.metrics_addr,
        operator_token: world.operator_token.clone(),
        reconcile,
    })
}

/// One settlement round: `Operator.SettleNow`, then wait until every channel's whole msat
/// is paid (the engine retries a failed payout by itself).
async fn settle_round(world: &World, steps: &Steps, round: u64) -> Result<(), DemoError> {
    world.running().flush().await;
    let before = balances(world).await?;
    let owed: Vec<(PublicKey, u64)> = before
        .iter()
        .map(|(k, accrued, settled, _)| (*k, whole_msat(*accrued).saturating_sub(*settled)))
        .filter(|(_, owed)| *owed > 0)
        .collect();
    let total: u64 = owed.iter().map(|(_, o)| o).sum();
    world.operator()?.settle_now(pb::SettleNowRequest {}).await.during("Operator.SettleNow")?;
    let bar =
        steps.bar(owed.len() as u64, "settling  [{bar:40}] {pos}/{len} payouts over Lightning");
    let started = Instant::now();
    let deadline = started + WAIT;
    loop {
        let now = balances(world).await?;
        let done = owed
            .iter()
            .filter(|(k, _)| {
                now.iter()
                    .any(|(key, accrued, settled, _)| key == k && *settled == whole_msat(*accrued))
            })
            .count();
        bar.set_position(done as u64);
        if done == owed.len() {
            break;
        }
        if Instant::now() >= deadline {
            let failed = world
                .operator()?
                .list_settlements(pb::ListSettlementsRequest {
                    status: "failed".into(),
                    ..Default::default()
                })
                .await
                .during("Operator.ListSettlements")?
                .into_inner()
                .settlements;
            let why: Vec<String> =
                failed.iter().map(|s| format!("#{}: {}", s.settlement_id, s.error)).collect();
            return Err(DemoError::new(
                "settling",
                format!(
                    "{done}/{} payouts done after {WAIT:?}; failures: {}",
                    owed.len(),
                    why.join("; ")
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    bar.finish_and_clear();
    steps.say(format!(
        "round {round}: settled {total} msat in {} keysend payouts in {:.2} s; sub-msat remainders stay in the channels",
        owed.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
