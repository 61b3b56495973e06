//! Reconciliation: re-derives every ledger invariant from the raw SQLite records, for an
//! accountant holding a copy of the database (or the operator, against the live file).
//!
//! It trusts nothing the daemon derived: every split is recomputed from the stored inputs
//! (model, attribution version or per-request attribution, pool), every receipt leaf and
//! Merkle root rebuilt, every signature verified, every sum taken again. What it checks:
//!
//! 1. **Pools = accruals.** Each event's pool is what its price and the model's share give;
//!    per batch, the recomputed shares, summed per channel, equal the batch's stored
//!    `accruals` exactly; `Σ pools == Σ batch accruals == Σ accrued over channels`.
//! 2. **Accrued = settled + outstanding.** Each channel's row, and its current head (row plus
//!    the batches it does not show yet, as the ledger reads it), equal the sums of its batch
//!    accruals; `settled_msat` is the sum of its succeeded settlements and at most
//!    `floor(accrued)`; its signed states verify under the provider key, `seq` strictly
//!    increases, amounts never decrease, each promises an accrued amount the batches reached,
//!    and the latest one agrees with the row.
//! 3. **Settlements.** Each succeeded settlement's preimage hashes to its payment hash, and
//!    the signed state at its `settled_state_seq` carries that hash and the cumulative
//!    settled amount; no signed state moves `settled_msat` without a settlement.
//! 4. **Receipts.** Each event's receipt leaf is the leaf at its index in its batch; each
//!    batch's leaves hash to its `merkle_root`, whose signed root verifies and commits to
//!    that root and count; each batch holds exactly as many events as receipts; event and
//!    batch sequences have no gaps; no request id is metered twice.
//!
//! The provider key is the one the database records (`meta.provider_key`, written at the
//! daemon's first start); an accountant pins the key the provider published with
//! [`Options::provider_key`], and every signed root and state is then checked against it.
//! The provider's secret key is never needed.
//!
//! Everything is read in one read transaction on a read-only connection, so a live daemon's
//! database (WAL) can be reconciled as it runs: the reconcile sees one committed state.
//! Events and batches are streamed in sequence order (memory grows with channels, signed
//! states and settlements, plus ~40 bytes per event for the duplicate-id check).

use crate::ledger::{
    accruals_applied_through, decode_accruals, weights_of, ChannelRow, EventRow, Unapplied,
    CHANNEL_COLUMNS, CHANNEL_COLUMN_COUNT,
};
use crate::registry::{load_snapshot, Snapshot};
use crate::store::{self, StoreError};
use ldk_node::bitcoin::hashes::{sha256, Hash};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tribute_channels::channel::{ChannelState, ChannelStatus};
use tribute_channels::codec::Encode;
use tribute_channels::merkle::merkle_root;
use tribute_channels::pricing::contributor_pool;
use tribute_channels::receipt::{leaf_hash_of, ReceiptBatchRoot};
use tribute_channels::split::{SplitScratch, Weights};
use tribute_channels::{
    ChannelId, ModelId, Msat, Network, Nsat, PublicKey, RequestId, Signed, NSAT_PER_MSAT,
};

/// Findings kept in a report; past it they are only counted (a badly damaged ledger would
/// otherwise produce one per event).
pub const DEFAULT_MAX_FINDINGS: usize = 1_000;

/// The schema version this reconcile reads (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

/// How a reconcile runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The provider's state key as published by the provider. `None`: take the key the
    /// database records (then a database re-signed under another key is only caught by
    /// comparing the reported key with the published one).
    pub provider_key: Option<PublicKey>,
    /// Findings kept in the report (the rest are counted in `findings_omitted`).
    pub max_findings: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { provider_key: None, max_findings: DEFAULT_MAX_FINDINGS }
    }
}

/// Why a reconcile could not run at all (a broken invariant is a [`Finding`] instead).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The file could not be opened read-only.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Reading failed.
    #[error("reading the database: {0}")]
    Store(#[from] StoreError),
    /// The file is not a (migrated) tributed database.
    #[error("not a tributed ledger: {0}")]
    NotALedger(String),
}

impl From<rusqlite::Error> for ReconcileError {
    fn from(e: rusqlite::Error) -> Self {
        ReconcileError::Store(StoreError::Sqlite(e))
    }
}

/// Which invariant a finding breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The database's identity (network, provider key).
    Identity,
    /// 1: pools = accruals (events, batch accruals, channel totals).
    PoolsEqualAccruals,
    /// 2: accrued = settled + outstanding per channel, and its signed states.
    ChannelBalances,
    /// 3: settlements (preimages, the signed states that carry them).
    Settlements,
    /// 4: receipts in signed batch roots.
    Receipts,
}

/// The record a finding is about: a table and the key of the row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Table (`meter_events`, `receipt_batches`, `channels`, `channel_states`,
    /// `settlements`, `meta`), or `ledger` for totals over all of them.
    pub table: &'static str,
    /// The row's key, e.g. `seq=17`, `batch_seq=4`, `channel_id=ab…`.
    pub key: String,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.table, self.key)
    }
}

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The invariant.
    pub check: Check,
    /// The offending record.
    pub record: Record,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.record, self.problem)
    }
}

/// How many records of each kind were checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Checked {
    /// `meter_events` rows.
    pub meter_events: u64,
    /// `receipt_batches` rows.
    pub receipt_batches: u64,
    /// `channels` rows.
    pub channels: u64,
    /// `channel_states` rows (each signature verified).
    pub channel_states: u64,
    /// `settlements` rows.
    pub settlements: u64,
}

/// Ledger-wide sums. Nanosat amounts are strings in JSON (they are `u128`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Σ `pool_nsat` over every meter event.
    #[serde(serialize_with = "as_string")]
    pub pools_nsat: u128,
    /// Σ over every batch's stored `accruals`.
    #[serde(serialize_with = "as_string")]
    pub batch_accruals_nsat: u128,
    /// Σ accrued over channels (each channel's current head).
    #[serde(serialize_with = "as_string")]
    pub accrued_nsat: u128,
    /// Σ `settled_msat` over channels.
    pub settled_msat: u64,
    /// Σ (accrued − settled) over channels, to the nsat.
    #[serde(serialize_with = "as_string")]
    pub outstanding_nsat: u128,
    /// Σ whole msat owed now (`floor(accrued) − settled`) over channels.
    pub payable_msat: u64,
    /// Σ `amount_msat` over succeeded settlements.
    pub succeeded_settlements_msat: u64,
    /// Settlements by status.
    pub settlements_succeeded: u64,
    /// Settlements whose outcome is not known yet.
    pub settlements_pending: u64,
    /// Settlements that definitely failed (their amounts stay owed).
    pub settlements_failed: u64,
}

/// One channel as reconciled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChannelLine {
    /// Channel id, hex.
    pub channel_id: String,
    /// Contributor key, hex.
    pub contributor_key: String,
    /// `active`, `closing` or `closed`.
    pub status: String,
    /// Current head's `seq`.
    pub seq: u64,
    /// Current accrued (row plus later batches).
    #[serde(serialize_with = "as_string")]
    pub accrued_nsat: u128,
    /// Settled.
    pub settled_msat: u64,
    /// Accrued − settled, to the nsat.
    #[serde(serialize_with = "as_string")]
    pub outstanding_nsat: u128,
    /// Stored signed states.
    pub signed_states: u64,
    /// `seq` of the newest signed state.
    pub latest_signed_seq: Option<u64>,
    /// Succeeded settlements.
    pub settlements: u64,
}

