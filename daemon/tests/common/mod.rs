//! Test support: a real daemon on loopback with a real SQLite file, clients with bearer
//! tokens, deterministic keys and signed registrations.
#![allow(dead_code)]

use ldk_node::bitcoin::secp256k1::{Keypair, SecretKey};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tribute_channels::codec::Encode;
use tribute_channels::licence::{Licence, Use, Uses};
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::sign::secp;
use tribute_channels::{DatasetHash, Network, PublicKey, Signed, Timestamp};
use tribute_daemon::auth::Role;
use tribute_daemon::config::Config;
use tribute_daemon::ledger::unix_now;
use tribute_daemon::server::{self, RunningDaemon};
use tribute_proto::v1 as pb;

pub use pb::auth_client::AuthClient;
pub use pb::channels_client::ChannelsClient;
pub use pb::metering_client::MeteringClient;
pub use pb::operator_client::OperatorClient;
pub use pb::receipts_client::ReceiptsClient;
pub use pb::registry_client::RegistryClient;

/// Adds `authorization: Bearer …`.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().expect("ascii token"));
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// The key pair with secret `n`.
pub fn keypair(n: u64) -> Keypair {
    let mut sk = [0u8; 32];
    sk[24..].copy_from_slice(&n.to_be_bytes());
    Keypair::from_secret_key(secp(), &SecretKey::from_slice(&sk).expect("secret"))
}

pub fn pubkey(n: u64) -> PublicKey {
    PublicKey::from(keypair(n).x_only_public_key().0)
}

pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        ..Config::default()
    };
    c.meter.stream_interval_ms = 20;
    c
}

pub struct TestDaemon {
    pub daemon: Option<RunningDaemon>,
    pub dir: PathBuf,
    pub provider_token: String,
    pub operator_token: String,
    pub accountant_token: String,
}

impl TestDaemon {
    pub async fn start(dir: &Path) -> TestDaemon {
        Self::start_with(test_config(dir)).await
    }

    pub async fn start_with(config: Config) -> TestDaemon {
        Self::start_with_options(config, server::StartOptions::default()).await
    }

    pub async fn start_with_options(config: Config, options: server::StartOptions) -> TestDaemon {
        let dir = config.data_dir.clone();
        let daemon = server::start_with(config, options).await.expect("daemon starts");
        let now = Timestamp(unix_now());
        let token =
            |role| daemon.tokens.create(role, None, "test", None, now).expect("token").secret;
        let (provider_token, operator_token, accountant_token) =
            (token(Role::Provider), token(Role::Operator), token(Role::Accountant));
        TestDaemon { daemon: Some(daemon), dir, provider_token, operator_token, accountant_token }
    }

    pub fn running(&self) -> &RunningDaemon {
        self.daemon.as_ref().expect("running")
    }

