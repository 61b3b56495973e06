//! The ledger writer: the single task that sequences, commits and acknowledges metering.
//!
//! Requests arrive validated and split (see `meter`). The writer takes whatever is queued
//! (up to `max_batch`) as one batch — no artificial waiting: while one batch commits, the
//! next one gathers — and in one SQLite transaction appends the meter events, the batch's
//! provider-signed receipt root, and one balance update per touched channel. Only after the
//! commit returns does any caller get an answer: no acknowledgement precedes durability.
//!
//! Idempotency: request ids are checked against an in-memory index (64-bit hash → event
//! sequence numbers) rebuilt at start-up from the append-only event log; a hit is confirmed
//! against the stored row. The event row, which is the idempotency record, is written in
//! the same transaction as the accruals it guards.
//!
//! Channel rows: a batch does not rewrite the rows of the channels it touches. Its
//! per-channel accruals go into its own `receipt_batches` row (one blob), and a channel's row
//! is rewritten (head, `applied_batch_seq`) only when one of its signed states is stored,
//! about once per `sign_interval` while it accrues. The current head is the row plus the
//! accruals of later batches ([`Unapplied`]), which start-up replays; the watermark in
//! `meta` bounds how far back that reading goes. So a commit costs one row per request and
//! one per batch, whatever the number of contributors.
//!
//! Channel states: accruals move each channel's head; every `sign_interval` the dirty heads
//! are handed to a signer thread (so signing never stalls a commit), and the signed states
//! come back to the writer, which writes them in its next transaction (a batch's, or one of
//! their own when nothing is queued) and publishes them to subscribers only after that
//! commit. Invariants:
//! - A signature is never released before it is durable.
//! - One `seq`, one content: when a head is handed to the signer it counts as signed, so
//!   the next accrual moves the channel to `seq + 1` and the `seq` being signed can never
//!   be signed with other content. If the process dies before the signature is durable,
//!   nothing was released and the stored head (unsigned, same content) is signed again.
//! - A channel row is marked signed only if its stored head is exactly the signed state.

use crate::admission::Admitted;
use crate::error::ApiError;
use crate::hub::{Hub, HubEvent};
use crate::meter::{decode_attribution, Prepared};
use crate::metrics::Metrics;
use crate::registry::{fresh_aux, Registry, Snapshot};
use crate::store::{self, StoreError};
use ldk_node::bitcoin::secp256k1::Keypair;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tonic::Code;
use tribute_channels::attribution::request_weights;
use tribute_channels::channel::{ChannelParams, ChannelState, ChannelStatus, PayerChannel};
use tribute_channels::codec::Encode;
use tribute_channels::merkle::MerkleTree;
use tribute_channels::receipt::ReceiptBatchRoot;
use tribute_channels::split::Weights;
use tribute_channels::{ChannelId, Network, Nsat, PublicKey, Signed};
use tribute_proto::v1::ErrorReason;

use crate::faults::{MeterFault, ALL_METER_FAULTS};

/// Tunables of the writer.
#[derive(Clone, Copy, Debug)]
pub struct LedgerConfig {
    /// Most requests in one batch (one transaction).
    pub max_batch: usize,
    /// Bound of the queue in front of the writer; beyond it callers get OVERLOADED.
    pub queue_capacity: usize,
    /// How often dirty channel heads are signed and published.
    pub sign_interval: Duration,
}

/// The durable answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeterOutcome {
    /// Request id.
    pub request_id: String,
    /// Model.
    pub model_id: String,
    /// Attribution version (0: per-request attribution).
    pub attribution_version: u64,
    /// Price.
    pub price_nsat: u64,
    /// Pool.
    pub pool_nsat: u64,
    /// Batch whose signed root covers the receipt.
    pub batch_seq: u64,
    /// Leaf index in that batch.
    pub leaf_index: u32,
    /// Whether this answers an earlier call with the same id.
    pub replayed: bool,
    /// Shares, when asked for.
    pub shares: Option<Vec<(PublicKey, Nsat)>>,
}

/// One request for the writer.
pub struct MeterJob {
    /// The validated request.
    pub prepared: Prepared,
    /// Return the shares in the outcome.
    pub include_shares: bool,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<MeterOutcome, ApiError>>,
    /// The request's admission slot: released when the writer is done with the job.
    pub admitted: Admitted,
}

impl MeterJob {
    /// Answers the request, releasing its admission slot first: a caller that has its
    /// answer finds its slot free again (a `MeterStream` relies on that).
    fn answer(self, answer: Result<MeterOutcome, ApiError>) {
        let MeterJob { reply, admitted, .. } = self;
        drop(admitted);
        let _ = reply.send(answer);
    }
}

/// A succeeded settlement for the writer to finalize.
#[derive(Clone, Debug)]
pub struct SettleJob {
    /// The settlement.
    pub settlement_id: u64,
    /// Whose channel.
    pub contributor_key: PublicKey,
    /// The channel it pays (checked against the contributor's active channel).
    pub channel_id: ChannelId,
    /// Amount paid.
    pub amount_msat: u64,
    /// `sha256(preimage)`.
    pub payment_hash: [u8; 32],
    /// The preimage the payee released.
    pub preimage: [u8; 32],
    /// Routing fee, when known.
    pub fee_msat: Option<u64>,
    /// Fault injection (tests): do everything, then roll back instead of committing.
    pub fail_before_commit: bool,
}

enum Command {
    Meter(MeterJob),
    /// Finalize a succeeded settlement; answers with the `seq` of the state carrying it.
    Settle(SettleJob, oneshot::Sender<Result<u64, ApiError>>),
    /// Sign and publish every dirty head now; answers when done.
    Flush(oneshot::Sender<()>),
}

/// A stored meter event.
#[derive(Clone, Debug)]
pub struct EventRow {
    /// Sequence in the log.
    pub seq: u64,
    /// Request id.
    pub request_id: String,
    /// Content hash.
    pub content_hash: Vec<u8>,
    /// Model.
    pub model_id: String,
    /// Attribution version.
    pub attribution_version: u64,
    /// Per-request attribution, canonical.
    pub attribution: Option<Vec<u8>>,
    /// Price.
    pub price_nsat: u64,
    /// Pool.
    pub pool_nsat: u64,
    /// Batch.
    pub batch_seq: u64,
    /// Leaf index.
    pub leaf_index: u32,
}

/// Request id → event sequence numbers, by 64-bit hash (collisions are resolved against
/// the stored rows). 20–36 bytes per request in memory (a 16-byte entry plus the table's
/// control byte and slack).
///
/// The map is split into [`ID_SHARDS`] shards by the top bits of the hash. A hash table
/// grows by rehashing every entry into a table twice the size in one insert, and the writer
/// inserts holding the index lock: with one table, every `Meter` in flight waited ~20 ms
/// when it doubled at 2 M ids and 0.3–1.25 s at 8 M (`tribute-bench --id-index`,
/// docs/PERFORMANCE.md), and a daemon that has metered for a while holds far more. A shard
/// holds 1/[`ID_SHARDS`] of the ids, so it rehashes that much at a time.
pub struct IdIndex {
    hasher: foldhash::quality::RandomState,
    /// Hash → the first event with it. Keyed by an already seeded hash, so the maps' own
    /// hashing need not resist anything.
    shards: Box<[HashMap<u64, u64, foldhash::fast::RandomState>]>,
    /// Hash → the later events with that same hash (a 64-bit collision): almost always
    /// empty, so the common entry stays 16 bytes.
    more: HashMap<u64, Vec<u64>, foldhash::fast::RandomState>,
}

/// Shards of the [`IdIndex`] (a power of two).
const ID_SHARDS: usize = 1024;

impl Default for IdIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl IdIndex {
    /// An empty index.
    pub fn new() -> Self {
        IdIndex {
            hasher: Default::default(),
            shards: (0..ID_SHARDS).map(|_| HashMap::default()).collect(),
            more: HashMap::default(),
        }
    }