/// The result of a reconcile: what was checked, the totals, and every broken invariant.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The database reconciled.
    pub database: String,
    /// Its network.
    pub network: String,
    /// The provider key signatures were checked against, hex.
    pub provider_key: String,
    /// Whether that key was pinned by the caller (else: as the database records it).
    pub provider_key_pinned: bool,
    /// Records checked.
    pub checked: Checked,
    /// Sums.
    pub totals: Totals,
    /// Per channel, ordered by contributor and opening.
    pub channels: Vec<ChannelLine>,
    /// Broken invariants (at most `Options::max_findings`).
    pub failures: Vec<Finding>,
    /// Findings beyond `Options::max_findings`, only counted.
    pub findings_omitted: u64,
}

impl Report {
    /// Whether every invariant holds.
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty() && self.findings_omitted == 0
    }
}

fn as_string<S: serde::Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        let c = &self.checked;
        writeln!(f, "reconcile of {}", self.database)?;
        writeln!(
            f,
            "network {}, provider key {} ({})",
            self.network,
            self.provider_key,
            if self.provider_key_pinned { "pinned" } else { "as recorded in the database" }
        )?;
        writeln!(
            f,
            "checked: {} meter events, {} receipt batches, {} channels, {} signed states, {} settlements",
            c.meter_events, c.receipt_batches, c.channels, c.channel_states, c.settlements
        )?;
        writeln!(f, "pools:            {} nsat", t.pools_nsat)?;
        writeln!(f, "batch accruals:   {} nsat", t.batch_accruals_nsat)?;
        writeln!(f, "channel accrued:  {} nsat", t.accrued_nsat)?;
        writeln!(
            f,
            "settled:          {} msat ({} succeeded settlements: {} msat; {} pending, {} failed)",
            t.settled_msat,
            t.settlements_succeeded,
            t.succeeded_settlements_msat,
            t.settlements_pending,
            t.settlements_failed
        )?;
        writeln!(
            f,
            "outstanding:      {} nsat ({} whole msat payable)",
            t.outstanding_nsat, t.payable_msat
        )?;
        writeln!(f, "channels:")?;
        for ch in &self.channels {
            writeln!(
                f,
                "  {} contributor {} {} seq {}: accrued {} nsat, settled {} msat, outstanding {} nsat, {} signed states, {} settlements",
                ch.channel_id,
                ch.contributor_key,
                ch.status,
                ch.seq,
                ch.accrued_nsat,
                ch.settled_msat,
                ch.outstanding_nsat,
                ch.signed_states,
                ch.settlements
            )?;
        }
        if self.is_clean() {
            writeln!(f, "OK: every invariant holds")
        } else {
            writeln!(f, "FAILED: {} findings", self.failures.len() as u64 + self.findings_omitted)?;
            for finding in &self.failures {
                writeln!(f, "  [{:?}] {finding}", finding.check)?;
            }
            if self.findings_omitted > 0 {
                writeln!(f, "  … and {} more", self.findings_omitted)?;
            }
            Ok(())
        }
    }
}

/// Opens `path` read-only (never creating it).
pub fn open_read_only(path: &Path) -> Result<Connection, ReconcileError> {
    let open = || -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    };
    open().map_err(|source| ReconcileError::Open { path: path.to_owned(), source })
}

/// Reconciles the database file at `path` (a copy, a backup, or a live daemon's database)
/// with the default options.
pub fn reconcile_file(path: &Path) -> Result<Report, ReconcileError> {
    reconcile_file_with(path, &Options::default())
}

/// Reconciles the database file at `path`, read-only, in one read transaction.
pub fn reconcile_file_with(path: &Path, options: &Options) -> Result<Report, ReconcileError> {
    let conn = open_read_only(path)?;
    reconcile_connection(&conn, &path.display().to_string(), options)
}

/// Reconciles the database behind `conn` (named `label` in the report). Everything is read
/// in one read transaction, so the result describes one committed state even while a daemon
/// writes. `conn` must not be inside a transaction of its own.
pub fn reconcile_connection(
    conn: &Connection,
    label: &str,
    options: &Options,
) -> Result<Report, ReconcileError> {
    conn.execute_batch("BEGIN DEFERRED")?;
    let result = Reconciler::run(conn, label, options);
    // A read transaction: ending it cannot lose anything.
    let _ = conn.execute_batch("ROLLBACK");
    result
}

/// Findings, bounded.
struct Findings {
    kept: Vec<Finding>,
    omitted: u64,
    max: usize,
}

impl Findings {
    fn add(&mut self, check: Check, table: &'static str, key: String, problem: String) {
        if self.kept.len() < self.max {
            self.kept.push(Finding { check, record: Record { table, key }, problem });
        } else {
            self.omitted += 1;
        }
    }
}

/// A channel row and what the reconcile learns about it.
struct ChannelInfo {
    row: ChannelRow,
    channel_id: ChannelId,
    /// `None` if the row's key is malformed (reported).
    contributor: Option<PublicKey>,
    opened_batch_seq: u64,
    /// Σ the channel's entries in every batch's stored `accruals`.
    batch_total: Nsat,
    /// The same, over the batches up to the row's `applied_batch_seq`.
    through_applied: Nsat,
    /// The first batch after the row's `applied_batch_seq` but not after the watermark
    /// that accrues to it (the ledger would never apply it).
    skipped_batch: Option<u64>,
    /// Signed states stored.
    states: u64,
    /// The newest signed state (the last in `seq` order).
    latest: Option<ChannelState>,
    /// Signed states' accrued amounts not yet matched to a batch boundary, ascending.
    unmatched: VecDeque<(u64, Nsat)>,
    /// Σ succeeded settlements.
    settled_msat: u64,
    settlements: u64,
}

/// The settlement fields (settled, last payment hash) of the signed states that succeeded
/// settlements name, by (channel, seq).
type Carried = HashMap<(ChannelId, u64), (Msat, [u8; 32])>;

/// A settlement row, as far as the reconcile needs it.
struct SettlementRec {
    id: u64,
    channel_id: Option<ChannelId>,
    contributor_key: Vec<u8>,
    amount_msat: u64,
    state_seq: u64,
    payment_hash: Option<Vec<u8>>,
    preimage: Option<Vec<u8>>,
    status: String,
    settled_state_seq: Option<u64>,
}

/// A batch being matched against its events.
struct OpenBatch {
    seq: u64,
    receipt_count: i64,
    leaves: Vec<[u8; 32]>,
    leaves_ok: bool,
    merkle_root: Vec<u8>,
    signed_root: Vec<u8>,
    accruals: Vec<u8>,
    /// The leaf index the next event should have.
    next_leaf: u32,
    events: u64,
    /// Shares recomputed from the events, summed per weights vector (found by pointer).
    groups: Vec<(Arc<Weights>, Vec<Nsat>)>,
    group_of: HashMap<*const Weights, usize>,
}

struct Reconciler<'c> {
    conn: &'c Connection,
    network: Network,
    provider_key: PublicKey,
    snap: Snapshot,
    findings: Findings,
    checked: Checked,
    totals: Totals,
    channels: HashMap<ChannelId, ChannelInfo>,
    /// Contributor → its channels as (opened_batch_seq, id), ascending.
    by_contributor: HashMap<PublicKey, Vec<(u64, ChannelId)>>,
    /// Channels named by batches or states that have no row (reported once each).
    unknown_channels: HashSet<ChannelId>,
    watermark: u64,
    last_batch_seq: u64,
    verifier: Verifier,
}

/// A signature to verify, with the key of its record.
enum SigJob {
    /// A batch's signed root (`receipt_batches`).
    Root(String, Signed<ReceiptBatchRoot>),
    /// A signed channel state (`channel_states`).
    State(String, Signed<ChannelState>),
}

