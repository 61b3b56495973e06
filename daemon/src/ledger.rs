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
//! Channel states: accruals move each channel's head; every `sign_interval` the dirty heads
//! are signed, persisted, and only then published to subscribers. A signature is never
//! released before it is durable, so a crash cannot lead to two different states with one
//! `seq`.

use crate::error::ApiError;
use crate::hub::{Hub, HubEvent};
use crate::meter::{decode_attribution, Prepared};
use crate::registry::{fresh_aux, Registry, Snapshot};
use crate::store::{self, StoreError};
use ldk_node::bitcoin::secp256k1::Keypair;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::hash_map::RandomState;
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
}

enum Command {
    Meter(MeterJob),
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

enum Seqs {
    One(u64),
    Many(Vec<u64>),
}

/// Request id → event sequence numbers, by 64-bit hash (collisions are resolved against
/// the stored rows). ~40 bytes per request in memory.
pub struct IdIndex {
    hasher: RandomState,
    map: HashMap<u64, Seqs>,
}

impl IdIndex {
    fn new() -> Self {
        IdIndex { hasher: RandomState::new(), map: HashMap::new() }
    }

    fn insert(&mut self, request_id: &str, seq: u64) {
        let h = self.hasher.hash_one(request_id);
        match self.map.get_mut(&h) {
            None => {
                self.map.insert(h, Seqs::One(seq));
            }
            Some(Seqs::One(first)) => {
                let first = *first;
                self.map.insert(h, Seqs::Many(vec![first, seq]));
            }
            Some(Seqs::Many(v)) => v.push(seq),
        }
    }

    fn candidates(&self, request_id: &str) -> Vec<u64> {
        match self.map.get(&self.hasher.hash_one(request_id)) {
            None => Vec::new(),
            Some(Seqs::One(s)) => vec![*s],
            Some(Seqs::Many(v)) => v.clone(),
        }
    }

    /// Number of requests indexed.
    pub fn len(&self) -> usize {
        self.map.values().map(|s| if let Seqs::Many(v) = s { v.len() } else { 1 }).sum()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
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

    /// The shared request-id index.
    pub fn ids(&self) -> &SharedIds {
        &self.ids
    }
}

struct ChannelEntry {
    nonce: [u8; 32],
    payer: PayerChannel,
}

impl ChannelEntry {
    fn id(&self) -> ChannelId {
        self.payer.head().channel_id
    }
}

struct Writer {
    conn: Connection,
    network: Network,
    provider: Keypair,
    provider_key: PublicKey,
    channels: HashMap<PublicKey, ChannelEntry>,
    dirty: HashSet<PublicKey>,
    ids: SharedIds,
    next_event_seq: u64,
    next_batch_seq: u64,
    hub: Arc<Hub>,
    registry: Arc<Registry>,
}

impl Ledger {
    /// Loads the ledger state from `conn` and starts the writer thread.
    pub fn start(
        conn: Connection,
        network: Network,
        provider: Keypair,
        registry: Arc<Registry>,
        hub: Arc<Hub>,
        config: LedgerConfig,
    ) -> Result<Ledger, StoreError> {
        let ids = Arc::new(Mutex::new(IdIndex::new()));
        let mut writer = Writer {
            conn,
            network,
            provider,
            provider_key: PublicKey::from(provider.x_only_public_key().0),
            channels: HashMap::new(),
            dirty: HashSet::new(),
            ids: ids.clone(),
            next_event_seq: 1,
            next_batch_seq: 1,
            hub,
            registry,
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
        let rows: Vec<ChannelRow> = {
            let mut stmt = self.conn.prepare(
                "SELECT contributor_key, nonce, status, seq, accrued_msat, accrued_rem_nsat, settled_msat,
                        last_settlement_hash, head_signed FROM channels WHERE status = 0",
            )?;
            let rows = stmt.query_map([], ChannelRow::from_row)?.collect::<Result<Vec<_>, _>>()?;
            rows
        };
        for row in rows {
            let (key, entry, signed) = row.restore(self.network, self.provider_key)?;
            if let Some(state) = latest_signed_state(&self.conn, &entry.id())? {
                self.hub.publish_state(&key, state);
            }
            if !signed {
                self.dirty.insert(key);
            }
            self.channels.insert(key, entry);
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
            let mut next_sign = Instant::now() + config.sign_interval;
            loop {
                let sleep = tokio::time::sleep_until(next_sign.into());
                tokio::select! {
                    n = rx.recv_many(&mut buf, config.max_batch) => {
                        if n == 0 {
                            break;
                        }
                        let mut jobs = Vec::with_capacity(n);
                        let mut flushes = Vec::new();
                        for cmd in buf.drain(..) {
                            match cmd {
                                Command::Meter(j) => jobs.push(j),
                                Command::Flush(f) => flushes.push(f),
                            }
                        }
                        if !jobs.is_empty() {
                            self.process(jobs);
                        }
                        if !flushes.is_empty() {
                            self.sign_dirty();
                            next_sign = Instant::now() + config.sign_interval;
                            for f in flushes {
                                let _ = f.send(());
                            }
                        }
                    }
                    _ = sleep, if !self.dirty.is_empty() => {}
                }
                if Instant::now() >= next_sign {
                    self.sign_dirty();
                    next_sign = Instant::now() + config.sign_interval;
                }
            }
            self.sign_dirty();
        });
    }

