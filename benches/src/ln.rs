//! `tribute-bench --lightning`: the per-request Lightning model against Tribute, in one run on
//! the dev chain with real ldk-node nodes. Two nodes with one private channel: keysend one
//! payment per request (one at a time, then 100 and 300 in flight) — what paying every
//! inference over Lightning would cost — and, through the daemon whose node is the payer,
//! `Meter` (unary, concurrency 64) and `MeterStream` with the same 100-contributor model. Then
//! one settlement round paying the 100 contributors (all to the second node) over Lightning.
//!
//! `TRIBUTE_BENCH_LN_PER_NODE=<n>` sets the daemon's `settlement.max_in_flight_per_node` for
//! the round (default: the daemon's default), to compare bounds.

use crate::load::{self, Call};
use crate::setup::{self, Bearer};
use crate::BenchError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tribute_daemon::devchain::DevChain;
use tribute_daemon::lightning::{
    ChainSourceConfig, DynLightningBackend, KeysendRequest, LdkBackend, LdkBackendConfig,
    LightningBackend, LightningError, OpenChannelRequest, PaymentId, PaymentStatus,
};
use tribute_daemon::server::StartOptions;
use tribute_daemon::settlement::EngineOptions;

const FUNDING_SAT: u64 = 20_000_000;
const CHANNEL_SAT: u64 = 16_000_000;
const KEYSEND_MSAT: u64 = 1_000;
const WAIT: Duration = Duration::from_secs(120);
/// How long one keysend may stay unresolved before it counts as not done.
const PAYMENT_PATIENCE: Duration = Duration::from_secs(20);

fn err(what: &str) -> impl Fn(tribute_daemon::lightning::LightningError) -> BenchError + '_ {
    move |e| BenchError::msg(format!("{what}: {e}"))
}

