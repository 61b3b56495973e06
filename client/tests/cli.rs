//! The `tribute` binary against a real daemon on loopback with a real SQLite file:
//! init, register, register-dataset, licences, revoke, and clear errors.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tribute_daemon::auth::Role;
use tribute_daemon::server::{self, RunningDaemon};

const FIXTURE_DATASET_HASH: &str =
    "636cb2d8992bf57568dadbced1d059ef47c541580dbdf4588187546f32f13bca";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dataset")
}

async fn daemon(dir: &Path) -> RunningDaemon {
    server::start(daemon_config(dir)).await.expect("daemon starts")
}

/// Runs `tribute` with `args` (off the async workers) and the given environment.
async fn tribute(home: &Path, url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tribute"));
    cmd.arg("--home").arg(home).arg("--daemon").arg(url).args(args);
    cmd.env_remove("TRIBUTE_CLI_TOKEN").env_remove("TRIBUTE_CLI_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("runs")).await.expect("joined")
}

#[tokio::test(flavor = "multi_thread")]
async fn contributor_lifecycle_against_a_real_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir.path().join("daemon")).await;
    let url = format!("http://{}", d.grpc_addr);
    let alice = dir.path().join("alice");

    let o = tribute(&alice, &url, &["contributor", "init"], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let key = field(&stdout(&o), "contributor_key");
    let key_file = alice.join("contributor.key");
    assert_eq!(std::fs::metadata(&key_file).expect("key").permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&alice).expect("home").permissions().mode() & 0o777, 0o700);
    let o = tribute(&alice, &url, &["contributor", "init"], &[]).await;
    assert!(o.status.success());
    assert!(stdout(&o).contains("already initialised"));
    assert_eq!(field(&stdout(&o), "contributor_key"), key, "init never replaces the key");

    let node_id = format!("02{key}");
    let o = tribute(&alice, &url, &["contributor", "register", "--node-id", &node_id], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));

    let fx = fixture();
    let fx = fx.to_str().expect("utf-8 path");
    let o = tribute(
        &alice,
        &url,
        &[
            "contributor",
            "register-dataset",
            fx,
            "--licence",
            "CC-BY-4.0",
            "--uses",
            "training,retrieval",
            "--not-after",
            "2100-01-01",
        ],
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(field(&out, "dataset_hash"), FIXTURE_DATASET_HASH);
    assert_eq!(field(&out, "uses"), "training,retrieval");
    assert_eq!(field(&out, "not_after"), "4102444800");
    let licence_id = field(&out, "licence_id");

    // The daemon has it, signed by alice's key.
    let o = tribute(&alice, &url, &["contributor", "licences"], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(field(&stdout(&o), "licence_id"), licence_id);
    assert_eq!(field(&stdout(&o), "revoked_at"), "-");

    // Someone else cannot license alice's dataset: the daemon's code and reason are shown.
    let bob = dir.path().join("bob");
    assert!(tribute(&bob, &url, &["contributor", "init"], &[]).await.status.success());
    let o = tribute(
        &bob,
        &url,
        &["contributor", "register-dataset", fx, "--licence", "MIT", "--uses", "training"],
        &[],
    )
    .await;
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("Registry.RegisterLicence failed: ALREADY_EXISTS CONFLICT"), "{e}");
    assert!(e.contains(FIXTURE_DATASET_HASH), "names the dataset: {e}");

    // Bad input is refused before anything is sent.
    let o = tribute(
        &alice,
        &url,
        &["contributor", "register-dataset", fx, "--licence", "CC BY!", "--uses", "training"],
        &[],
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("SPDX"), "{}", stderr(&o));
    let o = tribute(
        &alice,
        &url,
        &["contributor", "register-dataset", fx, "--licence", "MIT", "--uses", "selling"],
        &[],
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("selling"), "{}", stderr(&o));
    let o = tribute(
        &alice,
        &url,
        &[
            "contributor",
            "register-dataset",
            fx,
            "--licence",
            "MIT",
            "--uses",
            "training",
            "--not-after",
            "someday",
        ],
        &[],
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--not-after"), "{}", stderr(&o));

    // Revoke by dataset hash.
    let o = tribute(
        &alice,
        &url,
        &["contributor", "revoke", FIXTURE_DATASET_HASH, "--at", "2099-01-01"],
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(field(&stdout(&o), "revoked_at"), "4070908800");
    assert_eq!(field(&stdout(&o), "licence_id"), licence_id);
    // Nothing left to revoke.
    let o = tribute(&alice, &url, &["contributor", "revoke", fx], &[]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no unrevoked licence"), "{}", stderr(&o));

    // A provider call with the wrong role's token, and with none.
    let o = tribute(
        &alice,
        &url,
        &["provider", "meter", "--model", "m", "--request-id", "r1", "--price-nsat", "5"],
        &[],
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("TRIBUTE_CLI_TOKEN"), "{}", stderr(&o));
    let acct = d
        .tokens
        .create(Role::Accountant, None, "t", None, tribute_client::time::unix_now())
        .expect("token")
        .secret;
    let o = tribute(
        &alice,
        &url,
        &["provider", "meter", "--model", "m", "--request-id", "r1", "--price-nsat", "5"],
        &[("TRIBUTE_CLI_TOKEN", &acct)],
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("PERMISSION_DENIED WRONG_ROLE"), "{}", stderr(&o));
    let prov = d
        .tokens
        .create(Role::Provider, None, "t", None, tribute_client::time::unix_now())
        .expect("token")
        .secret;
    let o = tribute(
        &alice,
        &url,
        &["provider", "meter", "--model", "m", "--request-id", "r1", "--price-nsat", "5"],
        &[("TRIBUTE_CLI_TOKEN", &prov)],
    )
    .await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("NOT_FOUND UNKNOWN_MODEL"), "{}", stderr(&o));

    d.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_daemon_and_missing_key_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("h");
    let o = tribute(&home, "http://127.0.0.1:9", &["contributor", "licences"], &[]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tribute contributor init"), "{}", stderr(&o));
    assert!(tribute(&home, "http://127.0.0.1:9", &["contributor", "init"], &[])
        .await
        .status
        .success());
    let o = tribute(&home, "http://127.0.0.1:9", &["contributor", "licences"], &[]).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot connect to the daemon at http://127.0.0.1:9"),
        "{}",
        stderr(&o)
    );
    let o = tribute(&home, "https://127.0.0.1:9", &["contributor", "licences"], &[]).await;
    assert!(stderr(&o).contains("--tls-ca"), "{}", stderr(&o));
    let o = tribute(&home, "127.0.0.1:9", &["contributor", "licences"], &[]).await;
    assert!(stderr(&o).contains("http://"), "{}", stderr(&o));
}

/// Polls `tribute contributor status` until `accrued_nsat` is `want`.
async fn status_reaches(home: &Path, url: &str, want: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = tribute(home, url, &["contributor", "status"], &[]).await;
        if o.status.success() && field(&stdout(&o), "accrued_nsat") == want {
            return stdout(&o);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never showed {want}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn run_follows_the_channel_and_status_reads_the_nodes_own_records() {
    use tribute_client::connect::Bearer;
    use tribute_proto::v1 as pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir.path().join("daemon")).await;
    let url = format!("http://{}", d.grpc_addr);
    let home = dir.path().join("carol");
    let o = tribute(&home, &url, &["contributor", "status"], &[]).await;
    assert!(stderr(&o).contains("tribute contributor run"), "{}", stderr(&o));
    assert!(tribute(&home, &url, &["contributor", "init"], &[]).await.status.success());
    let fx = fixture();
    let fx = fx.to_str().expect("utf-8");
    let o = tribute(
        &home,
        &url,
        &["contributor", "register-dataset", fx, "--licence", "CC0-1.0", "--uses", "training"],
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));

    // A provider trains a model on it (with the CLI) and meters requests (with the SDK).
    let now = tribute_client::time::unix_now();
    let prov = d.tokens.create(Role::Provider, None, "p", None, now).expect("token").secret;
    let op = d.tokens.create(Role::Operator, None, "o", None, now).expect("token").secret;
    let as_provider = [("TRIBUTE_CLI_TOKEN", prov.as_str())];
    let o = tribute(
        &home,
        &url,
        &[
            "provider",
            "register-model",
            "--model",
            "m",
            "--share-ppm",
            "250000",
            "--per-request-nsat",
            "4000001",
            "--per-input-token-nsat",
            "3",
            "--per-output-token-nsat",
            "5",
        ],
        &as_provider,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let started = (now.0 + 1).to_string();
    let ds = format!("{FIXTURE_DATASET_HASH}=1");
    let o = tribute(
        &home,
        &url,
        &[
            "provider",
            "register-run",
            "--model",
            "m",
            "--run-id",
            "m-1",
            "--started-at",
            &started,
            "--dataset",
            &ds,
        ],
        &as_provider,
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(field(&stdout(&o), "attribution_version"), "1");
    // A run over an unlicensed dataset names the reason.
    let unknown = format!("{}=1", "ab".repeat(32));
    let o = tribute(
        &home,
        &url,
        &[
            "provider",
            "register-run",
            "--model",
            "m",
            "--run-id",
            "m-2",
            "--started-at",
            &started,
            "--dataset",
            &unknown,
        ],
        &as_provider,
    )
    .await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Registry.RegisterTrainingRun failed: FAILED_PRECONDITION"),
        "{}",
        stderr(&o)
    );
    let o = tribute(
        &home,
        &url,
        &[
            "provider",
            "register-run",
            "--model",
            "m",
            "--run-id",
            "m-3",
            "--started-at",
            "now",
            "--dataset",
            "nope",
        ],
        &as_provider,
    )
    .await;
    assert!(stderr(&o).contains("HASH=WEIGHT"), "{}", stderr(&o));
    let channel = tribute_client::DaemonEndpoint::new(&url).connect().await.expect("connect");
    let provider = tribute_client::Provider::connect(tribute_client::ProviderConfig::new(
        tribute_client::DaemonEndpoint::new(&url),
        prov,
    ))
    .await
    .expect("provider");
    for i in 0..7 {
        provider
            .meter(&tribute_client::Meter::usage(&format!("q-{i}"), "m", i, i).expect("meter"))
            .await
            .expect("metered");
    }

    let mut node = Command::new(env!("CARGO_BIN_EXE_tribute"))
        .arg("--home")
        .arg(&home)
        .arg("--daemon")
        .arg(&url)
        .args(["contributor", "run"])
        .env_remove("TRIBUTE_CLI_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node starts");
    let mut chans = pb::channels_client::ChannelsClient::with_interceptor(
        channel,
        Bearer::new(Some(&op)).expect("bearer"),
    );
    let key = field(
        &stdout(&tribute(&home, &url, &["contributor", "show"], &[]).await),
        "contributor_key",
    );
    let want = chans
        .get_channel(pb::GetChannelRequest {
            contributor_key: hex::decode(&key).expect("hex"),
            channel_id: vec![],
        })
        .await
        .expect("channel")
        .into_inner();
    let out = status_reaches(&home, &url, &want.accrued_nsat).await;
    assert_eq!(field(&out, "outstanding_nsat"), want.outstanding_nsat);
    assert_eq!(field(&out, "settled_msat"), "0");
    assert_eq!(field(&out, "proofs"), "0");
    assert_eq!(field(&out, "contributor_key"), key);

    // SIGTERM stops it cleanly; its records stay readable.
    let killed =
        Command::new("kill").args(["-TERM", &node.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let exit =
        tokio::task::spawn_blocking(move || node.wait()).await.expect("joined").expect("waited");
    assert!(exit.success(), "{exit:?}");
    let o = tribute(&home, &url, &["contributor", "status"], &[]).await;
    assert_eq!(field(&stdout(&o), "accrued_nsat"), want.accrued_nsat);
    d.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_daemon_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("key");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, other.cert.pem()).expect("cert");
    let mut config = daemon_config(&dir.path().join("daemon"));
    config.tls = Some(tribute_daemon::config::TlsConfig { cert_path: cert_path.clone(), key_path });
    let d = server::start(config).await.expect("daemon starts");
    let url = format!("https://{}", d.grpc_addr);
    let home = dir.path().join("dora");
    assert!(tribute(&home, &url, &["contributor", "init"], &[]).await.status.success());
    let ca = cert_path.to_str().expect("utf-8");
    let domain = [("TRIBUTE_CLI_TLS_DOMAIN", "localhost")];

    let o = tribute(&home, &url, &["--tls-ca", ca, "contributor", "licences"], &domain).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "no licences");
    let o = tribute(
        &home,
        &url,
        &["--tls-ca", ca, "--tls-domain", "localhost", "contributor", "licences"],
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));

    let o = tribute(&home, &url, &["contributor", "licences"], &domain).await;
    assert!(stderr(&o).contains("--tls-ca"), "{}", stderr(&o));
    let wrong = wrong_ca.to_str().expect("utf-8");
    let o = tribute(&home, &url, &["--tls-ca", wrong, "contributor", "licences"], &domain).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));

    // The provider SDK over TLS: the daemon's verdict comes back.
    let prov = d
        .tokens
        .create(Role::Provider, None, "p", None, tribute_client::time::unix_now())
        .expect("token")
        .secret;
    let o = tribute(
        &home,
        &url,
        &[
            "--tls-ca",
            ca,
            "provider",
            "meter",
            "--model",
            "m",
            "--request-id",
            "r",
            "--price-nsat",
            "9",
        ],
        &[("TRIBUTE_CLI_TLS_DOMAIN", "localhost"), ("TRIBUTE_CLI_TOKEN", &prov)],
    )
    .await;
    assert!(stderr(&o).contains("NOT_FOUND UNKNOWN_MODEL"), "{}", stderr(&o));
    d.shutdown().await.expect("stops");
}
