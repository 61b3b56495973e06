//! The `tribute` binary against a real daemon on loopback with a real SQLite file:
//! init, register, register-dataset, licences, revoke, and clear errors.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tribute_daemon::auth::Role;
use tribute_daemon::config::Config;
use tribute_daemon::server::{self, RunningDaemon};

const FIXTURE_DATASET_HASH: &str =
    "636cb2d8992bf57568dadbced1d059ef47c541580dbdf4588187546f32f13bca";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dataset")
}

async fn daemon(dir: &Path) -> RunningDaemon {
    let c = Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        ..Config::default()
    };
    server::start(c).await.expect("daemon starts")
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

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {out}"))
        .trim()
        .to_owned()
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
