//! The daemon over real gRPC on loopback with a real SQLite file: registration, metering,
//! streaming with payee-side verification, conservation, idempotency, restart (bad input:
//! `hostile.rs`).

mod common;

use common::*;
use futures::StreamExt;
use std::time::Duration;
use tonic::Code;
use tribute_channels::channel::{ChannelParams, ChannelState, PayeeChannel};
use tribute_channels::codec::Encode;
use tribute_channels::merkle::InclusionProof;
use tribute_channels::receipt::{verify_receipt, Receipt, ReceiptBatchRoot};
use tribute_channels::{Network, Signed};
use tribute_proto::error_reason;
use tribute_proto::v1 as pb;
use tribute_proto::v1::ErrorReason;

const MODEL: &str = "llm-a";
const OWNERS: [(u64, u64); 3] = [(11, 1), (12, 2), (13, 3)];

fn reason(s: &tonic::Status) -> Option<ErrorReason> {
    error_reason(s)
}

/// What a subscriber saw, verified.
struct Seen {
    payee: Option<PayeeChannel>,
    micropayments_nsat: u128,
    payments: usize,
}

async fn subscribe(
    d: &TestDaemon,
    n: u64,
) -> tokio::sync::mpsc::UnboundedReceiver<pb::ChannelEvent> {
    let token = d.login(n).await;
    let mut ch = d.channels(Some(&token)).await;
    let mut stream = ch
        .subscribe_channel(pb::SubscribeChannelRequest {
            contributor_key: vec![],
            states_only: false,
        })
        .await
        .expect("subscribe")
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(ev)) = stream.next().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    rx
}

async fn channel_of(d: &TestDaemon, n: u64) -> pb::Channel {
    let mut ch = d.channels(Some(&d.operator_token)).await;
    ch.get_channel(pb::GetChannelRequest {
        contributor_key: pubkey(n).to_bytes().to_vec(),
        channel_id: vec![],
    })
    .await
    .expect("channel")
    .into_inner()
}

fn params_of(d: &TestDaemon, c: &pb::Channel, n: u64) -> ChannelParams {
    ChannelParams {
        network: Network::Regtest,
        provider_key: d.running().provider_key,
        contributor_key: pubkey(n),
        nonce: c.nonce.as_slice().try_into().expect("nonce"),
    }
}

