//! The crash loop (issue 7 item 1): `tributed` runs as a child process with its own
//! ldk-node on the dev chain and settles every second to three receiving ldk-nodes in this
//! process, while a load generator meters with request ids it persists (`sent`, then
//! `acked`) in its own SQLite file before sending. The daemon is killed with SIGKILL at a
//! random moment (seeded), restarted on the same data dir, and every unacknowledged id is
//! sent again. After every kill and every iteration the test checks, from the daemon's real
//! SQLite file, the signed states, the receiving nodes' own payment stores and the
//! contributors' receiving nodes:
//!
//! - `PRAGMA integrity_check` is `ok` right after the kill;
//! - no signed state a contributor's node accepted is missing from the daemon's file after
//!   the kill, every stored signed state survives byte for byte, and later states have a
//!   higher `seq` (it strictly increases across restarts; the nodes hold no proof of
//!   equivocation or regression);
//! - each acknowledged id has exactly one accrual (one meter event) and the daemon holds no
//!   id the client never sent;
//! - per channel, `Σ acknowledged shares == latest signed accrued == settled + outstanding`
//!   to the nsat, and `reconcile` re-derives every ledger invariant cleanly;
//! - settled equals what the receiving node received (no payout lost, none paid twice),
//!   once no settlement is pending.
//!
//! `TRIBUTE_CRASH_KILLS` (default 20) sets the number of kills, `TRIBUTE_CRASH_SEED` the
//! seed (printed at the start, so a failing run can be replayed); `TRIBUTE_KEEP_TEST_DIRS=1`
//! keeps the data dirs and tributed's log.

use futures::StreamExt;
use ldk_node::bitcoin::address::NetworkUnchecked;
use ldk_node::bitcoin::{Address, Amount, Network as BtcNetwork};
use rusqlite::{params, Connection};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::transport::Channel;
use tribute_channels::channel::ChannelState;
use tribute_channels::codec::Encode;
use tribute_channels::{Network, PublicKey, Signed};
use tribute_client::connect::Bearer;
use tribute_client::demo::SplitMix64;
use tribute_client::keys::ContributorKey;
use tribute_client::node::{self, NodeConfig, NodeStore, NODE_DB_FILE};
use tribute_client::payments::received_by_node as received;
use tribute_client::provider::{Meter, Metered, Provider, ProviderConfig, RetryPolicy};
use tribute_client::DaemonEndpoint;
use tribute_daemon::devchain::DevChain;
use tribute_daemon::lightning::{
    ChainSourceConfig, LdkBackend, LdkBackendConfig, LightningBackend,
};
use tribute_daemon::reconcile;
use tribute_proto::v1 as pb;
use tribute_tests::ln::Peer;
use tribute_tests::tributed::{self, Tributed};
use tribute_tests::{contributor_at, setup_model_with, Authed};

const MODEL: &str = "crash-llm";
const SHARE_PPM: u32 = 200_000;
const CONTRIBUTORS: [(&str, u64); 3] = [("ada", 5), ("grace", 3), ("alan", 2)];
const CHANNEL_SATS: u64 = 2_000_000;
/// Channels tributed's wallet can fund beyond the first ones: one per two kills, at least
/// this many (the keeper reopens a channel a crash force-closed; runs of 20 kills reopened
/// up to 6).
const MIN_SPARE_CHANNELS: u64 = 12;
/// On-chain coins of each receiving node (fees of on-chain HTLC claims).
const RECEIVER_SATS: u64 = 500_000;
/// Load generator tasks, each with one request in flight.
const WORKERS: u64 = 4;
/// Pause between one worker's requests (bounds the event log a long run builds up).
const PACE: Duration = Duration::from_millis(4);
/// A kill comes this long (uniform, in ms) after the load starts.
const KILL_AFTER_MS: (u64, u64) = (100, 2_500);
/// Bound on every wait for a condition.
const WAIT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(100);
/// Polls for quiet before the checkpoint mines blocks.
const QUIET_POLLS_BEFORE_MINING: u32 = 30;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
        Err(_) => default,
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The test's only source of randomness (SplitMix64), so a seed replays a run.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        self.0.between(lo, hi)
    }
}

