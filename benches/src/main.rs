//! `tribute-bench`: metering throughput and latency of `tributed` over real gRPC on
//! loopback with durable commits (SQLite WAL, `synchronous=FULL`), measured beside its two
//! ceilings on the same machine in the same run: an empty gRPC call (same server, same
//! connections, same concurrency) and the raw SQLite rate of the same rows in batches of
//! the same size. Method and figures: docs/PERFORMANCE.md, "Metering (tributed over gRPC)".
//!
//! `cargo run --release -p tribute-bench -- [--quick]`; `-- --knn` instead measures the
//! KNN-Shapley valuator (docs/PERFORMANCE.md, "KNN-Shapley valuator"); `-- --overload`
//! load shedding at 10× the sustainable rate (docs/PERFORMANCE.md, "Overload"); `--
//! --id-index N` how long the ledger's request-id index stalls an insert as it grows.

mod cpu;
mod id_index;
mod knn;
mod ln;
mod load;
mod overload;
mod setup;
mod sqlite;

use clap::Parser;
use load::Call;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// mimalloc: markedly cheaper than the system allocator for the many small, short-lived
/// allocations of each gRPC call (measured in docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Why the bench could not run (or found the daemon misbehaving).
pub struct BenchError(String);

impl BenchError {
    /// An error with a message.
    pub fn msg(m: impl Into<String>) -> Self {
        BenchError(m.into())
    }
}

impl fmt::Debug for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "Benchmark tributed metering over gRPC on loopback (durability FULL).")]
struct Args {
    /// Short phases (the whole run under ~30 s); figures are noisier.
    #[arg(long)]
    quick: bool,
    /// Worker threads of the daemon's tokio runtime.
    #[arg(long, default_value_t = 2)]
    daemon_workers: usize,
    /// Worker threads of the client's tokio runtime.
    #[arg(long, default_value_t = 2)]
    client_workers: usize,
    /// HTTP/2 connections the callers of a phase share (caller k uses connection k mod n).
    /// The default is the provider SDK's pool (`provider.connections`). One connection
    /// caps the empty RPC well below what several reach (docs/PERFORMANCE.md).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent MeterStream calls.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Parent directory of the run's temporary data (daemon database and the SQLite
    /// ceilings); the system temp directory by default. The disk's fsync latency is what
    /// the durable figures depend on; a tmpfs here measures the CPU side only.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// The daemon's `meter.stream_interval_ms` (how often dirty channel heads are signed);
    /// the daemon's default when not given.
    #[arg(long)]
    stream_interval_ms: Option<u64>,
    /// Instead: the per-request Lightning model (keysend per request between two ldk-node
    /// nodes on the dev chain) against Tribute's metering, and a 100-payout settlement round.
    #[arg(long)]
    lightning: bool,
    /// Instead: the KNN-Shapley valuator on synthetic float32 embeddings (no daemon).
    #[arg(long)]
    knn: bool,
    /// Instead: insert this many request ids into the ledger's request-id index, and into
    /// one unsharded table of the same entry size, and report the longest single insert
    /// (a table that grows rehashes everything at once, under the writer's lock).
    #[arg(long)]
    id_index: Option<u64>,
    /// `--knn`: training points.
    #[arg(long, default_value_t = 100_000)]
    knn_train: usize,
    /// `--knn`: test points.
    #[arg(long, default_value_t = 1_000)]
    knn_test: usize,
    /// `--knn`: embedding dimensions.
    #[arg(long, default_value_t = 128)]
    knn_dim: usize,
    /// `--knn`: K.
    #[arg(long, default_value_t = 5)]
    knn_k: usize,
    /// `--knn`: datasets the training points are spread over.
    #[arg(long, default_value_t = 100)]
    knn_datasets: usize,
    /// `--knn`: thread counts to run with, in order (0: all cores).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 1])]
    knn_threads: Vec<usize>,
    /// Skip the MeterStream phase (for profiling one phase).
    #[arg(long)]
    no_stream: bool,
    /// Skip the SQLite ceilings (for profiling).
    #[arg(long)]
    no_sqlite: bool,
    /// Instead: open-loop load at the sustainable rate R, then at 10 × R while settlement
    /// rounds run — admitted latency, shedding, memory, settlement (docs/PERFORMANCE.md,
    /// "Overload").
    #[arg(long)]
    overload: bool,
    /// `--overload`: the sustainable rate R in requests/s (default: 0.7 × the closed-loop
    /// Meter throughput at concurrency 64, measured first).
    #[arg(long)]
    overload_rate: Option<f64>,
    /// `--overload`: the overload factor.
    #[arg(long, default_value_t = 10.0)]
    overload_factor: f64,
    /// `--overload`: most calls the open-loop generator keeps outstanding (past it a
    /// scheduled request is counted as not sent). The default is about what the daemon
    /// takes over 4 connections (4 × 200 HTTP/2 streams); more only queues in the client.
    #[arg(long, default_value_t = 1024)]
    overload_outstanding: u64,
    /// The daemon's `meter.max_in_flight` (admission bound); the daemon's default when not
    /// given.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Concurrency levels of the unary phases (`0` alone: skip them).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 64])]
    concurrency: Vec<usize>,
}

