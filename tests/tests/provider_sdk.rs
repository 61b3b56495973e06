//! Provider SDK against a real daemon through a TCP proxy that breaks connections: a
//! request retried after a dropped connection accrues exactly once.

#![allow(clippy::unwrap_used)]

use futures::StreamExt;
use std::time::Duration;
use tribute_client::provider::{Meter, Provider, ProviderConfig, RetryPolicy};
use tribute_proto::v1::ErrorReason;
use tribute_tests::proxy::{Fault, Proxy};
use tribute_tests::*;

const MODEL: &str = "model-under-test";

struct Setup {
    _dir: tempfile::TempDir,
    d: TestDaemon,
    keys: Vec<tribute_channels::PublicKey>,
    proxy: Proxy,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(&dir.path().join("daemon")).await;
    let mut keys = Vec::new();
    let mut datasets = Vec::new();
    for (i, name) in ["ada", "bo"].iter().enumerate() {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let (k, h) = contributor_with_dataset(&d, &home, name).await;
        keys.push(k);
        datasets.push((h, (i as u64 + 1) * 3));
    }
    setup_model(&d, MODEL, &datasets, 500_000).await;
    let proxy = Proxy::start(d.running().grpc_addr).await;
    Setup { _dir: dir, d, keys, proxy }
}

fn config(s: &Setup, connections: usize) -> ProviderConfig {
    let mut c = ProviderConfig::new(
        tribute_client::DaemonEndpoint::new(s.proxy.url()),
        &s.d.provider_token,
    );
    c.connections = connections;
    c.attempt_timeout = Duration::from_secs(2);
    c.call_deadline = Duration::from_secs(20);
    c.retry = RetryPolicy {
        max_attempts: 6,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(200),
    };
    c
}

