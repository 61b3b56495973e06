//! Fault points at every step of the metering transaction (issue 7, item 2), swept one by
//! one. At each point the writer stops as if the process died there (`faults::MeterFault`).
//! Then: the database passes `PRAGMA integrity_check` and `reconcile` (conservation, every
//! batch whole), every acknowledged request is in it, no batch is half written; and after a
//! restart the client's retry of the same requests, under the same ids, completes the work
//! exactly once — acknowledged requests come back as replays with the receipts they had.
//!
//! The faults are armed process-wide for the next daemon started, so this binary holds one
//! test that starts one daemon at a time.

mod common;

use common::*;
use std::collections::HashMap;
use tonic::Code;
use tribute_daemon::faults::{arm_meter_fault, ALL_METER_FAULTS};
use tribute_proto::error_reason;
use tribute_proto::v1 as pb;
use tribute_proto::v1::ErrorReason;

const MODEL: &str = "llm-a";
/// A second model whose only contributor has no channel before the faulted batch, so that
/// batch also opens a channel.
const NEW: &str = "llm-new";
/// The batch the fault hits (batches 1 and 2 are committed before it).
const FAULT_BATCH: u64 = 3;

/// The requests sent in the faulted batch and after it. The first (alone in the faulted
/// batch when the writer is idle) pays an existing channel and opens a new one.
fn requests() -> Vec<pb::MeterRequest> {
    (0..40u64)
        .map(|i| {
            let model = if i % 4 == 0 { NEW } else { MODEL };
            let mut r = usage_request(&format!("f-{i}"), model, 10 * i + 1, 7 * i);
            if i == 0 {
                r.model_id = MODEL.into();
                r.attribution = [11, 14]
                    .map(|o| pb::DatasetWeight { dataset_hash: dataset(o).0.to_vec(), weight: o })
                    .to_vec();
            }
            r
        })
        .collect()
}

fn count(db: &std::path::Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.query_row(sql, [], |r| r.get(0)).expect("count")
}

/// The database after a stop: intact, reconciled, no half batch.
fn check_consistent(db: &std::path::Path, point: &str) {
    let conn = rusqlite::Connection::open(db).expect("open");
    let integrity: String =
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
    assert_eq!(integrity, "ok", "{point}: integrity_check");
    drop(conn);
    let half = count(
        db,
        "SELECT COUNT(*) FROM receipt_batches b
         WHERE b.receipt_count != (SELECT COUNT(*) FROM meter_events e WHERE e.batch_seq = b.batch_seq)",
    );
    assert_eq!(half, 0, "{point}: a batch whose events are not all there");
    let orphans = count(
        db,
        "SELECT COUNT(*) FROM meter_events e
         WHERE NOT EXISTS (SELECT 1 FROM receipt_batches b WHERE b.batch_seq = e.batch_seq)",
    );
    assert_eq!(orphans, 0, "{point}: events without their batch");
    let report = tribute_daemon::reconcile::reconcile_file(db).expect("reconcile");
    assert!(report.is_clean(), "{point}: reconcile found {:?}", report.failures);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_at_each_step_of_the_metering_transaction_is_consistent_and_the_retry_completes_it_once(
) {
    for point in ALL_METER_FAULTS {
        let name = format!("{point:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        arm_meter_fault(point, FAULT_BATCH);
        let mut d = TestDaemon::start(dir.path()).await;
        setup_model(&d, MODEL, &[(11, 1), (12, 2), (13, 3)], 500_000).await;
        setup_model(&d, NEW, &[(14, 1)], 400_000).await;
        let mut meter = d.metering(Some(&d.provider_token)).await;
        let mut acknowledged: HashMap<String, pb::Receipt> = HashMap::new();
        for i in 0..2 {
            let a = meter.meter(usage_request(&format!("p-{i}"), MODEL, 5, 5)).await;
            let a = a.expect("before the fault").into_inner();
            let receipt = a.receipt.expect("receipt");
            assert_eq!(receipt.batch_seq, i + 1, "{name}: one batch per sequential call");
            acknowledged.insert(receipt.request_id.clone(), receipt);
        }

        // The faulted batch: nothing from it on is acknowledged.
        let (answers, failed) = meter_stream(meter.clone(), requests()).await;
        assert!(answers.is_empty(), "{name}: answered {} after the fault point", answers.len());
        let failed = failed.expect("the stream fails at the fault point");
        assert_eq!(failed.code(), Code::Unavailable, "{name}: {failed:?}");
        assert_eq!(error_reason(&failed), Some(ErrorReason::ShuttingDown), "{name}");
        d.stop().await;

        let db = d.db_path();
        check_consistent(&db, &name);
        let committed = count(&db, "SELECT COUNT(*) FROM meter_events WHERE request_id LIKE 'f-%'");
        if point == tribute_daemon::faults::MeterFault::AfterCommit {
            assert!(committed > 0, "{name}: the faulted batch is durable");
        } else {
            assert_eq!(committed, 0, "{name}: the faulted batch rolled back whole");
        }
        for id in acknowledged.keys() {
            let n =
                count(&db, &format!("SELECT COUNT(*) FROM meter_events WHERE request_id = '{id}'"));
            assert_eq!(n, 1, "{name}: acknowledged {id} is stored once");
        }

        // The client retries everything it sent, under the same ids.
        let d = TestDaemon::start(dir.path()).await;
        let mut meter = d.metering(Some(&d.provider_token)).await;
        for (id, receipt) in &acknowledged {
            let a = meter.meter(usage_request(id, MODEL, 5, 5)).await.expect("replay").into_inner();
            assert!(a.replayed, "{name}: {id} was acknowledged, so it is a replay");
            assert_eq!(a.receipt.as_ref(), Some(receipt), "{name}: the same receipt");
        }
        let (answers, failed) = meter_stream(meter.clone(), requests()).await;
        assert!(failed.is_none(), "{name}: retry failed: {failed:?}");
        assert_eq!(answers.len(), 40, "{name}: every retried request answered");
        let replayed = answers.iter().filter(|a| a.replayed).count() as i64;
        assert_eq!(replayed, committed, "{name}: exactly the durable ones are replays");
        let pools: u128 = answers
            .iter()
            .map(|a| u128::from(a.receipt.as_ref().expect("receipt").pool_nsat))
            .chain(acknowledged.values().map(|r| u128::from(r.pool_nsat)))
            .sum();
        d.running().flush().await;
        assert_eq!(count(&db, "SELECT COUNT(*) FROM meter_events"), 42, "{name}: exactly once");
        assert_eq!(
            count(&db, "SELECT COUNT(DISTINCT request_id) FROM meter_events"),
            42,
            "{name}: no id twice"
        );
        assert_eq!(db_total_pools(&db), pools, "{name}: the pools of the answers");
        assert_eq!(db_total_accrued(&db), pools, "{name}: conservation");
        let mut d = d;
        d.stop().await;
        check_consistent(&db, &name);
    }
}