/// Phase lengths.
struct Timing {
    /// Alternations of the empty RPC and `Meter` per concurrency (each gets 1/rounds of
    /// its phase time, after its own warm-up).
    rounds: usize,
    warmup: Duration,
    meter: Duration,
    empty: Duration,
    stream: Duration,
    sqlite: Duration,
}

impl Timing {
    fn new(quick: bool) -> Self {
        if quick {
            Timing {
                rounds: 1,
                warmup: Duration::from_millis(300),
                meter: Duration::from_secs(2),
                empty: Duration::from_millis(1500),
                stream: Duration::from_secs(3),
                sqlite: Duration::from_secs(1),
            }
        } else {
            Timing {
                rounds: 3,
                warmup: Duration::from_secs(1),
                meter: Duration::from_secs(10),
                empty: Duration::from_secs(6),
                stream: Duration::from_secs(12),
                sqlite: Duration::from_secs(3),
            }
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// (last batch seq, last event seq) of the daemon's database: batch sizes per phase.
fn ledger_position(db: &Path) -> Result<(i64, i64), BenchError> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| BenchError::msg(e.to_string()))?;
    let q = |sql: &str| -> Result<i64, BenchError> {
        conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.unwrap_or(0))
            .map_err(|e| BenchError::msg(e.to_string()))
    };
    Ok((q("SELECT MAX(batch_seq) FROM receipt_batches")?, q("SELECT MAX(seq) FROM meter_events")?))
}

fn mean_batch(before: (i64, i64), after: (i64, i64)) -> f64 {
    let batches = (after.0 - before.0).max(1);
    (after.1 - before.1) as f64 / batches as f64
}

struct UnaryRow {
    concurrency: usize,
    meter: load::Unary,
    empty: load::Unary,
    batch: f64,
    load: String,
}

struct StreamRow {
    stream: load::Stream,
    batch: f64,
    load: String,
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn check_errors(what: &str, errors: u64, first: &Option<String>) -> Result<(), BenchError> {
    if errors > 0 {
        return Err(BenchError::msg(format!(
            "{what}: {errors} calls failed, first: {}",
            first.as_deref().unwrap_or("?")
        )));
    }
    Ok(())
}

fn main() -> Result<(), BenchError> {
    let args = Args::parse();
    let timing = Timing::new(args.quick);
    if let Some(n) = args.id_index {
        id_index::run(n);
        return Ok(());
    }
    if args.knn {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        return knn::run(&knn::KnnBench {
            train: args.knn_train,
            test: args.knn_test,
            dim: args.knn_dim,
            k: args.knn_k,
            datasets: args.knn_datasets,
            threads: args.knn_threads.iter().map(|t| if *t == 0 { cpus } else { *t }).collect(),
        });
    }
    let dir = match &args.data_dir {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    }
    .map_err(|e| BenchError::msg(e.to_string()))?;
    if args.overload {
        return overload::run(
            dir.path(),
            &overload::OverloadArgs {
                quick: args.quick,
                connections: args.connections,
                rate: args.overload_rate,
                factor: args.overload_factor,
                daemon_workers: args.daemon_workers,
                client_workers: args.client_workers,
                max_in_flight: args.max_in_flight,
                max_outstanding: args.overload_outstanding,
            },
        );
    }
    if args.lightning {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::msg(e.to_string()))?;
        return rt.block_on(ln::run(dir.path(), args.quick));
    }
    let data_dir = dir.path().join("daemon");
    let db = tribute_daemon::server::database_path(&data_dir);

