//! `--overload`: what the daemon does at 10× its sustainable rate (issue 7, item 5).
//!
//! 1. The sustainable rate R: the closed-loop `Meter` throughput at concurrency 64, × 0.7
//!    (or `--overload-rate`).
//! 2. Open loop at R: requests are issued on a schedule (one task per request, spawned per
//!    1 ms tick), whatever the answers do — so the offered load does not fall when the
//!    daemon slows down, unlike closed-loop callers. Admitted-request p50/p99 unloaded.
//! 3. Open loop at 10 × R, while the Lightning settlement engine (a scripted backend that
//!    pays at once) is asked for rounds back to back, and the process's resident memory is
//!    sampled: admitted rate and latency, shed count, rounds completed, RSS over time.
//!
//! Every answer must be a receipt or `RESOURCE_EXHAUSTED` + `OVERLOADED`; at the end the
//! ledger holds no shed request and every acknowledged one (`check_ledger`). The generator
//! bounds its own outstanding calls (`--overload-outstanding`): a call past the daemon's
//! HTTP/2 stream limit (hyper's 200 per connection) waits in the client for a stream, a
//! queue the daemon never sees and cannot shed; the bound turns that wait into requests
//! counted as not sent, and keeps the generator's memory bounded.

use crate::load::{self, Call};
use crate::setup::{self, meter_request, Authed, Bearer};
use crate::{ms, verdict, BenchError};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;
use tribute_daemon::lightning::{DynLightningBackend, ScriptedBackend};
use tribute_daemon::server::StartOptions;
use tribute_daemon::settlement::EngineOptions;
use tribute_proto::v1::metering_client::MeteringClient;
use tribute_proto::v1::ErrorReason;

/// The sustainable rate as a fraction of the closed-loop throughput.
const SUSTAINABLE_FRACTION: f64 = 0.7;
/// Latency shards (one lock per shard, chosen by request number).
const SHARDS: usize = 16;

/// The knobs of the overload bench.
pub struct OverloadArgs {
    /// Short phases.
    pub quick: bool,
    /// HTTP/2 connections.
    pub connections: usize,
    /// The sustainable rate, if given (else measured).
    pub rate: Option<f64>,
    /// Overload factor (10).
    pub factor: f64,
    /// Worker threads of the daemon's runtime.
    pub daemon_workers: usize,
    /// Worker threads of the client's runtime.
    pub client_workers: usize,
    /// The daemon's `meter.max_in_flight`, if given.
    pub max_in_flight: Option<usize>,
    /// Most calls the generator keeps outstanding; past it a scheduled request is counted
    /// as not sent.
    pub max_outstanding: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: valid bounds, so this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shared counters of one open-loop phase.
struct Tally {
    measure_from: Instant,
    admitted: AtomicU64,
    /// Admitted in the measurement window.
    admitted_measured: AtomicU64,
    shed: AtomicU64,
    shed_measured: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    outstanding: AtomicU64,
    /// Request numbers answered `OVERLOADED` (must leave no trace).
    shed_ids: Mutex<Vec<u64>>,
    /// Request numbers whose call failed otherwise (outcome unknown to the client).
    failed_ids: Mutex<Vec<u64>>,
    /// Admitted-request latency (from the call's start), µs, measured window.
    admitted_us: Vec<Mutex<Histogram<u64>>>,
    /// Time to the shedding answer, µs, measured window.
    shed_us: Vec<Mutex<Histogram<u64>>>,
    /// How late the generator started each call against its schedule, µs.
    lag_us: Vec<Mutex<Histogram<u64>>>,
}

/// What an open-loop phase measured.
pub struct OpenLoop {
    rate: f64,
    window: Duration,
    scheduled: u64,
    not_sent: u64,
    admitted: u64,
    shed: u64,
    errors: u64,
    first_error: Option<String>,
    admitted_us: Histogram<u64>,
    shed_us: Histogram<u64>,
    lag_us: Histogram<u64>,
    /// Every request acknowledged, warm-up included (for the ledger check).
    acknowledged: u64,
    /// The ids of every request shed, warm-up included.
    shed_ids: Vec<String>,
    /// The ids of every request that failed otherwise.
    failed_ids: Vec<String>,
}

impl OpenLoop {
    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.window.as_secs_f64()
    }
}

