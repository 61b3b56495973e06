//! Shared helpers for the end-to-end tests in `tests/tests/`: a real daemon on loopback
//! with a real SQLite file, contributors with real key files that license real (hashed)
//! datasets through the client library, and a TCP proxy that breaks connections on cue.
#![allow(clippy::unwrap_used, missing_docs)]

pub mod grpc_proxy;
pub mod ln;
pub mod proxy;
pub mod tributed;

use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tribute_channels::{DatasetHash, PublicKey, Timestamp};
use tribute_client::connect::Bearer;
use tribute_client::contributor::Contributor;
use tribute_client::keys::ContributorKey;
use tribute_client::DaemonEndpoint;
use tribute_daemon::auth::Role;
use tribute_daemon::config::Config;
use tribute_daemon::server::{self, RunningDaemon};
use tribute_proto::v1 as pb;

pub type Authed = InterceptedService<Channel, Bearer>;

/// Logs to the test's output when `RUST_LOG` is set (e.g. `RUST_LOG=info`).
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub fn now() -> Timestamp {
    tribute_client::time::unix_now()
}

/// A daemon on 127.0.0.1 with a temp data directory and one token per role.
pub struct TestDaemon {
    pub daemon: Option<RunningDaemon>,
    pub dir: PathBuf,
    pub provider_token: String,
    pub operator_token: String,
}

impl TestDaemon {
    pub async fn start(dir: &Path) -> TestDaemon {
        Self::start_on(dir, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `listen` (a restart on the address a daemon had before).
    pub async fn start_on(dir: &Path, listen: std::net::SocketAddr) -> TestDaemon {
        Self::start_with(dir, listen, server::StartOptions::default()).await
    }

    /// Starts paying settlements through a scripted Lightning backend (every payment
    /// succeeds), settling only when asked (`running().settlement.settle_now_and_wait()`)
    /// and from 1 msat on.
    pub async fn start_settling(
        dir: &Path,
    ) -> (TestDaemon, std::sync::Arc<tribute_daemon::lightning::ScriptedBackend>) {
        let backend = std::sync::Arc::new(tribute_daemon::lightning::ScriptedBackend::new());
        let options = server::StartOptions {
            lightning: Some(backend.clone()),
            settlement: tribute_daemon::settlement::EngineOptions {
                tick: Duration::from_millis(50),
                poll_interval: Duration::from_millis(20),
                ..Default::default()
            },
        };
        (Self::start_with(dir, "127.0.0.1:0".parse().unwrap(), options).await, backend)
    }

    pub async fn start_with(
        dir: &Path,
        listen: std::net::SocketAddr,
        options: server::StartOptions,
    ) -> TestDaemon {
        let mut c = Config {
            data_dir: dir.to_path_buf(),
            listen,
            metrics_listen: None,
            ..Config::default()
        };
        c.meter.stream_interval_ms = 20;
        c.settlement.min_payout_msat = 1;
        c.settlement.settle_threshold_msat = 1_000_000_000;
        c.settlement.max_outstanding_msat = 1_000_000_000;
        let daemon = server::start_with(c, options).await.expect("daemon starts");
        let token = |role| daemon.tokens.create(role, None, "test", None, now()).unwrap().secret;
        let (provider_token, operator_token) = (token(Role::Provider), token(Role::Operator));
        TestDaemon { daemon: Some(daemon), dir: dir.to_path_buf(), provider_token, operator_token }
    }

    pub fn running(&self) -> &RunningDaemon {
        self.daemon.as_ref().unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.running().grpc_addr)
    }

    pub fn endpoint(&self) -> DaemonEndpoint {
        DaemonEndpoint::new(self.url())
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
        Channel::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap()
    }

    pub async fn registry(&self, token: &str) -> pb::registry_client::RegistryClient<Authed> {
        pb::registry_client::RegistryClient::with_interceptor(
            self.channel().await,
            Bearer::new(Some(token)).unwrap(),
        )
    }

    pub async fn channels(&self, token: &str) -> pb::channels_client::ChannelsClient<Authed> {
        pb::channels_client::ChannelsClient::with_interceptor(
            self.channel().await,
            Bearer::new(Some(token)).unwrap(),
        )
    }

    pub async fn operator(&self) -> pb::operator_client::OperatorClient<Authed> {
        pb::operator_client::OperatorClient::with_interceptor(
            self.channel().await,
            Bearer::new(Some(&self.operator_token)).unwrap(),
        )
    }

    /// The daemon's view of a contributor's channel (operator token).
    pub async fn channel_of(&self, key: PublicKey) -> pb::Channel {
        self.channels(&self.operator_token)
            .await
            .get_channel(pb::GetChannelRequest {
                contributor_key: key.to_bytes().to_vec(),
                channel_id: vec![],
            })
            .await
            .expect("channel")
            .into_inner()
    }

    /// `Σ accrued_nsat` over every channel, from `ListChannels`.
    pub async fn total_accrued_nsat(&self) -> u128 {
        let list = self
            .channels(&self.operator_token)
            .await
            .list_channels(pb::ListChannelsRequest {})
            .await
            .expect("list")
            .into_inner();
        list.channels.iter().map(|c| c.accrued_nsat.parse::<u128>().unwrap()).sum()
    }

    /// Rows in the daemon's meter event log (read from its SQLite file).
    pub fn meter_events(&self) -> i64 {
        let conn = rusqlite::Connection::open(self.db_path()).unwrap();
        conn.query_row("SELECT COUNT(*) FROM meter_events", [], |r| r.get(0)).unwrap()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let (stop, _) = d.into_stopper();
            let _ = stop.send(());
        }
    }
}

