//! Load shedding at the admission bound (issue 7, item 5): past `meter.max_in_flight`
//! requests in flight, a `Meter` call is answered `RESOURCE_EXHAUSTED` + `OVERLOADED` at
//! once and leaves no trace — nothing stored, no id reserved: the same id sent later
//! accrues exactly once — while the admitted requests accrue. A `MeterStream` at the bound
//! is held back, not failed; one with nothing of its own in flight is shed like a unary
//! call.
//!
//! Deterministic, no timing: the bound is tiny and the writer is stopped before its batches
//! (`faults::arm_writer_hold`), so the admitted requests stay in flight until the test lets
//! them go. The gate is armed process-wide for the next daemon started, so this binary
//! holds one test.

mod common;

use common::*;
use std::time::Duration;
use tonic::Code;
use tribute_daemon::faults::{arm_writer_hold, WriterHold};
use tribute_proto::error_reason;
use tribute_proto::v1 as pb;
use tribute_proto::v1::ErrorReason;

const MODEL: &str = "llm-a";
const BOUND: usize = 4;

fn count(db: &std::path::Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.query_row(sql, [], |r| r.get(0)).expect("count")
}

fn events_like(db: &std::path::Path, prefix: &str) -> i64 {
    count(db, &format!("SELECT COUNT(*) FROM meter_events WHERE request_id LIKE '{prefix}-%'"))
}

fn request(id: &str) -> pb::MeterRequest {
    let n = id.bytes().map(u64::from).sum::<u64>();
    usage_request(id, MODEL, 10 + n, 3 + n % 7)
}

fn assert_shed(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
    assert_eq!(error_reason(status), Some(ErrorReason::Overloaded), "{what}: {status:?}");
}

/// Waits until `BOUND` requests are in flight and the writer is stopped at the gate with
/// a batch of them. Bounded, so a daemon that never gets there fails the test.
async fn wait_full(d: &TestDaemon, hold: &WriterHold) {
    let h = hold.clone();
    tokio::task::spawn_blocking(move || h.wait_parked()).await.expect("wait parked");
    for _ in 0..3000 {
        if d.running().metrics.in_flight.get() == BOUND as i64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("in flight: {} of {BOUND}", d.running().metrics.in_flight.get());
}

/// `call`, which must not wait for the stopped writer: a request past the bound that
/// waited instead of being shed would hang here, so give up (generously) and fail.
async fn at_once<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .unwrap_or_else(|_| panic!("{what}: waited for the stopped writer instead of being shed"))
}

fn overloaded(d: &TestDaemon) -> u64 {
    d.running()
        .metrics
        .meter_requests
        .get_or_create(&tribute_daemon::metrics::OutcomeLabel { outcome: "overloaded" })
        .get()
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_in_flight_bound_requests_are_shed_with_overloaded_and_leave_no_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hold = arm_writer_hold();
    let mut config = test_config(dir.path());
    config.meter.max_in_flight = BOUND;
    let mut d = TestDaemon::start_with(config).await;
    setup_model(&d, MODEL, &[(11, 1), (12, 2), (13, 3)], 500_000).await;
    let meter = d.metering(Some(&d.provider_token)).await;
    let db = d.db_path();

    // BOUND unary calls are admitted; the writer holds them before their batch.
    let admitted: Vec<_> = (0..BOUND)
        .map(|i| {
            let mut m = meter.clone();
            tokio::spawn(async move { m.meter(request(&format!("a-{i}"))).await })
        })
        .collect();
    wait_full(&d, &hold).await;

    // Beyond the bound: shed at once (the writer is stopped, so waiting would hang).
    for i in 0..3 {
        let shed = at_once("unary", meter.clone().meter(request(&format!("s-{i}"))))
            .await
            .expect_err("shed");
        assert_shed(&shed, &format!("unary s-{i}"));
    }
    // A stream with nothing of its own in flight: its first request is shed, and the
    // stream ends with that status (as for any failed request on a stream).
    let (answers, failed) = at_once(
        "stream",
        meter_stream(meter.clone(), vec![request("s-3"), request("s-4"), request("s-5")]),
    )
    .await;
    assert!(answers.is_empty(), "stream answered {} past the bound", answers.len());
    assert_shed(&failed.expect("the stream fails"), "stream s-3");
    assert_eq!(overloaded(&d), 4, "every shed request is counted");
    assert_eq!(d.running().metrics.in_flight.get(), BOUND as i64, "shed is not in flight");

    // The admitted ones accrue once the writer goes on.
    hold.open();
    for (i, a) in admitted.into_iter().enumerate() {
        let a = a.await.expect("task").expect("admitted request accrues").into_inner();
        assert!(!a.replayed, "a-{i}");
    }
    d.running().flush().await;
    assert_eq!(events_like(&db, "a"), BOUND as i64);
    assert_eq!(events_like(&db, "s"), 0, "a shed request left a trace");
    assert_eq!(d.running().metrics.in_flight.get(), 0);

    // The shed ids sent again later: each accrues exactly once (nothing was reserved).
    for i in 0..6 {
        let id = format!("s-{i}");
        let first = meter.clone().meter(request(&id)).await.expect("resent").into_inner();
        assert!(!first.replayed, "{id}: the shed attempt was not recorded");
        let again = meter.clone().meter(request(&id)).await.expect("again").into_inner();
        assert!(again.replayed, "{id}: the second send is a replay");
        assert_eq!(again.receipt, first.receipt, "{id}");
    }
    d.running().flush().await;
    assert_eq!(events_like(&db, "s"), 6);

    // A stream at the bound is held back, not failed: it takes every slot, a unary call
    // meanwhile is shed, and once the writer goes on the stream's requests all accrue.
    hold.close();
    let streamed: Vec<_> = (0..3 * BOUND).map(|i| request(&format!("t-{i}"))).collect();
    let streaming = tokio::spawn(meter_stream(meter.clone(), streamed));
    wait_full(&d, &hold).await;
    let shed = at_once("unary", meter.clone().meter(request("u-0"))).await.expect_err("shed");
    assert_shed(&shed, "unary u-0 beside a stream at the bound");
    hold.open();
    let (answers, failed) = streaming.await.expect("stream task");
    assert!(failed.is_none(), "the stream at the bound failed: {failed:?}");
    assert_eq!(answers.len(), 3 * BOUND, "every streamed request answered");
    assert!(answers.iter().all(|a| !a.replayed));
    d.running().flush().await;
    assert_eq!(events_like(&db, "t"), 3 * BOUND as i64);
    assert_eq!(events_like(&db, "u"), 0, "a shed request left a trace");
    assert_eq!(overloaded(&d), 5);

    // Nothing lost or counted twice.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM meter_events"), (BOUND + 6 + 3 * BOUND) as i64);
    assert_eq!(db_total_accrued(&db), db_total_pools(&db), "conservation");
    d.stop().await;
    let report = tribute_daemon::reconcile::reconcile_file(&db).expect("reconcile");
    assert!(report.is_clean(), "reconcile found {:?}", report.failures);
}
