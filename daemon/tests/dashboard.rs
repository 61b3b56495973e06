//! The dashboard in a real headless browser (Debian's chromium): against a running daemon
//! with live data it loads, shows every channel, draws the accrual chart and lists the
//! settlements and alerts; a screenshot is written to `target/tmp/dashboard.png`.
//!
//! Chromium is installed with apt-get when it is missing (the CI machine is a fresh Debian
//! with its package registry reachable); the test fails, saying why, if that cannot be done.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tribute_channels::channel::ChannelState;
use tribute_channels::codec::Encode;
use tribute_channels::Signed;
use tribute_daemon::lightning::ScriptedBackend;
use tribute_daemon::server::StartOptions;
use tribute_daemon::settlement::EngineOptions;

/// The chromium binary, installed from Debian's packages if needed.
fn chromium() -> PathBuf {
    let find = || {
        ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file())
            })
        })
    };
    if let Some(p) = find() {
        return p;
    }
    let install = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends chromium",
        ])
        .status();
    match (install, find()) {
        (_, Some(p)) => p,
        (result, None) => panic!(
            "the dashboard test needs Debian's chromium and could not install it \
             (apt-get install chromium: {result:?}); install it and run again"
        ),
    }
}

/// Runs headless chromium on `url` with `args`, letting the page's scripts run.
fn browse(browser: &Path, profile: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_live_data_in_a_real_browser() {
    let browser = tokio::task::spawn_blocking(chromium).await.expect("joined");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(&dir.path().join("daemon"));
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.settlement.settle_every_secs = 86_400;
    config.settlement.min_payout_msat = 1;
    // A node with no channels: whatever is owed after the round is more than it can send.
    let backend = Arc::new(ScriptedBackend::new());
    let options = StartOptions {
        lightning: Some(backend.clone()),
        settlement: EngineOptions {
            tick: Duration::from_millis(50),
            poll_interval: Duration::from_millis(20),
            ..Default::default()
        },
    };
    let d = TestDaemon::start_with_options(config, options).await;
    setup_model(&d, "m", &[(21, 2), (22, 3), (23, 5)], 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..60u64 {
        meter.meter(usage_request(&format!("a-{i}"), "m", 2_000_000, 9)).await.expect("meter");
    }
    settle_until_succeeded(&d, 3).await;
    for i in 0..30u64 {
        meter.meter(usage_request(&format!("b-{i}"), "m", 2_000_000, 9)).await.expect("meter");
    }
    d.running().flush().await;
    let addr = d.running().metrics_addr.expect("metrics listener");

    // A contributor reports provider misbehaviour with its proof: a second state signed for
    // the seq it holds (forged here with the provider's key file, as a compromised key or a
    // bug would). The daemon verifies and keeps it; the same proof again changes nothing;
    // states that prove nothing, or another contributor's channel, are refused.
    let provider = tribute_daemon::keys::load_or_create_keypair(
        &d.dir.join(tribute_daemon::server::files::PROVIDER_KEY),
    )
    .expect("provider key");
    let channel = d
        .channels(Some(&d.operator_token))
        .await
        .get_channel(tribute_proto::v1::GetChannelRequest {
            contributor_key: pubkey(21).to_bytes().to_vec(),
            channel_id: vec![],
        })
        .await
        .expect("channel")
        .into_inner();
    let held = channel.latest_state.expect("state").signed_state;
    let mut forked = Signed::<ChannelState>::decode(&held).expect("state").message;
    forked.accrued_nsat.0 += 1;
    let received = Signed::sign(forked, &provider, &[9; 32]).expect("sign").encode();
    let report = |who: u64, held: Vec<u8>, received: Vec<u8>| {
        let d = &d;
        async move {
            let token = d.login(who).await;
            d.channels(Some(&token))
                .await
                .report_misbehaviour(tribute_proto::v1::ReportMisbehaviourRequest {
                    held_state: held,
                    received_state: received,
                })
                .await
        }
    };
    let first = report(21, held.clone(), received.clone()).await.expect("report").into_inner();
    assert_eq!((first.kind.as_str(), first.new_report), ("equivocation", true));
    let again = report(21, held.clone(), received.clone()).await.expect("again").into_inner();
    assert_eq!((again.report_id, again.new_report), (first.report_id, false));
    let before = db_fingerprint(&d.db_path());
    let nothing = report(21, held.clone(), held.clone()).await.expect_err("proves nothing");
    assert_eq!(nothing.code(), tonic::Code::InvalidArgument);
    assert!(nothing.message().contains("prove nothing"), "{nothing:?}");
    let other = report(22, held.clone(), received.clone()).await.expect_err("not theirs");
    assert_eq!(other.code(), tonic::Code::PermissionDenied);
    assert_eq!(db_fingerprint(&d.db_path()), before, "refused reports change nothing");
    let metrics = http_get(addr, "/metrics").await;
    assert_eq!(series_value(&metrics, "tribute_misbehaviour_reports"), 1.0);

    // The API: every channel, a non-empty series, the settlements, the liquidity alert.
    let api = http_get(addr, "/api/dashboard").await;
    let json: serde_json::Value =
        serde_json::from_str(api.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    assert_eq!(json["channels"].as_array().map(Vec::len), Some(3), "{json}");
    assert!(json["accrual_series"]
        .as_array()
        .expect("series")
        .iter()
        .any(|v| v.as_str() != Some("0")));
    assert_eq!(json["settlements"].as_array().map(Vec::len), Some(3), "{json}");
    for kind in ["low_liquidity", "misbehaviour"] {
        assert!(
            json["alerts"].as_array().expect("alerts").iter().any(|a| a["kind"] == kind),
            "no {kind} alert: {json}"
        );
    }

    // The page in chromium: scripts ran, fetched the snapshot and rendered it.
    let profile = tempfile::tempdir().expect("profile");
    let url = format!("http://{addr}/");
    let (b, p, u) = (browser.clone(), profile.path().to_path_buf(), url.clone());
    let out = tokio::task::spawn_blocking(move || browse(&b, &p, &u, &["--dump-dom"]))
        .await
        .expect("joined");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(dom.contains("data-loaded=\"true\""), "page did not load its data: {dom}\n{:?}", out);
    for n in [21u64, 22, 23] {
        let key = hex::encode(pubkey(n).to_bytes());
        assert!(dom.contains(&format!("data-contributor=\"{key}\"")), "no row for {key}: {dom}");
    }
    let points: u32 = dom
        .split("data-points=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .expect("chart drawn");
    assert!(points >= 1, "{dom}");
    assert!(dom.contains("id=\"accrual-line\" d=\"M"), "the chart has a line: {dom}");
    assert_eq!(dom.matches("class=\"succeeded\"").count(), 3, "{dom}");
    assert!(dom.contains("data-kind=\"low_liquidity\""), "{dom}");
    assert!(dom.contains("data-kind=\"misbehaviour\""), "{dom}");

    // A screenshot, kept with the build's temporary files.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let (b, p) = (browser.clone(), profile.path().to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        browse(&b, &p, &url, &[&arg, "--window-size=1280,1500"])
    })
    .await
    .expect("joined");
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}): {out:?}"));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    eprintln!("dashboard screenshot: {}", shot.display());

    let mut d = d;
    d.stop().await;
}
