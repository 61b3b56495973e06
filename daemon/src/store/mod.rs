//! Storage: SQLite through rusqlite 0.31, WAL journal, `synchronous=FULL` by default.
//!
//! One connection per role: the metering writer owns one (it is the only writer of the
//! metering tables), the registry and token code share one behind a mutex, and readers
//! (channel and receipt lookups) use their own. WAL lets readers run beside the writer.
//!
//! Every function here takes a `&Connection` or `&Transaction` and does one job; the
//! caller decides the transaction boundaries.

mod schema;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::time::Duration;
use tribute_channels::amount::{Msat, Nsat, NSAT_PER_MSAT};

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// `PRAGMA integrity_check` did not say `ok`.
    #[error("database integrity check failed: {0}")]
    Integrity(String),
    /// A stored value is out of range or malformed (the record is named).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A value does not fit its column.
    #[error("value out of range for storage: {0}")]
    OutOfRange(&'static str),
}

/// How hard SQLite syncs a commit. `Full` is the default for money: a commit survives
/// power loss. `Normal` can lose the last commits on power loss (not on a process crash).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`.
    #[default]
    Full,
    /// `synchronous=NORMAL`.
    Normal,
}

/// A connection shared by request handlers (reads and rare writes), used through
/// [`with_conn`] on a blocking thread.
pub type SharedConn = std::sync::Arc<std::sync::Mutex<Connection>>;

/// Locks a shared connection. A panic while holding it cannot leave SQLite inconsistent
/// (an open transaction rolls back on drop), so a poisoned lock is still usable.
pub fn lock(conn: &SharedConn) -> std::sync::MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens a connection with the project's pragmas. The schema must already be migrated
/// (see [`initialize`]).
pub fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Opens (creating if needed) the database at `path`, checks its integrity and brings the
/// schema up to date. Returns the connection used.
pub fn initialize(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let mut conn = connect(path, durability)?;
    integrity_check(&conn)?;
    schema::migrations().to_latest(&mut conn)?;
    Ok(conn)
}

/// `PRAGMA integrity_check`; an error unless it reports `ok`.
pub fn integrity_check(conn: &Connection) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    if rows == ["ok"] {
        Ok(())
    } else {
        Err(StoreError::Integrity(rows.join("; ")))
    }
}

/// WAL pages the metering writer lets pile up before it checkpoints by itself: only a
/// backstop, as the [`Checkpointer`] keeps the WAL far shorter.
pub const WRITER_AUTOCHECKPOINT_PAGES: i64 = 16_384;

/// Copies the WAL back into the database file from a thread and connection of its own
/// (`PRAGMA wal_checkpoint(PASSIVE)` every `interval`: it never blocks the writer), so that
/// no metering commit pays for a checkpoint and its fsync.
pub struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path`.
    pub fn start(
        path: &Path,
        durability: Durability,
        interval: Duration,
    ) -> Result<Checkpointer, StoreError> {
        let conn = connect(path, durability)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tribute-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    });
                    if let Err(e) = done {
                        tracing::warn!("WAL checkpoint failed: {e}");
                    }
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start checkpoint thread: {e}")))?;
        Ok(Checkpointer { stop, thread })
    }

    /// Stops and joins the thread.
    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Writes a consistent copy of the live database to `dest` (`VACUUM INTO`), safe while the
/// daemon runs. `dest` must not exist.
pub fn backup(conn: &Connection, dest: &Path) -> Result<(), StoreError> {
    let dest = dest.to_str().ok_or(StoreError::OutOfRange("backup path is not UTF-8"))?;
    conn.execute("VACUUM INTO ?1", params![dest])?;
    Ok(())
}

/// A value from the `meta` table.
pub fn meta_get(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))
        .optional()?)
}

/// Sets a value in the `meta` table.
pub fn meta_set(conn: &Connection, key: &str, value: &[u8]) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// An `Nsat` as (whole msat, sub-msat remainder) columns.
pub fn nsat_to_columns(n: Nsat) -> Result<(i64, i64), StoreError> {
    let msat = i64::try_from(n.0 / NSAT_PER_MSAT).map_err(|_| StoreError::OutOfRange("nsat"))?;
    Ok((msat, (n.0 % NSAT_PER_MSAT) as i64))
}

/// The `Nsat` stored as (whole msat, sub-msat remainder) columns.
pub fn nsat_from_columns(msat: i64, rem_nsat: i64) -> Result<Nsat, StoreError> {
    let msat = u128::try_from(msat).map_err(|_| StoreError::Corrupt("negative msat".into()))?;
    let rem = u128::try_from(rem_nsat)
        .ok()
        .filter(|r| *r < NSAT_PER_MSAT)
        .ok_or_else(|| StoreError::Corrupt("sub-msat remainder out of range".into()))?;
    Ok(Nsat(msat * NSAT_PER_MSAT + rem))
}

/// An `Msat` as an i64 column.
pub fn msat_to_column(m: Msat) -> Result<i64, StoreError> {
    i64::try_from(m.0).map_err(|_| StoreError::OutOfRange("msat"))
}

/// The `Msat` stored in an i64 column.
pub fn msat_from_column(v: i64) -> Result<Msat, StoreError> {
    u64::try_from(v).map(Msat).map_err(|_| StoreError::Corrupt("negative msat".into()))
}

/// A u64 as an i64 column (sequence numbers, timestamps, prices).
pub fn u64_to_column(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange(what))
}

/// The u64 stored in an i64 column.
pub fn u64_from_column(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsat_columns_round_trip_and_refuse_garbage() {
        for n in [0u128, 1, 999_999, 1_000_000, 123_456_789_012_345] {
            let (m, r) = nsat_to_columns(Nsat(n)).unwrap();
            assert_eq!(nsat_from_columns(m, r).unwrap(), Nsat(n));
        }
        assert!(nsat_to_columns(Nsat(u128::MAX)).is_err());
        assert!(nsat_from_columns(-1, 0).is_err());
        assert!(nsat_from_columns(0, 1_000_000).is_err());
    }

    #[test]
    fn initialize_migrates_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        let conn = initialize(&path, Durability::Full).unwrap();
        meta_set(&conn, "k", b"v").unwrap();
        drop(conn);
        let conn = initialize(&path, Durability::Full).unwrap();
        assert_eq!(meta_get(&conn, "k").unwrap(), Some(b"v".to_vec()));
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "FULL");
        backup(&conn, &dir.path().join("copy.sqlite")).unwrap();
        let copy = initialize(&dir.path().join("copy.sqlite"), Durability::Full).unwrap();
        assert_eq!(meta_get(&copy, "k").unwrap(), Some(b"v".to_vec()));
    }
}
