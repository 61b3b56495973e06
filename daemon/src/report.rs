//! Accountants' reports, read from a ledger database file (a backup from
//! `tribute admin backup` / `tributed backup`, or a live daemon's file, read-only):
//!
//! - a contributor's **statement** for a period `[from, until)`: opening balance, accruals
//!   (per UTC day, from the receipt batches' per-channel accruals), settlements paid
//!   (payment hash, preimage, fee), closing balance;
//! - the **journal**: every balance change of every channel in order — one credit per
//!   channel per receipt batch, one debit per succeeded settlement — with the running
//!   outstanding balance.
//!
//! An accrual counts at its batch's `created_at`; a settlement at its `updated_at` (when it
//! was finalized as succeeded). The same rule for every period, so a period's closing balance
//! is the next period's opening balance.

use crate::ledger::decode_accruals;
use crate::reconcile::open_read_only;
use crate::settlement::{list_settlements, SettlementRow};
use crate::store::StoreError;
use rusqlite::{params, Connection};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use tribute_channels::{ChannelId, PublicKey};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file could not be opened or read.
    #[error(transparent)]
    Open(#[from] crate::reconcile::ReconcileError),
    /// Reading failed.
    #[error("reading the database: {0}")]
    Store(#[from] StoreError),
    /// The period is empty or reversed.
    #[error("the period must start before it ends ({from} ≥ {until})")]
    Period {
        /// Start.
        from: u64,
        /// End.
        until: u64,
    },
    /// The contributor has no channel.
    #[error("no channel of contributor {0}")]
    NoChannel(PublicKey),
}

impl From<rusqlite::Error> for ReportError {
    fn from(e: rusqlite::Error) -> Self {
        ReportError::Store(StoreError::Sqlite(e))
    }
}

fn as_string<S: serde::Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A balance at an instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Balance {
    /// Accrued so far, nsat.
    #[serde(serialize_with = "as_string")]
    pub accrued_nsat: u128,
    /// Paid so far, msat.
    pub settled_msat: u64,
    /// Accrued − paid, nsat.
    #[serde(serialize_with = "as_string")]
    pub outstanding_nsat: u128,
}

impl Balance {
    fn new(accrued_nsat: u128, settled_msat: u64) -> Balance {
        Balance {
            accrued_nsat,
            settled_msat,
            outstanding_nsat: accrued_nsat.saturating_sub(u128::from(settled_msat) * 1_000_000),
        }
    }
}

/// Accruals of one UTC day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccrualDay {
    /// Days since 1970-01-01 (UTC).
    pub day: u64,
    /// Receipt batches that credited the contributor that day.
    pub batches: u64,
    /// Σ credited, nsat.
    #[serde(serialize_with = "as_string")]
    pub nsat: u128,
}

/// One succeeded settlement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SettlementLine {
    /// Settlement id.
    pub settlement_id: u64,
    /// When it was finalized (Unix seconds).
    pub at: u64,
    /// Channel, hex.
    pub channel_id: String,
    /// Paid, msat.
    pub amount_msat: u64,
    /// Routing fee paid by the provider, msat (not deducted from the contributor).
    pub fee_msat: Option<u64>,
    /// `keysend` or `bolt12`.
    pub method: String,
    /// Payment hash, hex.
    pub payment_hash: String,
    /// Preimage, hex (its SHA-256 is the payment hash: the proof of payment).
    pub preimage: String,
}

impl SettlementLine {
    fn of(s: &SettlementRow) -> SettlementLine {
        SettlementLine {
            settlement_id: s.settlement_id,
            at: s.updated_at,
            channel_id: s.channel_id.to_string(),
            amount_msat: s.amount_msat,
            fee_msat: s.fee_msat,
            method: s.method.clone(),
            payment_hash: s.payment_hash.map(hex::encode).unwrap_or_default(),
            preimage: s.preimage.map(hex::encode).unwrap_or_default(),
        }
    }
}

/// A contributor's statement for `[from, until)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Statement {
    /// The contributor, hex.
    pub contributor_key: String,
    /// Its channels, hex.
    pub channels: Vec<String>,
    /// Period start (Unix seconds, inclusive).
    pub from: u64,
    /// Period end (exclusive).
    pub until: u64,
    /// At `from`.
    pub opening: Balance,
    /// Accruals in the period, by day.
    pub accruals: Vec<AccrualDay>,
    /// Σ accruals in the period, nsat.
    #[serde(serialize_with = "as_string")]
    pub accrued_nsat: u128,
    /// Settlements in the period.
    pub settlements: Vec<SettlementLine>,
    /// Σ settlements in the period, msat.
    pub settled_msat: u64,
    /// Σ routing fees of those settlements, msat.
    pub fees_msat: u64,
    /// At `until`: `opening` plus the period's accruals minus its settlements.
    pub closing: Balance,
}