fn merge(shards: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
    let mut h = histogram();
    for s in shards {
        // Same bounds everywhere: adding cannot fail.
        let _ = h.add(&*lock(s));
    }
    h
}

/// Requests at `rate`/s on a fixed schedule for `warmup + measure` (one task per request,
/// whatever the earlier ones are doing); the window counts requests scheduled after the
/// warm-up. Waits for every call to end.
async fn open_loop(
    channels: &[Channel],
    bearer: &Bearer,
    prefix: &str,
    rate: f64,
    max_outstanding: u64,
    warmup: Duration,
    measure: Duration,
) -> Result<OpenLoop, BenchError> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let shards = || (0..SHARDS).map(|_| Mutex::new(histogram())).collect::<Vec<_>>();
    let tally = Arc::new(Tally {
        measure_from,
        admitted: AtomicU64::new(0),
        admitted_measured: AtomicU64::new(0),
        shed: AtomicU64::new(0),
        shed_measured: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        outstanding: AtomicU64::new(0),
        shed_ids: Mutex::new(Vec::new()),
        failed_ids: Mutex::new(Vec::new()),
        admitted_us: shards(),
        shed_us: shards(),
        lag_us: shards(),
    });
    let clients: Vec<MeteringClient<Authed>> = channels
        .iter()
        .map(|c| MeteringClient::new(Authed::new(c.clone(), bearer.clone())))
        .collect();
    let prefix: Arc<str> = Arc::from(prefix);
    let tick = Duration::from_millis(1);
    let mut next = start;
    let mut sent = 0u64;
    let mut scheduled_measured = 0u64;
    let mut not_sent = 0u64;
    while next < end {
        tokio::time::sleep_until(next).await;
        next += tick;
        let now = Instant::now().min(end);
        let due = ((now - start).as_secs_f64() * rate) as u64;
        while sent < due {
            let i = sent;
            sent += 1;
            // When request i was due.
            let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
            let measured = scheduled >= measure_from;
            scheduled_measured += u64::from(measured);
            if tally.outstanding.load(Ordering::Relaxed) >= max_outstanding {
                not_sent += u64::from(measured);
                continue;
            }
            tally.outstanding.fetch_add(1, Ordering::Relaxed);
            let mut client = clients[(i as usize) % clients.len()].clone();
            let tally = tally.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let shard = (i as usize) % SHARDS;
                let result = client.meter(meter_request(&prefix, 0, i)).await;
                let took = (Instant::now() - t0).as_micros() as u64;
                let measured = scheduled >= tally.measure_from;
                if measured {
                    let lag = (t0 - scheduled).as_micros() as u64;
                    lock(&tally.lag_us[shard]).saturating_record(lag);
                }
                match result {
                    Ok(_) => {
                        tally.admitted.fetch_add(1, Ordering::Relaxed);
                        if measured {
                            tally.admitted_measured.fetch_add(1, Ordering::Relaxed);
                            lock(&tally.admitted_us[shard]).saturating_record(took);
                        }
                    }
                    Err(s)
                        if s.code() == tonic::Code::ResourceExhausted
                            && tribute_proto::error_reason(&s) == Some(ErrorReason::Overloaded) =>
                    {
                        tally.shed.fetch_add(1, Ordering::Relaxed);
                        lock(&tally.shed_ids).push(i);
                        if measured {
                            tally.shed_measured.fetch_add(1, Ordering::Relaxed);
                            lock(&tally.shed_us[shard]).saturating_record(took);
                        }
                    }
                    Err(s) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        lock(&tally.failed_ids).push(i);
                        lock(&tally.first_error).get_or_insert_with(|| s.to_string());
                    }
                }
                tally.outstanding.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    // Every call started must end (a shed one at once, an admitted one when durable).
    let drain_until = Instant::now() + Duration::from_secs(60);
    while tally.outstanding.load(Ordering::Relaxed) > 0 {
        if Instant::now() > drain_until {
            return Err(BenchError::msg(format!(
                "{} calls still outstanding 60 s after the phase",
                tally.outstanding.load(Ordering::Relaxed)
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_error = lock(&tally.first_error).clone();
    let ids = |v: &Mutex<Vec<u64>>| -> Vec<String> {
        lock(v).iter().map(|i| meter_request(&prefix, 0, *i).request_id).collect()
    };
    let shed_ids = ids(&tally.shed_ids);
    let failed_ids = ids(&tally.failed_ids);
    Ok(OpenLoop {
        shed_ids,
        failed_ids,
        rate,
        window: measure,
        scheduled: scheduled_measured,
        not_sent,
        admitted: tally.admitted_measured.load(Ordering::Relaxed),
        shed: tally.shed_measured.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        first_error,
        admitted_us: merge(&tally.admitted_us),
        shed_us: merge(&tally.shed_us),
        lag_us: merge(&tally.lag_us),
        acknowledged: tally.admitted.load(Ordering::Relaxed),
    })
}

/// Resident memory of this process (daemon and generator), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Samples RSS every `every` until `stop`; (seconds since start, KiB).
fn sample_rss(stop: Arc<AtomicBool>, every: Duration) -> std::thread::JoinHandle<Vec<(f64, u64)>> {
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            out.push((start.elapsed().as_secs_f64(), rss_kib()));
            std::thread::sleep(every);
        }
        out
    })
}

fn describe(name: &str, r: &OpenLoop, max_outstanding: u64) {
    println!(
        "{name}: offered {:.0}/s for {:.0} s — sent {:.0}/s ({} not sent: generator at its \
         {max_outstanding} outstanding), admitted {:.0}/s, shed {} ({:.0}/s, {:.1}%), other errors {}",
        r.rate,
        r.window.as_secs_f64(),
        r.per_sec(r.scheduled - r.not_sent),
        r.not_sent,
        r.per_sec(r.admitted),
        r.shed,
        r.per_sec(r.shed),
        100.0 * r.shed as f64 / r.scheduled.max(1) as f64,
        r.errors,
    );
    println!(
        "    admitted p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms; shed answered in p50 {:.2} ms \
         p99 {:.2} ms; generator lag p99 {:.2} ms",
        ms(&r.admitted_us, 0.5),
        ms(&r.admitted_us, 0.99),
        ms(&r.admitted_us, 0.999),
        r.admitted_us.max() as f64 / 1000.0,
        ms(&r.shed_us, 0.5),
        ms(&r.shed_us, 0.99),
        ms(&r.lag_us, 0.99),
    );
}

fn settled(db: &std::path::Path) -> Result<(i64, i64), BenchError> {
    let conn = rusqlite::Connection::open(db).map_err(|e| BenchError::msg(e.to_string()))?;
    conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(amount_msat), 0) FROM settlements WHERE status = 'succeeded'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .map_err(|e| BenchError::msg(e.to_string()))
}

/// After the run: no shed request is in the ledger; every acknowledged one is (the count of
/// stored events is the acknowledged ones plus, at most, calls whose answer was lost);
/// `Σ accrued == Σ pools`.
fn check_ledger(
    db: &std::path::Path,
    acknowledged: u64,
    phases: &[&OpenLoop],
) -> Result<(), BenchError> {
    let e = |e: rusqlite::Error| BenchError::msg(e.to_string());
    let conn = rusqlite::Connection::open(db).map_err(e)?;
    let mut stmt = conn.prepare("SELECT request_id FROM meter_events").map_err(e)?;
    let stored: std::collections::HashSet<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(e)?
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let shed: Vec<&String> = phases.iter().flat_map(|p| &p.shed_ids).collect();
    let traces = shed.iter().filter(|id| stored.contains(**id)).count();
    let failed: Vec<&String> = phases.iter().flat_map(|p| &p.failed_ids).collect();
    let failed_stored = failed.iter().filter(|id| stored.contains(**id)).count() as u64;
    let events = stored.len() as u64;
    println!(
        "ledger check: {events} events = {acknowledged} acknowledged + {failed_stored} of the \
         {} calls that failed without an answer; {} shed requests, {traces} of them in the ledger",
        failed.len(),
        shed.len()
    );
    if traces > 0 || events != acknowledged + failed_stored {
        return Err(BenchError::msg("ledger check failed"));
    }
    let (pools, accrued) = crate::conservation(db)?;
    println!("ledger check: Σ accrued == Σ pools == {pools} nsat: {}", accrued == pools);
    if accrued != pools {
        return Err(BenchError::msg("ledger check failed: Σ accrued != Σ pools"));
    }
    Ok(())
}

/// Runs the overload bench in `dir`.
pub fn run(dir: &std::path::Path, args: &OverloadArgs) -> Result<(), BenchError> {
    let data_dir = dir.join("daemon");
    let db = tribute_daemon::server::database_path(&data_dir);
    let (daemon_rt, client_rt) = setup::runtimes(args.daemon_workers, args.client_workers)?;

    let mut config = setup::config(&data_dir);
    if let Some(m) = args.max_in_flight {
        config.meter.max_in_flight = m;
    }
    // Rounds only when asked (back to back during the overload), every channel owed ≥ 1 msat.
    config.settlement.settle_every_secs = 86_400;
    config.settlement.settle_threshold_msat = u64::MAX / 4;
    config.settlement.max_outstanding_msat = u64::MAX / 4;
    config.settlement.min_payout_msat = 1;
    let max_in_flight = config.meter.max_in_flight;
    let backend = Arc::new(ScriptedBackend::new());
    let options = StartOptions {
        lightning: Some(backend.clone() as DynLightningBackend),
        settlement: EngineOptions {
            tick: Duration::from_millis(50),
            poll_interval: Duration::from_millis(10),
            ..EngineOptions::default()
        },
    };
    let (warmup, calibrate, unloaded, overloaded) = if args.quick {
        (
            Duration::from_millis(500),
            Duration::from_secs(3),
            Duration::from_secs(4),
            Duration::from_secs(9),
        )
    } else {
        (
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(15),
            Duration::from_secs(30),
        )
    };
    println!(
        "tribute-bench --overload: {} run, {} CPUs, meter.max_in_flight {max_in_flight}, \
         {} connection(s), scripted Lightning backend; load average {}",
        if args.quick { "quick" } else { "full" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        args.connections,
        crate::load_average()
    );
    let daemon = daemon_rt.block_on(setup::start_with(config, options))?;
    let settlement = daemon.running.settlement.clone();
    let addr = daemon.running.grpc_addr;
    let bearer = Bearer::new(&daemon.provider_token)?;
    let report = client_rt.block_on(async {
        setup::register(setup::connect(addr).await?, &daemon).await?;
        let mut channels = Vec::new();
        for _ in 0..args.connections.max(1) {
            channels.push(setup::connect(addr).await?);
        }
        let mut acknowledged = 0u64;

        // 1. The sustainable rate.
        let rate = match args.rate {
            Some(r) => {
                println!("sustainable rate R = {r:.0}/s (given)");
                r
            }
            None => {
                let closed =
                    load::unary(Call::Meter, &channels, &bearer, "cal", 64, warmup, calibrate)
                        .await?;
                crate::check_errors("closed-loop Meter", closed.errors, &closed.first_error)?;
                acknowledged += closed.acknowledged;
                let r = (closed.rate() * SUSTAINABLE_FRACTION).round();
                println!(
                    "closed loop, concurrency 64: {:.0}/s p99 {:.2} ms → sustainable rate R = \
                     {SUSTAINABLE_FRACTION} × that = {r:.0}/s; load {}",
                    closed.rate(),
                    ms(&closed.latency_us, 0.99),
                    crate::load_average()
                );
                r
            }
        };

        // 2. Open loop at R.
        let base =
            open_loop(&channels, &bearer, "x1", rate, args.max_outstanding, warmup, unloaded)
                .await?;
        acknowledged += base.acknowledged;
        describe(
            &format!("open loop at R ({})", crate::load_average()),
            &base,
            args.max_outstanding,
        );

        // 3. Open loop at factor × R, with settlement rounds back to back and RSS sampled.
        let stop = Arc::new(AtomicBool::new(false));
        let rss = sample_rss(stop.clone(), Duration::from_millis(250));
        let settled_before = settled(&db)?;
        let rounds_stop = stop.clone();
        let rounds = tokio::spawn(async move {
            let mut took = Vec::new();
            // Let the overload build up first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            while !rounds_stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                settlement.settle_now_and_wait().await;
                took.push(t0.elapsed());
                // Never a tight loop, should the engine not be running.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            took
        });
        let over = open_loop(
            &channels,
            &bearer,
            "x10",
            rate * args.factor,
            args.max_outstanding,
            warmup,
            overloaded,
        )
        .await?;
        acknowledged += over.acknowledged;
        stop.store(true, Ordering::Relaxed);
        let rounds = rounds.await.map_err(|e| BenchError::msg(e.to_string()))?;
        let rss = rss.join().map_err(|_| BenchError::msg("RSS sampler panicked"))?;
        let settled_after = settled(&db)?;
        describe(
            &format!("open loop at {} × R ({})", args.factor, crate::load_average()),
            &over,
            args.max_outstanding,
        );
        Ok::<_, BenchError>((
            rate,
            base,
            over,
            rounds,
            rss,
            settled_after.0 - settled_before.0,
            acknowledged,
        ))
    })?;
    let (rate, base, over, rounds, rss, payouts, acknowledged) = report;
    daemon_rt
        .block_on(daemon.running.shutdown())
        .map_err(|e| BenchError::msg(format!("daemon shutdown: {e}")))?;
    drop(client_rt);
    drop(daemon_rt);
    let ledger = check_ledger(&db, acknowledged, &[&base, &over]);

    // RSS: thirds of the overload phase (the sampler ran over warm-up and measurement).
    let third = rss.len() / 3;
    let max_of = |s: &[(f64, u64)]| s.iter().map(|x| x.1).max().unwrap_or(0);
    let (first, middle, last) =
        (max_of(&rss[..third]), max_of(&rss[third..2 * third]), max_of(&rss[2 * third..]));
    let series: Vec<String> = rss
        .iter()
        .step_by((rss.len() / 12).max(1))
        .map(|(t, k)| format!("{t:.0}s {:.0}", *k as f64 / 1024.0))
        .collect();
    println!("RSS (MiB) during the overload: {}", series.join(", "));
    let durations: Vec<String> =
        rounds.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).collect();
    println!(
        "settlement during the overload: {} rounds completed ({} payouts), durations ms: [{}]",
        rounds.len(),
        payouts,
        durations.join(", ")
    );

    println!();
    let target_rate = rate * args.factor;
    let sent_rate = over.per_sec(over.scheduled - over.not_sent);
    println!(
        "target offered load {}× R = {target_rate:.0}/s reached: sent {sent_rate:.0}/s = {:.1}× R — {}",
        args.factor,
        sent_rate / rate,
        verdict(sent_rate >= 0.95 * target_rate)
    );
    let only_shed = over.errors == 0 && base.errors == 0 && over.shed > 0;
    println!(
        "target every call answered with a receipt or RESOURCE_EXHAUSTED/OVERLOADED: {} shed at R ({:.2}%), {} shed at {}× R, {} other errors{} — {}",
        base.shed,
        100.0 * base.shed as f64 / base.scheduled.max(1) as f64,
        over.shed,
        args.factor,
        over.errors + base.errors,
        over.first_error
            .as_ref()
            .or(base.first_error.as_ref())
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        verdict(only_shed)
    );
    println!(
        "target no side effect of shedding (ledger holds exactly the acknowledged requests, Σ accrued == Σ pools): {}",
        verdict(ledger.is_ok())
    );
    let (p99_1, p99_10) = (ms(&base.admitted_us, 0.99), ms(&over.admitted_us, 0.99));
    println!(
        "target admitted p99 at {}× R <= 2 × p99 at R: {p99_10:.2} ms vs {p99_1:.2} ms = {:.2}× — {}",
        args.factor,
        p99_10 / p99_1,
        verdict(p99_10 <= 2.0 * p99_1)
    );
    println!(
        "target memory levels off (max RSS over the last third of the overload <= 1.2 × over the middle third): first {:.0} MiB, middle {:.0} MiB, last {:.0} MiB — {}",
        first as f64 / 1024.0,
        middle as f64 / 1024.0,
        last as f64 / 1024.0,
        verdict(last as f64 <= 1.2 * middle as f64)
    );
    let longest = rounds.iter().max().copied().unwrap_or_default();
    println!(
        "target settlement keeps running: {} rounds completed during the overload, {} payouts, longest {:.0} ms — {}",
        rounds.len(),
        payouts,
        longest.as_secs_f64() * 1000.0,
        verdict(!rounds.is_empty() && payouts > 0)
    );
    println!(
        "admitted throughput at {}× R: {:.0}/s = {:.2} of R",
        args.factor,
        over.per_sec(over.admitted),
        over.per_sec(over.admitted) / rate
    );
    ledger
}
