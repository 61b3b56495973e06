//! `tribute admin …` and `tribute reconcile` against a real daemon on loopback (real SQLite,
//! real gRPC; Lightning through the scripted backend, so payouts succeed at once): tokens
//! issued, used and revoked over the API; settlement control and listing; channels with
//! liquidity; node and funding; a streamed backup that reconciles; clear errors. And the
//! reputation commands: `tribute evaluator submit`, `tribute contributor reputation`,
//! `tribute report reputation`.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use tribute_channels::codec::Encode;
use tribute_channels::licence::{Licence, Use, Uses};
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::sign::secp;
use tribute_channels::{DatasetHash, Network, PublicKey, Signed, Timestamp};
use tribute_daemon::auth::Role;
use tribute_daemon::lightning::ScriptedBackend;
use tribute_daemon::server::{self, RunningDaemon, StartOptions};
use tribute_daemon::settlement::EngineOptions;
use tribute_proto::v1 as pb;

async fn daemon(dir: &Path) -> RunningDaemon {
    let mut c = daemon_config(dir);
    c.settlement.settle_every_secs = 86_400;
    c.settlement.min_payout_msat = 1;
    let options = StartOptions {
        lightning: Some(Arc::new(ScriptedBackend::new())),
        settlement: EngineOptions {
            tick: Duration::from_millis(50),
            poll_interval: Duration::from_millis(20),
            ..EngineOptions::default()
        },
    };
    server::start_with(c, options).await.expect("daemon starts")
}

/// Runs `tribute` with `args` and `token` (off the async workers).
async fn tribute(url: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tribute"));
    cmd.arg("--daemon").arg(url).args(args);
    cmd.env_remove("TRIBUTE_CLI_CONFIG").env("TRIBUTE_CLI_TOKEN", token);
    tokio::task::spawn_blocking(move || cmd.output().expect("runs")).await.expect("joined")
}

fn keypair(n: u8) -> ldk_node::bitcoin::secp256k1::Keypair {
    let mut sk = [0u8; 32];
    sk[31] = n;
    ldk_node::bitcoin::secp256k1::Keypair::from_secret_key(
        secp(),
        &ldk_node::bitcoin::secp256k1::SecretKey::from_slice(&sk).expect("secret"),
    )
}

fn pubkey(n: u8) -> PublicKey {
    PublicKey::from(keypair(n).x_only_public_key().0)
}

/// Two contributors with node ids, licences, a model and a run; 40 requests metered with
/// `provider`.
async fn ledger(url: &str, operator: &str, provider: &str) {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let with = |t: &str| {
        let v: tonic::metadata::MetadataValue<_> = format!("Bearer {t}").parse().expect("ascii");
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", v.clone());
            Ok(r)
        }
    };
    let mut reg =
        pb::registry_client::RegistryClient::with_interceptor(channel.clone(), with(operator));
    let mut datasets = Vec::new();
    for n in [1u8, 2] {
        let mut node_id = [2u8; 33];
        node_id[1..].copy_from_slice(&pubkey(n).to_bytes());
        let r = ContributorRegistration {
            network: Network::Regtest,
            contributor_key: pubkey(n),
            node_id: Some(node_id),
            bolt12_offer: None,
            registered_at: Timestamp(1_700_000_000),
        };
        reg.register_contributor(pb::RegisterContributorRequest {
            signed_registration: Signed::sign(r, &keypair(n), &[1; 32]).expect("sign").encode(),
        })
        .await
        .expect("register");
        let ds = DatasetHash([n; 32]);
        let l = Licence {
            network: Network::Regtest,
            dataset_hash: ds,
            contributor_key: pubkey(n),
            spdx_license_id: "CC-BY-4.0".into(),
            uses: Uses::of(&[Use::Training]),
            not_before: Timestamp(1_600_000_000),
            not_after: Timestamp::MAX,
            signed_at: Timestamp(1_600_000_000),
        };
        reg.register_licence(pb::RegisterLicenceRequest {
            signed_licence: Signed::sign(l, &keypair(n), &[2; 32]).expect("sign").encode(),
        })
        .await
        .expect("licence");
        datasets.push(pb::DatasetWeight { dataset_hash: ds.0.to_vec(), weight: u64::from(n) });
    }
    let mut prov =
        pb::registry_client::RegistryClient::with_interceptor(channel.clone(), with(provider));
    prov.register_model(pb::RegisterModelRequest {
        model_id: "m".into(),
        contributor_share_ppm: 500_000,
        tariff: Some(pb::Tariff {
            per_request_nsat: 3_000_000_007,
            per_input_token_nsat: 0,
            per_output_token_nsat: 0,
        }),
    })
    .await
    .expect("model");
    prov.register_training_run(pb::RegisterTrainingRunRequest {
        run_id: "run".into(),
        model_id: "m".into(),
        started_at: 1_700_000_000,
        finished_at: 1_700_000_100,
        datasets,
    })
    .await
    .expect("run");
    meter(url, provider, "q", 40).await;
}

