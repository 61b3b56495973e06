//! Operations: Prometheus metrics over HTTP, gRPC health, TLS, and the listen policy.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tribute_daemon::config::TlsConfig;
use tribute_daemon::server;

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.expect("write");
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .expect("in time")
        .expect("read");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_scraped_with_balances() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let d = TestDaemon::start_with(config).await;
    setup_model(&d, "m", &[(11, 1), (12, 3)], 1_000_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..40u64 {
        meter.meter(usage_request(&format!("q-{i}"), "m", 100_000, 0)).await.expect("meter");
    }
    // One replay, one rejection, then every head signed.
    assert!(
        meter
            .meter(usage_request("q-0", "m", 100_000, 0))
            .await
            .expect("replay")
            .into_inner()
            .replayed
    );
    meter.meter(usage_request("q-x", "no-such-model", 1, 0)).await.expect_err("unknown model");
    d.running().flush().await;
    let body = scrape(d.running().metrics_addr.expect("metrics enabled")).await;
    assert!(body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"), "{body}");
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {series} in {body}"))
            .parse()
            .expect("number")
    };
    assert_eq!(value("tribute_meter_requests_total{outcome=\"accepted\"}"), 40.0);
    assert_eq!(value("tribute_meter_requests_total{outcome=\"replayed\"}"), 1.0);
    assert_eq!(value("tribute_meter_requests_total{outcome=\"rejected\"}"), 1.0);
    assert_eq!(value("tribute_meter_latency_seconds_count"), 41.0);
    assert_eq!(value("tribute_meter_batch_size_sum"), 40.0);
    assert_eq!(value("tribute_meter_pool_nsat_total"), 40.0 * 1_700_003.0);
    assert!(value("tribute_signed_states_total") >= 2.0);
    assert_eq!(value("tribute_meter_queue_depth"), 0.0);
    assert!(body.contains("tribute_channels 2"), "two channels: {body}");
    // 40 × (1_000_003 + 700_000) nsat, all to contributors, split 1:3.
    let total_msat = 40 * 1_700_003u64 / 1_000_000;
    let accrued: Vec<i64> = body
        .lines()
        .filter(|l| l.starts_with("tribute_channel_accrued_msat{"))
        .map(|l| l.rsplit(' ').next().expect("value").parse().expect("number"))
        .collect();
    assert_eq!(accrued.len(), 2, "{body}");
    let sum: i64 = accrued.iter().sum();
    assert!((total_msat as i64 - sum).abs() <= 2, "accrued {accrued:?} vs {total_msat}");
    assert!(body.contains("tribute_channel_outstanding_msat{"));
    assert!(body.contains("# TYPE tribute_meter_latency_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "tribute.v1.Metering".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listener_serves_and_plain_public_listener_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No TLS on a non-loopback address: refused before anything starts.
    let mut public = test_config(dir.path());
    public.listen = "0.0.0.0:0".parse().expect("addr");
    assert!(matches!(server::start(public).await, Err(server::DaemonError::Config(_))));

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, &cert_pem).expect("write cert");
    std::fs::write(&key_path, &key_pem).expect("write key");
    let mut config = test_config(&dir.path().join("data"));
    config.tls = Some(TlsConfig { cert_path, key_path });
    let d = TestDaemon::start_with(config).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cert_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", d.running().grpc_addr))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("TLS connect");
    let mut auth = AuthClient::with_interceptor(channel, Bearer(Some(d.operator_token.clone())));
    let me =
        auth.who_am_i(tribute_proto::v1::WhoAmIRequest {}).await.expect("who am i").into_inner();
    assert_eq!(me.role, "operator");
    // Plain text to the TLS port fails.
    let plain = Channel::from_shared(format!("http://{}", d.running().grpc_addr))
        .expect("url")
        .connect()
        .await;
    if let Ok(plain) = plain {
        let mut auth = AuthClient::with_interceptor(plain, Bearer(Some(d.operator_token.clone())));
        assert!(auth.who_am_i(tribute_proto::v1::WhoAmIRequest {}).await.is_err());
    }
}