/// What a journal entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A receipt batch credited the channel.
    Accrual,
    /// A settlement paid the channel.
    Settlement,
}

/// One balance change of one channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JournalEntry {
    /// When (Unix seconds).
    pub at: u64,
    /// Credit or debit.
    pub kind: EntryKind,
    /// The contributor, hex.
    pub contributor_key: String,
    /// The channel, hex.
    pub channel_id: String,
    /// The batch (accruals) or settlement id.
    pub reference: u64,
    /// Credited, nsat (accruals).
    #[serde(serialize_with = "as_string")]
    pub credit_nsat: u128,
    /// Debited, nsat (settlements: msat × 10^6).
    #[serde(serialize_with = "as_string")]
    pub debit_nsat: u128,
    /// Settlements: payment hash, hex.
    pub payment_hash: String,
    /// Settlements: preimage, hex.
    pub preimage: String,
    /// Settlements: routing fee, msat.
    pub fee_msat: Option<u64>,
    /// The channel's outstanding balance after this entry, nsat.
    #[serde(serialize_with = "as_string")]
    pub balance_nsat: u128,
}

/// One channel's credit from one batch.
struct Credit {
    batch_seq: u64,
    at: u64,
    channel: ChannelId,
    nsat: u128,
}

/// Every batch's per-channel credits, in batch order.
fn credits(conn: &Connection) -> Result<Vec<Credit>, ReportError> {
    let mut stmt = conn.prepare(
        "SELECT batch_seq, created_at, accruals FROM receipt_batches ORDER BY batch_seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let batch_seq: i64 = r.get(0)?;
        let at: i64 = r.get(1)?;
        let blob: Vec<u8> = r.get(2)?;
        for (channel, nsat) in decode_accruals(&blob)? {
            out.push(Credit {
                batch_seq: u64::try_from(batch_seq).unwrap_or_default(),
                at: u64::try_from(at).unwrap_or_default(),
                channel,
                nsat: nsat.0,
            });
        }
    }
    Ok(out)
}

/// Succeeded settlements, oldest first.
fn paid(conn: &Connection) -> Result<Vec<SettlementRow>, ReportError> {
    Ok(list_settlements(
        conn,
        "WHERE status = 'succeeded' ORDER BY updated_at, settlement_id",
        params![],
    )?)
}

/// Channel id → contributor key, from the `channels` table.
fn channel_owners(conn: &Connection) -> Result<HashMap<ChannelId, Vec<u8>>, ReportError> {
    let mut stmt = conn.prepare("SELECT channel_id, contributor_key FROM channels")?;
    let mut rows = stmt.query([])?;
    let mut out = HashMap::new();
    while let Some(r) = rows.next()? {
        let id: Vec<u8> = r.get(0)?;
        let key: Vec<u8> = r.get(1)?;
        let id: [u8; 32] = id
            .try_into()
            .map_err(|_| StoreError::Corrupt("channels.channel_id is not 32 bytes".into()))?;
        out.insert(ChannelId(id), key);
    }
    Ok(out)
}

/// `contributor`'s statement for `[from, until)` from the database behind `conn`.
pub fn statement(
    conn: &Connection,
    contributor: &PublicKey,
    from: u64,
    until: u64,
) -> Result<Statement, ReportError> {
    if from >= until {
        return Err(ReportError::Period { from, until });
    }
    conn.execute_batch("BEGIN DEFERRED")?;
    let result = statement_in_tx(conn, contributor, from, until);
    let _ = conn.execute_batch("ROLLBACK");
    result
}