    let (daemon_rt, client_rt) = setup::runtimes(args.daemon_workers, args.client_workers)?;

    let mut config = setup::config(&data_dir);
    if let Some(ms) = args.stream_interval_ms {
        config.meter.stream_interval_ms = ms;
    }
    if let Some(m) = args.max_in_flight {
        config.meter.max_in_flight = m;
    }
    let stream_interval_ms = config.meter.stream_interval_ms;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "tribute-bench: {} run, {cpus} CPUs, daemon runtime {} workers + ledger thread, client \
         runtime {} workers, {} connection(s), {} stream(s), heads signed every {stream_interval_ms} ms, \
         meter.max_in_flight {}, data in {}; load average {}",
        if args.quick { "quick" } else { "full" },
        args.daemon_workers,
        args.client_workers,
        args.connections,
        args.streams,
        config.meter.max_in_flight,
        dir.path().display(),
        load_average()
    );

    let daemon = daemon_rt.block_on(setup::start(config))?;
    let addr = daemon.running.grpc_addr;
    let bearer = setup::Bearer::new(&daemon.provider_token)?;
    let (unary_rows, stream_row, acknowledged) = client_rt.block_on(async {
        let setup_start = std::time::Instant::now();
        setup::register(setup::connect(addr).await?, &daemon).await?;
        println!(
            "registered {} contributors, licences, model and training run in {:.1} s",
            setup::CONTRIBUTORS,
            setup_start.elapsed().as_secs_f64()
        );
        let mut channels = Vec::with_capacity(args.connections.max(1));
        for _ in 0..args.connections.max(1) {
            channels.push(setup::connect(addr).await?);
        }
        let mut acknowledged = 0u64;
        let mut rows = Vec::new();
        for &c in args.concurrency.iter().filter(|c| **c > 0) {
            let load = load_average();
            // The empty RPC and Meter alternate `rounds` times, so a drift of the machine's
            // speed during the phase (15–25% within minutes here) weighs on both alike.
            let before = ledger_position(&db)?;
            let mut phases: Option<(load::Unary, load::Unary)> = None;
            let mut ratios = Vec::with_capacity(timing.rounds);
            for round in 0..timing.rounds {
                let part = |d: Duration| d / timing.rounds as u32;
                let empty = load::unary(
                    Call::Empty,
                    &channels,
                    &bearer,
                    "",
                    c,
                    timing.warmup,
                    part(timing.empty),
                )
                .await?;
                check_errors("empty RPC", empty.errors, &empty.first_error)?;
                let meter = load::unary(
                    Call::Meter,
                    &channels,
                    &bearer,
                    &format!("c{c}r{round}"),
                    c,
                    timing.warmup,
                    part(timing.meter),
                )
                .await?;
                check_errors("Meter", meter.errors, &meter.first_error)?;
                ratios.push(format!("{:.2}", meter.rate() / empty.rate()));
                phases = Some(match phases {
                    None => (empty, meter),
                    Some((e, m)) => (e.merge(empty)?, m.merge(meter)?),
                });
            }
            let Some((empty, meter)) = phases else { continue };
            acknowledged += meter.acknowledged;
            let batch = mean_batch(before, ledger_position(&db)?);
            if timing.rounds > 1 {
                println!("concurrency {c:>3}: Meter ÷ empty RPC by round: {}", ratios.join(" "));
            }
            println!(
                "concurrency {c:>3}: Meter {:>8.0}/s p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms \
                 (mean batch {batch:.1}); empty RPC {:>8.0}/s p50 {:.2} ms p99 {:.2} ms; load {load}",
                meter.rate(),
                ms(&meter.latency_us, 0.5),
                ms(&meter.latency_us, 0.99),
                ms(&meter.latency_us, 0.999),
                empty.rate(),
                ms(&empty.latency_us, 0.5),
                ms(&empty.latency_us, 0.99),
            );
            println!("    CPU µs per call, Meter: {}", meter.cpu.per_request(meter.completed));
            println!("    CPU µs per call, empty RPC: {}", empty.cpu.per_request(empty.completed));
            rows.push(UnaryRow { concurrency: c, meter, empty, batch, load });
        }
        if args.no_stream {
            return Ok::<_, BenchError>((rows, None, acknowledged));
        }
        // MeterStream: a short warm-up stream, then the measured one.
        let warm = load::stream(&channels, &bearer, "sw", args.streams, timing.warmup).await?;
        check_errors("MeterStream warm-up", warm.errors, &warm.first_error)?;
        acknowledged += warm.completed;
        let load = load_average();
        let before = ledger_position(&db)?;
        let stream = load::stream(&channels, &bearer, "s", args.streams, timing.stream).await?;
        check_errors("MeterStream", stream.errors, &stream.first_error)?;
        acknowledged += stream.completed;
        let batch = mean_batch(before, ledger_position(&db)?);
        println!(
            "MeterStream x{}: {:>8.0}/s ({} requests in {:.2} s, mean batch {batch:.0}); load {load}",
            args.streams,
            stream.rate(),
            stream.completed,
            stream.elapsed.as_secs_f64()
        );
        println!("    CPU µs per request: {}", stream.cpu.per_request(stream.completed));
        Ok((rows, Some(StreamRow { stream, batch, load }), acknowledged))
    })?;
    daemon_rt
        .block_on(daemon.running.shutdown())
        .map_err(|e| BenchError::msg(format!("daemon shutdown: {e}")))?;
    drop(client_rt);
    drop(daemon_rt);
    verify_ledger(&db, acknowledged)?;

    // The SQLite ceilings, with the daemon stopped: one row per transaction, and each batch
    // size the daemon actually formed above.
    let mut sizes: Vec<usize> = vec![1];
    sizes.extend(unary_rows.iter().map(|r| r.batch.round().max(1.0) as usize));
    sizes.extend(stream_row.iter().map(|r| r.batch.round().max(1.0) as usize));
    if args.no_sqlite {
        sizes.clear();
    }
    sizes.sort_unstable();
    sizes.dedup();
    let raw_dir = dir.path().join("raw");
    std::fs::create_dir_all(&raw_dir).map_err(|e| BenchError::msg(e.to_string()))?;
    let mut raws = Vec::new();
    for b in sizes {
        let load = load_average();
        let r = sqlite::raw_insert(&raw_dir, b, timing.sqlite)?;
        let shaped =
            sqlite::writer_shaped(&raw_dir, b, setup::CONTRIBUTORS as usize, timing.sqlite)?;
        println!(
            "raw SQLite, {b:>5} rows/transaction: {:>9.0} rows/s ({} transactions); \
             writer-shaped (+ batch row with leaves and {} channel accruals): {:>9.0} rows/s; load {load}",
            r.rate(),
            r.transactions,
            setup::CONTRIBUTORS,
            shaped.rate(),
        );
        raws.push((r, shaped, load));
    }
    report(&unary_rows, stream_row.as_ref(), &raws, &args);
    Ok(())
}