    /// The hash of `request_id` and its shard.
    fn locate(&self, request_id: &str) -> (u64, usize) {
        let h = self.hasher.hash_one(request_id);
        (h, (h >> (64 - ID_SHARDS.trailing_zeros())) as usize)
    }

    /// Records that `request_id` is the event `seq`.
    pub fn insert(&mut self, request_id: &str, seq: u64) {
        let (h, shard) = self.locate(request_id);
        match self.shards[shard].entry(h) {
            Entry::Vacant(e) => {
                e.insert(seq);
            }
            Entry::Occupied(_) => self.more.entry(h).or_default().push(seq),
        }
    }

    fn candidates(&self, request_id: &str) -> Vec<u64> {
        let (h, shard) = self.locate(request_id);
        let Some(&first) = self.shards[shard].get(&h) else { return Vec::new() };
        let mut all = vec![first];
        if let Some(more) = self.more.get(&h) {
            all.extend_from_slice(more);
        }
        all
    }

    /// Number of requests indexed.
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum::<usize>()
            + self.more.values().map(Vec::len).sum::<usize>()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    /// About the bytes the index's tables hold: their slots (entry and control byte) as
    /// the tables are sized now (the rare collision lists aside).
    pub fn table_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(u64, u64)>() + 1;
        // A table of capacity c has c + 1 slots when small, else 8/7 of c (7/8 load).
        let slots = |c: usize| match c {
            0 => 0,
            1..=7 => c + 1,
            _ => c / 7 * 8,
        };
        self.shards.iter().map(|m| slots(m.capacity()) * slot).sum()
    }
}

/// Shared request-id index (the writer inserts after commit; readers look up).
pub type SharedIds = Arc<Mutex<IdIndex>>;

fn lock_ids(ids: &SharedIds) -> std::sync::MutexGuard<'_, IdIndex> {
    ids.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the stored event of `request_id`, if any.
pub fn find_event(
    conn: &Connection,
    ids: &SharedIds,
    request_id: &str,
) -> Result<Option<EventRow>, StoreError> {
    let candidates = lock_ids(ids).candidates(request_id);
    for seq in candidates {
        if let Some(row) = event_by_seq(conn, seq)? {
            if row.request_id == request_id {
                return Ok(Some(row));
            }
        }
    }
    Ok(None)
}

fn event_by_seq(conn: &Connection, seq: u64) -> Result<Option<EventRow>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT request_id, content_hash, model_id, attribution_version, attribution, price_nsat,
                    pool_nsat, batch_seq, leaf_index FROM meter_events WHERE seq = ?1",
        )?
        .query_row(params![store::u64_to_column(seq, "seq")?], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })
        .optional()?;
    let Some((request_id, content_hash, model_id, version, attribution, price, pool, batch, leaf)) =
        row
    else {
        return Ok(None);
    };
    Ok(Some(EventRow {
        seq,
        request_id,
        content_hash,
        model_id,
        attribution_version: store::u64_from_column(version, "attribution_version")?,
        attribution,
        price_nsat: store::u64_from_column(price, "price_nsat")?,
        pool_nsat: store::u64_from_column(pool, "pool_nsat")?,
        batch_seq: store::u64_from_column(batch, "batch_seq")?,
        leaf_index: u32::try_from(leaf).map_err(|_| StoreError::Corrupt("leaf_index".into()))?,
    }))
}

/// The weights a stored event was split by (from the registry's versions, or from its
/// per-request attribution).
pub fn weights_of(snap: &Snapshot, row: &EventRow) -> Option<Arc<Weights>> {
    if let Some(bytes) = &row.attribution {
        let entries = decode_attribution(bytes)?;
        return request_weights(&entries, |h| snap.owner(h)).ok().map(Arc::new);
    }
    let model = snap.models.get(&tribute_channels::ModelId::new(row.model_id.as_str()).ok()?)?;
    let v = model.versions.get(usize::try_from(row.attribution_version).ok()?.checked_sub(1)?)?;
    Some(v.weights.clone())
}

/// The shares of a stored event.
pub fn shares_of(snap: &Snapshot, row: &EventRow) -> Option<Vec<(PublicKey, Nsat)>> {
    let weights = weights_of(snap, row)?;
    Some(weights.split(Nsat(u128::from(row.pool_nsat))))
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The handle the services use to reach the writer.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Command>,
    ids: SharedIds,
}

/// The running writer; `shutdown` drains it.
pub struct Ledger {
    handle: LedgerHandle,
    thread: std::thread::JoinHandle<()>,
}

impl LedgerHandle {
    /// Queues a request. Full queue → OVERLOADED; stopped writer → SHUTTING_DOWN.
    pub fn submit(&self, job: MeterJob) -> Result<(), ApiError> {
        self.tx.try_send(Command::Meter(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::new(
                Code::ResourceExhausted,
                ErrorReason::Overloaded,
                "metering queue full; retry with the same request id",
            ),
            mpsc::error::TrySendError::Closed(_) => ApiError::new(
                Code::Unavailable,
                ErrorReason::ShuttingDown,
                "daemon is shutting down",
            ),
        })
    }

