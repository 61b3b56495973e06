//! The SQLite ceiling: the same `meter_events` rows the ledger writer appends, inserted the
//! same way (one cached prepared statement, one `execute` per row) into a fresh database
//! opened by `tribute_daemon::store::initialize` (same schema, WAL, `synchronous=FULL`),
//! `batch` rows per transaction, on one thread, for a fixed time.

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

/// Inserts rows in transactions of `batch` until `duration` has passed (whole
/// transactions only) into a fresh database in `dir`.
pub fn raw_insert(dir: &Path, batch: usize, duration: Duration) -> Result<Raw, BenchError> {
    let path = dir.join(format!("raw-{batch}.sqlite"));
    let mut conn = store::initialize(&path, Durability::Full).map_err(err)?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).map_err(err)?;
    if sync != 2 {
        return Err(err("synchronous is not FULL"));
    }
    let batch = batch.max(1);
    let start = Instant::now();
    let (mut rows, mut transactions) = (0u64, 0u64);
    let now = store::u64_to_column(tribute_daemon::ledger::unix_now(), "now").map_err(err)?;
    while start.elapsed() < duration {
        let tx = conn.transaction().map_err(err)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO meter_events (seq, request_id, content_hash, model_id, attribution_version,
                       attribution, price_nsat, pool_nsat, batch_seq, leaf_index, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(err)?;
            for leaf in 0..batch {
                let seq = rows + leaf as u64 + 1;
                let r = mix(seq);
                let mut content_hash = [0u8; 32];
                for (k, chunk) in content_hash.chunks_exact_mut(8).enumerate() {
                    chunk.copy_from_slice(&mix(r ^ k as u64).to_be_bytes());
                }
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
                    (transactions + 1) as i64,
                    leaf as i64,
                    now,
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        rows += batch as u64;
        transactions += 1;
    }
    Ok(Raw { batch, rows, transactions, elapsed: start.elapsed() })
}

/// As [`raw_insert`], but each transaction is shaped like the ledger writer's: the `batch`
/// event rows, one `receipt_batches` row (with its 32-byte leaves), and for each of
/// `channels` channels one balance update and one `batch_accruals` row. This is the
/// ceiling for what the writer must write, not only for the events.
pub fn writer_shaped(
    dir: &Path,
    batch: usize,
    channels: usize,
    duration: Duration,
) -> Result<Raw, BenchError> {
    let path = dir.join(format!("shaped-{batch}.sqlite"));
    let mut conn = store::initialize(&path, Durability::Full).map_err(err)?;
    let batch = batch.max(1);
    let now = store::u64_to_column(tribute_daemon::ledger::unix_now(), "now").map_err(err)?;
    let channel_id = |c: usize| -> [u8; 32] {
        let mut id = [0u8; 32];
        for (k, chunk) in id.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&mix((c as u64) << 8 | k as u64).to_be_bytes());
        }
        id
    };
    {
        let tx = conn.transaction().map_err(err)?;
        for c in 0..channels {
            tx.execute(
                "INSERT INTO channels (channel_id, contributor_key, nonce, status, seq, accrued_msat,
                    accrued_rem_nsat, settled_msat, last_settlement_hash, head_signed, opened_batch_seq)
                 VALUES (?1, ?2, ?3, 0, 0, 0, 0, 0, ?4, 0, 0)",
                params![&channel_id(c)[..], &channel_id(c + channels)[..], &[0u8; 32][..], &[0u8; 32][..]],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
    }
    let start = Instant::now();
    let (mut rows, mut transactions) = (0u64, 0u64);
    while start.elapsed() < duration {
        let batch_seq = (transactions + 1) as i64;
        let tx = conn.transaction().map_err(err)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO meter_events (seq, request_id, content_hash, model_id, attribution_version,
                       attribution, price_nsat, pool_nsat, batch_seq, leaf_index, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(err)?;
            let mut leaves = Vec::with_capacity(32 * batch);
            for leaf in 0..batch {
                let seq = rows + leaf as u64 + 1;
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
            tx.prepare_cached(
                "INSERT INTO receipt_batches (batch_seq, receipt_count, merkle_root, signed_root, leaves, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(err)?
            .execute(params![batch_seq, batch as i64, &[7u8; 32][..], &[9u8; 142][..], leaves, now])
            .map_err(err)?;
            let mut upd = tx
                .prepare_cached(
                    "UPDATE channels SET seq = ?2, accrued_msat = ?3, accrued_rem_nsat = ?4, head_signed = 0
                     WHERE rowid = ?1",
                )
                .map_err(err)?;
            let mut acc = tx
                .prepare_cached(
                    "INSERT INTO batch_accruals (batch_seq, channel_id, amount_msat, amount_rem_nsat)
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for c in 0..channels {
                upd.execute(params![(c + 1) as i64, batch_seq, batch_seq * 1000, 5i64])
                    .map_err(err)?;
                acc.execute(params![batch_seq, &channel_id(c)[..], 1000i64, 5i64]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        rows += batch as u64;
        transactions += 1;
    }
    Ok(Raw { batch, rows, transactions, elapsed: start.elapsed() })
}