async fn accrued(s: &Setup) -> u128 {
    let mut total = 0;
    for k in &s.keys {
        total += s.d.channel_of(*k).await.accrued_nsat.parse::<u128>().unwrap();
    }
    assert_eq!(total, s.d.total_accrued_nsat().await, "GetChannel and ListChannels agree");
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn meter_retried_after_the_answer_was_lost_accrues_once() {
    let s = setup().await;
    let p = Provider::connect(config(&s, 1)).await.expect("connects through the proxy");
    let warm = p.meter(&Meter::usage("warm-up-request", MODEL, 10, 10).unwrap()).await.unwrap();
    assert!(!warm.replayed);
    let before = accrued(&s).await;
    assert_eq!(before, warm.pool_nsat.0);

    s.proxy.arm(Fault::DropAnswer);
    let m = Meter::usage("request-whose-answer-is-lost", MODEL, 1234, 567).unwrap();
    let r = p.meter(&m).await.expect("answered after a retry");
    assert_eq!(s.proxy.broken(), 1, "the connection was dropped once");
    assert!(r.replayed, "the first attempt accrued; the retry got its original receipt");
    assert_eq!(r.request_id, "request-whose-answer-is-lost");

    // Exactly once: the daemon's channels grew by one pool, and one event was logged.
    assert_eq!(accrued(&s).await, before + r.pool_nsat.0);
    assert_eq!(s.d.meter_events(), 2);

    // Metering it again (same id, same content) still accrues nothing.
    let again = p.meter(&m).await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        (again.pool_nsat, again.batch_seq, again.leaf_index),
        (r.pool_nsat, r.batch_seq, r.leaf_index)
    );
    assert_eq!(accrued(&s).await, before + r.pool_nsat.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn meter_retried_after_the_request_was_lost_accrues_once() {
    let s = setup().await;
    let p = Provider::connect(config(&s, 1)).await.unwrap();
    p.meter(&Meter::usage("warm-up-request", MODEL, 1, 1).unwrap()).await.unwrap();
    let before = accrued(&s).await;
    s.proxy.arm(Fault::DropRequest);
    let r = p
        .meter(&Meter::priced("request-that-never-arrived", MODEL, 9_000_000).unwrap())
        .await
        .expect("answered after a retry");
    assert_eq!(s.proxy.broken(), 1);
    assert!(!r.replayed, "the first attempt never reached the daemon");
    assert_eq!(accrued(&s).await, before + r.pool_nsat.0);
    assert_eq!(s.d.meter_events(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn verdicts_are_not_retried_and_keep_code_and_reason() {
    let s = setup().await;
    let p = Provider::connect(config(&s, 1)).await.unwrap();
    let err = p.meter(&Meter::usage("r-1", "no-such-model", 1, 1).unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    assert_eq!(err.reason(), Some(ErrorReason::UnknownModel));
    assert!(!err.is_transient());
    let text = err.to_string();
    assert!(text.contains("NOT_FOUND") && text.contains("UNKNOWN_MODEL"), "{text}");

    p.meter(&Meter::usage("r-2", MODEL, 1, 1).unwrap()).await.unwrap();
    let err = p.meter(&Meter::usage("r-2", MODEL, 2, 1).unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::AlreadyExists));
    assert_eq!(err.reason(), Some(ErrorReason::ExistsWithDifferentContent));

    let mut bad = config(&s, 1);
    bad.token = "trb_not_a_token".into();
    let p = Provider::connect(bad).await.unwrap();
    let err = p.meter(&Meter::usage("r-3", MODEL, 1, 1).unwrap()).await.unwrap_err();
    assert_eq!(err.reason(), Some(ErrorReason::Unauthenticated));
    assert_eq!(s.d.meter_events(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_down_gives_up_within_the_deadline() {
    let mut s = setup().await;
    let mut c = config(&s, 2);
    c.call_deadline = Duration::from_millis(1500);
    c.attempt_timeout = Duration::from_millis(500);
    let p = Provider::connect(c).await.unwrap();
    s.d.stop().await;
    let started = std::time::Instant::now();
    let err = p.meter(&Meter::usage("while-down", MODEL, 1, 1).unwrap()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by the deadline: {:?}",
        started.elapsed()
    );
    assert!(matches!(err, tribute_client::ClientError::GaveUp { .. }), "{err}");
    assert!(err.is_transient());
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_opens_its_connections_and_spreads_calls() {
    let s = setup().await;
    let p = Provider::connect(config(&s, 4)).await.unwrap();
    // The proxy counts a connection when its accept loop gets to it, a moment after the
    // client's connect returned.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.proxy.accepted() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.proxy.accepted(), 4, "four HTTP/2 connections");
    let calls = (0..64).map(|i| {
        let p = p.clone();
        async move { p.meter(&Meter::usage(&format!("c-{i}"), MODEL, i, i).unwrap()).await.unwrap() }
    });
    let answers = futures::future::join_all(calls).await;
    let pools: u128 = answers.iter().map(|a| a.pool_nsat.0).sum();
    assert_eq!(accrued(&s).await, pools);
    assert_eq!(s.proxy.accepted(), 4, "no extra connections");
}

#[tokio::test(flavor = "multi_thread")]
async fn meter_stream_resends_unanswered_requests_after_a_drop_and_accrues_each_once() {
    let s = setup().await;
    let p = Provider::connect(config(&s, 2)).await.unwrap();
    p.meter(&Meter::usage("warm-up-request", MODEL, 1, 1).unwrap()).await.unwrap();
    let base = accrued(&s).await;
    const N: u64 = 300;
    // The first 150 requests go out; the rest only once the fault is armed, so the break
    // lands in the middle of the stream however fast or slow the machine is.
    let proxy_fault = std::sync::Arc::new(s.proxy.broken.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (armed_tx, armed_rx) = tokio::sync::oneshot::channel::<()>();
    let feeder = tokio::spawn(async move {
        let mut armed_rx = Some(armed_rx);
        for i in 0..N {
            if i == 150 {
                if let Some(rx) = armed_rx.take() {
                    let _ = rx.await;
                }
            }
            let _ = tx.send(Meter::usage(&format!("s-{i}"), MODEL, i, 2 * i).unwrap()).await;
        }
    });
    let mut out = p.meter_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut answers = Vec::new();
    let mut armed_tx = Some(armed_tx);
    while let Some(a) = out.next().await {
        let a = a.expect("every request answered");
        answers.push(a);
        if answers.len() == 100 {
            s.proxy.arm(Fault::DropAnswer);
            if let Some(t) = armed_tx.take() {
                let _ = t.send(());
            }
        }
    }
    feeder.await.unwrap();
    assert_eq!(proxy_fault.load(std::sync::atomic::Ordering::SeqCst), 1, "the stream broke once");
    assert_eq!(answers.len() as u64, N);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.request_id, format!("s-{i}"), "in order");
    }
    assert!(answers.iter().any(|a| a.replayed), "some answers were lost and replayed");
    let pools: u128 = answers.iter().map(|a| a.pool_nsat.0).sum();
    assert_eq!(accrued(&s).await, base + pools, "each request accrued exactly once");
    assert_eq!(s.d.meter_events(), 1 + N as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn meter_stream_answers_a_refused_request_and_goes_on() {
    let s = setup().await;
    let p = Provider::connect(config(&s, 1)).await.unwrap();
    let reqs = vec![
        Meter::usage("ok-1", MODEL, 1, 1).unwrap(),
        Meter::usage("bad-1", "unknown-model", 1, 1).unwrap(),
        Meter::usage("ok-2", MODEL, 1, 1).unwrap(),
    ];
    let out: Vec<_> = p.meter_stream(futures::stream::iter(reqs)).collect().await;
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].as_ref().unwrap().request_id, "ok-1");
    let e = out[1].as_ref().unwrap_err();
    assert_eq!(e.request_id, "bad-1");
    assert_eq!(e.error.reason(), Some(ErrorReason::UnknownModel));
    assert_eq!(out[2].as_ref().unwrap().request_id, "ok-2");
    assert_eq!(s.d.meter_events(), 2);
}