    /// Signs and publishes every dirty channel head now.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Finalizes a succeeded settlement: records it, moves the channel's `settled_msat`,
    /// signs the state carrying the payment hash (all in one transaction), then streams the
    /// state and a settlement notice. Idempotent: a settlement already finalized answers
    /// with the state that carries it.
    pub async fn settle(&self, job: SettleJob) -> Result<u64, ApiError> {
        let (tx, rx) = oneshot::channel();
        let stopped =
            || ApiError::new(Code::Unavailable, ErrorReason::ShuttingDown, "writer stopped");
        self.tx.send(Command::Settle(job, tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// The shared request-id index.
    pub fn ids(&self) -> &SharedIds {
        &self.ids
    }
}

struct ChannelEntry {
    nonce: [u8; 32],
    payer: PayerChannel,
    /// The channel's `rowid` in `channels` (0: not yet inserted), so a row is rewritten
    /// without an index lookup.
    rowid: i64,
    /// When its head was last handed to the signer (`None`: not since start-up).
    signed_at: Option<Instant>,
}

impl ChannelEntry {
    fn id(&self) -> ChannelId {
        self.payer.head().channel_id
    }
}

/// Signing rounds per `sign_interval`; each signs at most this fraction of the dirty heads
/// (but never fewer than [`SIGN_ROUND_MIN`], so a few channels are signed in one round).
const SIGN_SLICES: usize = 8;
/// Heads one signing round may always take (≈ 0.4 ms of signing).
const SIGN_ROUND_MIN: usize = 16;
/// Longest a signed state waits for a batch's transaction to ride along with.
const MAX_RIDE_WAIT: Duration = Duration::from_millis(5);
/// Rounds this small are signed on the writer itself (≈ 25 µs per head).
const SIGN_INLINE_MAX: usize = 4;

/// Maps and sets keyed by contributor, with a fast seeded hash: the writer looks up every
/// contributor of a batch several times, and SipHash showed in its profile.
type KeyMap<V> = HashMap<PublicKey, V, foldhash::fast::RandomState>;
type KeySet = HashSet<PublicKey, foldhash::fast::RandomState>;

/// Channel heads handed to the signer, and the signed states it returns.
type Heads = Vec<(PublicKey, ChannelState)>;
type SignedHeads = Vec<(PublicKey, Signed<ChannelState>)>;

/// Signs heads (on the signer thread, or on the writer for a flush): each head's
/// invariants are checked again right before it is signed.
fn sign_heads(provider: &Keypair, heads: Heads) -> SignedHeads {
    let mut out = Vec::with_capacity(heads.len());
    for (key, head) in heads {
        match PayerChannel::restore(head, false).and_then(|p| p.sign(provider, &fresh_aux())) {
            Ok((_, state)) => out.push((key, state)),
            Err(e) => tracing::error!(contributor = %key, "cannot sign channel head: {e}"),
        }
    }
    out
}

/// The signer thread: signs one set of heads at a time, off the writer, so a signing round
/// (≈ 25 µs per touched channel) never delays a commit.
struct Signer {
    tx: std::sync::mpsc::SyncSender<Heads>,
    thread: std::thread::JoinHandle<()>,
}

impl Signer {
    fn start(provider: Keypair) -> Result<(Signer, mpsc::Receiver<SignedHeads>), StoreError> {
        // One round in flight at a time: both directions hold at most one message.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Heads>(1);
        let (done_tx, done_rx) = mpsc::channel::<SignedHeads>(1);
        let thread = std::thread::Builder::new()
            .name("tribute-signer".into())
            .spawn(move || {
                while let Ok(heads) = rx.recv() {
                    if done_tx.blocking_send(sign_heads(&provider, heads)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start signer thread: {e}")))?;
        Ok((Signer { tx, thread }, done_rx))
    }
}

struct Writer {
    conn: Connection,
    network: Network,
    provider: Keypair,
    provider_key: PublicKey,
    channels: KeyMap<ChannelEntry>,
    /// Channels whose head changed since it was last handed to the signer.
    dirty: KeySet,
    ids: SharedIds,
    next_event_seq: u64,
    next_batch_seq: u64,
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// `None` once the signer thread is gone (then the writer signs itself).
    signer: Option<Signer>,
    signed_rx: mpsc::Receiver<SignedHeads>,
    /// Heads with the signer now (empty: no round in flight).
    in_flight: Heads,
    /// Signed states not yet durable: written by the next transaction, published after it.
    signed_pending: SignedHeads,
    /// Since when `signed_pending` is not empty.
    pending_since: Option<Instant>,
    /// Channels whose row lags their head: the first batch the row does not show.
    unwritten: KeyMap<u64>,
    /// Test-only fault point (`faults`): where, and at which batch.
    fault: Option<(MeterFault, u64)>,
    /// A fault point was reached: the writer stops as if the process died.
    halted: bool,
    /// Test-only gate in front of meter batches (`faults::WriterHold`).
    hold: Option<crate::faults::WriterHold>,
}

impl Ledger {
    /// Loads the ledger state from `conn` and starts the writer and signer threads.
    pub fn start(
        conn: Connection,
        network: Network,
        provider: Keypair,
        registry: Arc<Registry>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        config: LedgerConfig,
    ) -> Result<Ledger, StoreError> {
        let ids = Arc::new(Mutex::new(IdIndex::new()));
        let (signer, signed_rx) = Signer::start(provider)?;
        let mut writer = Writer {
            conn,
            network,
            provider,
            provider_key: PublicKey::from(provider.x_only_public_key().0),
            channels: KeyMap::default(),
            dirty: KeySet::default(),
            ids: ids.clone(),
            next_event_seq: 1,
            next_batch_seq: 1,
            hub,
            registry,
            metrics,
            signer: Some(signer),
            signed_rx,
            in_flight: Vec::new(),
            signed_pending: Vec::new(),
            pending_since: None,
            unwritten: KeyMap::default(),
            fault: crate::faults::take_armed(),
            halted: false,
            hold: crate::faults::take_hold(),
        };
        writer.load()?;
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("tribute-ledger".into())
            .spawn(move || writer.run(rx, config))
            .map_err(|e| StoreError::Corrupt(format!("cannot start ledger thread: {e}")))?;
        Ok(Ledger { handle: LedgerHandle { tx, ids }, thread })
    }

    /// A handle for services.
    pub fn handle(&self) -> LedgerHandle {
        self.handle.clone()
    }

    /// Stops taking work, commits everything queued, signs and publishes, and joins.
    /// Other handles must be dropped first (the writer runs until every sender is gone).
    pub fn shutdown(self) {
        drop(self.handle);
        let _ = self.thread.join();
    }
}

/// What the writer does with one request of a batch.
enum Fate {
    /// New: gets the batch's next leaf.
    Fresh,
    /// The same id as fresh leaf `.0` earlier in this batch, with the same content.
    Follows(usize),
    /// Answered without writing (a replay, a conflict, a storage error).
    Answered(Result<MeterOutcome, ApiError>),
}

impl Writer {
    fn load(&mut self) -> Result<(), StoreError> {
        let max_event: Option<i64> =
            self.conn.query_row("SELECT MAX(seq) FROM meter_events", [], |r| r.get(0))?;
        self.next_event_seq = max_event.map_or(Ok(0), |v| store::u64_from_column(v, "seq"))? + 1;
        let max_batch: Option<i64> =
            self.conn.query_row("SELECT MAX(batch_seq) FROM receipt_batches", [], |r| r.get(0))?;
        self.next_batch_seq =
            max_batch.map_or(Ok(0), |v| store::u64_from_column(v, "batch_seq"))? + 1;
        {
            let mut ids = lock_ids(&self.ids);
            let mut stmt = self.conn.prepare("SELECT seq, request_id FROM meter_events")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let seq = store::u64_from_column(r.get(0)?, "seq")?;
                ids.insert(
                    r.get_ref(1)?.as_str().map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    seq,
                );
            }
        }
        let rows: Vec<(ChannelRow, i64)> = {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT {CHANNEL_COLUMNS}, rowid FROM channels WHERE status = 0"
            ))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((ChannelRow::from_row(r)?, r.get::<_, i64>(CHANNEL_COLUMN_COUNT)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows
        };
        // Rows plus the accruals of the batches they do not show yet.
        let unapplied = Unapplied::read(&self.conn)?;
        let mut replayed = 0usize;
        for (row, rowid) in rows {
            let (key, nonce, payer) = unapplied.apply(&row, self.network, self.provider_key)?;
            if unapplied.touches(&payer.head().channel_id) {
                replayed += 1;
            }
            if let Some(first) =
                unapplied.first_after(&payer.head().channel_id, row.applied_batch_seq)
            {
                self.unwritten.insert(key, first);
            }
            let mut entry = ChannelEntry { nonce, payer, rowid, signed_at: None };
            if let Some(state) = latest_signed_state(&self.conn, &entry.id())? {
                // The head may have been signed without its row saying so: then it must not
                // be signed again under the same `seq`.
                if entry.payer.needs_signature() && state.message == *entry.payer.head() {
                    entry.payer = PayerChannel::restore(state.message, true)
                        .map_err(|e| StoreError::Corrupt(format!("channel {key}: {e}")))?;
                }
                self.hub.publish_state(&key, state);
            }
            if entry.payer.needs_signature() {
                self.dirty.insert(key);
            }
            self.channels.insert(key, entry);
        }
        if unapplied.channels() > replayed {
            return Err(StoreError::Corrupt(
                "a batch accrued to a channel that is not active".into(),
            ));
        }
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>, config: LedgerConfig) {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("ledger runtime: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let mut buf = Vec::with_capacity(config.max_batch);
            let tick = (config.sign_interval / SIGN_SLICES as u32).max(Duration::from_millis(1));
            // Signed states ride along with the next batch's transaction if one comes soon
            // (under load one always does); else they get a transaction of their own.
            let ride = (tick / 2).min(MAX_RIDE_WAIT);
            let mut next_tick = Instant::now() + tick;
            loop {
                let signing = !self.in_flight.is_empty();
                let wake = match self.pending_since {
                    Some(since) => Some(since + ride),
                    None => (!signing && !self.dirty.is_empty()).then_some(next_tick),
                };
                let sleep = tokio::time::sleep_until(wake.unwrap_or(next_tick).into());
                tokio::select! {
                    n = rx.recv_many(&mut buf, config.max_batch) => {
                        if n == 0 {
                            break;
                        }
                        self.metrics.queue_depth.set(rx.len() as i64);
                        let mut jobs = Vec::with_capacity(n);
                        let mut flushes = Vec::new();
                        let mut settles = Vec::new();
                        for cmd in buf.drain(..) {
                            match cmd {
                                Command::Meter(j) => jobs.push(j),
                                Command::Flush(f) => flushes.push(f),
                                Command::Settle(j, reply) => settles.push((j, reply)),
                            }
                        }
                        if !jobs.is_empty() {
                            if let Some(hold) = &self.hold {
                                hold.pass(jobs.len());
                            }
                            self.process(jobs);
                            if self.halted {
                                tracing::warn!("ledger writer stopped at its fault point");
                                return;
                            }
                        }
                        for (job, reply) in settles {
                            let _ = reply.send(self.settle(job));
                        }
                        if !flushes.is_empty() {
                            self.sign_all_now().await;
                            for f in flushes {
                                let _ = f.send(());
                            }
                        }
                    }
                    done = self.signed_rx.recv(), if signing => self.signed(done),
                    _ = sleep, if wake.is_some() => {}
                }
                let now = Instant::now();
                if self.in_flight.is_empty()
                    && self.signed_pending.is_empty()
                    && !self.dirty.is_empty()
                    && now >= next_tick
                {
                    self.start_signing(now, config.sign_interval);
                    next_tick = now + tick;
                }
                if self.pending_since.is_some_and(|since| now >= since + ride) && rx.is_empty() {
                    self.persist_pending();
                }
            }
            self.sign_all_now().await;
            if let Some(signer) = self.signer.take() {
                drop(signer.tx);
                let _ = signer.thread.join();
            }
        });
    }

    /// Takes the heads of `keys` for signing. From here on each counts as signed: its next
    /// accrual moves it to `seq + 1`, so no other content can ever be signed with the `seq`
    /// being signed now. (Until the signature is durable nothing is released; after a
    /// crash the stored head is still unsigned and is signed again with the same content.)
    fn take_heads(&mut self, keys: impl IntoIterator<Item = PublicKey>, now: Instant) -> Heads {
        let mut heads = Vec::new();
        for key in keys {
            self.dirty.remove(&key);
            let Some(entry) = self.channels.get_mut(&key) else { continue };
            if !entry.payer.needs_signature() {
                continue;
            }
            let head = *entry.payer.head();
            match PayerChannel::restore(head, true) {
                Ok(marked) => {
                    entry.payer = marked;
                    entry.signed_at = Some(now);
                    heads.push((key, head));
                }
                Err(e) => {
                    tracing::error!(contributor = %key, "channel head breaks invariants: {e}")
                }
            }
        }
        heads
    }

    /// Hands a slice of the dirty heads to the signer thread (or signs them here if it is
    /// gone): those not handed over within `interval`, oldest first, at most
    /// 1/[`SIGN_SLICES`] of the dirty ones (or [`SIGN_ROUND_MIN`]). A round every `interval / SIGN_SLICES` thus signs
    /// each channel about once per interval, while the signing work and the signed states a
    /// commit carries stay small and evenly spread, not one burst per interval.
    fn start_signing(&mut self, now: Instant, interval: Duration) {
        let mut due: Vec<(Option<Instant>, PublicKey)> = self
            .dirty
            .iter()
            .filter_map(|key| {
                let at = self.channels.get(key)?.signed_at;
                match at {
                    Some(t) if now.saturating_duration_since(t) < interval => None,
                    _ => Some((at, *key)),
                }
            })
            .collect();
        due.sort_unstable();
        due.truncate(self.dirty.len().div_ceil(SIGN_SLICES).max(SIGN_ROUND_MIN));
        let heads = self.take_heads(due.into_iter().map(|(_, key)| key), now);
        if heads.is_empty() {
            return;
        }
        // A few signatures cost less here than the hand-off to another thread and back.
        if heads.len() <= SIGN_INLINE_MAX {
            self.add_signed(sign_heads(&self.provider, heads));
            return;
        }
        if let Some(signer) = &self.signer {
            match signer.tx.try_send(heads.clone()) {
                Ok(()) => {
                    self.in_flight = heads;
                    return;
                }
                Err(_) => {
                    tracing::error!("signer thread is gone; signing on the ledger thread");
                    self.signer = None;
                }
            }
        }
        self.add_signed(sign_heads(&self.provider, heads));
    }

    /// A signing round came back (or the signer died: then sign its heads here).
    fn signed(&mut self, done: Option<SignedHeads>) {
        let heads = std::mem::take(&mut self.in_flight);
        match done {
            Some(signed) => self.add_signed(signed),
            None => {
                tracing::error!("signer thread is gone; signing on the ledger thread");
                self.signer = None;
                self.add_signed(sign_heads(&self.provider, heads));
            }
        }
    }

    /// Signs every dirty head now, makes every signed state durable, and publishes them.
    async fn sign_all_now(&mut self) {
        if !self.in_flight.is_empty() {
            let done = self.signed_rx.recv().await;
            self.signed(done);
        }
        let dirty: Vec<PublicKey> = self.dirty.iter().copied().collect();
        let heads = self.take_heads(dirty, Instant::now());
        self.add_signed(sign_heads(&self.provider, heads));
        self.persist_pending();
    }

    /// Writes the pending signed states in a transaction of their own, then publishes them.
    fn persist_pending(&mut self) {
        if self.signed_pending.is_empty() {
            return;
        }
        let applied = self.next_batch_seq - 1;
        let persisted: KeySet = self.signed_pending.iter().map(|(k, _)| *k).collect();
        let watermark = self.watermark_after_writing(&persisted);
        let channels = &self.channels;
        let written = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)
            .and_then(|tx| {
                persist_states(&tx, &self.signed_pending, |k| channels.get(k), applied, watermark)?;
                tx.commit().map_err(StoreError::from)
            });
        match written {
            Ok(()) => self.publish_states(),
            // Nothing was released; the states stay pending and go with the next write
            // (or are tried again after the wait).
            Err(e) => {
                tracing::error!("persisting signed states failed: {e}");
                self.pending_since = Some(Instant::now());
            }
        }
    }

    /// The watermark once the rows of `written` are rewritten as of the last batch: the
    /// batch before the first one some other channel's row does not show yet.
    fn watermark_after_writing(&self, written: &KeySet) -> u64 {
        let applied = self.next_batch_seq - 1;
        self.unwritten
            .iter()
            .filter(|(k, _)| !written.contains(k))
            .map(|(_, first)| first - 1)
            .min()
            .unwrap_or(applied)
    }

    /// Finalizes a succeeded settlement (see [`LedgerHandle::settle`]).
    fn settle(&mut self, job: SettleJob) -> Result<u64, ApiError> {
        let internal = |e: String| ApiError::new(Code::Internal, ErrorReason::Internal, e);
        match crate::settlement::pending_of(&self.conn, job.settlement_id)
            .map_err(ApiError::storage)?
        {
            Some((status, Some(seq))) if status == "succeeded" => {
                return u64::try_from(seq).map_err(|_| internal("settled_state_seq".into()))
            }
            Some((status, _)) if status == "pending" => {}
            other => {
                return Err(internal(format!(
                    "settlement {} cannot be finalized: {other:?}",
                    job.settlement_id
                )))
            }
        }
        let Some(entry) = self.channels.get(&job.contributor_key) else {
            return Err(internal(format!("no active channel of {}", job.contributor_key)));
        };
        if entry.id() != job.channel_id {
            return Err(internal(format!(
                "settlement {} is for another channel",
                job.settlement_id
            )));
        }
        let (payer, signed) = entry
            .payer
            .settle(tribute_channels::Msat(job.amount_msat), job.payment_hash)
            .and_then(|p| p.sign(&self.provider, &fresh_aux()))
            .map_err(|e| internal(format!("settlement {}: {e}", job.settlement_id)))?;
        let updated = ChannelEntry {
            nonce: entry.nonce,
            payer,
            rowid: entry.rowid,
            signed_at: entry.signed_at,
        };
        let key = job.contributor_key;
        let written: KeySet = [key].into_iter().collect();
        let watermark = self.watermark_after_writing(&written);
        let applied = self.next_batch_seq - 1;
        let seq = signed.message.seq;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ApiError::storage)?;
        let changed = tx
            .execute(
                "UPDATE settlements SET status = 'succeeded', preimage = ?2, payment_hash = ?3,
                    fee_msat = ?4, settled_state_seq = ?5, updated_at = ?6
                 WHERE settlement_id = ?1 AND status = 'pending'",
                params![
                    store::u64_to_column(job.settlement_id, "settlement_id")?,
                    &job.preimage[..],
                    &job.payment_hash[..],
                    job.fee_msat.map(|f| store::u64_to_column(f, "fee_msat")).transpose()?,
                    store::u64_to_column(seq, "seq")?,
                    store::u64_to_column(unix_now(), "now")?,
                ],
            )
            .map_err(ApiError::storage)?;
        if changed != 1 {
            return Err(internal(format!("settlement {} changed meanwhile", job.settlement_id)));
        }
        persist_states(&tx, &vec![(key, signed)], |_| Some(&updated), applied, watermark)?;
        if job.fail_before_commit {
            // Dropping the transaction rolls it back: nothing of it happened.
            return Err(internal("fault point: finalize rolled back".into()));
        }
        tx.commit().map_err(ApiError::storage)?;
        // Durable: install and publish.
        self.channels.insert(key, updated);
        self.unwritten.remove(&key);
        self.dirty.remove(&key);
        self.metrics.signed_states.inc();
        self.hub.publish_state(&key, signed);
        self.hub.publish_event(
            &key,
            HubEvent::Settlement {
                settlement_id: job.settlement_id,
                amount_msat: job.amount_msat,
                payment_hash: job.payment_hash,
                state: "succeeded",
            },
        );
        Ok(seq)
    }

    /// Queues signed states to be made durable (then published).
    fn add_signed(&mut self, signed: SignedHeads) {
        if !signed.is_empty() && self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        self.signed_pending.extend(signed);
    }

    /// Publishes the pending signed states; call only once they are durable (with their
    /// channels' rows, which then lag no more).
    fn publish_states(&mut self) {
        self.pending_since = None;
        self.metrics.signed_states.inc_by(self.signed_pending.len() as u64);
        for (key, state) in self.signed_pending.drain(..) {
            self.unwritten.remove(&key);
            self.hub.publish_state(&key, state);
        }
    }

    /// Sequences, commits and answers one batch.
    fn process(&mut self, jobs: Vec<MeterJob>) {
        let fates = self.classify(&jobs);
        let mut fresh: Vec<MeterJob> = Vec::with_capacity(jobs.len());
        let mut followers: Vec<(MeterJob, usize)> = Vec::new();
        for (job, fate) in jobs.into_iter().zip(fates) {
            match fate {
                Fate::Fresh => fresh.push(job),
                Fate::Follows(leaf) => followers.push((job, leaf)),
                Fate::Answered(answer) => {
                    job.answer(answer);
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        match self.commit(&fresh) {
            Ok((batch_seq, groups)) => {
                self.metrics.batch_size.observe(fresh.len() as f64);
                self.metrics.pool_nsat.inc_by(fresh.iter().map(|j| j.prepared.pool_nsat).sum());
                self.publish_payments(&fresh, &groups, batch_seq);
                for (job, leaf) in followers {
                    let p = &fresh[leaf].prepared;
                    let o = outcome(p, batch_seq, leaf as u32, true, job.include_shares);
                    job.answer(Ok(o));
                }
                for (leaf, job) in fresh.into_iter().enumerate() {
                    let o =
                        outcome(&job.prepared, batch_seq, leaf as u32, false, job.include_shares);
                    job.answer(Ok(o));
                }
            }
            Err(e) => {
                tracing::error!("metering batch failed, nothing was written: {e}");
                for job in fresh.into_iter().chain(followers.into_iter().map(|(j, _)| j)) {
                    job.answer(Err(e.clone()));
                }
            }
        }
    }

    /// Decides each request's fate: the id index is locked once per batch, and the log is
    /// read only for ids the index has seen (replays, or rare 64-bit hash collisions).
    fn classify(&self, jobs: &[MeterJob]) -> Vec<Fate> {
        let candidates: Vec<Vec<u64>> = {
            let ids = lock_ids(&self.ids);
            jobs.iter().map(|j| ids.candidates(j.prepared.request_id.as_str())).collect()
        };
        let mut fates = Vec::with_capacity(jobs.len());
        // Fresh ids of this batch → (leaf index, content hash).
        let mut fresh: HashMap<&str, (usize, &[u8; 32])> = HashMap::new();
        for (job, candidates) in jobs.iter().zip(candidates) {
            let p = &job.prepared;
            let id = p.request_id.as_str();
            if let Some(&(leaf, content)) = fresh.get(id) {
                fates.push(if *content == p.content_hash {
                    Fate::Follows(leaf)
                } else {
                    Fate::Answered(Err(different_content()))
                });
                continue;
            }
            let stored =
                if candidates.is_empty() { Ok(None) } else { self.stored_event(&candidates, id) };
            fates.push(match stored {
                Ok(Some(row)) => Fate::Answered(if row.content_hash == p.content_hash {
                    Ok(self.replay(&row, job.include_shares))
                } else {
                    Err(different_content())
                }),
                Ok(None) => {
                    fresh.insert(id, (fresh.len(), &p.content_hash));
                    Fate::Fresh
                }
                Err(e) => Fate::Answered(Err(ApiError::storage(e))),
            });
        }
        fates
    }

    fn stored_event(
        &self,
        candidates: &[u64],
        request_id: &str,
    ) -> Result<Option<EventRow>, StoreError> {
        for &seq in candidates {
            if let Some(row) = event_by_seq(&self.conn, seq)? {
                if row.request_id == request_id {
                    return Ok(Some(row));
                }
            }
        }
        Ok(None)
    }

    /// Writes a batch in one transaction (with any signed states waiting to become
    /// durable); installs the new channel heads and publishes those states only after
    /// the commit. Returns the batch's sequence number and its jobs grouped by weights.
    fn commit(&mut self, fresh: &[MeterJob]) -> Result<(u64, Groups), ApiError> {
        let internal = |e: String| ApiError::new(Code::Internal, ErrorReason::Internal, e);
        let batch_seq = self.next_batch_seq;
        let at = |point| self.fault == Some((point, batch_seq));
        let tree = MerkleTree::new(fresh.iter().map(|j| j.prepared.leaf).collect())
            .map_err(|e| internal(e.to_string()))?;
        let root = ReceiptBatchRoot::for_tree(self.network, self.provider_key, batch_seq, &tree);
        let signed_root = Signed::sign(root, &self.provider, &fresh_aux())
            .map_err(|e| internal(e.to_string()))?;

        // Sum shares per weights vector first (no hashing per share), then per contributor.
        let groups = Groups::of(fresh);
        let mut totals: Vec<Vec<Nsat>> =
            groups.weights.iter().map(|w| vec![Nsat::ZERO; w.len()]).collect();
        for (j, &g) in fresh.iter().zip(&groups.of_job) {
            for (sum, share) in totals[g].iter_mut().zip(&j.prepared.shares) {
                *sum = sum.checked_add(*share).map_err(overflow)?;
            }
        }
        let mut sums: KeyMap<Nsat> = KeyMap::default();
        for (w, totals) in groups.weights.iter().zip(&totals) {
            for ((key, _), amount) in w.entries().iter().zip(totals) {
                if !amount.is_zero() {
                    let s = sums.entry(*key).or_insert(Nsat::ZERO);
                    *s = s.checked_add(*amount).map_err(overflow)?;
                }
            }
        }
        // (key, new entry (rowid 0 if the channel is new), amount)
        let mut staged: Vec<(PublicKey, ChannelEntry, Nsat)> = Vec::with_capacity(sums.len());
        for (key, amount) in sums {
            let (nonce, payer, rowid, signed_at) = match self.channels.get(&key) {
                Some(e) => (e.nonce, e.payer.clone(), e.rowid, e.signed_at),
                None => {
                    let nonce = fresh_aux();
                    let params = ChannelParams {
                        network: self.network,
                        provider_key: self.provider_key,
                        contributor_key: key,
                        nonce,
                    };
                    (nonce, PayerChannel::open(&params), 0, None)
                }
            };
            let payer = payer.accrue(amount).map_err(|e| internal(e.to_string()))?;
            staged.push((key, ChannelEntry { nonce, payer, rowid, signed_at }, amount));
        }
        let mut accruals: Vec<(ChannelId, Nsat)> =
            staged.iter().map(|(_, e, amount)| (e.id(), *amount)).collect();
        accruals.sort_unstable_by_key(|(id, _)| id.0);
        let accruals = encode_accruals(&accruals);
        // Rows of the channels this batch touches lag from this batch on, except new ones
        // (inserted below) and those whose signed state this transaction stores.
        let persisted: KeySet = self.signed_pending.iter().map(|(k, _)| *k).collect();
        let watermark = self
            .unwritten
            .iter()
            .filter(|(k, _)| !persisted.contains(k))
            .map(|(_, first)| *first)
            .chain(
                staged
                    .iter()
                    .filter(|(k, e, _)| e.rowid != 0 && !persisted.contains(k))
                    .map(|_| batch_seq),
            )
            .min()
            .map_or(batch_seq, |first| first - 1);

        let now = store::u64_to_column(unix_now(), "now")?;
        let batch_col = store::u64_to_column(batch_seq, "batch_seq")?;
        // Test-only fault points, in ALL_METER_FAULTS order (nothing is armed in production).
        let faults = ALL_METER_FAULTS.map(at);
        let halt = |hit: bool, halted: &mut bool| {
            *halted |= hit;
            if hit {
                Err(ApiError::new(Code::Unavailable, ErrorReason::ShuttingDown, "writer stopped"))
            } else {
                Ok(())
            }
        };
        halt(faults[0], &mut self.halted)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO meter_events (seq, request_id, content_hash, model_id, attribution_version,
                       attribution, price_nsat, pool_nsat, batch_seq, leaf_index, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(StoreError::from)?;
            for (i, j) in fresh.iter().enumerate() {
                let p = &j.prepared;
                ins.execute(params![
                    store::u64_to_column(self.next_event_seq + i as u64, "seq")?,
                    p.request_id.as_str(),
                    &p.content_hash[..],
                    p.model_id.as_str(),
                    store::u64_to_column(p.attribution_version, "attribution_version")?,
                    p.attribution.as_deref(),
                    store::u64_to_column(p.price_nsat, "price_nsat")?,
                    store::u64_to_column(p.pool_nsat, "pool_nsat")?,
                    batch_col,
                    i as i64,
                    now,
                ])
                .map_err(StoreError::from)?;
            }
            halt(faults[1], &mut self.halted)?;
            let leaves: Vec<u8> = fresh.iter().flat_map(|j| j.prepared.leaf).collect();
            tx.prepare_cached(
                "INSERT INTO receipt_batches (batch_seq, receipt_count, merkle_root, signed_root, leaves,
                    accruals, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(StoreError::from)?
            .execute(params![
                batch_col,
                fresh.len() as i64,
                &tree.root()[..],
                signed_root.encode(),
                leaves,
                accruals,
                now
            ])
            .map_err(StoreError::from)?;
            halt(faults[2], &mut self.halted)?;
            for (key, entry, _) in &mut staged {
                if entry.rowid == 0 {
                    entry.rowid = insert_channel(&tx, key, entry, batch_seq)?;
                }
            }
            // Signed states whose signature is not yet durable ride along, with their
            // channels' rows as of this batch.
            let staged_entries: KeyMap<&ChannelEntry> =
                staged.iter().map(|(k, e, _)| (*k, e)).collect();
            persist_states(
                &tx,
                &self.signed_pending,
                |k| staged_entries.get(k).copied().or_else(|| self.channels.get(k)),
                batch_seq,
                watermark,
            )?;
        }
        halt(faults[3], &mut self.halted)?;
        tx.commit().map_err(StoreError::from)?;
        halt(faults[4], &mut self.halted)?;

        // Durable: install, and release the signed states.
        {
            let mut ids = lock_ids(&self.ids);
            for (i, j) in fresh.iter().enumerate() {
                ids.insert(j.prepared.request_id.as_str(), self.next_event_seq + i as u64);
            }
        }
        for (key, entry, _) in staged {
            if self.channels.contains_key(&key) {
                self.unwritten.entry(key).or_insert(batch_seq);
            }
            self.dirty.insert(key);
            self.channels.insert(key, entry);
        }
        self.publish_states();
        self.next_event_seq += fresh.len() as u64;
        self.next_batch_seq += 1;
        Ok((batch_seq, groups))
    }

    fn replay(&self, row: &EventRow, include_shares: bool) -> MeterOutcome {
        MeterOutcome {
            request_id: row.request_id.clone(),
            model_id: row.model_id.clone(),
            attribution_version: row.attribution_version,
            price_nsat: row.price_nsat,
            pool_nsat: row.pool_nsat,
            batch_seq: row.batch_seq,
            leaf_index: row.leaf_index,
            replayed: true,
            shares: if include_shares { shares_of(&self.registry.snapshot(), row) } else { None },
        }
    }

    /// Each request's micropayments to the contributors that have event subscribers. Who
    /// listens is looked up once per weights vector per batch, not once per share.
    fn publish_payments(&self, fresh: &[MeterJob], groups: &Groups, batch_seq: u64) {
        let listening: Vec<Option<Vec<bool>>> = groups
            .weights
            .iter()
            .map(|w| {
                let flags = self.hub.event_listeners(w.entries().iter().map(|(k, _)| k));
                flags.contains(&true).then_some(flags)
            })
            .collect();
        if listening.iter().all(Option::is_none) {
            return;
        }
        for ((leaf, j), &g) in fresh.iter().enumerate().zip(&groups.of_job) {
            let Some(flags) = &listening[g] else { continue };
            let p = &j.prepared;
            let request_id: Arc<str> = Arc::from(p.request_id.as_str());
            for (((key, _), share), listens) in p.weights.entries().iter().zip(&p.shares).zip(flags)
            {
                if !*listens || share.is_zero() {
                    continue;
                }
                // A share is at most the pool, which fits u64.
                let share_nsat = u64::try_from(share.0).unwrap_or(u64::MAX);
                self.hub.publish_event(
                    key,
                    HubEvent::Payment {
                        request_id: request_id.clone(),
                        share_nsat,
                        batch_seq,
                        leaf_index: leaf as u32,
                    },
                );
            }
        }
    }
}

/// A batch's jobs grouped by the weights they were split by (one `Arc` per model version;
/// one per request with its own attribution), found by pointer.
struct Groups {
    weights: Vec<Arc<Weights>>,
    /// Group of each job, in batch order.
    of_job: Vec<usize>,
}

impl Groups {
    fn of(jobs: &[MeterJob]) -> Groups {
        let mut index: HashMap<*const Weights, usize> = HashMap::new();
        let mut weights = Vec::new();
        let of_job = jobs
            .iter()
            .map(|j| {
                *index.entry(Arc::as_ptr(&j.prepared.weights)).or_insert_with(|| {
                    weights.push(j.prepared.weights.clone());
                    weights.len() - 1
                })
            })
            .collect();
        Groups { weights, of_job }
    }
}

/// Writes signed states, rewrites each one's channel row to the channel's head as of batch
/// `applied` (signed if the head is exactly the stored state; a head that moved on since is
/// a newer, unsigned `seq`), and records the watermark: every channel row now shows at
/// least the batches up to `watermark`.
fn persist_states<'a>(
    tx: &rusqlite::Transaction<'_>,
    signed: &SignedHeads,
    entry_of: impl Fn(&PublicKey) -> Option<&'a ChannelEntry>,
    applied: u64,
    watermark: u64,
) -> Result<(), StoreError> {
    if signed.is_empty() {
        return Ok(());
    }
    let mut ins = tx.prepare_cached(
        "INSERT INTO channel_states (channel_id, seq, state) VALUES (?1, ?2, ?3)",
    )?;
    let mut upd = tx.prepare_cached(
        "UPDATE channels SET status = ?3, seq = ?4, accrued_msat = ?5, accrued_rem_nsat = ?6,
            settled_msat = ?7, last_settlement_hash = ?8, head_signed = ?9, applied_batch_seq = ?10
         WHERE rowid = ?1 AND channel_id = ?2",
    )?;
    let applied = store::u64_to_column(applied, "applied_batch_seq")?;
    for (key, s) in signed {
        let m = &s.message;
        ins.execute(params![&m.channel_id.0[..], store::u64_to_column(m.seq, "seq")?, s.encode()])?;
        let Some(entry) = entry_of(key) else {
            return Err(StoreError::Corrupt(format!("signed state of unknown channel {key}")));
        };
        let h = entry.payer.head();
        if h.channel_id != m.channel_id {
            return Err(StoreError::Corrupt(format!("signed state of another channel of {key}")));
        }
        let (am, ar) = store::nsat_to_columns(h.accrued_nsat)?;
        let changed = upd.execute(params![
            entry.rowid,
            &h.channel_id.0[..],
            status_to_column(h.status),
            store::u64_to_column(h.seq, "seq")?,
            am,
            ar,
            store::msat_to_column(h.settled_msat)?,
            &h.last_settlement_hash[..],
            i64::from(h == m),
            applied,
        ])?;
        if changed != 1 {
            return Err(StoreError::Corrupt(format!("channel row {} is missing", entry.rowid)));
        }
    }
    store::meta_set(tx, APPLIED_THROUGH, &watermark.to_be_bytes())?;
    Ok(())
}

/// `meta` key of the watermark: every channel row shows every batch up to it.
const APPLIED_THROUGH: &str = "accruals_applied_through";

/// Bytes of one entry of a batch's `accruals`: channel id, then nsat as u128 big-endian.
const ACCRUAL_ENTRY: usize = 32 + 16;

/// A batch's per-channel accruals in their stored form (entries sorted by channel id).
fn encode_accruals(accruals: &[(ChannelId, Nsat)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(accruals.len() * ACCRUAL_ENTRY);
    for (id, amount) in accruals {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&amount.0.to_be_bytes());
    }
    out
}

/// Reads a batch's `accruals`.
pub fn decode_accruals(bytes: &[u8]) -> Result<Vec<(ChannelId, Nsat)>, StoreError> {
    if bytes.len() % ACCRUAL_ENTRY != 0 {
        return Err(StoreError::Corrupt("batch accruals: truncated entry".into()));
    }
    Ok(bytes
        .chunks_exact(ACCRUAL_ENTRY)
        .map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(&c[..32]);
            let mut amount = [0u8; 16];
            amount.copy_from_slice(&c[32..]);
            (ChannelId(id), Nsat(u128::from_be_bytes(amount)))
        })
        .collect())
}

/// A channel as it stands now: its row plus the accruals the row does not show yet.
pub struct CurrentChannel {
    /// Contributor.
    pub contributor_key: PublicKey,
    /// Channel nonce.
    pub nonce: [u8; 32],
    /// Current head.
    pub head: ChannelState,
    /// Whether the head is signed (a signed state with exactly this content is stored).
    pub head_signed: bool,
}

/// The channels selected by `filter` (an SQL suffix over `channels`: `WHERE …`,
/// `ORDER BY …`), each as it stands now.
pub fn read_channels<P: rusqlite::Params>(
    conn: &Connection,
    filter: &str,
    params: P,
    network: Network,
    provider_key: PublicKey,
) -> Result<Vec<CurrentChannel>, StoreError> {
    // The rows and the batches they lag are read from one snapshot. Two autocommit reads
    // could straddle a writer commit that rewrites rows and moves the watermark past
    // batches the first read's rows lack: those accruals would be left out (a balance shown,
    // or settled, lower than the signed one). Inside a caller's transaction it is one already.
    let _snapshot = if conn.is_autocommit() { Some(conn.unchecked_transaction()?) } else { None };
    let rows = conn
        .prepare_cached(&format!("SELECT {CHANNEL_COLUMNS} FROM channels {filter}"))?
        .query_map(params, ChannelRow::from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let unapplied = Unapplied::read(conn)?;
    rows.iter()
        .map(|row| {
            let (contributor_key, nonce, payer) = unapplied.apply(row, network, provider_key)?;
            Ok(CurrentChannel {
                contributor_key,
                nonce,
                head: *payer.head(),
                head_signed: !payer.needs_signature(),
            })
        })
        .collect()
}

/// The watermark: every channel row shows the accruals of every batch up to it (0 before
/// any row was rewritten).
pub fn accruals_applied_through(conn: &Connection) -> Result<u64, StoreError> {
    match store::meta_get(conn, APPLIED_THROUGH)? {
        None => Ok(0),
        Some(b) => Ok(u64::from_be_bytes(
            b.as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("meta {APPLIED_THROUGH}")))?,
        )),
    }
}

/// The accruals that channel rows may not show yet: those of every batch after the
/// watermark, per channel, in batch order. A row plus its unapplied accruals is the
/// channel's current head (what the writer holds in memory).
pub struct Unapplied {
    by_channel: HashMap<ChannelId, Vec<(u64, Nsat)>>,
}

impl Unapplied {
    /// Reads the batches after the watermark.
    pub fn read(conn: &Connection) -> Result<Unapplied, StoreError> {
        let watermark = accruals_applied_through(conn)?;
        let mut stmt = conn.prepare_cached(
            "SELECT batch_seq, accruals FROM receipt_batches WHERE batch_seq > ?1 ORDER BY batch_seq",
        )?;
        let mut rows = stmt.query(params![store::u64_to_column(watermark, "watermark")?])?;
        let mut by_channel: HashMap<ChannelId, Vec<(u64, Nsat)>> = HashMap::new();
        while let Some(r) = rows.next()? {
            let batch = store::u64_from_column(r.get(0)?, "batch_seq")?;
            let bytes = r.get_ref(1)?.as_blob().map_err(|e| StoreError::Corrupt(e.to_string()))?;
            for (id, amount) in decode_accruals(bytes)? {
                by_channel.entry(id).or_default().push((batch, amount));
            }
        }
        Ok(Unapplied { by_channel })
    }

    /// Number of channels with accruals after the watermark.
    fn channels(&self) -> usize {
        self.by_channel.len()
    }

    /// Whether a batch after the watermark accrued to `id`.
    fn touches(&self, id: &ChannelId) -> bool {
        self.by_channel.contains_key(id)
    }

    /// The first batch after `applied` that accrued to `id`, if any.
    fn first_after(&self, id: &ChannelId, applied: u64) -> Option<u64> {
        self.by_channel.get(id)?.iter().map(|(b, _)| *b).find(|b| *b > applied)
    }

    /// The channel's current head: its row, plus the accruals of batches after the row's
    /// `applied_batch_seq`.
    pub fn apply(
        &self,
        row: &ChannelRow,
        network: Network,
        provider_key: PublicKey,
    ) -> Result<(PublicKey, [u8; 32], PayerChannel), StoreError> {
        let (key, nonce, state) = row.head(network, provider_key)?;
        let corrupt = |e: tribute_channels::channel::ChannelError| {
            StoreError::Corrupt(format!("channel {key}: {e}"))
        };
        let mut payer = PayerChannel::restore(state, row.head_signed).map_err(corrupt)?;
        for (batch, amount) in self.by_channel.get(&state.channel_id).into_iter().flatten() {
            if *batch > row.applied_batch_seq {
                payer = payer.accrue(*amount).map_err(corrupt)?;
            }
        }
        Ok((key, nonce, payer))
    }
}

/// A channel's first row; returns its rowid.
fn insert_channel(
    tx: &rusqlite::Transaction<'_>,
    key: &PublicKey,
    entry: &ChannelEntry,
    batch_seq: u64,
) -> Result<i64, StoreError> {
    let h = entry.payer.head();
    let (am, ar) = store::nsat_to_columns(h.accrued_nsat)?;
    tx.prepare_cached(
        "INSERT INTO channels (channel_id, contributor_key, nonce, status, seq, accrued_msat, accrued_rem_nsat,
            settled_msat, last_settlement_hash, head_signed, opened_batch_seq, applied_batch_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)",
    )?
    .execute(params![
        &h.channel_id.0[..],
        key.to_bytes(),
        &entry.nonce[..],
        status_to_column(h.status),
        store::u64_to_column(h.seq, "seq")?,
        am,
        ar,
        store::msat_to_column(h.settled_msat)?,
        &h.last_settlement_hash[..],
        i64::from(!entry.payer.needs_signature()),
        store::u64_to_column(batch_seq, "batch_seq")?,
    ])?;
    Ok(tx.last_insert_rowid())
}

/// The column value of a status.
pub fn status_to_column(s: ChannelStatus) -> i64 {
    match s {
        ChannelStatus::Active => 0,
        ChannelStatus::Closing => 1,
        ChannelStatus::Closed => 2,
    }
}

/// The status of a column value.
pub fn status_from_column(v: i64) -> Result<ChannelStatus, StoreError> {
    match v {
        0 => Ok(ChannelStatus::Active),
        1 => Ok(ChannelStatus::Closing),
        2 => Ok(ChannelStatus::Closed),
        _ => Err(StoreError::Corrupt(format!("channel status {v}"))),
    }
}

/// The newest signed state of a channel.
pub fn latest_signed_state(
    conn: &Connection,
    channel_id: &ChannelId,
) -> Result<Option<Signed<ChannelState>>, StoreError> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached(
            "SELECT state FROM channel_states WHERE channel_id = ?1 ORDER BY seq DESC LIMIT 1",
        )?
        .query_row(params![&channel_id.0[..]], |r| r.get(0))
        .optional()?;
    bytes
        .map(|b| {
            Signed::<ChannelState>::decode(&b)
                .map_err(|e| StoreError::Corrupt(format!("signed state: {e}")))
        })
        .transpose()
}

/// A `channels` row.
pub struct ChannelRow {
    /// Contributor.
    pub contributor_key: Vec<u8>,
    /// Nonce.
    pub nonce: Vec<u8>,
    /// Status column.
    pub status: i64,
    /// Head seq.
    pub seq: i64,
    /// Accrued, whole msat.
    pub accrued_msat: i64,
    /// Accrued, sub-msat remainder.
    pub accrued_rem_nsat: i64,
    /// Settled.
    pub settled_msat: i64,
    /// Last settlement hash.
    pub last_settlement_hash: Vec<u8>,
    /// Whether the head is signed.
    pub head_signed: bool,
    /// The last batch the row shows.
    pub applied_batch_seq: u64,
}

/// The columns [`ChannelRow::from_row`] reads, in order.
pub const CHANNEL_COLUMNS: &str = "contributor_key, nonce, status, seq, accrued_msat, \
    accrued_rem_nsat, settled_msat, last_settlement_hash, head_signed, applied_batch_seq";
/// How many columns [`CHANNEL_COLUMNS`] names.
pub const CHANNEL_COLUMN_COUNT: usize = 10;

impl ChannelRow {
    /// Reads the row (columns in the order of [`CHANNEL_COLUMNS`]).
    pub fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(ChannelRow {
            contributor_key: r.get(0)?,
            nonce: r.get(1)?,
            status: r.get(2)?,
            seq: r.get(3)?,
            accrued_msat: r.get(4)?,
            accrued_rem_nsat: r.get(5)?,
            settled_msat: r.get(6)?,
            last_settlement_hash: r.get(7)?,
            head_signed: r.get::<_, i64>(8)? != 0,
            applied_batch_seq: u64::try_from(r.get::<_, i64>(9)?)
                .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(9, -1))?,
        })
    }

    /// The channel's head state, checked.
    pub fn head(
        &self,
        network: Network,
        provider_key: PublicKey,
    ) -> Result<(PublicKey, [u8; 32], ChannelState), StoreError> {
        let corrupt = |w: &str| StoreError::Corrupt(format!("channel row: {w}"));
        let key_bytes: [u8; 32] =
            self.contributor_key.as_slice().try_into().map_err(|_| corrupt("contributor_key"))?;
        let key = PublicKey::from_bytes(key_bytes).map_err(|_| corrupt("contributor_key"))?;
        let nonce: [u8; 32] = self.nonce.as_slice().try_into().map_err(|_| corrupt("nonce"))?;
        let params = ChannelParams { network, provider_key, contributor_key: key, nonce };
        let state = ChannelState {
            network,
            channel_id: params.channel_id(),
            provider_key,
            seq: store::u64_from_column(self.seq, "seq")?,
            accrued_nsat: store::nsat_from_columns(self.accrued_msat, self.accrued_rem_nsat)?,
            settled_msat: store::msat_from_column(self.settled_msat)?,
            last_settlement_hash: self
                .last_settlement_hash
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("hash"))?,
            status: status_from_column(self.status)?,
        };
        Ok((key, nonce, state))
    }
}