/// Polls `check` until it gives `Some`, for at most [`WAIT`]; on timeout panics with what
/// `describe` says about the last state.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => {
                panic!("{what}: not done after {WAIT:?}: {why}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The load generator's own ledger, a real SQLite file: each request id is written as
/// `sent` (with its content, so a re-send is the same request) before it is sent, and
/// `acked` with its receipt's pool and shares once the daemon answers.
struct ClientLedger {
    conn: Mutex<Connection>,
}

impl ClientLedger {
    fn open(path: &Path) -> ClientLedger {
        let conn = Connection::open(path).expect("client ledger");
        conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
        conn.pragma_update(None, "synchronous", "FULL").expect("full");
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS requests (
                 request_id    TEXT PRIMARY KEY,
                 input_tokens  INTEGER NOT NULL,
                 output_tokens INTEGER NOT NULL,
                 status        TEXT NOT NULL CHECK (status IN ('sent', 'acked')),
                 pool_nsat     TEXT,
                 replayed      INTEGER
             ) STRICT;
             CREATE TABLE IF NOT EXISTS shares (
                 request_id      TEXT NOT NULL,
                 contributor_key BLOB NOT NULL,
                 nsat            TEXT NOT NULL,
                 PRIMARY KEY (request_id, contributor_key)
             ) STRICT;",
        )
        .expect("client ledger schema");
        ClientLedger { conn: Mutex::new(conn) }
    }

    fn sent(&self, id: &str, input: u64, output: u64) {
        self.conn
            .lock()
            .expect("lock")
            .execute(
                "INSERT INTO requests (request_id, input_tokens, output_tokens, status)
                 VALUES (?1, ?2, ?3, 'sent')",
                params![id, input as i64, output as i64],
            )
            .expect("persist a sent id");
    }

    /// Records the answer; an id is acknowledged once (the test only re-sends `sent` ids).
    fn acked(&self, m: &Metered) {
        let mut conn = self.conn.lock().expect("lock");
        let tx = conn.transaction().expect("tx");
        let n = tx
            .execute(
                "UPDATE requests SET status = 'acked', pool_nsat = ?2, replayed = ?3
                 WHERE request_id = ?1 AND status = 'sent'",
                params![m.request_id, m.pool_nsat.0.to_string(), m.replayed],
            )
            .expect("ack");
        assert_eq!(n, 1, "{} answered but not pending in the client ledger", m.request_id);
        for (key, nsat) in &m.shares {
            tx.execute(
                "INSERT INTO shares (request_id, contributor_key, nsat) VALUES (?1, ?2, ?3)",
                params![m.request_id, key.to_bytes().to_vec(), nsat.0.to_string()],
            )
            .expect("share");
        }
        tx.commit().expect("commit");
    }

    fn unacked(&self) -> Vec<(String, u64, u64)> {
        let conn = self.conn.lock().expect("lock");
        let mut st = conn
            .prepare(
                "SELECT request_id, input_tokens, output_tokens FROM requests
                 WHERE status = 'sent' ORDER BY request_id",
            )
            .expect("prepare");
        st.query_map([], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }

    /// Every id ever written, with whether it was acknowledged.
    fn ids(&self) -> HashMap<String, bool> {
        let conn = self.conn.lock().expect("lock");
        let mut st = conn.prepare("SELECT request_id, status FROM requests").expect("prepare");
        st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)? == "acked")))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// `Σ` acknowledged shares per contributor, and `Σ` acknowledged pools.
    fn sums(&self) -> (HashMap<PublicKey, u128>, u128) {
        let conn = self.conn.lock().expect("lock");
        let mut per = HashMap::new();
        let mut st = conn.prepare("SELECT contributor_key, nsat FROM shares").expect("prepare");
        let rows = st
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?)))
            .expect("query");
        for row in rows {
            let (key, nsat) = row.expect("row");
            let key = PublicKey::from_bytes(key.try_into().expect("32 bytes")).expect("key");
            *per.entry(key).or_insert(0u128) += nsat.parse::<u128>().expect("nsat");
        }
        let mut pools = 0u128;
        let mut st =
            conn.prepare("SELECT pool_nsat FROM requests WHERE status = 'acked'").expect("prepare");
        for p in st.query_map([], |r| r.get::<_, String>(0)).expect("query") {
            pools += p.expect("row").parse::<u128>().expect("pool");
        }
        (per, pools)
    }
}

