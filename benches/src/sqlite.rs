//! The SQLite ceiling: the same `meter_events` rows the ledger writer appends, inserted the
//! same way (one cached prepared statement, one `execute` per row) into a fresh database
//! opened by `tribute_daemon::store::initialize` (same schema, WAL, `synchronous=FULL`),
//! `batch` rows per transaction, on one thread, for a fixed time; and the same with the
//! per-batch row the writer adds.

use crate::setup::{mix, MODEL};
use crate::BenchError;
use rusqlite::params;
use std::path::Path;
use std::time::{Duration, Instant};
use tribute_daemon::store::{self, Durability};

/// What one ceiling run measured.
pub struct Raw {
    /// Rows per transaction.
    pub batch: usize,
    /// Rows committed.
    pub rows: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl Raw {
    /// Rows per second.
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::msg(format!("sqlite ceiling: {e}"))
}

/// The `batch` event rows of one transaction, inserted as the writer does; returns their
/// 32-byte leaves (stand-ins, the rows' content hashes).
fn insert_events(
    tx: &rusqlite::Transaction<'_>,
    first_seq: u64,
    batch: usize,
    batch_seq: i64,
    now: i64,
) -> Result<Vec<u8>, BenchError> {
    let mut ins = tx
        .prepare_cached(
            "INSERT INTO meter_events (seq, request_id, content_hash, model_id, attribution_version,
               attribution, price_nsat, pool_nsat, batch_seq, leaf_index, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .map_err(err)?;
    let mut leaves = Vec::with_capacity(32 * batch);
    for leaf in 0..batch {
        let seq = first_seq + leaf as u64;
        let r = mix(seq);
        let mut content_hash = [0u8; 32];
        for (k, chunk) in content_hash.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&mix(r ^ k as u64).to_be_bytes());
        }
        leaves.extend_from_slice(&content_hash);
        let price = 1_000_003 + 7 * (1 + r % 4096) + 13 * (1 + (r >> 32) % 1024);
        ins.execute(params![
            seq as i64,
            format!("raw-0-{seq}"),
            &content_hash[..],
            MODEL,
            1i64,
            Option::<Vec<u8>>::None,
            price as i64,
            (price * 7 / 10) as i64,
            batch_seq,
            leaf as i64,
            now,
        ])
        .map_err(err)?;
    }
    Ok(leaves)
}

/// Runs transactions made by `write(tx, first_seq, batch_seq)` (each writing `batch`
/// events) into a fresh database at `path` until `duration` has passed (whole transactions
/// only).
fn run(
    path: &Path,
    batch: usize,
    duration: Duration,
    write: impl Fn(&rusqlite::Transaction<'_>, u64, i64) -> Result<(), BenchError>,
) -> Result<Raw, BenchError> {
    let mut conn = store::initialize(path, Durability::Full).map_err(err)?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).map_err(err)?;
    if sync != 2 {
        return Err(err("synchronous is not FULL"));
    }
    let start = Instant::now();
    let (mut rows, mut transactions) = (0u64, 0u64);
    while start.elapsed() < duration {
        let tx = conn.transaction().map_err(err)?;
        write(&tx, rows + 1, (transactions + 1) as i64)?;
        tx.commit().map_err(err)?;
        rows += batch as u64;
        transactions += 1;
    }
    Ok(Raw { batch, rows, transactions, elapsed: start.elapsed() })
}

fn now() -> Result<i64, BenchError> {
    store::u64_to_column(tribute_daemon::ledger::unix_now(), "now").map_err(err)
}

/// Inserts event rows only, `batch` per transaction, into a fresh database in `dir`.
pub fn raw_insert(dir: &Path, batch: usize, duration: Duration) -> Result<Raw, BenchError> {
    let batch = batch.max(1);
    let now = now()?;
    run(&dir.join(format!("raw-{batch}.sqlite")), batch, duration, |tx, first, batch_seq| {
        insert_events(tx, first, batch, batch_seq, now).map(|_| ())
    })
}

/// As [`raw_insert`], but each transaction is shaped like the ledger writer's: the `batch`
/// event rows and one `receipt_batches` row with its 32-byte leaves and its accruals (one
/// 48-byte entry for each of `channels` channels). This is the ceiling for what the writer
/// must write per batch, not only for the events. (The writer also rewrites a channel's row
/// when it stores one of its signed states, about once per channel per signing interval,
/// whatever the rate: not part of this ceiling.)
pub fn writer_shaped(
    dir: &Path,
    batch: usize,
    channels: usize,
    duration: Duration,
) -> Result<Raw, BenchError> {
    let batch = batch.max(1);
    let now = now()?;
    let mut accruals = Vec::with_capacity(48 * channels);
    for c in 0..channels {
        for k in 0..4u64 {
            accruals.extend_from_slice(&mix((c as u64) << 8 | k).to_be_bytes());
        }
        accruals.extend_from_slice(&(1_000_005u128 + c as u128).to_be_bytes());
    }
    run(&dir.join(format!("shaped-{batch}.sqlite")), batch, duration, |tx, first, batch_seq| {
        let leaves = insert_events(tx, first, batch, batch_seq, now)?;
        tx.prepare_cached(
            "INSERT INTO receipt_batches (batch_seq, receipt_count, merkle_root, signed_root, leaves,
                accruals, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(err)?
        .execute(params![batch_seq, batch as i64, &[7u8; 32][..], &[9u8; 142][..], leaves, &accruals, now])
        .map_err(err)?;
        Ok(())
    })
}