/// A contributor with a real key file in `home`, registered with a keysend node id and
/// holding a licence (training + retrieval) for a small dataset directory it wrote and
/// hashed. Returns its key and the dataset hash.
pub async fn contributor_with_dataset(
    d: &TestDaemon,
    home: &Path,
    name: &str,
) -> (PublicKey, DatasetHash) {
    contributor_at(&d.endpoint(), home, name, None).await
}

/// [`contributor_with_dataset`] against any daemon: registers `node_id` as the keysend
/// destination (a made-up id derived from the key when `None`).
pub async fn contributor_at(
    endpoint: &DaemonEndpoint,
    home: &Path,
    name: &str,
    node_id: Option<[u8; 33]>,
) -> (PublicKey, DatasetHash) {
    use tribute_channels::licence::{Use, Uses};
    let key = ContributorKey::create(&home.join("contributor.key")).unwrap();
    let public = key.public();
    let data = home.join("dataset");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("text.txt"), format!("the words of {name}\n")).unwrap();
    let hash =
        tribute_client::manifest::Manifest::build(&data, &mut tribute_client::manifest::NoProgress)
            .unwrap()
            .dataset_hash();
    let c = Contributor::login(endpoint, key, None, None).await.expect("login");
    let node_id = node_id.unwrap_or_else(|| {
        let mut id = [0x02; 33];
        id[1..].copy_from_slice(&public.to_bytes());
        id
    });
    c.register(Some(node_id), None, now()).await.expect("register");
    let signed_at = now();
    c.register_licence(
        hash,
        "CC-BY-4.0",
        Uses::of(&[Use::Training, Use::Retrieval]),
        signed_at,
        Timestamp::MAX,
        signed_at,
    )
    .await
    .expect("licence");
    (public, hash)
}

/// Registers `model` (per-request tariff 1_000_003 nsat, share `share_ppm`) and one
/// training run over `datasets`, started now (after the licences were signed).
pub async fn setup_model(
    d: &TestDaemon,
    model: &str,
    datasets: &[(DatasetHash, u64)],
    share_ppm: u32,
) {
    setup_model_with(d.registry(&d.provider_token).await, model, datasets, share_ppm).await
}

/// [`setup_model`] through any provider-authorized registry client.
pub async fn setup_model_with(
    mut prov: pb::registry_client::RegistryClient<Authed>,
    model: &str,
    datasets: &[(DatasetHash, u64)],
    share_ppm: u32,
) {
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
    let started = now().0 + 1;
    prov.register_training_run(pb::RegisterTrainingRunRequest {
        run_id: format!("{model}-run-1"),
        model_id: model.into(),
        started_at: started,
        finished_at: started + 60,
        datasets: datasets
            .iter()
            .map(|(h, w)| pb::DatasetWeight { dataset_hash: h.0.to_vec(), weight: *w })
            .collect(),
    })
    .await
    .expect("register training run");
}