/// A finding as the verifier thread reports it.
type SigFinding = (Check, &'static str, String, String);

impl SigJob {
    fn check(self) -> Option<SigFinding> {
        match self {
            SigJob::Root(key, s) => s.verify().is_err().then(|| {
                let p = "signed_root signature does not verify".to_owned();
                (Check::Receipts, "receipt_batches", key, p)
            }),
            SigJob::State(key, s) => s.verify().is_err().then(|| {
                let p = "signature does not verify".to_owned();
                (Check::ChannelBalances, "channel_states", key, p)
            }),
        }
    }
}

/// Jobs queued to the verifier thread at most (back-pressure on the reading thread).
const SIG_QUEUE: usize = 4_096;

/// Verifies signatures on a thread of its own: with small batches, one BIP340 verification
/// per batch root and per signed state is most of a reconcile's work, and it overlaps with
/// reading and hashing on the other core. Falls back to verifying inline.
struct Verifier {
    tx: Option<std::sync::mpsc::SyncSender<SigJob>>,
    thread: Option<std::thread::JoinHandle<Vec<SigFinding>>>,
    inline: Vec<SigFinding>,
}

impl Verifier {
    fn start() -> Verifier {
        let (tx, rx) = std::sync::mpsc::sync_channel::<SigJob>(SIG_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("tribute-reconcile-verify".into())
            .spawn(move || rx.into_iter().filter_map(SigJob::check).collect::<Vec<_>>());
        match spawned {
            Ok(thread) => Verifier { tx: Some(tx), thread: Some(thread), inline: Vec::new() },
            Err(_) => Verifier { tx: None, thread: None, inline: Vec::new() },
        }
    }

    fn submit(&mut self, job: SigJob) {
        let job = match &self.tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                // The thread is gone: verify here from now on.
                Err(std::sync::mpsc::SendError(job)) => {
                    self.tx = None;
                    job
                }
            },
            None => job,
        };
        self.inline.extend(job.check());
    }

    /// Waits for every queued verification; returns the failures.
    fn finish(&mut self) -> Vec<SigFinding> {
        drop(self.tx.take());
        let mut out = std::mem::take(&mut self.inline);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(found) => out.extend(found),
                Err(_) => out.push((
                    Check::Receipts,
                    "ledger",
                    "signatures".into(),
                    "the signature verifier failed; signatures were not all checked".into(),
                )),
            }
        }
        out
    }
}

fn cid(id: &ChannelId) -> String {
    format!("channel_id={}", id.to_hex())
}

fn add(a: Nsat, b: Nsat) -> Nsat {
    Nsat(a.0.saturating_add(b.0))
}

fn status_name(s: ChannelStatus) -> &'static str {
    match s {
        ChannelStatus::Active => "active",
        ChannelStatus::Closing => "closing",
        ChannelStatus::Closed => "closed",
    }
}