/// Meters `n` requests `{prefix}{i}` of model `m`.
async fn meter(url: &str, provider: &str, prefix: &str, n: u64) {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let v: tonic::metadata::MetadataValue<_> = format!("Bearer {provider}").parse().expect("ascii");
    let mut meter = pb::metering_client::MeteringClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", v.clone());
            Ok(r)
        },
    );
    for i in 0..n {
        meter
            .meter(pb::MeterRequest {
                request_id: format!("{prefix}{i}"),
                model_id: "m".into(),
                price: Some(pb::meter_request::Price::Usage(pb::Usage {
                    input_tokens: 1,
                    output_tokens: 1,
                })),
                ..Default::default()
            })
            .await
            .expect("meter");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_administers_a_running_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir.path().join("daemon")).await;
    let url = format!("http://{}", d.grpc_addr);
    let root = d
        .tokens
        .create(Role::Operator, None, "root", None, Timestamp(1_700_000_000))
        .expect("token")
        .secret;

    // Tokens over the API: a provider token is issued, works, is listed without its secret.
    let created = ok(&tribute(
        &url,
        &root,
        &["admin", "tokens", "create", "--role", "provider", "--label", "fleet"],
    )
    .await);
    let (provider_id, provider) = (field(&created, "token_id"), field(&created, "token"));
    assert!(provider.starts_with("trb_"), "{created}");
    ledger(&url, &root, &provider).await;
    let listed = ok(&tribute(&url, &root, &["admin", "tokens", "list", "--json"]).await);
    let tokens: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let entry = tokens
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["token_id"] == provider_id.as_str())
        .expect("listed");
    assert_eq!(entry["role"], "provider");
    assert_eq!(entry["label"], "fleet");
    assert_eq!(entry["revoked_at"], 0);
    assert!(!listed.contains(&provider), "a secret was listed");

    // Bad input: a clear error, nothing created.
    let bad = tribute(&url, &root, &["admin", "tokens", "create", "--role", "king"]).await;
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("role"), "{}", stderr(&bad));
    // A provider token cannot administer.
    let denied = tribute(&url, &provider, &["admin", "tokens", "list"]).await;
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("PERMISSION_DENIED") || stderr(&denied).contains("ermission"),
        "{}",
        stderr(&denied)
    );
    let after: serde_json::Value =
        serde_json::from_str(&ok(
            &tribute(&url, &root, &["admin", "tokens", "list", "--json"]).await
        ))
        .expect("json");
    assert_eq!(after.as_array().map(Vec::len), tokens.as_array().map(Vec::len));

    // Settlement control and listing.
    assert!(ok(&tribute(&url, &root, &["admin", "pause"]).await).contains("paused"));
    assert!(ok(&tribute(&url, &root, &["admin", "node"]).await).contains("paused"));
    assert!(ok(&tribute(&url, &root, &["admin", "resume"]).await).contains("running"));
    ok(&tribute(&url, &root, &["admin", "settle-now"]).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let paid = loop {
        let out =
            ok(&tribute(&url, &root, &["admin", "settlements", "--status", "succeeded", "--json"])
                .await);
        let list: serde_json::Value = serde_json::from_str(&out).expect("json");
        if list.as_array().map(Vec::len) == Some(2) {
            break list;
        }
        assert!(std::time::Instant::now() < deadline, "no settlements: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let one = hex::encode(pubkey(1).to_bytes());
    let mine =
        ok(&tribute(&url, &root, &["admin", "settlements", "--contributor", &one, "--json"]).await);
    let mine: serde_json::Value = serde_json::from_str(&mine).expect("json");
    assert_eq!(mine.as_array().map(Vec::len), Some(1));
    assert_eq!(mine[0]["contributor_key"], one.as_str());
    let table = ok(&tribute(&url, &root, &["admin", "settlements"]).await);
    for s in paid.as_array().expect("array") {
        assert!(table.contains(s["payment_hash"].as_str().expect("hash")), "{table}");
    }
    let none = ok(&tribute(&url, &root, &["admin", "settlements", "--status", "failed"]).await);
    assert!(none.contains("(none)"), "{none}");
    let bad_time = tribute(&url, &root, &["admin", "settlements", "--from", "yesterday"]).await;
    assert!(!bad_time.status.success());
    assert!(stderr(&bad_time).contains("--from"), "{}", stderr(&bad_time));

    // Channels: every msat paid, sub-msat remainders outstanding; liquidity section shown.
    let chans: serde_json::Value =
        serde_json::from_str(&ok(&tribute(&url, &root, &["admin", "channels", "--json"]).await))
            .expect("json");
    let list = chans["channels"].as_array().expect("channels");
    assert_eq!(list.len(), 2);
    for c in list {
        let accrued: u128 = c["accrued_nsat"].as_str().expect("s").parse().expect("n");
        let outstanding: u128 = c["outstanding_nsat"].as_str().expect("s").parse().expect("n");
        let settled = u128::from(c["settled_msat"].as_u64().expect("n"));
        assert_eq!(settled * 1_000_000 + outstanding, accrued);
        assert!(outstanding < 1_000_000);
    }
    assert!(chans["lightning_channels"].is_array());
    let text = ok(&tribute(&url, &root, &["admin", "channels"]).await);
    assert!(text.contains(&one) && text.contains("total outbound"), "{text}");
    assert!(ok(&tribute(&url, &root, &["admin", "funding-address"]).await)
        .trim()
        .starts_with("bcrt1"));

    // Backup: streamed, checked, and it reconciles; an existing file is never overwritten.
    let file = dir.path().join("ledger.sqlite");
    let b = ok(&tribute(&url, &root, &["admin", "backup", file.to_str().expect("utf8")]).await);
    let bytes = std::fs::read(&file).expect("backup written");
    assert_eq!(field(&b, "size"), format!("{} bytes", bytes.len()));
    use ldk_node::bitcoin::hashes::{sha256, Hash};
    assert_eq!(field(&b, "sha256"), hex::encode(sha256::Hash::hash(&bytes).to_byte_array()));
    let again = tribute(&url, &root, &["admin", "backup", file.to_str().expect("utf8")]).await;
    assert!(!again.status.success() && stderr(&again).contains("not overwriting"));
    assert_eq!(std::fs::read(&file).expect("still there"), bytes);
    let key = hex::encode(d.provider_key.to_bytes());
    let rec =
        tribute(&url, &root, &["reconcile", file.to_str().expect("utf8"), "--provider-key", &key])
            .await;
    assert!(rec.status.success(), "{}{}", stdout(&rec), stderr(&rec));
    assert!(stdout(&rec).contains("40 meter events"), "{}", stdout(&rec));
    // No backup file is left in the daemon's data dir.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("daemon"))
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("backup-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A corrupted copy: reconcile exits 1 and names the record.
    let conn = rusqlite::Connection::open(&file).expect("open copy");
    conn.execute("UPDATE settlements SET preimage = zeroblob(32) WHERE settlement_id = 1", [])
        .expect("corrupt");
    drop(conn);
    let rec = tribute(&url, &root, &["reconcile", file.to_str().expect("utf8")]).await;
    assert_eq!(rec.status.code(), Some(1), "{}", stdout(&rec));
    assert!(stdout(&rec).contains("settlement_id=1"), "{}", stdout(&rec));

    // Revoked: the provider token stops working at once.
    ok(&tribute(&url, &root, &["admin", "tokens", "revoke", &provider_id]).await);
    let revoked = tribute(
        &url,
        &provider,
        &["provider", "meter", "--model", "m", "--request-id", "late", "--price-nsat", "5"],
    )
    .await;
    assert!(!revoked.status.success());
    assert!(stderr(&revoked).contains("revoked"), "{}", stderr(&revoked));
    let unknown = tribute(&url, &root, &["admin", "tokens", "revoke", "nope"]).await;
    assert!(
        !unknown.status.success() && stderr(&unknown).contains("NOT_FOUND")
            || stderr(&unknown).contains("no token"),
        "{}",
        stderr(&unknown)
    );

    d.shutdown().await.expect("shutdown");
}

/// Unix seconds now.
fn now() -> u64 {
    tribute_client::time::unix_now().0
}

/// Waits until the wall clock is past `t` (receipt batches and settlements are timed to
/// the second, so each phase lands in its own period).
async fn after(t: u64) -> u64 {
    while now() <= t {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    now()
}

fn csv_rows(text: &str) -> Vec<csv::StringRecord> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    r.records().collect::<Result<_, _>>().expect("CSV parses")
}

fn nsat_cell(r: &csv::StringRecord, i: usize) -> u128 {
    let c = r.get(i).expect("cell");
    if c.is_empty() {
        0
    } else {
        c.parse().expect("nsat")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_chain_across_periods_and_exports_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir.path().join("daemon")).await;
    let url = format!("http://{}", d.grpc_addr);
    let token =
        |role| d.tokens.create(role, None, "t", None, Timestamp(now())).expect("token").secret;
    let (root, provider) = (token(Role::Operator), token(Role::Provider));

    // Period 1: accruals. Period 2: accruals and a settlement. Period 3: accruals.
    // Each boundary is a second after the last thing of the period before it happened.
    ledger(&url, &root, &provider).await;
    let t1 = after(now()).await;
    meter(&url, &provider, "b", 30).await;
    // Both contributors paid (a round may end with a payout still in flight).
    let db_path = tribute_daemon::server::database_path(&dir.path().join("daemon"));
    loop {
        d.settlement.settle_now_and_wait().await;
        let conn = rusqlite::Connection::open(&db_path).expect("open");
        let done: i64 = conn
            .query_row("SELECT COUNT(*) FROM settlements WHERE status = 'succeeded'", [], |r| {
                r.get(0)
            })
            .expect("count");
        if done == 2 {
            break;
        }
    }
    let t2 = after(now()).await;
    meter(&url, &provider, "c", 20).await;
    let t3 = after(now()).await;

    let file = dir.path().join("ledger.sqlite");
    ok(&tribute(&url, &root, &["admin", "backup", file.to_str().expect("utf8")]).await);
    let db = file.to_str().expect("utf8").to_owned();
    let key = hex::encode(pubkey(2).to_bytes());
    let statement = |from: u64, until: u64, format: &'static str| {
        let (url, root, db, key) = (url.clone(), root.clone(), db.clone(), key.clone());
        async move {
            let args = [
                "report",
                "statement",
                &db,
                "--contributor",
                &key,
                "--from",
                &from.to_string(),
                "--until",
                &until.to_string(),
                "--format",
                format,
            ]
            .map(str::to_owned);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ok(&tribute(&url, &root, &args).await)
        }
    };
    let periods = [(0, t1), (t1, t2), (t2, t3 + 1)];
    let mut json = Vec::new();
    for (from, until) in periods {
        let v: serde_json::Value =
            serde_json::from_str(&statement(from, until, "json").await).expect("json");
        json.push(v);
    }
    // A closing balance is the next period's opening balance; each closes what it opened
    // plus its accruals minus its settlements.
    for w in json.windows(2) {
        assert_eq!(w[0]["closing"], w[1]["opening"], "{w:?}");
    }
    for st in &json {
        let n = |v: &serde_json::Value| v.as_str().expect("str").parse::<u128>().expect("n");
        let opening = n(&st["opening"]["outstanding_nsat"]);
        let closing = n(&st["closing"]["outstanding_nsat"]);
        let settled = u128::from(st["settled_msat"].as_u64().expect("n")) * 1_000_000;
        assert_eq!(opening + n(&st["accrued_nsat"]) - settled, closing, "{st}");
        assert!(n(&st["accrued_nsat"]) > 0, "every period accrued: {st}");
    }
    assert_eq!(json[0]["settlements"].as_array().map(Vec::len), Some(0));
    let paid = &json[1]["settlements"].as_array().expect("array")[0];
    use ldk_node::bitcoin::hashes::{sha256, Hash};
    let preimage = hex::decode(paid["preimage"].as_str().expect("hex")).expect("hex");
    assert_eq!(
        hex::encode(sha256::Hash::hash(&preimage).to_byte_array()),
        paid["payment_hash"].as_str().expect("hex")
    );
    assert!(json[2]["closing"]["outstanding_nsat"] != json[1]["closing"]["outstanding_nsat"]);

    // The CSV of the settled period parses with a standard reader and its totals match
    // the JSON.
    let rows = csv_rows(&statement(t1, t2, "csv").await);
    assert_eq!(rows.first().and_then(|r| r.get(0)), Some("opening"));
    assert_eq!(rows.last().and_then(|r| r.get(0)), Some("closing"));
    let credits: u128 = rows.iter().map(|r| nsat_cell(r, 3)).sum();
    let debits: u128 = rows.iter().map(|r| nsat_cell(r, 4)).sum();
    let st = &json[1];
    assert_eq!(credits.to_string(), st["accrued_nsat"].as_str().expect("s"));
    assert_eq!(debits, u128::from(st["settled_msat"].as_u64().expect("n")) * 1_000_000);
    assert_eq!(rows.last().and_then(|r| r.get(5)), st["closing"]["outstanding_nsat"].as_str());
    // The running balance before the closing row ends where the closing row says.
    assert_eq!(rows[rows.len() - 2].get(5), rows[rows.len() - 1].get(5));
    assert!(statement(t1, t2, "text").await.contains("closing"));

    // The journal: CSV and JSON agree; credits over all channels are the pools; each
    // channel's last balance is its outstanding amount.
    let journal_csv = ok(&tribute(&url, &root, &["report", "journal", &db]).await);
    let journal: serde_json::Value = serde_json::from_str(&ok(&tribute(
        &url,
        &root,
        &["report", "journal", &db, "--format", "json"],
    )
    .await))
    .expect("json");
    let entries = journal.as_array().expect("array");
    let rows = csv_rows(&journal_csv);
    assert_eq!(rows.len(), entries.len());
    let credits: u128 = rows.iter().map(|r| nsat_cell(r, 5)).sum();
    let report = tribute_daemon::reconcile::reconcile_file(&file).expect("reconcile");
    assert!(report.is_clean(), "{report}");
    assert_eq!(credits, report.totals.pools_nsat);
    for c in &report.channels {
        let last =
            rows.iter().rev().find(|r| r.get(3) == Some(c.channel_id.as_str())).expect("rows");
        assert_eq!(nsat_cell(last, 7), c.outstanding_nsat, "{}", c.channel_id);
    }

    // Bad input: a clear error.
    let bad = tribute(&url, &root, &["report", "statement", &db, "--contributor", "zz"]).await;
    assert!(!bad.status.success() && stderr(&bad).contains("--contributor"), "{}", stderr(&bad));
    let out = tribute(
        &url,
        &root,
        &[
            "report",
            "statement",
            &db,
            "--contributor",
            &key,
            "--from",
            &t2.to_string(),
            "--until",
            &t1.to_string(),
        ],
    )
    .await;
    assert!(!out.status.success() && stderr(&out).contains("period"), "{}", stderr(&out));

    d.shutdown().await.expect("shutdown");
}

/// Writes key `n` as a key file (one line of hex, mode 0600) at `path`.
fn write_key(path: &Path, n: u8) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("key file");
    writeln!(f, "{}", hex::encode(keypair(n).secret_bytes())).expect("write");
}

/// `tribute evaluator submit`, `tribute contributor reputation` (through the daemon) and
/// `tribute report reputation` (recomputed from a backup) agree.
#[tokio::test(flavor = "multi_thread")]
async fn an_evaluator_submits_and_reputation_is_served_and_recomputed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(&dir.path().join("daemon")).await;
    let url = format!("http://{}", d.grpc_addr);
    let now = Timestamp(1_700_000_000);
    let token = |role, key| d.tokens.create(role, key, "t", None, now).expect("token").secret;
    let (root, provider) = (token(Role::Operator, None), token(Role::Provider, None));
    ledger(&url, &root, &provider).await;
    let evaluator = token(Role::Evaluator, Some(pubkey(9)));
    let key = dir.path().join("evaluator.key");
    write_key(&key, 9);
    let body = dir.path().join("eval.json");
    let ds = |n: u8| hex::encode([n; 32]);
    std::fs::write(
        &body,
        format!(
            r#"{{"evaluation_id": "e-cli", "model_id": "m", "attribution_version": 1,
            "benchmark_id": "mmlu-mini", "benchmark_sha256": "{}", "metric": "accuracy",
            "higher_is_better": true, "full_score": 0.83, "evaluated_at": 1780000000,
            "datasets": [{{"dataset": "{}", "method": "knn-shapley", "value": -0.01,
                           "samples": 1000, "ci_low": -0.02, "ci_high": 0.0}},
                         {{"dataset": "{}", "method": "leave-one-out", "ablation_score": 0.80}}]}}"#,
            hex::encode([5u8; 32]),
            ds(2),
            ds(1)
        ),
    )
    .expect("json");
    let (body_arg, key_arg) = (body.to_str().expect("utf8"), key.to_str().expect("utf8"));
    let submit = |token: String| {
        let url = url.clone();
        async move { tribute(&url, &token, &["evaluator", "submit", body_arg, "--key", key_arg]).await }
    };
    assert!(
        ok(&submit(evaluator.clone()).await).contains("recorded evaluation e-cli (2 measurements)")
    );
    assert!(ok(&submit(evaluator.clone()).await).contains("already recorded"));
    // A token bound to another key may not submit this key's record.
    let other = submit(token(Role::Evaluator, Some(pubkey(8)))).await;
    assert!(!other.status.success());
    assert!(stderr(&other).contains("EVALUATOR_NOT_AUTHORIZED"), "{}", stderr(&other));

    // Contributor 1's own view, through the daemon.
    let home = dir.path().join("home-1");
    std::fs::create_dir(&home).expect("home");
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("mode");
    write_key(&home.join("contributor.key"), 1);
    let as_of = "1780086400";
    let view = ok(&tribute(
        &url,
        "",
        &[
            "--home",
            home.to_str().expect("utf8"),
            "contributor",
            "reputation",
            "--as-of",
            as_of,
            "--json",
        ],
    )
    .await);
    let view: serde_json::Value = serde_json::from_str(&view).expect("json");
    assert_eq!(view["datasets"].as_array().expect("datasets").len(), 1);
    assert_eq!(view["datasets"][0]["dataset"], ds(1));
    assert_eq!(view["datasets"][0]["contributions"][0]["evaluation_id"], "e-cli");
    let served = view["datasets"][0]["reputation"]["score_ppb"].as_i64().expect("score");
    assert_eq!(served, 30_000_000 * 1_000_000_000 / 830_000_000, "(0.83 - 0.80) / 0.83");

    // Recomputed from a backup: the same numbers.
    let file = dir.path().join("backup.sqlite");
    ok(&tribute(&url, &root, &["admin", "backup", file.to_str().expect("utf8")]).await);
    let report = ok(&tribute(
        &url,
        &root,
        &[
            "report",
            "reputation",
            file.to_str().expect("utf8"),
            "--as-of",
            as_of,
            "--format",
            "json",
        ],
    )
    .await);
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    let of = |d: &str| {
        report["datasets"]
            .as_array()
            .expect("datasets")
            .iter()
            .find(|v| v["dataset"] == d)
            .map(|v| v["score_ppb"].as_i64().expect("score"))
    };
    assert_eq!(of(&ds(1)), Some(served));
    assert!(of(&ds(2)).expect("measured") < 0, "dataset 2 hurts the model");

    // The provider weights the model's payouts by reputation: a new attribution version in
    // which the helpful dataset gains and the harmful one loses.
    let out = ok(&tribute(
        &url,
        &provider,
        &["provider", "quality-policy", "--model", "m", "--policy-id", "q", "--as-of", as_of],
    )
    .await);
    assert_eq!(field(&out, "attribution_version"), "2", "{out}");
    assert_eq!(field(&out, "base_version"), "1", "{out}");
    assert_eq!(field(&out, "policy"), "q v1", "{out}");
    let factor = |d: &str| -> u64 {
        let line = out.lines().find(|l| l.contains(d)).unwrap_or_else(|| panic!("{d} in {out}"));
        line.rsplit(' ').next().and_then(|f| f.parse().ok()).expect("factor")
    };
    assert!(factor(&ds(1)) > 1_000_000 && factor(&ds(2)) < 1_000_000, "{out}");
    // Bad clamps are refused with the reason, and make no version.
    let bad = tribute(
        &url,
        &provider,
        &[
            "provider",
            "quality-policy",
            "--model",
            "m",
            "--policy-id",
            "q",
            "--floor-ppm",
            "3000000",
        ],
    )
    .await;
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("INVALID_QUALITY_POLICY"), "{}", stderr(&bad));
    d.shutdown().await.expect("clean shutdown");
}