fn statement_in_tx(
    conn: &Connection,
    contributor: &PublicKey,
    from: u64,
    until: u64,
) -> Result<Statement, ReportError> {
    let key = contributor.to_bytes().to_vec();
    let mut channels: Vec<ChannelId> =
        channel_owners(conn)?.into_iter().filter(|(_, k)| *k == key).map(|(id, _)| id).collect();
    if channels.is_empty() {
        return Err(ReportError::NoChannel(*contributor));
    }
    channels.sort();
    let (mut opening, mut closing) = ((0u128, 0u64), (0u128, 0u64));
    let mut days: Vec<AccrualDay> = Vec::new();
    for c in credits(conn)?.iter().filter(|c| channels.contains(&c.channel)) {
        if c.at < from {
            opening.0 += c.nsat;
        }
        if c.at < until {
            closing.0 += c.nsat;
        }
        if (from..until).contains(&c.at) {
            let day = c.at / 86_400;
            match days.last_mut() {
                Some(d) if d.day == day => {
                    d.batches += 1;
                    d.nsat += c.nsat;
                }
                _ => days.push(AccrualDay { day, batches: 1, nsat: c.nsat }),
            }
        }
    }
    let mut settlements = Vec::new();
    for s in paid(conn)?.iter().filter(|s| channels.contains(&s.channel_id)) {
        if s.updated_at < from {
            opening.1 += s.amount_msat;
        }
        if s.updated_at < until {
            closing.1 += s.amount_msat;
        }
        if (from..until).contains(&s.updated_at) {
            settlements.push(SettlementLine::of(s));
        }
    }
    Ok(Statement {
        contributor_key: contributor.to_string(),
        channels: channels.iter().map(ToString::to_string).collect(),
        from,
        until,
        opening: Balance::new(opening.0, opening.1),
        accrued_nsat: days.iter().map(|d| d.nsat).sum(),
        accruals: days,
        settled_msat: settlements.iter().map(|s| s.amount_msat).sum(),
        fees_msat: settlements.iter().filter_map(|s| s.fee_msat).sum(),
        settlements,
        closing: Balance::new(closing.0, closing.1),
    })
}

/// Every balance change of every channel, in time order (accruals before settlements of
/// the same second, then by batch / settlement id), from the database behind `conn`.
pub fn journal(conn: &Connection) -> Result<Vec<JournalEntry>, ReportError> {
    conn.execute_batch("BEGIN DEFERRED")?;
    let result = journal_in_tx(conn);
    let _ = conn.execute_batch("ROLLBACK");
    result
}

fn journal_in_tx(conn: &Connection) -> Result<Vec<JournalEntry>, ReportError> {
    let owners = channel_owners(conn)?;
    let owner = |id: &ChannelId| owners.get(id).map(hex::encode).unwrap_or_default();
    let mut entries: Vec<JournalEntry> = credits(conn)?
        .into_iter()
        .map(|c| JournalEntry {
            at: c.at,
            kind: EntryKind::Accrual,
            contributor_key: owner(&c.channel),
            channel_id: c.channel.to_string(),
            reference: c.batch_seq,
            credit_nsat: c.nsat,
            debit_nsat: 0,
            payment_hash: String::new(),
            preimage: String::new(),
            fee_msat: None,
            balance_nsat: 0,
        })
        .collect();
    entries.extend(paid(conn)?.iter().map(|s| {
        let line = SettlementLine::of(s);
        JournalEntry {
            at: line.at,
            kind: EntryKind::Settlement,
            contributor_key: owner(&s.channel_id),
            channel_id: line.channel_id,
            reference: line.settlement_id,
            credit_nsat: 0,
            debit_nsat: u128::from(line.amount_msat) * 1_000_000,
            payment_hash: line.payment_hash,
            preimage: line.preimage,
            fee_msat: line.fee_msat,
            balance_nsat: 0,
        }
    }));
    // Stable: accruals of a second come before its settlements (a settlement only pays
    // what had accrued), each kind in its own id order.
    entries.sort_by_key(|e| (e.at, e.kind == EntryKind::Settlement, e.reference));
    let mut balances: HashMap<String, u128> = HashMap::new();
    for e in &mut entries {
        let b = balances.entry(e.channel_id.clone()).or_default();
        *b = (*b + e.credit_nsat).saturating_sub(e.debit_nsat);
        e.balance_nsat = *b;
    }
    Ok(entries)
}

/// [`statement`] of the database file at `path` (opened read-only).
pub fn statement_of_file(
    path: &Path,
    contributor: &PublicKey,
    from: u64,
    until: u64,
) -> Result<Statement, ReportError> {
    statement(&open_read_only(path)?, contributor, from, until)
}

/// [`journal`] of the database file at `path` (opened read-only).
pub fn journal_of_file(path: &Path) -> Result<Vec<JournalEntry>, ReportError> {
    journal(&open_read_only(path)?)
}
