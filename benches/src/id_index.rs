//! `--id-index N`: the ledger's request-id index against one unsharded hash table of the
//! same entry size, filled with N ids. A hash table that grows rehashes every entry into a
//! table twice the size in one insert; the writer does that holding the index lock, so every
//! `Meter` waits for it. Reports the longest single insert and the inserts over 1 ms of each.
//! Method and figures: docs/PERFORMANCE.md, "2026-11-30, later" (the request-id index).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};
use tribute_daemon::ledger::IdIndex;

/// Longest insert, inserts over 1 ms, the whole fill, and the table bytes at the end.
struct Fill {
    longest: Duration,
    over_1ms: usize,
    total: Duration,
    bytes: usize,
}

fn fill(n: u64, mut insert: impl FnMut(&str, u64)) -> Fill {
    let mut out = Fill { longest: Duration::ZERO, over_1ms: 0, total: Duration::ZERO, bytes: 0 };
    let mut id = String::new();
    let start = Instant::now();
    for seq in 1..=n {
        id.clear();
        id.push_str("bench-");
        id.push_str(&seq.to_string());
        let t = Instant::now();
        insert(&id, seq);
        let took = t.elapsed();
        out.longest = out.longest.max(took);
        out.over_1ms += usize::from(took > Duration::from_millis(1));
    }
    out.total = start.elapsed();
    out
}

fn report(what: &str, n: u64, f: &Fill) {
    println!(
        "{what:>28}: {n} ids in {:.2} s ({:.0} ns/insert); longest insert {:.2} ms; inserts over 1 ms: {}; tables {:.1} bytes/id",
        f.total.as_secs_f64(),
        f.total.as_nanos() as f64 / n as f64,
        f.longest.as_secs_f64() * 1e3,
        f.over_1ms,
        f.bytes as f64 / n as f64
    );
}

/// Runs both fills and prints them.
pub fn run(n: u64) {
    let mut index = IdIndex::new();
    let mut sharded = fill(n, |id, seq| index.insert(id, seq));
    sharded.bytes = index.table_bytes();
    drop(index);
    // The index before it was sharded: one table of 64-bit id hash → 24-byte entry.
    let hasher = foldhash::quality::RandomState::default();
    let mut one: HashMap<u64, [u64; 3], foldhash::fast::RandomState> = HashMap::default();
    let mut single = fill(n, |id, seq| {
        one.insert(hasher.hash_one(id), [seq, 0, 0]);
    });
    // Slots (8/7 of the capacity at 7/8 load) of entry plus control byte.
    single.bytes = one.capacity() / 7 * 8 * (std::mem::size_of::<(u64, [u64; 3])>() + 1);
    report("IdIndex (now)", n, &sharded);
    report("one table (before)", n, &single);
}