fn different_content() -> ApiError {
    ApiError::new(
        Code::AlreadyExists,
        ErrorReason::ExistsWithDifferentContent,
        "request id already used with different content",
    )
    .with("field", "request_id")
}

fn overflow(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(Code::Internal, ErrorReason::Internal, format!("accrual overflow: {e}"))
}

fn outcome(
    p: &Prepared,
    batch_seq: u64,
    leaf_index: u32,
    replayed: bool,
    include_shares: bool,
) -> MeterOutcome {
    MeterOutcome {
        request_id: p.request_id.as_str().to_owned(),
        model_id: p.model_id.as_str().to_owned(),
        attribution_version: p.attribution_version,
        price_nsat: p.price_nsat,
        pool_nsat: p.pool_nsat,
        batch_seq,
        leaf_index,
        replayed,
        shares: include_shares.then(|| p.receipt().shares),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_index_finds_every_id_across_its_shards() {
        let mut ids = IdIndex::new();
        let n = 200_000u64;
        for seq in 1..=n {
            ids.insert(&format!("req-{seq}"), seq);
        }
        assert_eq!(ids.len(), n as usize);
        for seq in 1..=n {
            assert!(ids.candidates(&format!("req-{seq}")).contains(&seq), "req-{seq} lost");
        }
        // (A 64-bit hash collision with one of 200,000 ids is too unlikely to ever happen.)
        assert!(ids.candidates("never-sent").is_empty());
        // The ids are spread over the shards, so no shard rehashes more than a sliver of
        // them at once.
        let largest = ids.shards.iter().map(HashMap::len).max().unwrap_or(0);
        let used = ids.shards.iter().filter(|m| !m.is_empty()).count();
        assert!(used > ID_SHARDS * 9 / 10, "only {used} of {ID_SHARDS} shards used");
        assert!(largest < 4 * n as usize / ID_SHARDS, "a shard holds {largest} of {n} ids");
    }

    #[test]
    fn id_index_keeps_every_seq_of_one_hash() {
        let mut ids = IdIndex::new();
        assert!(ids.is_empty());
        ids.insert("a", 1);
        ids.insert("a", 7);
        ids.insert("a", 9);
        assert_eq!(ids.candidates("a"), vec![1, 7, 9]);
        assert_eq!(ids.len(), 3);
        assert!(!ids.is_empty());
    }
}