impl<'c> Reconciler<'c> {
    fn run(conn: &'c Connection, label: &str, options: &Options) -> Result<Report, ReconcileError> {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < SCHEMA_VERSION {
            return Err(ReconcileError::NotALedger(format!(
                "schema version {version}, expected {SCHEMA_VERSION} (open it with tributed once to migrate)"
            )));
        }
        let mut findings =
            Findings { kept: Vec::new(), omitted: 0, max: options.max_findings.max(1) };
        let network_name = store::meta_get(conn, "network")?
            .ok_or_else(|| ReconcileError::NotALedger("meta has no network".into()))?;
        let network_name = String::from_utf8_lossy(&network_name).into_owned();
        let network = crate::config::parse_network(&network_name)
            .map_err(|e| ReconcileError::NotALedger(format!("meta network: {e}")))?;
        let recorded = store::meta_get(conn, "provider_key")?
            .ok_or_else(|| ReconcileError::NotALedger("meta has no provider_key".into()))?;
        let recorded = <[u8; 32]>::try_from(recorded.as_slice())
            .ok()
            .and_then(|b| PublicKey::from_bytes(b).ok())
            .ok_or_else(|| ReconcileError::NotALedger("meta provider_key is malformed".into()))?;
        let provider_key = match options.provider_key {
            Some(pinned) => {
                if pinned != recorded {
                    findings.add(
                        Check::Identity,
                        "meta",
                        "key=provider_key".into(),
                        format!(
                            "the database records provider key {recorded}, the pinned key is {pinned}"
                        ),
                    );
                }
                pinned
            }
            None => recorded,
        };
        let snap = load_snapshot(conn, network)?;
        let mut r = Reconciler {
            conn,
            network,
            provider_key,
            snap,
            findings,
            checked: Checked::default(),
            totals: Totals::default(),
            channels: HashMap::new(),
            by_contributor: HashMap::new(),
            unknown_channels: HashSet::new(),
            watermark: accruals_applied_through(conn)?,
            last_batch_seq: 0,
            verifier: Verifier::start(),
        };
        r.read_channels()?;
        let settlements = r.read_settlements()?;
        let succeeded_at: HashSet<(ChannelId, u64)> = settlements
            .iter()
            .filter(|s| s.status == "succeeded")
            .filter_map(|s| Some((s.channel_id?, s.settled_state_seq?)))
            .collect();
        let carried = r.check_states(&succeeded_at)?;
        r.check_events_and_batches()?;
        r.check_settlements(&settlements, &carried);
        let lines = r.check_channels()?;
        r.check_totals();
        for (check, table, key, problem) in r.verifier.finish() {
            r.findings.add(check, table, key, problem);
        }
        Ok(Report {
            database: label.to_owned(),
            network: network_name,
            provider_key: provider_key.to_hex(),
            provider_key_pinned: options.provider_key.is_some(),
            checked: r.checked,
            totals: r.totals,
            channels: lines,
            failures: r.findings.kept,
            findings_omitted: r.findings.omitted,
        })
    }

    fn finding(&mut self, check: Check, table: &'static str, key: String, problem: String) {
        self.findings.add(check, table, key, problem);
    }

    fn unknown_channel(&mut self, check: Check, table: &'static str, key: String, id: ChannelId) {
        if self.unknown_channels.insert(id) {
            self.finding(
                check,
                table,
                key,
                format!("names channel {id}, which has no channels row"),
            );
        }
    }

    /// Reads every channel row (few: one per contributor and opening).
    fn read_channels(&mut self) -> Result<(), ReconcileError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {CHANNEL_COLUMNS}, channel_id, opened_batch_seq FROM channels \
             ORDER BY contributor_key, opened_batch_seq"
        ))?;
        let mut rows = stmt.query([])?;
        let mut found: Vec<(Vec<u8>, ChannelRow, i64)> = Vec::new();
        while let Some(r) = rows.next()? {
            found.push((
                r.get(CHANNEL_COLUMN_COUNT)?,
                ChannelRow::from_row(r)?,
                r.get(CHANNEL_COLUMN_COUNT + 1)?,
            ));
        }
        for (id_bytes, row, opened) in found {
            self.checked.channels += 1;
            let Ok(id) = <[u8; 32]>::try_from(id_bytes.as_slice()).map(ChannelId) else {
                self.finding(
                    Check::ChannelBalances,
                    "channels",
                    format!("channel_id={}", hex::encode(&id_bytes)),
                    "channel id is not 32 bytes".into(),
                );
                continue;
            };
            let contributor = <[u8; 32]>::try_from(row.contributor_key.as_slice())
                .ok()
                .and_then(|b| PublicKey::from_bytes(b).ok());
            if contributor.is_none() {
                self.finding(
                    Check::ChannelBalances,
                    "channels",
                    cid(&id),
                    "contributor_key is not a valid key".into(),
                );
            }
            let opened_batch_seq = u64::try_from(opened).unwrap_or(0);
            if let Some(key) = contributor {
                self.by_contributor.entry(key).or_default().push((opened_batch_seq, id));
            }
            self.channels.insert(
                id,
                ChannelInfo {
                    row,
                    channel_id: id,
                    contributor,
                    opened_batch_seq,
                    batch_total: Nsat::ZERO,
                    through_applied: Nsat::ZERO,
                    skipped_batch: None,
                    states: 0,
                    latest: None,
                    unmatched: VecDeque::new(),
                    settled_msat: 0,
                    settlements: 0,
                },
            );
        }
        for list in self.by_contributor.values_mut() {
            list.sort_unstable();
        }
        Ok(())
    }

    /// Reads every settlement row (one per payout attempt).
    fn read_settlements(&mut self) -> Result<Vec<SettlementRec>, ReconcileError> {
        let mut stmt = self.conn.prepare(
            "SELECT settlement_id, channel_id, contributor_key, amount_msat, state_seq, payment_hash,
                    preimage, status, settled_state_seq FROM settlements ORDER BY settlement_id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            self.checked.settlements += 1;
            let id: i64 = r.get(0)?;
            let channel: Vec<u8> = r.get(1)?;
            let amount: i64 = r.get(3)?;
            let state_seq: i64 = r.get(4)?;
            let settled_state_seq: Option<i64> = r.get(8)?;
            let rec = SettlementRec {
                id: u64::try_from(id).unwrap_or(0),
                channel_id: <[u8; 32]>::try_from(channel.as_slice()).ok().map(ChannelId),
                contributor_key: r.get(2)?,
                amount_msat: u64::try_from(amount).unwrap_or(0),
                state_seq: u64::try_from(state_seq).unwrap_or(0),
                payment_hash: r.get(5)?,
                preimage: r.get(6)?,
                status: r.get(7)?,
                settled_state_seq: settled_state_seq.and_then(|v| u64::try_from(v).ok()),
            };
            let key = format!("settlement_id={id}");
            if id < 0 || amount < 0 || state_seq < 0 || settled_state_seq.is_some_and(|v| v < 0) {
                self.finding(
                    Check::Settlements,
                    "settlements",
                    key.clone(),
                    "negative value".into(),
                );
            }
            if rec.channel_id.is_none() {
                self.finding(
                    Check::Settlements,
                    "settlements",
                    key,
                    "channel_id is not 32 bytes".into(),
                );
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// Streams every signed state in (channel, seq) order: decodes and verifies each, checks
    /// the per-channel rules, and keeps what later checks need. Returns the settlement
    /// fields of the states that succeeded settlements name.
    fn check_states(
        &mut self,
        succeeded_at: &HashSet<(ChannelId, u64)>,
    ) -> Result<Carried, ReconcileError> {
        let mut carried = HashMap::new();
        let mut stmt = self.conn.prepare(
            "SELECT channel_id, seq, state FROM channel_states ORDER BY channel_id, seq",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            self.checked.channel_states += 1;
            let id_bytes: Vec<u8> = r.get(0)?;
            let seq_col: i64 = r.get(1)?;
            let key = format!("channel_id={} seq={seq_col}", hex::encode(&id_bytes));
            let Ok(id) = <[u8; 32]>::try_from(id_bytes.as_slice()).map(ChannelId) else {
                self.finding(
                    Check::ChannelBalances,
                    "channel_states",
                    key,
                    "channel id is not 32 bytes".into(),
                );
                continue;
            };
            let bytes = blob(r, 2)?;
            let signed = match Signed::<ChannelState>::decode(bytes) {
                Ok(s) => s,
                Err(e) => {
                    self.finding(
                        Check::ChannelBalances,
                        "channel_states",
                        key,
                        format!("signed state does not decode: {e}"),
                    );
                    continue;
                }
            };
            let m = signed.message;
            let mut problems = Vec::new();
            self.verifier.submit(SigJob::State(key.clone(), signed));
            if m.provider_key != self.provider_key {
                problems.push(format!("signed by {}, not the provider key", m.provider_key));
            }
            if m.network != self.network {
                problems.push(format!("for network {:?}", m.network));
            }
            if m.channel_id != id || i64::try_from(m.seq).ok() != Some(seq_col) {
                problems.push(format!(
                    "the state is channel {} seq {}, stored under another key",
                    m.channel_id, m.seq
                ));
            }
            if let Err(e) = m.check_invariants() {
                problems.push(format!("breaks an invariant: {e}"));
            }
            for p in problems {
                self.finding(Check::ChannelBalances, "channel_states", key.clone(), p);
            }
            let Some(info) = self.channels.get_mut(&id) else {
                self.unknown_channel(Check::ChannelBalances, "channel_states", key, id);
                continue;
            };
            info.states += 1;
            let mut problems = Vec::new();
            let (prev_settled, prev_hash) = match &info.latest {
                Some(prev) => {
                    if m.seq <= prev.seq {
                        problems.push(format!("seq {} does not increase past {}", m.seq, prev.seq));
                    }
                    if m.accrued_nsat < prev.accrued_nsat {
                        problems.push(format!(
                            "accrued decreases from {} to {} nsat",
                            prev.accrued_nsat.0, m.accrued_nsat.0
                        ));
                    }
                    if m.settled_msat < prev.settled_msat {
                        problems.push(format!(
                            "settled decreases from {} to {} msat",
                            prev.settled_msat.0, m.settled_msat.0
                        ));
                    }
                    (prev.settled_msat, prev.last_settlement_hash)
                }
                None => (Msat::ZERO, [0; 32]),
            };
            if (m.settled_msat, m.last_settlement_hash) != (prev_settled, prev_hash)
                && !succeeded_at.contains(&(id, m.seq))
            {
                problems.push(format!(
                    "moves settled from {} to {} msat (payment hash {}) but no succeeded settlement names this state",
                    prev_settled.0,
                    m.settled_msat.0,
                    hex::encode(m.last_settlement_hash)
                ));
            }
            if succeeded_at.contains(&(id, m.seq)) {
                carried.insert((id, m.seq), (m.settled_msat, m.last_settlement_hash));
            }
            info.unmatched.push_back((m.seq, m.accrued_nsat));
            info.latest = Some(m);
            for p in problems {
                self.finding(Check::ChannelBalances, "channel_states", key.clone(), p);
            }
        }
        // Matched against batch boundaries in ascending order of accrued (a decrease is
        // reported above already).
        for info in self.channels.values_mut() {
            info.unmatched.make_contiguous().sort_by_key(|(seq, a)| (*a, *seq));
            while info.unmatched.front().is_some_and(|(_, a)| a.is_zero()) {
                info.unmatched.pop_front();
            }
        }
        Ok(carried)
    }

    /// The channel contributor `key` accrued to in batch `batch`: its newest channel opened
    /// at or before that batch (as the ledger's writer had it in memory).
    fn channel_for(&self, key: &PublicKey, batch: u64) -> Option<ChannelId> {
        self.by_contributor
            .get(key)?
            .iter()
            .rev()
            .find(|(opened, _)| *opened <= batch)
            .map(|(_, id)| *id)
    }

    /// Streams events (by `seq`) and batches (by `batch_seq`) side by side: both are
    /// appended in the same order, so each batch's events arrive together.
    fn check_events_and_batches(&mut self) -> Result<(), ReconcileError> {
        let conn = self.conn;
        let mut ev_stmt = conn.prepare(
            "SELECT seq, request_id, content_hash, model_id, attribution_version, attribution,
                    price_nsat, pool_nsat, batch_seq, leaf_index FROM meter_events ORDER BY seq",
        )?;
        let mut b_stmt = conn.prepare(
            "SELECT batch_seq, receipt_count, merkle_root, signed_root, leaves, accruals
             FROM receipt_batches ORDER BY batch_seq",
        )?;
        let mut events = ev_stmt.query([])?;
        let mut batches = b_stmt.query([])?;
        let mut current = self.next_batch(&mut batches)?;
        let mut scratch = SplitScratch::new();
        let mut shares: Vec<Nsat> = Vec::new();
        let mut last_event_seq = 0u64;
        // Request id → first event seq, by 64-bit hash; hits are confirmed at the end.
        let hasher = RandomState::new();
        let mut ids: HashMap<u64, u64> = HashMap::new();
        let mut id_hits: Vec<(u64, u64)> = Vec::new();
        while let Some(r) = events.next()? {
            self.checked.meter_events += 1;
            let seq_col: i64 = r.get(0)?;
            let key = format!("seq={seq_col}");
            let ints = [r.get::<_, i64>(4)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?];
            if seq_col < 1 || ints.iter().any(|v| *v < 0) || ints[4] > i64::from(u32::MAX) {
                self.finding(
                    Check::PoolsEqualAccruals,
                    "meter_events",
                    key,
                    "a column holds a negative or out-of-range value".into(),
                );
                continue;
            }
            let row = EventRow {
                seq: seq_col as u64,
                request_id: r.get(1)?,
                content_hash: r.get(2)?,
                model_id: r.get(3)?,
                attribution_version: ints[0] as u64,
                attribution: r.get(5)?,
                price_nsat: ints[1] as u64,
                pool_nsat: ints[2] as u64,
                batch_seq: ints[3] as u64,
                leaf_index: ints[4] as u32,
            };
            self.totals.pools_nsat += u128::from(row.pool_nsat);
            if row.seq != last_event_seq + 1 {
                let missing = if row.seq == last_event_seq + 2 {
                    format!("seq={}", last_event_seq + 1)
                } else {
                    format!("seq={}..={}", last_event_seq + 1, row.seq - 1)
                };
                self.finding(
                    Check::PoolsEqualAccruals,
                    "meter_events",
                    missing,
                    format!(
                        "missing: the metering log has a gap before seq {} (a deleted accrual)",
                        row.seq
                    ),
                );
            }
            last_event_seq = last_event_seq.max(row.seq);
            let h = hasher.hash_one(&row.request_id);
            if let Some(first) = ids.insert(h, row.seq) {
                id_hits.push((first, row.seq));
            }

            // The receipt, recomputed from the stored inputs.
            let recomputed = self.recompute(&row, &mut scratch, &mut shares);
            while current.as_ref().is_some_and(|b| b.seq < row.batch_seq) {
                if let Some(done) = current.take() {
                    self.finish_batch(done);
                }
                current = self.next_batch(&mut batches)?;
            }
            match current.as_mut() {
                Some(b) if b.seq == row.batch_seq => {
                    let (leaf, weights) = match recomputed {
                        Some((leaf, w)) => (Some(leaf), Some(w)),
                        None => (None, None),
                    };
                    let problems = b.add_event(&row, leaf, weights, &shares);
                    for p in problems {
                        self.finding(Check::Receipts, "meter_events", key.clone(), p);
                    }
                }
                _ => self.orphan_event(&row, recomputed.map(|(leaf, _)| leaf))?,
            }
        }
        while let Some(done) = current.take() {
            self.finish_batch(done);
            current = self.next_batch(&mut batches)?;
        }
        drop(events);
        drop(batches);
        // Confirm the hash hits against the rows (64-bit collisions are possible).
        for (first, second) in id_hits {
            let a = self.request_id_of(first)?;
            let b = self.request_id_of(second)?;
            if a.is_some() && a == b {
                self.finding(
                    Check::PoolsEqualAccruals,
                    "meter_events",
                    format!("seq={second}"),
                    format!(
                        "request id {:?} was already metered as seq {first}: accrued twice",
                        a.unwrap_or_default()
                    ),
                );
            }
        }
        Ok(())
    }

    fn request_id_of(&self, seq: u64) -> Result<Option<String>, ReconcileError> {
        Ok(self
            .conn
            .prepare_cached("SELECT request_id FROM meter_events WHERE seq = ?1")?
            .query_row(params![store::u64_to_column(seq, "seq")?], |r| r.get(0))
            .optional()?)
    }

    /// An event's split and receipt leaf, from its stored inputs; `None` (reported) if they
    /// cannot be recomputed. `shares` receives the split, aligned with the weights.
    fn recompute(
        &mut self,
        row: &EventRow,
        scratch: &mut SplitScratch,
        shares: &mut Vec<Nsat>,
    ) -> Option<([u8; 32], Arc<Weights>)> {
        let key = format!("seq={}", row.seq);
        let ids = RequestId::new(row.request_id.as_str())
            .ok()
            .zip(ModelId::new(row.model_id.as_str()).ok());
        let Some((request_id, model_id)) = ids else {
            self.finding(
                Check::Receipts,
                "meter_events",
                key,
                "request id or model id is malformed".into(),
            );
            return None;
        };
        let Some(model) = self.snap.models.get(&model_id) else {
            self.finding(
                Check::PoolsEqualAccruals,
                "meter_events",
                key,
                format!("request {request_id}: model {model_id} is not registered"),
            );
            return None;
        };
        let pool = contributor_pool(Nsat(u128::from(row.price_nsat)), model.contributor_share_ppm);
        if pool.as_ref().ok() != Some(&Nsat(u128::from(row.pool_nsat))) {
            self.finding(
                Check::PoolsEqualAccruals,
                "meter_events",
                key.clone(),
                format!(
                    "request {request_id}: pool_nsat {} is not the pool of price {} nsat at {} ppm ({})",
                    row.pool_nsat,
                    row.price_nsat,
                    model.contributor_share_ppm,
                    match &pool {
                        Ok(p) => p.0.to_string(),
                        Err(e) => e.to_string(),
                    }
                ),
            );
        }
        let Some(weights) = weights_of(&self.snap, row) else {
            self.finding(
                Check::PoolsEqualAccruals,
                "meter_events",
                key,
                format!(
                    "request {request_id}: its split cannot be recomputed (attribution version {} of {model_id} unknown, or per-request attribution invalid)",
                    row.attribution_version
                ),
            );
            return None;
        };
        let pool = Nsat(u128::from(row.pool_nsat));
        weights.split_into_with(pool, shares, scratch);
        let leaf = leaf_hash_of(
            &request_id,
            &model_id,
            row.attribution_version,
            pool,
            weights.entries().iter().map(|(k, _)| k).zip(shares.iter().copied()),
        );
        Some((leaf, weights))
    }

    /// An event whose batch is not the one being read: its batch row is missing, or the
    /// event is out of order.
    fn orphan_event(
        &mut self,
        row: &EventRow,
        leaf: Option<[u8; 32]>,
    ) -> Result<(), ReconcileError> {
        let key = format!("seq={}", row.seq);
        let leaves: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT leaves FROM receipt_batches WHERE batch_seq = ?1")?
            .query_row(params![store::u64_to_column(row.batch_seq, "batch_seq")?], |r| r.get(0))
            .optional()?;
        match leaves {
            None => self.finding(
                Check::Receipts,
                "meter_events",
                key,
                format!(
                    "request {}: its batch {} has no receipt_batches row: the receipt is in no signed batch",
                    row.request_id, row.batch_seq
                ),
            ),
            Some(leaves) => {
                let i = row.leaf_index as usize;
                let stored = leaves.get(i * 32..i * 32 + 32);
                let in_batch = leaf.is_some_and(|l| stored == Some(&l[..]));
                self.finding(
                    Check::Receipts,
                    "meter_events",
                    key,
                    format!(
                        "request {}: out of order in the log (batch {} was already read); its leaf {} the batch's leaf {}",
                        row.request_id,
                        row.batch_seq,
                        if in_batch { "matches" } else { "does not match" },
                        row.leaf_index
                    ),
                );
            }
        }
        Ok(())
    }

    fn next_batch(
        &mut self,
        rows: &mut rusqlite::Rows<'_>,
    ) -> Result<Option<OpenBatch>, ReconcileError> {
        while let Some(r) = rows.next()? {
            self.checked.receipt_batches += 1;
            let seq_col: i64 = r.get(0)?;
            let key = format!("batch_seq={seq_col}");
            let Ok(seq) = u64::try_from(seq_col) else {
                self.finding(Check::Receipts, "receipt_batches", key, "negative batch_seq".into());
                continue;
            };
            if seq != self.last_batch_seq + 1 {
                let missing = if seq == self.last_batch_seq + 2 {
                    format!("batch_seq={}", self.last_batch_seq + 1)
                } else {
                    format!("batch_seq={}..={}", self.last_batch_seq + 1, seq.saturating_sub(1))
                };
                self.finding(
                    Check::Receipts,
                    "receipt_batches",
                    missing,
                    format!("missing: the batch sequence has a gap before batch {seq}"),
                );
            }
            self.last_batch_seq = self.last_batch_seq.max(seq);
            let leaves_blob = blob(r, 4)?;
            let leaves_ok = leaves_blob.len() % 32 == 0;
            let leaves: Vec<[u8; 32]> =
                leaves_blob.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect();
            return Ok(Some(OpenBatch {
                seq,
                receipt_count: r.get(1)?,
                leaves,
                leaves_ok,
                merkle_root: r.get(2)?,
                signed_root: r.get(3)?,
                accruals: r.get(5)?,
                next_leaf: 0,
                events: 0,
                groups: Vec::new(),
                group_of: HashMap::new(),
            }));
        }
        Ok(None)
    }

    /// A batch whose events have all been read: its counts, root, signature and accruals.
    fn finish_batch(&mut self, b: OpenBatch) {
        let key = format!("batch_seq={}", b.seq);
        let mut problems: Vec<(Check, String)> = Vec::new();
        let leaf_count = b.leaves.len() as u64;
        if !b.leaves_ok {
            problems.push((
                Check::Receipts,
                "leaves blob is not a whole number of 32-byte leaves".into(),
            ));
        }
        if u64::try_from(b.receipt_count).ok() != Some(leaf_count) {
            problems.push((
                Check::Receipts,
                format!("receipt_count {} but {} leaves", b.receipt_count, leaf_count),
            ));
        }
        if b.events != leaf_count {
            problems.push((
                Check::Receipts,
                format!("{} receipts but {} meter events", leaf_count, b.events),
            ));
        }
        if u64::from(b.next_leaf) < leaf_count {
            problems.push((
                Check::Receipts,
                format!(
                    "leaves {}..{} have no meter event (deleted accruals)",
                    b.next_leaf, leaf_count
                ),
            ));
        }
        match merkle_root(&b.leaves) {
            Ok(root) if root[..] == b.merkle_root[..] => {}
            Ok(root) => problems.push((
                Check::Receipts,
                format!(
                    "merkle_root {} is not the root of its leaves ({})",
                    hex::encode(&b.merkle_root),
                    hex::encode(root)
                ),
            )),
            Err(e) => problems.push((Check::Receipts, format!("leaves form no tree: {e}"))),
        }
        match Signed::<ReceiptBatchRoot>::decode(&b.signed_root) {
            Err(e) => problems.push((Check::Receipts, format!("signed_root does not decode: {e}"))),
            Ok(signed) => {
                self.verifier.submit(SigJob::Root(key.clone(), signed.clone()));
                let m = &signed.message;
                if m.provider_key != self.provider_key {
                    problems.push((
                        Check::Receipts,
                        format!(
                            "signed_root is signed by {}, not the provider key",
                            m.provider_key
                        ),
                    ));
                }
                if m.network != self.network {
                    problems.push((Check::Receipts, format!("signed_root is for {:?}", m.network)));
                }
                if m.batch_seq != b.seq {
                    problems.push((
                        Check::Receipts,
                        format!("signed_root is for batch {}", m.batch_seq),
                    ));
                }
                if m.merkle_root[..] != b.merkle_root[..] {
                    problems.push((
                        Check::Receipts,
                        format!(
                            "signed_root commits to root {}, the row says {}",
                            hex::encode(m.merkle_root),
                            hex::encode(&b.merkle_root)
                        ),
                    ));
                }
                if u64::from(m.receipt_count) != leaf_count {
                    problems.push((
                        Check::Receipts,
                        format!(
                            "signed_root commits to {} receipts, the batch has {}",
                            m.receipt_count, leaf_count
                        ),
                    ));
                }
            }
        }

        // The recomputed shares per channel.
        let mut recomputed: BTreeMap<[u8; 32], Nsat> = BTreeMap::new();
        for (weights, totals) in &b.groups {
            for ((key, _), amount) in weights.entries().iter().zip(totals) {
                if amount.is_zero() {
                    continue;
                }
                match self.channel_for(key, b.seq) {
                    Some(id) => {
                        let e = recomputed.entry(id.0).or_insert(Nsat::ZERO);
                        *e = add(*e, *amount);
                    }
                    None => problems.push((
                        Check::PoolsEqualAccruals,
                        format!(
                            "contributor {key} has shares here but no channel opened by this batch"
                        ),
                    )),
                }
            }
        }
        let stored = match decode_accruals(&b.accruals) {
            Ok(s) => s,
            Err(e) => {
                problems.push((Check::PoolsEqualAccruals, format!("accruals: {e}")));
                Vec::new()
            }
        };
        if stored.windows(2).any(|w| w[0].0 .0 >= w[1].0 .0) {
            problems.push((
                Check::PoolsEqualAccruals,
                "accruals are not sorted by channel id or repeat one".into(),
            ));
        }
        let mut stored_map: BTreeMap<[u8; 32], Nsat> = BTreeMap::new();
        for (id, amount) in &stored {
            let e = stored_map.entry(id.0).or_insert(Nsat::ZERO);
            *e = add(*e, *amount);
        }
        let ids: std::collections::BTreeSet<[u8; 32]> =
            recomputed.keys().chain(stored_map.keys()).copied().collect();
        for id in ids {
            let s = stored_map.get(&id).copied().unwrap_or(Nsat::ZERO);
            let c = recomputed.get(&id).copied().unwrap_or(Nsat::ZERO);
            if s != c {
                problems.push((
                    Check::PoolsEqualAccruals,
                    format!(
                        "accruals to channel {}: stored {} nsat, its events' shares sum to {} nsat",
                        hex::encode(id),
                        s.0,
                        c.0
                    ),
                ));
            }
        }
        for (c, p) in problems {
            self.finding(c, "receipt_batches", key.clone(), p);
        }

        // What the ledger applied: the stored accruals.
        for (id, amount) in stored {
            self.totals.batch_accruals_nsat =
                self.totals.batch_accruals_nsat.saturating_add(amount.0);
            let Some(info) = self.channels.get_mut(&id) else {
                self.unknown_channel(Check::PoolsEqualAccruals, "receipt_batches", key.clone(), id);
                continue;
            };
            if b.seq < info.opened_batch_seq {
                let opened = info.opened_batch_seq;
                self.finding(
                    Check::PoolsEqualAccruals,
                    "receipt_batches",
                    key.clone(),
                    format!("accrues to channel {id}, opened only at batch {opened}"),
                );
                continue;
            }
            let Some(info) = self.channels.get_mut(&id) else { continue };
            let before = info.batch_total;
            info.batch_total = add(info.batch_total, amount);
            if b.seq <= info.row.applied_batch_seq {
                info.through_applied = add(info.through_applied, amount);
            } else if b.seq <= self.watermark && info.skipped_batch.is_none() {
                info.skipped_batch = Some(b.seq);
            }
            // Signed states must promise exactly what some prefix of the batches accrued.
            let mut skipped = Vec::new();
            while let Some(&(seq, a)) = info.unmatched.front() {
                if a > info.batch_total {
                    break;
                }
                info.unmatched.pop_front();
                if a < info.batch_total {
                    skipped.push((seq, a, before));
                }
            }
            for (seq, a, before) in skipped {
                self.finding(
                    Check::ChannelBalances,
                    "channel_states",
                    format!("channel_id={} seq={seq}", id.to_hex()),
                    format!(
                        "promises accrued {} nsat, which no batch boundary reaches (batch {} moves the channel from {} to {} nsat)",
                        a.0, b.seq, before.0, info_total(&self.channels, &id)
                    ),
                );
            }
        }
    }

    /// Settlements: preimages, and the signed states that carry them.
    fn check_settlements(&mut self, settlements: &[SettlementRec], carried: &Carried) {
        let mut succeeded: Vec<&SettlementRec> = Vec::new();
        for s in settlements {
            let key = format!("settlement_id={}", s.id);
            match s.status.as_str() {
                "succeeded" => {
                    self.totals.settlements_succeeded += 1;
                    self.totals.succeeded_settlements_msat =
                        self.totals.succeeded_settlements_msat.saturating_add(s.amount_msat);
                    succeeded.push(s);
                }
                "pending" | "failed" => {
                    if s.status == "pending" {
                        self.totals.settlements_pending += 1;
                    } else {
                        self.totals.settlements_failed += 1;
                    }
                    if s.preimage.is_some() || s.settled_state_seq.is_some() {
                        self.finding(
                            Check::Settlements,
                            "settlements",
                            key,
                            format!(
                                "{} but records a preimage or a settled state (only a succeeded settlement has them)",
                                s.status
                            ),
                        );
                    }
                    continue;
                }
                other => {
                    self.finding(
                        Check::Settlements,
                        "settlements",
                        key,
                        format!("unknown status {other:?}"),
                    );
                    continue;
                }
            }
            let mut problems = Vec::new();
            match (&s.preimage, &s.payment_hash) {
                (Some(p), Some(h)) => {
                    if sha256::Hash::hash(p).to_byte_array()[..] != h[..] {
                        problems.push(format!(
                            "preimage {} does not hash to payment_hash {}",
                            hex::encode(p),
                            hex::encode(h)
                        ));
                    }
                }
                _ => problems.push("succeeded without a preimage and payment hash".to_owned()),
            }
            if let Some(id) = s.channel_id {
                match self.channels.get(&id) {
                    None => problems.push(format!("channel {id} has no channels row")),
                    Some(info) => {
                        if info.contributor.map(|k| k.to_bytes().to_vec())
                            != Some(s.contributor_key.clone())
                        {
                            problems.push(format!(
                                "contributor {} is not the channel's",
                                hex::encode(&s.contributor_key)
                            ));
                        }
                    }
                }
            }
            match s.settled_state_seq {
                None => problems.push("succeeded without settled_state_seq".to_owned()),
                Some(seq) if seq < s.state_seq => problems.push(format!(
                    "settled_state_seq {seq} precedes the state_seq {} it was owed at",
                    s.state_seq
                )),
                Some(_) => {}
            }
            for p in problems {
                self.finding(Check::Settlements, "settlements", key.clone(), p);
            }
        }
        // Per channel, in the order the states carry them: each state's settled amount is
        // the cumulative sum, and its hash the settlement's.
        succeeded.sort_by_key(|s| (s.channel_id.map(|c| c.0), s.settled_state_seq, s.id));
        let mut cumulative: HashMap<ChannelId, u64> = HashMap::new();
        for s in succeeded {
            let key = format!("settlement_id={}", s.id);
            let (Some(id), Some(seq)) = (s.channel_id, s.settled_state_seq) else { continue };
            let total = cumulative.entry(id).or_insert(0);
            *total = total.saturating_add(s.amount_msat);
            let total = *total;
            if let Some(info) = self.channels.get_mut(&id) {
                info.settled_msat = info.settled_msat.saturating_add(s.amount_msat);
                info.settlements += 1;
            }
            match carried.get(&(id, seq)) {
                None => self.finding(
                    Check::Settlements,
                    "settlements",
                    key,
                    format!("no signed state {seq} of channel {id} is stored to carry it"),
                ),
                Some((settled, hash)) => {
                    if s.payment_hash.as_deref() != Some(&hash[..]) {
                        self.finding(
                            Check::Settlements,
                            "settlements",
                            key.clone(),
                            format!(
                                "signed state {seq} carries last_settlement_hash {}, not its payment hash",
                                hex::encode(hash)
                            ),
                        );
                    }
                    if settled.0 != total {
                        self.finding(
                            Check::Settlements,
                            "settlements",
                            key,
                            format!(
                                "signed state {seq} says settled {} msat, the succeeded settlements up to this one sum to {total} msat",
                                settled.0
                            ),
                        );
                    }
                }
            }
        }
    }

    /// Per channel: row and current head against the batches, settlements and signed
    /// states. Returns the per-channel lines.
    fn check_channels(&mut self) -> Result<Vec<ChannelLine>, ReconcileError> {
        let unapplied = match Unapplied::read(self.conn) {
            Ok(u) => Some(u),
            Err(e) => {
                self.finding(
                    Check::ChannelBalances,
                    "receipt_batches",
                    format!("batch_seq>{}", self.watermark),
                    format!("channel heads cannot be rebuilt from the unapplied batches: {e}"),
                );
                None
            }
        };
        let mut ids: Vec<(Vec<u8>, u64, ChannelId)> = self
            .channels
            .values()
            .map(|c| (c.row.contributor_key.clone(), c.opened_batch_seq, c.channel_id))
            .collect();
        ids.sort();
        let mut lines = Vec::with_capacity(ids.len());
        for (_, _, id) in ids {
            let Some(info) = self.channels.get(&id) else { continue };
            let key = cid(&id);
            let mut problems: Vec<String> = Vec::new();
            let row = &info.row;
            let head = row.head(self.network, self.provider_key);
            let row_state = match &head {
                Ok((_, _, state)) => Some(*state),
                Err(e) => {
                    problems.push(format!("row is malformed: {e}"));
                    None
                }
            };
            if let Some(state) = &row_state {
                if state.channel_id != id {
                    problems.push(format!(
                        "channel_id is not derived from the provider key, contributor and nonce ({})",
                        state.channel_id
                    ));
                }
                if let Err(e) = state.check_invariants() {
                    problems.push(format!("row breaks an invariant: {e}"));
                }
                if state.accrued_nsat != info.through_applied {
                    problems.push(format!(
                        "row accrued {} nsat, but its batches up to applied_batch_seq {} accrue {} nsat",
                        state.accrued_nsat.0, row.applied_batch_seq, info.through_applied.0
                    ));
                }
            }
            // A row may lag the watermark only over batches that did not touch it: the
            // ledger reads the batches after the watermark only.
            if let Some(batch) = info.skipped_batch {
                problems.push(format!(
                    "batch {batch} accrues to it after the row's applied_batch_seq {} but not after the watermark {}: the ledger's head misses it",
                    row.applied_batch_seq, self.watermark
                ));
            }
            if row.applied_batch_seq > self.last_batch_seq
                || info.opened_batch_seq > row.applied_batch_seq
            {
                problems.push(format!(
                    "opened_batch_seq {} / applied_batch_seq {} out of range (last batch {})",
                    info.opened_batch_seq, row.applied_batch_seq, self.last_batch_seq
                ));
            }
            // The current head, as the ledger computes it.
            let current = match (&unapplied, &head) {
                (Some(u), Ok(_)) => match u.apply(row, self.network, self.provider_key) {
                    Ok((_, _, payer)) => Some(*payer.head()),
                    Err(e) => {
                        problems.push(format!("current head cannot be rebuilt: {e}"));
                        None
                    }
                },
                _ => None,
            };
            if let Some(cur) = &current {
                if cur.accrued_nsat != info.batch_total {
                    problems.push(format!(
                        "accrued {} nsat, but its accruals over all batches sum to {} nsat",
                        cur.accrued_nsat.0, info.batch_total.0
                    ));
                }
                if cur.settled_msat.0 != info.settled_msat {
                    problems.push(format!(
                        "settled_msat {}, but its succeeded settlements sum to {} msat",
                        cur.settled_msat.0, info.settled_msat
                    ));
                }
                match cur.accrued_nsat.floor_msat() {
                    Ok(floor) if cur.settled_msat <= floor => {}
                    _ => problems.push(format!(
                        "settled {} msat exceeds floor(accrued) of {} nsat",
                        cur.settled_msat.0, cur.accrued_nsat.0
                    )),
                }
            }
            // The newest signed state against the row (one seq, one content).
            if let Some(state) = &row_state {
                match &info.latest {
                    None => {
                        if state.seq != 0 || row.head_signed {
                            problems.push(format!(
                                "no signed state is stored, yet the row is at seq {}{}",
                                state.seq,
                                if row.head_signed { " and marked signed" } else { "" }
                            ));
                        }
                    }
                    Some(latest) => {
                        let same = state == latest;
                        if row.head_signed && !same {
                            problems.push(format!(
                                "row is marked signed but differs from the newest signed state (seq {})",
                                latest.seq
                            ));
                        } else if state.seq == latest.seq && !same {
                            problems.push(format!(
                                "row at seq {} differs from the signed state with that seq",
                                state.seq
                            ));
                        } else if state.seq == latest.seq + 1 {
                            if state.settled_msat != latest.settled_msat
                                || state.last_settlement_hash != latest.last_settlement_hash
                                || state.status != latest.status
                                || state.accrued_nsat < latest.accrued_nsat
                            {
                                problems.push(format!(
                                    "unsigned row at seq {} is not the newest signed state (seq {}) plus accruals",
                                    state.seq, latest.seq
                                ));
                            }
                        } else if state.seq != latest.seq {
                            problems.push(format!(
                                "row at seq {}, the newest signed state is seq {}",
                                state.seq, latest.seq
                            ));
                        }
                        if current.is_some_and(|c| c.accrued_nsat < latest.accrued_nsat) {
                            problems.push(format!(
                                "signed state {} promises accrued {} nsat, more than the ledger holds",
                                latest.seq, latest.accrued_nsat.0
                            ));
                        }
                    }
                }
            }
            for (seq, a) in &info.unmatched {
                if *a > info.batch_total {
                    problems.push(format!(
                        "signed state {seq} promises accrued {} nsat, more than all its batches accrue ({} nsat)",
                        a.0, info.batch_total.0
                    ));
                }
            }

            let state = current.or(row_state);
            let accrued = state.map_or(0, |s| s.accrued_nsat.0);
            let settled = state.map_or(0, |s| s.settled_msat.0);
            let outstanding = accrued.saturating_sub(u128::from(settled) * NSAT_PER_MSAT);
            let payable =
                u64::try_from(accrued / NSAT_PER_MSAT).unwrap_or(u64::MAX).saturating_sub(settled);
            self.totals.accrued_nsat = self.totals.accrued_nsat.saturating_add(accrued);
            self.totals.settled_msat = self.totals.settled_msat.saturating_add(settled);
            self.totals.outstanding_nsat = self.totals.outstanding_nsat.saturating_add(outstanding);
            self.totals.payable_msat = self.totals.payable_msat.saturating_add(payable);
            lines.push(ChannelLine {
                channel_id: id.to_hex(),
                contributor_key: hex::encode(&row.contributor_key),
                status: state.map_or("?", |s| status_name(s.status)).to_owned(),
                seq: state.map_or(0, |s| s.seq),
                accrued_nsat: accrued,
                settled_msat: settled,
                outstanding_nsat: outstanding,
                signed_states: info.states,
                latest_signed_seq: info.latest.map(|l| l.seq),
                settlements: info.settlements,
            });
            for p in problems {
                self.finding(Check::ChannelBalances, "channels", key.clone(), p);
            }
        }
        Ok(lines)
    }

    /// `Σ pools == Σ batch accruals == Σ accrued`, and settled + outstanding == accrued.
    fn check_totals(&mut self) {
        let t = &self.totals;
        let (pools, batches, accrued) = (t.pools_nsat, t.batch_accruals_nsat, t.accrued_nsat);
        if pools != batches || batches != accrued {
            self.finding(
                Check::PoolsEqualAccruals,
                "ledger",
                "totals".into(),
                format!(
                    "Σ pools {pools} nsat, Σ batch accruals {batches} nsat, Σ channel accrued {accrued} nsat: not equal"
                ),
            );
        }
        let t = &self.totals;
        let settled_plus = u128::from(t.settled_msat) * NSAT_PER_MSAT + t.outstanding_nsat;
        if settled_plus != t.accrued_nsat {
            let (s, o, a) = (t.settled_msat, t.outstanding_nsat, t.accrued_nsat);
            self.finding(
                Check::ChannelBalances,
                "ledger",
                "totals".into(),
                format!("settled {s} msat + outstanding {o} nsat is not accrued {a} nsat"),
            );
        }
    }
}

/// A BLOB column, borrowed from the row.
fn blob<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r [u8], ReconcileError> {
    r.get_ref(i)?.as_blob().map_err(|e| ReconcileError::Store(StoreError::Corrupt(e.to_string())))
}

fn info_total(channels: &HashMap<ChannelId, ChannelInfo>, id: &ChannelId) -> u128 {
    channels.get(id).map_or(0, |c| c.batch_total.0)
}

impl OpenBatch {
    /// Adds one event of this batch; returns its problems.
    fn add_event(
        &mut self,
        row: &EventRow,
        leaf: Option<[u8; 32]>,
        weights: Option<Arc<Weights>>,
        shares: &[Nsat],
    ) -> Vec<String> {
        let mut problems = Vec::new();
        self.events += 1;
        if row.leaf_index > self.next_leaf {
            problems.push(format!(
                "leaf_index {} skips leaves {}..{} of batch {} (their events are missing)",
                row.leaf_index, self.next_leaf, row.leaf_index, self.seq
            ));
        } else if row.leaf_index < self.next_leaf {
            problems.push(format!(
                "leaf_index {} of batch {} is used by an earlier event",
                row.leaf_index, self.seq
            ));
        }
        self.next_leaf = self.next_leaf.max(row.leaf_index.saturating_add(1));
        let stored = self.leaves.get(row.leaf_index as usize);
        match (leaf, stored) {
            (_, None) => problems.push(format!(
                "request {}: batch {} has no leaf {}: the receipt is outside its signed batch",
                row.request_id, self.seq, row.leaf_index
            )),
            (Some(l), Some(s)) if l != *s => problems.push(format!(
                "request {}: its receipt (recomputed) is not leaf {} of batch {}: not in the signed batch",
                row.request_id, row.leaf_index, self.seq
            )),
            _ => {}
        }
        if let Some(w) = weights {
            let g = *self.group_of.entry(Arc::as_ptr(&w)).or_insert_with(|| {
                self.groups.push((w.clone(), vec![Nsat::ZERO; w.len()]));
                self.groups.len() - 1
            });
            if let Some((_, totals)) = self.groups.get_mut(g) {
                for (t, s) in totals.iter_mut().zip(shares) {
                    *t = add(*t, *s);
                }
            }
        }
        problems
    }
}
