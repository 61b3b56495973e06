//! Operations: Prometheus metrics over HTTP, gRPC health, TLS, the listen policy, and the
//! channel keeper.

mod common;

use common::*;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tribute_daemon::config::TlsConfig;
use tribute_daemon::server;

async fn scrape(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").await
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
    let value = |series: &str| series_value(&body, series);
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
    // No Lightning node: its series say so; nothing settled; everything accrued is payable.
    assert_eq!(value("tribute_lightning_up"), 0.0);
    assert_eq!(value("tribute_settlements{status=\"succeeded\"}"), 0.0);
    assert_eq!(value("tribute_settled_msat"), 0.0);
    assert_eq!(value("tribute_payable_msat"), sum as f64);
}

/// With a Lightning node and a settlement round: settlement outcomes, paid amounts, fees,
/// nothing stuck, liquidity from the node, nothing payable left.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_settlements_and_lightning_liquidity() {
    use std::sync::Arc;
    use tribute_daemon::lightning::{
        LightningBackend, OnchainBalance, OpenChannelRequest, ScriptedBackend,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.settlement.settle_every_secs = 86_400;
    config.settlement.min_payout_msat = 1;
    let backend = Arc::new(ScriptedBackend::new());
    backend.set_onchain_balance(OnchainBalance {
        total_sat: 2_000_000,
        spendable_sat: 2_000_000,
        ..Default::default()
    });
    let mut node_id = [2u8; 33];
    node_id[1..].copy_from_slice(&pubkey(11).to_bytes());
    backend
        .open_channel(OpenChannelRequest {
            node_id,
            addr: "127.0.0.1:9735".into(),
            amount_sat: 1_000_000,
            push_msat: 250_000_000,
            announce: false,
        })
        .await
        .expect("scripted channel");
    let options = server::StartOptions {
        lightning: Some(backend.clone()),
        settlement: tribute_daemon::settlement::EngineOptions {
            tick: Duration::from_millis(50),
            poll_interval: Duration::from_millis(20),
            ..Default::default()
        },
    };
    let d = TestDaemon::start_with_options(config, options).await;
    setup_model(&d, "m", &[(11, 1), (12, 3)], 1_000_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..30u64 {
        meter.meter(usage_request(&format!("s-{i}"), "m", 3_000_000, 0)).await.expect("meter");
    }
    settle_until_succeeded(&d, 2).await;
    let body = scrape(d.running().metrics_addr.expect("metrics enabled")).await;
    let value = |series: &str| series_value(&body, series);
    let paid: u64 = backend.sent_payments().iter().map(|p| p.amount_msat).sum();
    assert!(paid > 0);
    assert_eq!(value("tribute_settlements{status=\"succeeded\"}"), 2.0);
    assert_eq!(value("tribute_settlements{status=\"pending\"}"), 0.0);
    assert_eq!(value("tribute_settlements{status=\"failed\"}"), 0.0);
    assert_eq!(value("tribute_settled_msat"), paid as f64);
    assert!(value("tribute_settlement_fees_msat") >= 0.0);
    assert_eq!(value("tribute_settlement_oldest_pending_seconds"), 0.0);
    assert_eq!(value("tribute_payable_msat"), 0.0);
    assert_eq!(value("tribute_lightning_up"), 1.0);
    // The node's own figures (the scripted node does not move balances on payment).
    let chans = backend.list_channels().await.expect("channels");
    let out: u64 = chans.iter().map(|c| c.outbound_capacity_msat).sum();
    let inbound: u64 = chans.iter().map(|c| c.inbound_capacity_msat).sum();
    assert_eq!((out, inbound), (750_000_000, 250_000_000));
    assert_eq!(value("tribute_lightning_outbound_msat"), out as f64);
    assert_eq!(value("tribute_lightning_inbound_msat"), inbound as f64);
    assert_eq!(value("tribute_lightning_channels{status=\"usable\"}"), 1.0);
    assert_eq!(value("tribute_lightning_channels{status=\"total\"}"), 1.0);
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

/// The channel keeper: a channel opened through the Operator API and closed without the
/// operator asking (the peer, or a force-close after a crash) is reopened at the same size,
/// after a restart too; a channel the operator closes is not.
#[tokio::test(flavor = "multi_thread")]
async fn kept_channels_are_reopened_after_an_unrequested_close_and_not_after_the_operators() {
    use std::sync::Arc;
    use tribute_daemon::lightning::{LightningBackend, OnchainBalance, ScriptedBackend};
    use tribute_proto::v1 as pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let backend = Arc::new(ScriptedBackend::new());
    backend.set_onchain_balance(OnchainBalance {
        total_sat: 10_000_000,
        spendable_sat: 10_000_000,
        ..Default::default()
    });
    let options = || server::StartOptions {
        lightning: Some(backend.clone()),
        settlement: Default::default(),
    };
    let mut d = TestDaemon::start_with_options(config.clone(), options()).await;
    let peer = |n: u64| {
        let mut id = [2u8; 33];
        id[1..].copy_from_slice(&pubkey(n).to_bytes());
        id
    };
    let (a, b) = (peer(21), peer(22));
    let mut op = d.operator(Some(&d.operator_token)).await;
    for (node, sat) in [(a, 1_000_000), (b, 2_000_000)] {
        op.open_lightning_channel(pb::OpenLightningChannelRequest {
            node_id: node.to_vec(),
            address: "127.0.0.1:9735".into(),
            amount_sat: sat,
            push_msat: 0,
            announce: false,
        })
        .await
        .expect("open");
    }
    let channel_to = |node: [u8; 33]| {
        let backend = backend.clone();
        async move {
            backend
                .list_channels()
                .await
                .expect("channels")
                .into_iter()
                .find(|c| c.counterparty == node)
        }
    };
    let reopens = |db: std::path::PathBuf, node: [u8; 33]| {
        rusqlite::Connection::open(db)
            .expect("open")
            .query_row(
                "SELECT reopens, kept FROM lightning_channel_targets WHERE node_id = ?1",
                [node.to_vec()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?)),
            )
            .expect("target")
    };
    // Waits (bounded) until the keeper has reopened `node`'s channel `n` times in all.
    let reopened = |db: std::path::PathBuf, node: [u8; 33], n: i64| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while reopens(db.clone(), node).0 < n {
            assert!(std::time::Instant::now() < deadline, "not reopened {n} times");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // A's channel closes by itself: a new one of the same size, once.
    let first = channel_to(a).await.expect("A's channel");
    backend.close_by_peer(&first.channel_id).expect("close");
    reopened(d.db_path(), a, 1).await;
    let second = channel_to(a).await.expect("A has a channel again");
    assert_ne!(second.channel_id, first.channel_id);
    assert_eq!(second.capacity_sat, 1_000_000);
    assert_eq!(backend.list_channels().await.expect("channels").len(), 2, "one per peer");

    // The operator closes B's channel: B is no longer kept. Then A's closes again; the pass
    // that reopens it saw B closed and did not reopen B.
    let to_b = channel_to(b).await.expect("B's channel");
    op.close_lightning_channel(pb::CloseLightningChannelRequest {
        channel_id: to_b.channel_id.0.to_vec(),
        force: false,
    })
    .await
    .expect("close");
    backend.close_by_peer(&second.channel_id).expect("close");
    reopened(d.db_path(), a, 2).await;
    assert!(channel_to(b).await.is_none(), "the operator's close was undone");
    assert_eq!(reopens(d.db_path(), b), (0, false));

    // The targets survive a restart: A is still kept, B still not.
    d.stop().await;
    let d = TestDaemon::start_with_options(config, options()).await;
    let third = channel_to(a).await.expect("A's channel");
    backend.close_by_peer(&third.channel_id).expect("close");
    reopened(d.db_path(), a, 3).await;
    assert!(channel_to(b).await.is_none());
    assert_eq!(channel_to(a).await.expect("A's channel").capacity_sat, 1_000_000);
    // Reopening a closed peer is the operator's choice: opening to B again keeps it again.
    let mut op = d.operator(Some(&d.operator_token)).await;
    op.open_lightning_channel(pb::OpenLightningChannelRequest {
        node_id: b.to_vec(),
        address: "127.0.0.1:9735".into(),
        amount_sat: 500_000,
        push_msat: 0,
        announce: false,
    })
    .await
    .expect("open");
    assert_eq!(reopens(d.db_path(), b), (0, true));
}