/// The daemon's SQLite file, read directly (the daemon may be dead).
struct DaemonFile(PathBuf);

/// Signed states by (channel id, seq): the canonical signed bytes.
type States = BTreeMap<(Vec<u8>, u64), Vec<u8>>;

impl DaemonFile {
    fn conn(&self) -> Connection {
        reconcile::open_read_only(&self.0).expect("open the daemon's database read-only")
    }

    fn integrity(&self) -> String {
        self.conn().query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity")
    }

    /// Meter events per request id.
    fn request_ids(&self) -> HashMap<String, u32> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT request_id FROM meter_events").expect("prepare");
        let mut out = HashMap::new();
        for id in st.query_map([], |r| r.get::<_, String>(0)).expect("query") {
            *out.entry(id.expect("row")).or_insert(0) += 1;
        }
        out
    }

    /// Channels the daemon's keeper reopened so far (after a crash cost one).
    fn reopens(&self) -> i64 {
        self.conn()
            .query_row("SELECT COALESCE(SUM(reopens), 0) FROM lightning_channel_targets", [], |r| {
                r.get(0)
            })
            .expect("reopens")
    }

    fn states(&self) -> States {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT channel_id, seq, state FROM channel_states").expect("p");
        st.query_map([], |r| Ok(((r.get(0)?, r.get::<_, i64>(1)? as u64), r.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }
}

/// The newest signed state of each channel in `states`, by channel id (hex).
fn latest(states: &States) -> HashMap<String, Signed<ChannelState>> {
    let mut out = HashMap::new();
    for ((cid, _), bytes) in states {
        // BTreeMap order: the last entry of a channel is its highest seq.
        out.insert(hex_of(cid), Signed::<ChannelState>::decode(bytes).expect("signed state"));
    }
    out
}

/// A contributor: its Lightning node (in this process) and its receiving node.
struct Member {
    name: &'static str,
    home: PathBuf,
    key: PublicKey,
    ln: LdkBackend,
    ln_addr: String,
    node: Option<tokio::task::JoinHandle<Result<(), node::NodeError>>>,
}

impl Member {
    fn store(&self) -> NodeStore {
        NodeStore::open(&self.home.join(NODE_DB_FILE)).expect("receiving node's store")
    }
}

/// Everything the loop runs on.
struct World {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    url: String,
    provider_token: String,
    operator_token: String,
    daemon: Option<Tributed>,
    file: DaemonFile,
    members: Vec<Member>,
}

impl World {
    fn endpoint(&self) -> DaemonEndpoint {
        DaemonEndpoint::new(self.url.clone())
    }

    fn spawn(&mut self) {
        self.daemon = Some(Tributed::spawn(&self.bin, &self.config, &self.log));
    }

    async fn channel(&self) -> Result<Channel, String> {
        self.endpoint().connect().await.map_err(|e| e.to_string())
    }

    async fn operator(&self) -> Result<pb::operator_client::OperatorClient<Authed>, String> {
        Ok(pb::operator_client::OperatorClient::with_interceptor(
            self.channel().await?,
            Bearer::new(Some(&self.operator_token)).expect("token"),
        ))
    }

    async fn channels(&self) -> Result<Vec<pb::Channel>, String> {
        let mut c = pb::channels_client::ChannelsClient::with_interceptor(
            self.channel().await?,
            Bearer::new(Some(&self.operator_token)).expect("token"),
        );
        Ok(c.list_channels(pb::ListChannelsRequest {})
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .channels)
    }

    async fn settlements(&self, status: &str) -> Result<Vec<pb::Settlement>, String> {
        Ok(self
            .operator()
            .await?
            .list_settlements(pb::ListSettlementsRequest {
                status: status.into(),
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .settlements)
    }

    /// Waits until the daemon answers on gRPC with its Lightning node up; its node id.
    async fn ready(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.daemon.as_mut().expect("spawned").exited() {
                panic!("tributed exited ({status}):\n{}", tributed::log_tail(&self.log, 40));
            }
            let info = async {
                self.operator()
                    .await?
                    .get_node_info(pb::GetNodeInfoRequest {})
                    .await
                    .map_err(|s| s.to_string())
            };
            match info.await {
                Ok(info) => return info.into_inner().node_id,
                Err(why) if Instant::now() >= deadline => {
                    panic!("tributed not ready after {WAIT:?}: {why}")
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    fn kill(&mut self) {
        self.daemon.take().expect("running").kill();
    }
}

/// A provider for the load: short attempts and one retry, so a dead daemon fails the call
/// quickly and the id stays `sent`.
async fn load_provider(w: &World) -> Provider {
    let mut c = ProviderConfig::new(w.endpoint(), &w.provider_token);
    c.connections = 2;
    c.call_deadline = Duration::from_secs(3);
    c.attempt_timeout = Duration::from_secs(2);
    c.retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    };
    Provider::connect(c).await.expect("provider connects")
}

fn request(id: &str, input: u64, output: u64) -> Meter {
    Meter::usage(id, MODEL, input, output).expect("request").with_shares()
}

/// One load worker: persist, send, record the answer; stops at `stop` or at the first
/// failure (the daemon was killed), leaving that id `sent`.
async fn worker(
    provider: Provider,
    ledger: Arc<ClientLedger>,
    next_id: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut acked = 0;
    while !stop.load(Ordering::Relaxed) {
        let n = next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("req-{n:09}");
        let mut mix = Rng(SplitMix64(n));
        let (input, output) = (50 + mix.next() % 2_000, 10 + mix.next() % 800);
        ledger.sent(&id, input, output);
        match provider.meter(&request(&id, input, output)).await {
            Ok(m) => {
                ledger.acked(&m);
                acked += 1;
            }
            Err(_) => break,
        }
        tokio::time::sleep(PACE).await;
    }
    acked
}

/// Sends every unacknowledged id again (same content); returns (re-sent, of which had
/// accrued before the kill).
async fn resend(w: &World, ledger: &ClientLedger) -> (usize, usize) {
    let pending = ledger.unacked();
    let mut c = ProviderConfig::new(w.endpoint(), &w.provider_token);
    c.call_deadline = Duration::from_secs(60);
    c.retry.max_attempts = 50;
    let provider = Provider::connect(c).await.expect("provider connects");
    let answers: Vec<(String, Result<Metered, String>)> =
        futures::stream::iter(pending.iter().cloned())
            .map(|(id, input, output)| {
                let p = provider.clone();
                async move {
                    let r = p.meter(&request(&id, input, output)).await.map_err(|e| e.to_string());
                    (id, r)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    let mut replayed = 0;
    for (id, answer) in answers {
        let m = answer.unwrap_or_else(|e| panic!("re-sending {id}: {e}"));
        replayed += usize::from(m.replayed);
        ledger.acked(&m);
    }
    (pending.len(), replayed)
}

/// A fresh address of tributed's on-chain wallet.
async fn onchain_address(op: &pb::operator_client::OperatorClient<Authed>) -> Address {
    op.clone()
        .new_onchain_address(pb::NewOnchainAddressRequest {})
        .await
        .expect("address")
        .into_inner()
        .address
        .parse::<Address<NetworkUnchecked>>()
        .expect("address")
        .require_network(BtcNetwork::Regtest)
        .expect("regtest")
}

/// Funds tributed's node from the faucet and opens a private channel to each member.
async fn fund_and_open(w: &World, chain: &DevChain, spare_channels: u64) {
    let op = w.operator().await.expect("operator");
    let peers: Vec<Peer> = w
        .members
        .iter()
        .map(|m| Peer { node: &m.ln, address: m.ln_addr.clone(), announce: false })
        .collect();
    let funding = CHANNEL_SATS * w.members.len() as u64 + 1_000_000;
    tribute_tests::ln::fund_and_open(&op, chain, None, funding, CHANNEL_SATS, &peers).await;
    // Spare coins, one output each, for the keeper to reopen channels a crash force-closed
    // (the closed channel's own funds come back only after its CSV delay), and some for
    // each receiving node, to pay the fees of claiming an HTLC on-chain after such a close
    // (anchor channels: the claim brings its own fee).
    for _ in 0..spare_channels {
        let address = onchain_address(&op).await;
        chain.faucet(&address, Amount::from_sat(CHANNEL_SATS + 100_000)).expect("faucet");
    }
    for m in &w.members {
        let address = m.ln.onchain_address().await.expect("address");
        chain.faucet(&address, Amount::from_sat(RECEIVER_SATS)).expect("faucet");
    }
    chain.mine_blocks(6).expect("mine");
}

fn write_config(path: &Path, data: &Path, grpc_port: u16, chain: &DevChain, ln_port: u16) {
    let text = format!(
        r#"data_dir = "{data}"
network = "regtest"
listen = "127.0.0.1:{grpc_port}"
metrics_listen = "off"

[meter]
stream_interval_ms = 50

[settlement]
settle_every_secs = 1
min_payout_msat = 1
settle_threshold_msat = 20000
max_outstanding_msat = 200000

[lightning]
enabled = true
chain_source = "devchain"
bitcoind_rpc_host = "{host}"
bitcoind_rpc_port = {port}
listen_port = {ln_port}

[log]
filter = "info"
"#,
        data = data.display(),
        host = chain.rpc_addr().ip(),
        port = chain.rpc_addr().port(),
    );
    std::fs::write(path, text).expect("config");
}

/// What one checkpoint found, for the next one to compare with.
#[derive(Default)]
struct Seen {
    states: States,
    acked: usize,
}

/// After a kill, before the restart: the file is sound, no stored signed state was lost or
/// rewritten, and the daemon's file holds every state a receiving node accepted.
fn check_after_kill(w: &World, seen: &Seen, iteration: u64) -> States {
    let integrity = w.file.integrity();
    assert_eq!(integrity, "ok", "iteration {iteration}: integrity_check after the kill");
    let states = w.file.states();
    for (at, bytes) in &seen.states {
        assert_eq!(
            states.get(at),
            Some(bytes),
            "iteration {iteration}: signed state {at:?} lost or rewritten by the crash"
        );
    }
    for m in &w.members {
        for c in m.store().status().expect("status").channels {
            if let Some(held) = c.latest {
                let at = (c.channel_id.0.to_vec(), held.message.seq);
                assert_eq!(
                    states.get(&at),
                    Some(&held.encode()),
                    "iteration {iteration}: {} accepted signed state seq {} the daemon's file \
                     does not hold after the kill (signed before it was durable)",
                    m.name,
                    held.message.seq
                );
            }
        }
    }
    states
}

/// Waits until nothing is in flight (no request unanswered, no settlement pending, every
/// whole msat paid, every receiving node caught up), then checks every invariant.
async fn checkpoint(
    w: &World,
    chain: &DevChain,
    ledger: &ClientLedger,
    seen: &mut Seen,
    provider_key: &mut Option<PublicKey>,
    iteration: u64,
) {
    assert!(ledger.unacked().is_empty(), "iteration {iteration}: unacknowledged ids remain");
    let keys: HashMap<Vec<u8>, &Member> =
        w.members.iter().map(|m| (m.key.to_bytes().to_vec(), m)).collect();
    // Not quiet within a few polls: a crash may have cost a channel (see `keeper`), and
    // its reopening and the on-chain resolution of HTLCs in flight on the closed channel
    // (up to the payments' CLTV expiry, 144 blocks) need blocks.
    let polls = std::cell::Cell::new(0u32);
    wait_for("settlement to go quiet", || async {
        polls.set(polls.get() + 1);
        if polls.get() > QUIET_POLLS_BEFORE_MINING {
            chain.mine_blocks(2).map_err(|e| e.to_string())?;
        }
        if !w.settlements("pending").await?.is_empty() {
            return Err("settlements pending".into());
        }
        let channels = w.channels().await?;
        for c in &channels {
            let accrued: u128 = c.accrued_nsat.parse().map_err(|e| format!("{e}"))?;
            let whole = u64::try_from(accrued / 1_000_000).map_err(|e| e.to_string())?;
            let m = keys.get(&c.contributor_key).ok_or("a channel to a stranger")?;
            if c.settled_msat != whole {
                return Err(format!("{}: settled {} of {whole} msat", m.name, c.settled_msat));
            }
            let signed = c.latest_state.as_ref().map_or(0, |s| s.seq);
            if signed != c.seq {
                return Err(format!("{}: head seq {} signed up to {signed}", m.name, c.seq));
            }
            let (got, _) = received(&m.ln);
            if got != c.settled_msat {
                return Err(format!("{}: received {got} of {} msat", m.name, c.settled_msat));
            }
            let held = m.store().status().map_err(|e| e.to_string())?;
            let held_seq =
                held.channels.iter().filter_map(|c| c.latest.as_ref()).map(|s| s.message.seq).max();
            if held_seq != Some(c.seq) {
                return Err(format!("{}: its node holds seq {held_seq:?} of {}", m.name, c.seq));
            }
        }
        (channels.len() == w.members.len())
            .then_some(())
            .ok_or_else(|| format!("{} channels", channels.len()))
    })
    .await;

    // Every acknowledged id exactly once in the daemon's log, and nothing the client never sent.
    let ids = ledger.ids();
    let metered = w.file.request_ids();
    for (id, acked) in &ids {
        assert!(*acked, "iteration {iteration}: {id} not acknowledged");
        assert_eq!(metered.get(id), Some(&1), "iteration {iteration}: accruals of {id}");
    }
    for id in metered.keys() {
        assert!(ids.contains_key(id), "iteration {iteration}: {id} metered but never sent");
    }
    assert!(ids.len() >= seen.acked, "iteration {iteration}: acknowledged ids went missing");

    // The ledger, re-derived from the raw records (signatures under the provider key the
    // first checkpoint saw: it must not change across restarts).
    let options = reconcile::Options { provider_key: *provider_key, ..Default::default() };
    let report = reconcile::reconcile_file_with(&w.file.0, &options).expect("reconcile runs");
    assert!(report.is_clean(), "iteration {iteration}: {report}");
    let pinned = PublicKey::from_hex(&report.provider_key).expect("provider key");
    assert_eq!(*provider_key.get_or_insert(pinned), pinned);
    let (shares, pools) = ledger.sums();
    assert_eq!(report.totals.pools_nsat, pools, "iteration {iteration}: Σ pools");
    assert_eq!(report.checked.meter_events, ids.len() as u64);

    let states = w.file.states();
    let newest = latest(&states);
    for line in &report.channels {
        let key = PublicKey::from_hex(&line.contributor_key).expect("key");
        let m = w.members.iter().find(|m| m.key == key).expect("a member's channel");
        let signed = &newest
            .get(&line.channel_id)
            .unwrap_or_else(|| panic!("iteration {iteration}: {}: no signed state", m.name))
            .message;
        let acked = shares.get(&key).copied().unwrap_or(0);
        assert_eq!(line.accrued_nsat, acked, "iteration {iteration}: {}: Σ acked shares", m.name);
        assert_eq!(
            (signed.accrued_nsat.0, signed.settled_msat.0),
            (line.accrued_nsat, line.settled_msat),
            "iteration {iteration}: {}: latest signed state vs the ledger",
            m.name
        );
        assert_eq!(
            u128::from(line.settled_msat) * 1_000_000 + line.outstanding_nsat,
            line.accrued_nsat,
            "iteration {iteration}: {}: settled + outstanding",
            m.name
        );
        assert_eq!(
            received(&m.ln).0,
            line.settled_msat,
            "iteration {iteration}: {}: received",
            m.name
        );
        let status = m.store().status().expect("status");
        assert!(
            status.rejections.is_empty(),
            "iteration {iteration}: {}'s node refused states: {:?}",
            m.name,
            status.rejections
        );
    }

    // seq strictly increases across restarts: old states intact, new ones above them.
    for (at, bytes) in &seen.states {
        assert_eq!(states.get(at), Some(bytes), "iteration {iteration}: state {at:?} changed");
    }
    let old_max: HashMap<&Vec<u8>, u64> =
        seen.states.keys().fold(HashMap::new(), |mut acc, (cid, seq)| {
            let e = acc.entry(cid).or_insert(0);
            *e = (*e).max(*seq);
            acc
        });
    for (cid, seq) in states.keys() {
        if !seen.states.contains_key(&(cid.clone(), *seq)) {
            if let Some(floor) = old_max.get(cid) {
                assert!(
                    seq > floor,
                    "iteration {iteration}: new state seq {seq} at or below {floor}"
                );
            }
        }
    }
    seen.states = states;
    seen.acked = ids.len();
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_no_accrual_and_pays_exactly_once() {
    let kills = env_u64("TRIBUTE_CRASH_KILLS", 20);
    let seed = env_u64("TRIBUTE_CRASH_SEED", tribute_client::time::unix_now().0);
    eprintln!("crash loop: {kills} kills, seed {seed} (TRIBUTE_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(SplitMix64(seed));
    let started = Instant::now();

    let temp = tempfile::Builder::new().prefix("crash-loop-").tempdir().expect("tempdir");
    let (_guard, dir) = if std::env::var_os("TRIBUTE_KEEP_TEST_DIRS").is_some() {
        let path = temp.keep();
        eprintln!("keeping {}", path.display());
        (None, path)
    } else {
        let path = temp.path().to_path_buf();
        (Some(temp), path)
    };
    let chain = DevChain::start().await.expect("dev chain");
    let data = dir.join("daemon");
    let config = dir.join("tributed.toml");
    let grpc_port = free_port();
    write_config(&config, &data, grpc_port, &chain, free_port());
    let bin = tributed::binary();
    let provider_token = tributed::create_token(&bin, &config, "provider");
    let operator_token = tributed::create_token(&bin, &config, "operator");
    let mut w = World {
        bin,
        log: dir.join("tributed.log"),
        config,
        url: format!("http://127.0.0.1:{grpc_port}"),
        provider_token,
        operator_token,
        daemon: None,
        file: DaemonFile(tribute_daemon::server::database_path(&data)),
        members: Vec::new(),
    };
    w.spawn();
    let daemon_node: [u8; 33] = w.ready().await.try_into().expect("33-byte node id");
    eprintln!("[{:>6.1}s] tributed up (log: {})", started.elapsed().as_secs_f64(), w.log.display());

    // The receiving Lightning nodes, trusting tributed's node (no on-chain reserve needed),
    // and the contributors, each registered with its node as the keysend destination.
    let endpoint = w.endpoint();
    let mut datasets = Vec::new();
    for (name, weight) in CONTRIBUTORS {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).expect("home");
        let port = free_port();
        let ln = LdkBackend::start(LdkBackendConfig {
            listening_addresses: vec![format!("127.0.0.1:{port}")],
            trusted_peers_no_reserve: vec![daemon_node],
            ..LdkBackendConfig::new(
                home.join("ldk"),
                BtcNetwork::Regtest,
                ChainSourceConfig::dev_chain(&chain),
            )
        })
        .await
        .expect("receiving node");
        let (key, hash) = contributor_at(&endpoint, &home, name, Some(ln.node_id())).await;
        datasets.push((hash, weight));
        w.members.push(Member {
            name,
            home,
            key,
            ln,
            ln_addr: format!("127.0.0.1:{port}"),
            node: None,
        });
    }
    let spare = (kills / 2).max(MIN_SPARE_CHANNELS);
    fund_and_open(&w, &chain, spare).await;
    eprintln!("[{:>6.1}s] channels open", started.elapsed().as_secs_f64());

    let registry = pb::registry_client::RegistryClient::with_interceptor(
        w.channel().await.expect("channel"),
        Bearer::new(Some(&w.provider_token)).expect("token"),
    );
    setup_model_with(registry, MODEL, &datasets, SHARE_PPM).await;
    let (stop_nodes, _) = watch::channel(false);
    for m in &mut w.members {
        let key = ContributorKey::load(&m.home.join("contributor.key")).expect("key");
        let config = NodeConfig {
            endpoint: endpoint.clone(),
            store_path: m.home.join(NODE_DB_FILE),
            network: Some(Network::Regtest),
            provider_key: None,
            reconnect: RetryPolicy {
                max_attempts: u32::MAX,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
            },
            payout: None,
        };
        m.node = Some(tokio::spawn(node::run(config, key, stop_nodes.subscribe())));
    }

    let ledger = Arc::new(ClientLedger::open(&dir.join("client-ledger.sqlite")));
    let next_id = Arc::new(AtomicU64::new(0));
    let mut seen = Seen::default();
    let mut provider_key = None;
    let (mut restart_total, mut replayed_total, mut resent_total) = (Duration::ZERO, 0, 0);
    for i in 1..=kills {
        let t0 = Instant::now();
        // Load, and a kill at a random moment of it.
        let stop = Arc::new(AtomicBool::new(false));
        let provider = load_provider(&w).await;
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                tokio::spawn(worker(
                    provider.clone(),
                    ledger.clone(),
                    next_id.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let after_ms = rng.between(KILL_AFTER_MS);
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        w.kill();
        stop.store(true, Ordering::Relaxed);
        let mut acked = 0;
        for h in workers {
            acked += h.await.expect("worker");
        }
        let states = check_after_kill(&w, &seen, i);

        // Restart; one time in four, kill it again while it starts (recovery included).
        let t_restart = Instant::now();
        if rng.next() % 4 == 0 {
            w.spawn();
            tokio::time::sleep(Duration::from_millis(rng.between((50, 1_500)))).await;
            w.kill();
            check_after_kill(&w, &seen, i);
        }
        w.spawn();
        w.ready().await;
        let ready_in = t_restart.elapsed();
        restart_total += ready_in;
        let (resent, replayed) = resend(&w, &ledger).await;
        resent_total += resent;
        replayed_total += replayed;
        checkpoint(&w, &chain, &ledger, &mut seen, &mut provider_key, i).await;
        eprintln!(
            "[{:>6.1}s] kill {i}/{kills} after {after_ms} ms: {acked} acked, {resent} re-sent \
             ({replayed} had accrued), {} signed states ({} before the kill), ready {:.1} s after \
             the kill, {} channels reopened so far, iteration {:.1} s",
            started.elapsed().as_secs_f64(),
            seen.states.len(),
            states.len(),
            ready_in.as_secs_f64(),
            w.file.reopens(),
            t0.elapsed().as_secs_f64(),
        );
    }
    eprintln!(
        "crash loop: {kills} kills in {:.1} s (seed {seed}); {} ids acknowledged, {resent_total} \
         re-sent after kills ({replayed_total} had accrued before the kill); {} channels \
         force-closed by a crash and reopened; restart to ready {:.2} s on average",
        started.elapsed().as_secs_f64(),
        seen.acked,
        w.file.reopens(),
        restart_total.as_secs_f64() / kills.max(1) as f64,
    );

    let _ = stop_nodes.send(true);
    for m in &mut w.members {
        if let Some(h) = m.node.take() {
            h.await.expect("node task").expect("receiving node");
        }
    }
    w.kill();
    for m in &w.members {
        m.ln.stop().await.expect("stop");
    }
    chain.shutdown().await;
}