    pub fn db_path(&self) -> PathBuf {
        server::database_path(&self.dir)
    }

    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.expect("clean shutdown");
        }
    }

    pub async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.running().grpc_addr);
        Channel::from_shared(url)
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect")
    }

    pub async fn token_for(&self, role: Role, key: Option<PublicKey>) -> String {
        self.running()
            .tokens
            .create(role, key, "test", None, Timestamp(unix_now()))
            .expect("token")
            .secret
    }

    pub async fn registry(&self, token: Option<&str>) -> RegistryClient<Authed> {
        RegistryClient::with_interceptor(self.channel().await, Bearer(token.map(str::to_owned)))
    }
    pub async fn metering(&self, token: Option<&str>) -> MeteringClient<Authed> {
        MeteringClient::with_interceptor(self.channel().await, Bearer(token.map(str::to_owned)))
    }
    pub async fn channels(&self, token: Option<&str>) -> ChannelsClient<Authed> {
        ChannelsClient::with_interceptor(self.channel().await, Bearer(token.map(str::to_owned)))
    }
    pub async fn receipts(&self, token: Option<&str>) -> ReceiptsClient<Authed> {
        ReceiptsClient::with_interceptor(self.channel().await, Bearer(token.map(str::to_owned)))
    }
    pub async fn auth(&self, token: Option<&str>) -> AuthClient<Authed> {
        AuthClient::with_interceptor(self.channel().await, Bearer(token.map(str::to_owned)))
    }
    pub async fn operator(&self, token: Option<&str>) -> OperatorClient<Authed> {
        OperatorClient::with_interceptor(self.channel().await, Bearer(token.map(str::to_owned)))
    }

    /// Logs a contributor in with a signed challenge; returns its session token.
    pub async fn login(&self, n: u64) -> String {
        let mut auth = self.auth(None).await;
        let ch = auth
            .get_challenge(pb::GetChallengeRequest {
                contributor_key: pubkey(n).to_bytes().to_vec(),
            })
            .await
            .expect("challenge")
            .into_inner();
        let challenge =
            tribute_channels::auth::AuthChallenge::decode(&ch.challenge).expect("decodes");
        let signed = Signed::sign(challenge, &keypair(n), &[7; 32]).expect("sign");
        auth.login(pb::LoginRequest { signed_challenge: signed.encode() })
            .await
            .expect("login")
            .into_inner()
            .token
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        // Dropping without `stop` aborts like a crash would; the tests call `stop`.
        if let Some(d) = self.daemon.take() {
            let (stop, _) = d.into_stopper();
            let _ = stop.send(());
        }
    }
}

pub fn signed_registration(n: u64) -> Vec<u8> {
    let key = pubkey(n);
    let mut node_id = [0x02; 33];
    node_id[1..].copy_from_slice(&key.to_bytes());
    let reg = ContributorRegistration {
        network: Network::Regtest,
        contributor_key: key,
        node_id: Some(node_id),
        bolt12_offer: None,
        registered_at: Timestamp(1_700_000_000),
    };
    Signed::sign(reg, &keypair(n), &[1; 32]).expect("sign").encode()
}

pub fn dataset(n: u64) -> DatasetHash {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&n.to_be_bytes());
    h[31] = 0xda;
    DatasetHash(h)
}

pub fn licence(owner: u64, ds: u64) -> Licence {
    Licence {
        network: Network::Regtest,
        dataset_hash: dataset(ds),
        contributor_key: pubkey(owner),
        spdx_license_id: "CC-BY-4.0".into(),
        uses: Uses::of(&[Use::Training, Use::Retrieval]),
        not_before: Timestamp(1_600_000_000),
        not_after: Timestamp::MAX,
        signed_at: Timestamp(1_600_000_000),
    }
}

pub fn signed_licence(owner: u64, ds: u64) -> Vec<u8> {
    Signed::sign(licence(owner, ds), &keypair(owner), &[2; 32]).expect("sign").encode()
}

/// Registers contributors `owners` (each with one dataset numbered like the owner), a model
/// `model` and one training run with the given weights. Returns nothing; panics on error.
pub async fn setup_model(
    d: &TestDaemon,
    model: &str,
    owners_weights: &[(u64, u64)],
    share_ppm: u32,
) {
    let mut op = d.registry(Some(&d.operator_token)).await;
    for (owner, _) in owners_weights {
        op.register_contributor(pb::RegisterContributorRequest {
            signed_registration: signed_registration(*owner),
        })
        .await
        .expect("register contributor");
        op.register_licence(pb::RegisterLicenceRequest {
            signed_licence: signed_licence(*owner, *owner),
        })
        .await
        .expect("register licence");
    }
    let mut prov = d.registry(Some(&d.provider_token)).await;
    prov.register_model(pb::RegisterModelRequest {
        model_id: model.into(),
        contributor_share_ppm: share_ppm,
        tariff: Some(pb::Tariff {
            per_request_nsat: 1_000_003,
            per_input_token_nsat: 7,
            per_output_token_nsat: 13,
        }),
    })
    .await
    .expect("register model");
    prov.register_training_run(pb::RegisterTrainingRunRequest {
        run_id: format!("{model}-run-1"),
        model_id: model.into(),
        started_at: 1_700_000_000,
        finished_at: 1_700_003_600,
        datasets: owners_weights
            .iter()
            .map(|(o, w)| pb::DatasetWeight { dataset_hash: dataset(*o).0.to_vec(), weight: *w })
            .collect(),
    })
    .await
    .expect("register training run");
}