/// (Σ pools, Σ accrued) over the ledger, in nsat.
fn conservation(db: &Path) -> Result<(u128, u128), BenchError> {
    let conn = rusqlite::Connection::open(db).map_err(|e| BenchError::msg(e.to_string()))?;
    let e = |e: rusqlite::Error| BenchError::msg(e.to_string());
    let pools: i64 = conn
        .query_row("SELECT COALESCE(SUM(pool_nsat), 0) FROM meter_events", [], |r| r.get(0))
        .map_err(e)?;
    let mut stmt =
        conn.prepare("SELECT accrued_msat, accrued_rem_nsat FROM channels").map_err(e)?;
    let accrued: u128 = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(e)?
        .map(|r| r.map(|(m, rem)| m as u128 * 1_000_000 + rem as u128))
        .sum::<Result<u128, _>>()
        .map_err(e)?;
    Ok((pools as u128, accrued))
}

/// Every acknowledged request is in the log, and `Σ accrued == Σ pools` to the nsat.
fn verify_ledger(db: &Path, acknowledged: u64) -> Result<(), BenchError> {
    let conn = rusqlite::Connection::open(db).map_err(|e| BenchError::msg(e.to_string()))?;
    let events: i64 = conn
        .query_row("SELECT COUNT(*) FROM meter_events", [], |r| r.get(0))
        .map_err(|e| BenchError::msg(e.to_string()))?;
    let (pools, accrued) = conservation(db)?;
    if events as u64 != acknowledged || accrued != pools {
        return Err(BenchError::msg(format!(
            "ledger check failed: {events} events for {acknowledged} acknowledged requests; \
             accrued {accrued} nsat vs pools {pools} nsat"
        )));
    }
    println!(
        "ledger check: {events} events == {acknowledged} acknowledged requests; \
         Σ accrued == Σ pools == {pools} nsat"
    );
    Ok(())
}