/// Feeds events into a verifying payee until its accrued equals `target` (with a deadline).
async fn follow(
    d: &TestDaemon,
    n: u64,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<pb::ChannelEvent>,
    seen: &mut Seen,
    target: u128,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = &seen.payee {
            if p.latest().map(|s| s.message.accrued_nsat.0) == Some(target) {
                return;
            }
        }
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("contributor {n}: no state with accrued {target} in time"))
            .expect("stream open");
        match ev.event.expect("event") {
            pb::channel_event::Event::State(s) => {
                let signed = Signed::<ChannelState>::decode(&s.signed_state).expect("decodes");
                let payee = match seen.payee.take() {
                    Some(p) => p,
                    None => PayeeChannel::new(&params_of(d, &channel_of(d, n).await, n)),
                };
                seen.payee =
                    Some(payee.accept(signed).unwrap_or_else(|e| panic!("state refused: {e}")));
            }
            pb::channel_event::Event::Payment(p) => {
                seen.micropayments_nsat += u128::from(p.share_nsat);
                seen.payments += 1;
            }
            pb::channel_event::Event::Gap(g) => panic!("unexpected gap {g:?}"),
            pb::channel_event::Event::Settlement(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn meter_subscribe_verify_and_conserve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    setup_model(&d, MODEL, &OWNERS, 600_000).await;
    let mut subs = Vec::new();
    for (n, _) in OWNERS {
        subs.push((
            n,
            subscribe(&d, n).await,
            Seen { payee: None, micropayments_nsat: 0, payments: 0 },
        ));
    }

    let mut total_pool = 0u128;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    // Unary, varied usage, some with per-request attribution (retrieval citations).
    for i in 0..200u64 {
        let mut r = usage_request(&format!("u-{i}"), MODEL, i * 17 % 1000, i * 31 % 700);
        if i % 5 == 0 {
            r.attribution = vec![
                pb::DatasetWeight { dataset_hash: dataset(11).0.to_vec(), weight: 1 + i },
                pb::DatasetWeight { dataset_hash: dataset(13).0.to_vec(), weight: 7 },
            ];
        }
        let resp = meter.meter(r).await.expect("meter").into_inner();
        assert!(!resp.replayed);
        total_pool += u128::from(resp.receipt.expect("receipt").pool_nsat);
    }
    // A stream of 2,000 requests.
    let reqs: Vec<pb::MeterRequest> = (0..2000u64)
        .map(|i| usage_request(&format!("s-{i}"), MODEL, i % 4096, (i * 7) % 2048))
        .collect();
    let mut out =
        meter.meter_stream(futures::stream::iter(reqs)).await.expect("stream").into_inner();
    let mut answered = 0;
    while let Some(resp) = out.next().await {
        let resp = resp.expect("answer");
        assert_eq!(
            resp.receipt.as_ref().expect("receipt").request_id,
            format!("s-{answered}"),
            "in order"
        );
        total_pool += u128::from(resp.receipt.expect("receipt").pool_nsat);
        answered += 1;
    }
    assert_eq!(answered, 2000);

    // Every contributor verifies every state and ends at its channel's accrued amount.
    let mut signed_total = 0u128;
    for (n, rx, seen) in &mut subs {
        let c = channel_of(&d, *n).await;
        let accrued: u128 = c.accrued_nsat.parse().expect("decimal");
        follow(&d, *n, rx, seen, accrued).await;
        assert_eq!(
            seen.micropayments_nsat, accrued,
            "micropayments sum to the signed accrued amount"
        );
        signed_total +=
            seen.payee.as_ref().and_then(|p| p.latest()).expect("state").message.accrued_nsat.0;
    }
    // Conservation, from the responses, the database and the signed states.
    assert_eq!(db_total_pools(&d.db_path()), total_pool);
    assert_eq!(db_total_accrued(&d.db_path()), total_pool);
    assert_eq!(signed_total, total_pool);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_same_different_concurrent_and_across_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = TestDaemon::start(dir.path()).await;
    setup_model(&d, MODEL, &OWNERS, 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;

    let first =
        meter.meter(usage_request("req-1", MODEL, 100, 50)).await.expect("meter").into_inner();
    let again =
        meter.meter(usage_request("req-1", MODEL, 100, 50)).await.expect("replay").into_inner();
    assert!(again.replayed);
    assert_eq!(again.receipt, first.receipt, "identical receipt");
    let pools_after_one = db_total_pools(&d.db_path());

    let err =
        meter.meter(usage_request("req-1", MODEL, 101, 50)).await.expect_err("different content");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(reason(&err), Some(ErrorReason::ExistsWithDifferentContent));
    assert_eq!(db_total_pools(&d.db_path()), pools_after_one, "nothing accrued");

    // The same new id sent 32 times at once accrues once, and every answer is the same receipt.
    let calls =
        (0..32).map(|_| {
            let mut m = meter.clone();
            async move {
                m.meter(usage_request("req-2", MODEL, 7, 7)).await.expect("meter").into_inner()
            }
        });
    let answers = futures::future::join_all(calls).await;
    assert!(answers.iter().all(|a| a.receipt == answers[0].receipt));
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    let conn = rusqlite::Connection::open(d.db_path()).expect("open");
    let n: i64 =
        conn.query_row("SELECT COUNT(*) FROM meter_events", [], |r| r.get(0)).expect("count");
    assert_eq!(n, 2);
    drop(conn);

    // Across a restart.
    d.stop().await;
    let d = TestDaemon::start(dir.path()).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    let after =
        meter.meter(usage_request("req-1", MODEL, 100, 50)).await.expect("replay").into_inner();
    assert!(after.replayed);
    assert_eq!(after.receipt, first.receipt);
    let err = meter.meter(usage_request("req-2", MODEL, 8, 7)).await.expect_err("different");
    assert_eq!(reason(&err), Some(ErrorReason::ExistsWithDifferentContent));
    assert_eq!(db_total_accrued(&d.db_path()), db_total_pools(&d.db_path()));
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_balances_states_and_receipts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = TestDaemon::start(dir.path()).await;
    setup_model(&d, MODEL, &OWNERS, 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..50 {
        meter.meter(usage_request(&format!("a-{i}"), MODEL, i, i)).await.expect("meter");
    }
    let mut rx = subscribe(&d, 12).await;
    let before = channel_of(&d, 12).await;
    let mut seen = Seen { payee: None, micropayments_nsat: 0, payments: 0 };
    follow(&d, 12, &mut rx, &mut seen, before.accrued_nsat.parse().expect("n")).await;
    let seq_before = seen.payee.as_ref().and_then(|p| p.latest()).expect("state").message.seq;
    d.stop().await;

    let d = TestDaemon::start(dir.path()).await;
    let after = channel_of(&d, 12).await;
    assert_eq!(after.accrued_nsat, before.accrued_nsat);
    assert_eq!(after.channel_id, before.channel_id);
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 50..60 {
        meter.meter(usage_request(&format!("a-{i}"), MODEL, i, i)).await.expect("meter");
    }
    // The payee that verified states before the restart accepts the new ones: seq continues.
    let mut rx = subscribe(&d, 12).await;
    let now = channel_of(&d, 12).await;
    follow(&d, 12, &mut rx, &mut seen, now.accrued_nsat.parse().expect("n")).await;
    assert!(seen.payee.as_ref().and_then(|p| p.latest()).expect("state").message.seq > seq_before);
    // Receipts from before the restart still verify.
    check_receipt(&d, "a-3").await;
}

/// `read_channels` reads the channel rows and the batches they lag from one snapshot. Here a
/// writer commit that catches every row up and moves the watermark (what persisting signed
/// states does) lands between its two queries: read as two autocommit statements, the rows
/// came from before it and the watermark from after, and the lagging accruals went missing.
#[tokio::test(flavor = "multi_thread")]
async fn channel_reads_are_one_snapshot_while_rows_catch_up() {
    use tribute_daemon::ledger::read_channels;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(&dir.path().join("daemon"));
    config.meter.stream_interval_ms = 600_000;
    let d = TestDaemon::start_with(config).await;
    setup_model(&d, MODEL, &OWNERS, 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    meter.meter(usage_request("s-0", MODEL, 5, 5)).await.expect("meter");
    d.running().flush().await;
    for i in 1..12 {
        meter.meter(usage_request(&format!("s-{i}"), MODEL, i, 2 * i)).await.expect("meter");
    }
    let image = dir.path().join("image.sqlite");
    rusqlite::Connection::open(d.db_path())
        .expect("open")
        .execute("VACUUM INTO ?1", [image.to_str().expect("utf-8 path")])
        .expect("snapshot");
    let pools = db_total_pools(&image);
    assert!(db_total_accrued(&image) < pools, "the rows must lag, or this test shows nothing");
    let provider = d.running().provider_key;

    let writer = rusqlite::Connection::open(&image).expect("open");
    writer.pragma_update(None, "journal_mode", "WAL").expect("wal");
    let heads = read_channels(&writer, "", [], Network::Regtest, provider).expect("heads");
    let last: i64 = writer
        .query_row("SELECT MAX(batch_seq) FROM receipt_batches", [], |r| r.get(0))
        .expect("last batch");
    let catch_up = move || {
        let tx = writer.unchecked_transaction().expect("begin");
        for c in &heads {
            let (msat, rem) = tribute_daemon::store::nsat_to_columns(c.head.accrued_nsat).unwrap();
            tx.execute(
                "UPDATE channels SET accrued_msat = ?1, accrued_rem_nsat = ?2,
                    applied_batch_seq = ?3 WHERE channel_id = ?4",
                rusqlite::params![msat, rem, last, &c.head.channel_id.0[..]],
            )
            .expect("row");
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'accruals_applied_through'",
            [(last as u64).to_be_bytes().to_vec()],
        )
        .expect("watermark");
        tx.commit().expect("commit");
    };
    let reader = rusqlite::Connection::open(&image).expect("open");
    // Load the schema first: reading it runs statements too, and the commit must land in
    // the middle of `read_channels`, not before it.
    let _: i64 = reader.query_row("SELECT COUNT(*) FROM channels", [], |r| r.get(0)).expect("warm");
    // (The handler must be unwind-safe; a panic in it fails the test either way.)
    let mut pending = std::panic::AssertUnwindSafe(Some(catch_up));
    reader.progress_handler(
        1,
        Some(move || {
            if let Some(commit) = (*pending).take() {
                commit();
            }
            false
        }),
    );
    let read = read_channels(&reader, "", [], Network::Regtest, provider).expect("read");
    reader.progress_handler(0, None::<fn() -> bool>);
    assert_eq!(db_total_accrued(&image), pools, "the catch-up commit did not happen");
    let total: u128 = read.iter().map(|c| c.head.accrued_nsat.0).sum();
    assert_eq!(total, pools, "a read straddling the commit lost accruals");
}

/// A crash leaves the database as of some commit, where channel rows may lag their heads
/// (a row is rewritten only with one of its signed states). A snapshot taken between commits
/// (`VACUUM INTO`, with signing far off) is such a database. A daemon started on it replays
/// the batches after the watermark: every channel's balance is what the events say, `seq`
/// goes on from the last signed state, and a payee that followed the first daemon accepts
/// the second one's states.
#[tokio::test(flavor = "multi_thread")]
async fn crash_image_replays_accruals_the_rows_do_not_show() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    let mut config = test_config(&first_dir);
    config.meter.stream_interval_ms = 600_000;
    let d = TestDaemon::start_with(config).await;
    setup_model(&d, MODEL, &OWNERS, 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..20 {
        meter.meter(usage_request(&format!("c-{i}"), MODEL, i, i)).await.expect("meter");
    }
    d.running().flush().await;
    let mut rx = subscribe(&d, 12).await;
    let signed_accrued: u128 = channel_of(&d, 12).await.accrued_nsat.parse().expect("n");
    let mut seen = Seen { payee: None, micropayments_nsat: 0, payments: 0 };
    follow(&d, 12, &mut rx, &mut seen, signed_accrued).await;
    let seq_before = seen.payee.as_ref().and_then(|p| p.latest()).expect("state").message.seq;
    // More accruals, none signed (the next round is minutes away): the rows lag behind.
    for i in 20..45 {
        meter.meter(usage_request(&format!("c-{i}"), MODEL, i, 3 * i)).await.expect("meter");
    }
    let live: u128 = channel_of(&d, 12).await.accrued_nsat.parse().expect("n");
    assert!(live > signed_accrued);

    std::fs::create_dir_all(&second_dir).expect("dir");
    for f in std::fs::read_dir(&first_dir).expect("list") {
        let f = f.expect("entry").path();
        if f.extension().is_some_and(|e| e == "key" || e == "secret") {
            std::fs::copy(&f, second_dir.join(f.file_name().expect("name"))).expect("copy");
        }
    }
    let image = tribute_daemon::server::database_path(&second_dir);
    rusqlite::Connection::open(d.db_path())
        .expect("open")
        .execute("VACUUM INTO ?1", [image.to_str().expect("utf-8 path")])
        .expect("snapshot");
    assert!(
        db_total_accrued(&image) < db_total_pools(&image),
        "the image must have channel rows behind their heads, or this test shows nothing"
    );

    let second = TestDaemon::start(&second_dir).await;
    assert_eq!(channel_of(&second, 12).await.accrued_nsat, live.to_string());
    let mut list = second.channels(Some(&second.operator_token)).await;
    let channels = list.list_channels(pb::ListChannelsRequest {}).await.expect("list").into_inner();
    let total: u128 =
        channels.channels.iter().map(|c| c.accrued_nsat.parse::<u128>().expect("n")).sum();
    assert_eq!(total, db_total_pools(&image));
    // The replayed heads are signed; the payee of the first daemon takes the new state.
    second.running().flush().await;
    let mut rx = subscribe(&second, 12).await;
    follow(&second, 12, &mut rx, &mut seen, live).await;
    assert!(seen.payee.as_ref().and_then(|p| p.latest()).expect("state").message.seq > seq_before);
    // And the rows caught up: the database alone now says Σ accrued == Σ pools.
    assert_eq!(db_total_accrued(&image), db_total_pools(&image));
    check_receipt(&second, "c-30").await;
}

async fn check_receipt(d: &TestDaemon, id: &str) -> Receipt {
    let mut r = d.receipts(Some(&d.accountant_token)).await;
    let proof = r
        .get_receipt(pb::GetReceiptRequest { request_id: id.into() })
        .await
        .expect("receipt")
        .into_inner();
    let receipt = Receipt::decode(&proof.receipt_bytes).expect("receipt bytes");
    let inclusion = InclusionProof::decode(&proof.inclusion_proof).expect("proof bytes");
    let root = Signed::<ReceiptBatchRoot>::decode(&proof.signed_batch_root).expect("root bytes");
    assert_eq!(root.message.provider_key, d.running().provider_key);
    verify_receipt(&receipt, &inclusion, &root).expect("receipt verifies against the signed root");
    let shown = proof.receipt.expect("receipt");
    let shares: u128 = shown.shares.iter().map(|s| u128::from(s.nsat)).sum();
    assert_eq!(shares, u128::from(shown.pool_nsat));
    receipt
}

#[tokio::test(flavor = "multi_thread")]
async fn receipts_verify_and_tampering_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    setup_model(&d, MODEL, &OWNERS, 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    let reqs: Vec<_> =
        (0..300u64).map(|i| usage_request(&format!("r-{i}"), MODEL, i, 2 * i)).collect();
    let mut out =
        meter.meter_stream(futures::stream::iter(reqs)).await.expect("stream").into_inner();
    while out.next().await.is_some() {}
    for id in ["r-0", "r-150", "r-299"] {
        let receipt = check_receipt(&d, id).await;
        let mut r = d.receipts(Some(&d.accountant_token)).await;
        let proof = r
            .get_receipt(pb::GetReceiptRequest { request_id: id.into() })
            .await
            .expect("receipt")
            .into_inner();
        let inclusion = InclusionProof::decode(&proof.inclusion_proof).expect("proof");
        let root = Signed::<ReceiptBatchRoot>::decode(&proof.signed_batch_root).expect("root");
        let mut altered = receipt.clone();
        altered.shares[0].1 .0 += 1;
        altered.pool_nsat.0 += 1;
        assert!(verify_receipt(&altered, &inclusion, &root).is_err());
    }
}