async fn until<F, Fut>(what: &str, mut check: F) -> Result<(), BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        if Instant::now() > deadline {
            return Err(BenchError::msg(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn preimage(i: u64) -> [u8; 32] {
    let mut p = [0u8; 32];
    for (k, chunk) in p.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&setup::mix(i.wrapping_mul(4) + k as u64).to_be_bytes());
    }
    p
}

/// One request's keysend, followed until it is final; `true` if it succeeded. A send the
/// node refuses at once (its channel is at its in-flight HTLC limit: LDK accepts 50 by
/// default) is tried again under a new preimage, as a per-request payer would.
async fn keysend(payer: &LdkBackend, dest: [u8; 33], i: u64) -> Result<bool, BenchError> {
    for attempt in 0u64.. {
        let request = KeysendRequest {
            dest_node_id: dest,
            amount_msat: KEYSEND_MSAT,
            preimage: preimage(i ^ (attempt << 48)),
            custom_tlvs: vec![],
            max_fee_msat: 1_000,
        };
        let id: PaymentId = request.payment_id();
        match payer.pay_keysend(request).await {
            Ok(_) => {}
            Err(LightningError::PaymentFailed(_) | LightningError::Duplicate(_))
                if attempt < 10_000 =>
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            Err(e) => return Err(BenchError::msg(format!("keysend: {e}"))),
        }
        // A payment still unresolved after this long counts as not done.
        let deadline = Instant::now() + PAYMENT_PATIENCE;
        while Instant::now() < deadline {
            match payer.payment_status(&id).await.map_err(err("status"))? {
                PaymentStatus::Succeeded { .. } => return Ok(true),
                PaymentStatus::Failed { .. } => return Ok(false),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
        return Ok(false);
    }
    Ok(false)
}

/// Keysends with `in_flight` at a time until `total` are final; (succeeded, elapsed).
async fn keysends(
    payer: &Arc<LdkBackend>,
    dest: [u8; 33],
    first: u64,
    total: u64,
    in_flight: usize,
) -> Result<(u64, Duration), BenchError> {
    use futures::stream::{self, StreamExt};
    let start = Instant::now();
    let results: Vec<Result<bool, BenchError>> = stream::iter(first..first + total)
        .map(|i| {
            let payer = payer.clone();
            async move { keysend(&payer, dest, i).await }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let mut ok = 0;
    for r in results {
        ok += u64::from(r?);
    }
    Ok((ok, start.elapsed()))
}

/// Runs the comparison and prints its table.
pub async fn run(data: &std::path::Path, quick: bool) -> Result<(), BenchError> {
    let chain = DevChain::start().await.map_err(|e| BenchError::msg(e.to_string()))?;
    chain.start_auto_mining(Duration::from_secs(1));
    let node = |dir: &str, trusted: Vec<[u8; 33]>| {
        let mut c = LdkBackendConfig::new(
            data.join(dir),
            bitcoin::Network::Regtest,
            ChainSourceConfig::dev_chain(&chain),
        );
        c.listening_addresses = vec![format!("127.0.0.1:{}", free_port())];
        c.trusted_peers_no_reserve = trusted;
        c
    };
    let payer = Arc::new(LdkBackend::start(node("payer", vec![])).await.map_err(err("payer"))?);
    let payee_config = node("payee", vec![payer.node_id()]);
    let payee_addr = payee_config.listening_addresses[0].clone();
    let payee = LdkBackend::start(payee_config).await.map_err(err("payee"))?;
    let address = payer.onchain_address().await.map_err(err("address"))?;
    chain
        .faucet(&address, bitcoin::Amount::from_sat(FUNDING_SAT))
        .map_err(|e| BenchError::msg(e.to_string()))?;
    until("the payer's funds", || async {
        let _ = payer.sync_wallets().await;
        payer.onchain_balance().await.is_ok_and(|b| b.spendable_sat >= FUNDING_SAT)
    })
    .await?;
    payer.connect(payee.node_id(), &payee_addr).await.map_err(err("connect"))?;
    payer
        .open_channel(OpenChannelRequest {
            node_id: payee.node_id(),
            addr: payee_addr,
            amount_sat: CHANNEL_SAT,
            push_msat: 0,
            announce: false,
        })
        .await
        .map_err(err("open"))?;
    until("the channel", || async {
        let _ = payer.sync_wallets().await;
        let _ = payee.sync_wallets().await;
        payer.list_channels().await.is_ok_and(|c| c.len() == 1 && c[0].usable)
    })
    .await?;
    let dest = payee.node_id();
    println!("two ldk-node nodes on the dev chain, one private channel of {CHANNEL_SAT} sat");

    // The per-request Lightning model: one keysend per request.
    let sequential = if quick { 20 } else { 60 };
    let (ok1, t1) = keysends(&payer, dest, 0, sequential, 1).await?;
    let rate1 = ok1 as f64 / t1.as_secs_f64();
    println!(
        "keysend, 1 in flight: {ok1}/{sequential} in {:.2} s = {rate1:.1}/s",
        t1.as_secs_f64()
    );
    let mut best = rate1;
    let mut rows = vec![(1usize, ok1, sequential, t1)];
    for in_flight in [100usize, 300] {
        let total = (in_flight * if quick { 1 } else { 2 }) as u64;
        let first = 1_000_000 * in_flight as u64;
        let (ok, t) = keysends(&payer, dest, first, total, in_flight).await?;
        let rate = ok as f64 / t.as_secs_f64();
        println!(
            "keysend, {in_flight} in flight: {ok}/{total} in {:.2} s = {rate:.1}/s",
            t.as_secs_f64()
        );
        best = best.max(rate);
        rows.push((in_flight, ok, total, t));
    }

    // Tribute, with the payer as the daemon's node: every request split 100 ways.
    let mut config = setup::config(&data.join("daemon"));
    config.settlement.settle_every_secs = 86_400;
    config.settlement.settle_threshold_msat = u64::MAX / 4;
    config.settlement.max_outstanding_msat = u64::MAX / 4;
    config.settlement.min_payout_msat = 1;
    if let Some(n) = std::env::var("TRIBUTE_BENCH_LN_PER_NODE").ok().and_then(|v| v.parse().ok()) {
        config.settlement.max_in_flight_per_node = n;
    }
    let per_node = config.settlement.max_in_flight_per_node;
    let options = StartOptions {
        lightning: Some(payer.clone() as DynLightningBackend),
        settlement: EngineOptions {
            // All 100 contributors are paid to one node here, over one channel that carries
            // at most 50 HTLCs (LDK's default); `max_in_flight_per_node` bounds the round's
            // payouts to it below that.
            max_in_flight: 40,
            poll_interval: Duration::from_millis(5),
            ..EngineOptions::default()
        },
    };
    let daemon = setup::start_with(config, options).await?;
    let addr = daemon.running.grpc_addr;
    setup::register_paid_to(setup::connect(addr).await?, &daemon, Some(dest)).await?;
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(setup::connect(addr).await?);
    }
    let bearer = Bearer::new(&daemon.provider_token)?;
    let secs = if quick { 3 } else { 8 };
    let unary = load::unary(
        Call::Meter,
        &channels,
        &bearer,
        "ln",
        64,
        Duration::from_secs(1),
        Duration::from_secs(secs),
    )
    .await?;
    let stream = load::stream(&channels, &bearer, "lns", 1, Duration::from_secs(secs)).await?;
    if unary.errors + stream.errors > 0 {
        return Err(BenchError::msg(format!(
            "metering errors: {:?} {:?}",
            unary.first_error, stream.first_error
        )));
    }
    println!(
        "Meter unary, concurrency 64: {:.0}/s ({:.0}× the best keysend rate); MeterStream: {:.0}/s ({:.0}×)",
        unary.rate(),
        unary.rate() / best,
        stream.rate(),
        stream.rate() / best
    );

    // One settlement round paying the 100 contributors over Lightning, with the channel's
    // room for one more HTLC sampled throughout.
    daemon.running.flush().await;
    println!("before the round: {}", channel_room(&payer).describe());
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (payer, sampling) = (payer.clone(), sampling.clone());
        async move {
            let mut samples = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push(channel_room(&payer));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        }
    });
    let started = Instant::now();
    daemon.running.settlement.settle_now_and_wait().await;
    let round = started.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await.map_err(|e| BenchError::msg(e.to_string()))?;
    let full: Vec<&Room> = samples.iter().filter(|r| r.next_htlc_limit_msat == 0).collect();
    println!(
        "during the round: {} of {} samples found no room for another HTLC (our pending \
         payments then: {:?}..{:?}); most pending at once: {:?}",
        full.len(),
        samples.len(),
        full.iter().map(|r| r.pending_payments).min(),
        full.iter().map(|r| r.pending_payments).max(),
        samples.iter().map(|r| r.pending_payments).max(),
    );
    let db = tribute_daemon::server::database_path(&data.join("daemon"));
    let conn = rusqlite::Connection::open(&db).map_err(|e| BenchError::msg(e.to_string()))?;
    let (paid, msat): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(amount_msat), 0) FROM settlements WHERE status = 'succeeded'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(|e| BenchError::msg(e.to_string()))?;
    println!(
        "settlement round (at most 40 in flight, {per_node} per node): {paid} of {} contributors \
         paid ({msat} msat) in {:.2} s = {:.1} payouts/s",
        setup::CONTRIBUTORS,
        round.as_secs_f64(),
        paid as f64 / round.as_secs_f64()
    );
    // What became of the others, and why (the engine records each definite failure's reason).
    let mut stmt = conn
        .prepare(
            "SELECT status, COALESCE(error, ''), COUNT(*) FROM settlements
             WHERE status != 'succeeded' GROUP BY status, error ORDER BY COUNT(*) DESC",
        )
        .map_err(|e| BenchError::msg(e.to_string()))?;
    let others: Vec<(String, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .and_then(|rows| rows.collect())
        .map_err(|e| BenchError::msg(e.to_string()))?;
    for (status, error, n) in others {
        println!("  {n} {status}: {error}");
    }

    println!();
    println!("| measurement | rate | ÷ best keysend |");
    println!("|---|---|---|");
    for (in_flight, ok, total, t) in rows {
        println!(
            "| keysend per request, {in_flight} in flight ({ok}/{total} ok) | {:.1}/s | – |",
            ok as f64 / t.as_secs_f64()
        );
    }
    println!(
        "| Tribute `Meter`, concurrency 64 | {:.0}/s | {:.0}× |",
        unary.rate(),
        unary.rate() / best
    );
    println!("| Tribute `MeterStream` | {:.0}/s | {:.0}× |", stream.rate(), stream.rate() / best);
    println!(
        "| settlement round, {paid} payouts | {:.1} payouts/s ({:.2} s) | – |",
        paid as f64 / round.as_secs_f64(),
        round.as_secs_f64()
    );
    let ratio = unary.rate().max(stream.rate()) / best;
    println!();
    println!(
        "target ≥ 300× the per-request Lightning rate: {ratio:.0}× — {}",
        if ratio >= 300.0 { "met" } else { "NOT met" }
    );

    daemon.running.shutdown().await.map_err(|e| BenchError::msg(e.to_string()))?;
    payee.stop().await.map_err(err("stop payee"))?;
    payer.stop().await.map_err(err("stop payer"))?;
    chain.shutdown().await;
    Ok(())
}

/// The payer's only channel as a sender sees it, and its own payments still pending.
struct Room {
    /// LDK's `next_outbound_htlc_limit_msat`: 0 when the channel takes no further HTLC.
    next_htlc_limit_msat: u64,
    /// Outbound payments pending in the payer's store.
    pending_payments: usize,
}

impl Room {
    fn describe(&self) -> String {
        format!(
            "{} outbound payments pending on the payer; room for one more HTLC: {} msat",
            self.pending_payments, self.next_htlc_limit_msat
        )
    }
}

fn channel_room(payer: &LdkBackend) -> Room {
    let next_htlc_limit_msat =
        payer.node().list_channels().first().map_or(0, |c| c.next_outbound_htlc_limit_msat);
    Room { next_htlc_limit_msat, pending_payments: payer.pending_outbound_payments() }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}