fn raw_for(raws: &[Ceiling], batch: f64) -> Option<&Ceiling> {
    let b = batch.round().max(1.0) as usize;
    raws.iter().find(|c| c.0.batch == b)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// A SQLite ceiling: events only, writer-shaped, load average.
type Ceiling = (sqlite::Raw, sqlite::Raw, String);

fn report(unary: &[UnaryRow], stream: Option<&StreamRow>, raws: &[Ceiling], args: &Args) {
    let ceilings = |batch: f64, rate: f64| -> [String; 4] {
        match raw_for(raws, batch) {
            Some((events, shaped, _)) => [
                format!("{:.0}", events.rate()),
                format!("{:.2}", rate / events.rate()),
                format!("{:.0}", shaped.rate()),
                format!("{:.2}", rate / shaped.rate()),
            ],
            None => ["–".into(), "–".into(), "–".into(), "–".into()],
        }
    };
    println!();
    println!(
        "| measurement | req/s | p50 ms | p99 ms | p99.9 ms | mean batch | empty RPC req/s (p50, p99 ms) | ÷ empty RPC | SQLite events rows/s | ÷ | SQLite writer-shaped rows/s | ÷ | load avg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in unary {
        let [e, er, w, wr] = ceilings(r.batch, r.meter.rate());
        println!(
            "| Meter, concurrency {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} ({:.2}, {:.2}) | {:.2} | {e} | {er} | {w} | {wr} | {} |",
            r.concurrency,
            r.meter.rate(),
            ms(&r.meter.latency_us, 0.5),
            ms(&r.meter.latency_us, 0.99),
            ms(&r.meter.latency_us, 0.999),
            r.batch,
            r.empty.rate(),
            ms(&r.empty.latency_us, 0.5),
            ms(&r.empty.latency_us, 0.99),
            r.meter.rate() / r.empty.rate(),
            r.load
        );
    }
    if let Some(stream) = stream {
        let [e, er, w, wr] = ceilings(stream.batch, stream.stream.rate());
        println!(
            "| MeterStream, {} stream(s) | {:.0} | – | – | – | {:.0} | – | – | {e} | {er} | {w} | {wr} | {} |",
            args.streams,
            stream.stream.rate(),
            stream.batch,
            stream.load
        );
    }
    for (events, shaped, load) in raws {
        println!(
            "| SQLite alone, {} rows/transaction | – | – | – | – | {} | – | – | {:.0} | – | {:.0} | – | {} |",
            events.batch,
            events.batch,
            events.rate(),
            shaped.rate(),
            load
        );
    }
    println!();
    let one_row = raws.iter().map(|(r, _, _)| r).find(|r| r.batch == 1);
    if let Some(stream) = stream {
        let rate = stream.stream.rate();
        let ok = rate >= 100_000.0 && one_row.is_none_or(|r| rate > r.rate());
        println!(
            "target MeterStream >= 100,000/s and above one-row-per-transaction SQLite ({}): {rate:.0}/s — {}",
            one_row.map_or("–".into(), |r| format!("{:.0}/s", r.rate())),
            verdict(ok)
        );
    }
    if let Some(r) = unary.iter().find(|r| r.concurrency == 64) {
        let rate = r.meter.rate();
        let p99 = ms(&r.meter.latency_us, 0.99);
        let half = rate >= 0.5 * r.empty.rate();
        println!(
            "target Meter at 64 >= 30,000/s, p99 <= 10 ms, >= 1/2 empty RPC: {rate:.0}/s, p99 {p99:.2} ms, {:.2} of empty — {}",
            rate / r.empty.rate(),
            verdict(rate >= 30_000.0 && p99 <= 10.0 && half)
        );
    }
    if let Some(r) = unary.iter().find(|r| r.concurrency == 1) {
        let p99 = ms(&r.meter.latency_us, 0.99);
        println!("target Meter at 1, p99 <= 3 ms: p99 {p99:.2} ms — {}", verdict(p99 <= 3.0));
    }
}