pub fn usage_request(id: &str, model: &str, input: u64, output: u64) -> pb::MeterRequest {
    pb::MeterRequest {
        request_id: id.into(),
        model_id: model.into(),
        price: Some(pb::meter_request::Price::Usage(pb::Usage {
            input_tokens: input,
            output_tokens: output,
        })),
        attribution: vec![],
        include_shares: false,
    }
}

/// A logical fingerprint of every table (row contents), independent of the file layout.
pub fn db_fingerprint(path: &Path) -> String {
    let conn = rusqlite::Connection::open(path).expect("open");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let mut out = String::new();
    for t in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\" ORDER BY 1")).expect("select");
        let cols = stmt.column_count();
        let mut rows = stmt.query([]).expect("rows");
        out.push_str(&format!("[{t}]\n"));
        while let Some(r) = rows.next().expect("row") {
            for i in 0..cols {
                let v: rusqlite::types::Value = r.get(i).expect("value");
                out.push_str(&format!("{v:?}|"));
            }
            out.push('\n');
        }
    }
    out
}

/// Sums `Σ accrued_nsat` over every channel row.
pub fn db_total_accrued(path: &Path) -> u128 {
    let conn = rusqlite::Connection::open(path).expect("open");
    let mut stmt =
        conn.prepare("SELECT accrued_msat, accrued_rem_nsat FROM channels").expect("prepare");
    let rows =
        stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).expect("query");
    rows.map(|r| {
        let (m, rem) = r.expect("row");
        m as u128 * 1_000_000 + rem as u128
    })
    .sum()
}

/// `Σ pool_nsat` over every meter event.
pub fn db_total_pools(path: &Path) -> u128 {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.query_row("SELECT COALESCE(SUM(pool_nsat), 0) FROM meter_events", [], |r| {
        r.get::<_, i64>(0)
    })
    .expect("sum") as u128
}

/// `GET path` over HTTP/1.0 from `addr`: the whole response, headers included.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .expect("in time")
        .expect("read");
    body
}

/// The value of `series` (name and labels, exactly) in a Prometheus text exposition.
pub fn series_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in {exposition}"))
        .parse()
        .expect("number")
}

/// Starts settlement rounds until `n` settlements have succeeded in all (a round may end
/// with payouts still in flight; they finish in a later one). Panics after 30 s.
pub async fn settle_until_succeeded(d: &TestDaemon, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        d.running().settlement.settle_now_and_wait().await;
        let conn = rusqlite::Connection::open(d.db_path()).expect("open");
        let done: i64 = conn
            .query_row("SELECT COUNT(*) FROM settlements WHERE status = 'succeeded'", [], |r| {
                r.get(0)
            })
            .expect("count");
        if done >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "only {done} of {n} settlements succeeded");
    }
}

/// Sends `reqs` on one `MeterStream`; the answers in order until the stream ends or fails.
pub async fn meter_stream(
    mut meter: MeteringClient<Authed>,
    reqs: Vec<pb::MeterRequest>,
) -> (Vec<pb::MeterResponse>, Option<tonic::Status>) {
    let mut out = match meter.meter_stream(futures::stream::iter(reqs)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return (vec![], Some(s)),
    };
    let mut answers = Vec::new();
    loop {
        match out.message().await {
            Ok(Some(a)) => answers.push(a),
            Ok(None) => return (answers, None),
            Err(s) => return (answers, Some(s)),
        }
    }
}