    /// Sequences, commits and answers one batch.
    fn process(&mut self, jobs: Vec<MeterJob>) {
        let mut fresh: Vec<MeterJob> = Vec::with_capacity(jobs.len());
        let mut in_batch: HashMap<String, usize> = HashMap::new();
        let mut followers: Vec<(MeterJob, usize)> = Vec::new();
        for job in jobs {
            let id = job.prepared.request_id.as_str();
            if let Some(&i) = in_batch.get(id) {
                if fresh[i].prepared.content_hash == job.prepared.content_hash {
                    followers.push((job, i));
                } else {
                    let _ = job.reply.send(Err(different_content()));
                }
                continue;
            }
            match find_event(&self.conn, &self.ids, id) {
                Ok(Some(row)) => {
                    let answer = if row.content_hash == job.prepared.content_hash {
                        Ok(self.replay(&row, job.include_shares))
                    } else {
                        Err(different_content())
                    };
                    let _ = job.reply.send(answer);
                }
                Ok(None) => {
                    in_batch.insert(id.to_owned(), fresh.len());
                    fresh.push(job);
                }
                Err(e) => {
                    let _ = job.reply.send(Err(ApiError::storage(e)));
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        match self.commit(&fresh) {
            Ok(batch_seq) => {
                let outcomes: Vec<MeterOutcome> = fresh
                    .iter()
                    .enumerate()
                    .map(|(i, j)| {
                        outcome(&j.prepared, batch_seq, i as u32, false, j.include_shares)
                    })
                    .collect();
                self.publish_payments(&fresh, batch_seq);
                for (job, i) in followers {
                    let mut o = outcomes[i].clone();
                    o.replayed = true;
                    o.shares = job.include_shares.then(|| fresh[i].prepared.receipt().shares);
                    let _ = job.reply.send(Ok(o));
                }
                for (job, o) in fresh.into_iter().zip(outcomes) {
                    let _ = job.reply.send(Ok(o));
                }
            }
            Err(e) => {
                tracing::error!("metering batch failed, nothing was written: {e}");
                for job in fresh.into_iter().chain(followers.into_iter().map(|(j, _)| j)) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Writes a batch in one transaction; installs the new channel heads only after commit.
    fn commit(&mut self, fresh: &[MeterJob]) -> Result<u64, ApiError> {
        let batch_seq = self.next_batch_seq;
        let tree = MerkleTree::new(fresh.iter().map(|j| j.prepared.leaf).collect())
            .map_err(|e| ApiError::new(Code::Internal, ErrorReason::Internal, e.to_string()))?;
        let root = ReceiptBatchRoot::for_tree(self.network, self.provider_key, batch_seq, &tree);
        let signed_root = Signed::sign(root, &self.provider, &fresh_aux())
            .map_err(|e| ApiError::new(Code::Internal, ErrorReason::Internal, e.to_string()))?;

        // Sum shares per weights vector first (no hashing per share), then per contributor.
        let mut groups: Vec<(&Arc<Weights>, Vec<Nsat>)> = Vec::new();
        for j in fresh {
            let p = &j.prepared;
            let g = match groups.iter().position(|(w, _)| Arc::ptr_eq(w, &p.weights)) {
                Some(g) => g,
                None => {
                    groups.push((&p.weights, vec![Nsat::ZERO; p.weights.len()]));
                    groups.len() - 1
                }
            };
            for (sum, share) in groups[g].1.iter_mut().zip(&p.shares) {
                *sum = sum.checked_add(*share).map_err(overflow)?;
            }
        }
        let mut sums: HashMap<PublicKey, Nsat> = HashMap::new();
        for (w, totals) in &groups {
            for ((key, _), amount) in w.entries().iter().zip(totals) {
                if !amount.is_zero() {
                    let s = sums.entry(*key).or_insert(Nsat::ZERO);
                    *s = s.checked_add(*amount).map_err(overflow)?;
                }
            }
        }
        let mut staged: Vec<(PublicKey, ChannelEntry, Nsat)> = Vec::with_capacity(sums.len());
        for (key, amount) in sums {
            let (nonce, payer) = match self.channels.get(&key) {
                Some(e) => (e.nonce, e.payer.clone()),
                None => {
                    let nonce = fresh_aux();
                    let params = ChannelParams {
                        network: self.network,
                        provider_key: self.provider_key,
                        contributor_key: key,
                        nonce,
                    };
                    (nonce, PayerChannel::open(&params))
                }
            };
            let payer = payer
                .accrue(amount)
                .map_err(|e| ApiError::new(Code::Internal, ErrorReason::Internal, e.to_string()))?;
            staged.push((key, ChannelEntry { nonce, payer }, amount));
        }

        let now = store::u64_to_column(unix_now(), "now")?;
        let tx = self.conn.transaction().map_err(StoreError::from)?;
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
                    store::u64_to_column(batch_seq, "batch_seq")?,
                    i as i64,
                    now,
                ])
                .map_err(StoreError::from)?;
            }
            let leaves: Vec<u8> = fresh.iter().flat_map(|j| j.prepared.leaf).collect();
            tx.execute(
                "INSERT INTO receipt_batches (batch_seq, receipt_count, merkle_root, signed_root, leaves, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    store::u64_to_column(batch_seq, "batch_seq")?,
                    fresh.len() as i64,
                    &tree.root()[..],
                    signed_root.encode(),
                    leaves,
                    now
                ],
            )
            .map_err(StoreError::from)?;
            let mut acc = tx
                .prepare_cached(
                    "INSERT INTO batch_accruals (batch_seq, channel_id, amount_msat, amount_rem_nsat) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(StoreError::from)?;
            for (key, entry, amount) in &staged {
                write_channel(&tx, key, entry, batch_seq)?;
                let (m, r) = store::nsat_to_columns(*amount)?;
                acc.execute(params![
                    store::u64_to_column(batch_seq, "batch_seq")?,
                    &entry.id().0[..],
                    m,
                    r
                ])
                .map_err(StoreError::from)?;
            }
        }
        tx.commit().map_err(StoreError::from)?;

        // Durable: install.
        {
            let mut ids = lock_ids(&self.ids);
            for (i, j) in fresh.iter().enumerate() {
                ids.insert(j.prepared.request_id.as_str(), self.next_event_seq + i as u64);
            }
        }
        for (key, entry, _) in staged {
            self.dirty.insert(key);
            self.channels.insert(key, entry);
        }
        self.next_event_seq += fresh.len() as u64;
        self.next_batch_seq += 1;
        Ok(batch_seq)
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

    fn publish_payments(&self, fresh: &[MeterJob], batch_seq: u64) {
        let mut listeners: HashMap<PublicKey, bool> = HashMap::new();
        for (i, j) in fresh.iter().enumerate() {
            let p = &j.prepared;
            let request_id: Arc<str> = Arc::from(p.request_id.as_str());
            for ((key, _), share) in p.weights.entries().iter().zip(&p.shares) {
                if share.is_zero()
                    || !*listeners
                        .entry(*key)
                        .or_insert_with(|| self.hub.has_event_subscribers(key))
                {
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
                        leaf_index: i as u32,
                    },
                );
            }
        }
    }

    /// Signs every dirty head, persists the signed states, then publishes them.
    fn sign_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut signed = Vec::with_capacity(self.dirty.len());
        for key in &self.dirty {
            let Some(entry) = self.channels.get(key) else { continue };
            if !entry.payer.needs_signature() {
                continue;
            }
            match entry.payer.sign(&self.provider, &fresh_aux()) {
                Ok((payer, state)) => signed.push((*key, payer, state)),
                Err(e) => tracing::error!(contributor = %key, "cannot sign channel head: {e}"),
            }
        }
        match persist_states(&mut self.conn, &signed) {
            Ok(()) => {
                self.dirty.clear();
                for (key, payer, state) in signed {
                    if let Some(entry) = self.channels.get_mut(&key) {
                        entry.payer = payer;
                    }
                    self.hub.publish_state(&key, state);
                }
            }
            // Nothing was released; the heads stay dirty and are signed again next time.
            Err(e) => tracing::error!("persisting signed states failed: {e}"),
        }
    }
}

fn persist_states(
    conn: &mut Connection,
    signed: &[(PublicKey, PayerChannel, Signed<ChannelState>)],
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO channel_states (channel_id, seq, state) VALUES (?1, ?2, ?3)",
        )?;
        let mut upd = tx.prepare_cached(
            "UPDATE channels SET head_signed = 1 WHERE channel_id = ?1 AND seq = ?2",
        )?;
        for (_, _, s) in signed {
            let seq = store::u64_to_column(s.message.seq, "seq")?;
            ins.execute(params![&s.message.channel_id.0[..], seq, s.encode()])?;
            if upd.execute(params![&s.message.channel_id.0[..], seq])? != 1 {
                return Err(StoreError::Corrupt("channel head moved while signing".into()));
            }
        }
    }
    tx.commit()?;
    Ok(())
}

fn write_channel(
    tx: &rusqlite::Transaction<'_>,
    key: &PublicKey,
    entry: &ChannelEntry,
    batch_seq: u64,
) -> Result<(), StoreError> {
    let h = entry.payer.head();
    let (am, ar) = store::nsat_to_columns(h.accrued_nsat)?;
    tx.prepare_cached(
        "INSERT INTO channels (channel_id, contributor_key, nonce, status, seq, accrued_msat, accrued_rem_nsat,
            settled_msat, last_settlement_hash, head_signed, opened_batch_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (channel_id) DO UPDATE SET status = excluded.status, seq = excluded.seq,
            accrued_msat = excluded.accrued_msat, accrued_rem_nsat = excluded.accrued_rem_nsat,
            settled_msat = excluded.settled_msat, last_settlement_hash = excluded.last_settlement_hash,
            head_signed = excluded.head_signed",
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
    Ok(())
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
}

impl ChannelRow {
    /// Reads the row (columns in the order of the SELECTs above).
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

    fn restore(
        &self,
        network: Network,
        provider_key: PublicKey,
    ) -> Result<(PublicKey, ChannelEntry, bool), StoreError> {
        let (key, nonce, state) = self.head(network, provider_key)?;
        let payer = PayerChannel::restore(state, self.head_signed)
            .map_err(|e| StoreError::Corrupt(format!("channel {key}: {e}")))?;
        Ok((key, ChannelEntry { nonce, payer }, self.head_signed))
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
