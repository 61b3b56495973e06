//! The daemon under test: a real `tributed` in-process on 127.0.0.1:0 with a temporary data
//! directory (SQLite WAL, `synchronous=FULL`), 100 registered contributors with signed
//! licences, and one model whose training run attributes to all 100 datasets.

use crate::BenchError;
use bitcoin::secp256k1::{Keypair, SecretKey};
use std::path::Path;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tribute_channels::codec::Encode;
use tribute_channels::licence::{Licence, Use, Uses};
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::sign::secp;
use tribute_channels::{DatasetHash, Network, Signed, Timestamp};
use tribute_daemon::auth::Role;
use tribute_daemon::config::Config;
use tribute_daemon::ledger::unix_now;
use tribute_daemon::server::{self, RunningDaemon};
use tribute_daemon::store::Durability;
use tribute_proto::v1 as pb;
use tribute_proto::v1::registry_client::RegistryClient;

/// The model every request meters against.
pub const MODEL: &str = "bench-model";
/// Contributors in the model's attribution vector (the "100 per model").
pub const CONTRIBUTORS: u64 = 100;
/// The model's tariff, in nsat: per request, per input token, per output token.
pub const TARIFF_NSAT: (u64, u64, u64) = (1_000_003, 7, 13);
/// Contributors' share of each price, in ppm.
pub const SHARE_PPM: u32 = 700_000;

/// Adds `authorization: Bearer …` to every call (the provider's token).
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

impl Bearer {
    /// The header for `token`.
    pub fn new(token: &str) -> Result<Self, BenchError> {
        format!("Bearer {token}")
            .parse()
            .map(Bearer)
            .map_err(|_| BenchError::msg("token is not ASCII"))
    }
}

/// A client channel with an authorization header.
pub type Authed = InterceptedService<Channel, Bearer>;

/// The daemon's configuration: the defaults (durability FULL, batch bound, queue bound,
/// stream interval), listening on an ephemeral loopback port, no metrics listener.
pub fn config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        listen: ([127, 0, 0, 1], 0).into(),
        metrics_listen: None,
        ..Config::default()
    }
}

/// The running daemon and the tokens the bench uses.
pub struct Daemon {
    /// The daemon.
    pub running: RunningDaemon,
    /// A provider token (meters, registers the model).
    pub provider_token: String,
    /// An operator token (registers contributors and licences).
    pub operator_token: String,
}

/// Starts the daemon; must run inside the daemon's runtime.
pub async fn start(config: Config) -> Result<Daemon, BenchError> {
    start_with(config, server::StartOptions::default()).await
}

/// [`start`] with a Lightning backend (and engine options).
pub async fn start_with(
    config: Config,
    options: server::StartOptions,
) -> Result<Daemon, BenchError> {
    if config.storage.durability != Durability::Full {
        return Err(BenchError::msg("the bench measures durability FULL only"));
    }
    let running =
        server::start_with(config, options).await.map_err(|e| BenchError::msg(e.to_string()))?;
    let now = Timestamp(unix_now());
    let token = |role| {
        running
            .tokens
            .create(role, None, "bench", None, now)
            .map(|t| t.secret)
            .map_err(|e| BenchError::msg(format!("token: {e:?}")))
    };
    let provider_token = token(Role::Provider)?;
    let operator_token = token(Role::Operator)?;
    Ok(Daemon { running, provider_token, operator_token })
}

/// One client connection (one HTTP/2 connection, TCP_NODELAY) to `addr`.
pub async fn connect(addr: std::net::SocketAddr) -> Result<Channel, BenchError> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| BenchError::msg(e.to_string()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| BenchError::msg(format!("connect: {e}")))
}

/// The key pair with secret `n`.
fn keypair(n: u64) -> Result<Keypair, BenchError> {
    let mut sk = [0u8; 32];
    sk[24..].copy_from_slice(&n.to_be_bytes());
    let sk = SecretKey::from_slice(&sk).map_err(|e| BenchError::msg(e.to_string()))?;
    Ok(Keypair::from_secret_key(secp(), &sk))
}

/// The dataset contributor `n` licenses.
fn dataset(n: u64) -> DatasetHash {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&n.to_be_bytes());
    h[31] = 0xda;
    DatasetHash(h)
}

/// Contributor `n`'s attribution weight: varied, so shares differ and remainders matter.
fn weight(n: u64) -> u64 {
    1 + (n * 7919) % 997
}

fn status(what: &str) -> impl Fn(tonic::Status) -> BenchError + '_ {
    move |s| BenchError::msg(format!("{what}: {s}"))
}

/// Registers contributors 1..=100 (each with one licensed dataset), the model and its
/// training run over the 100 datasets.
pub async fn register(channel: Channel, d: &Daemon) -> Result<(), BenchError> {
    register_paid_to(channel, d, None).await
}

/// [`register`], every contributor paid to `node_id` when given (one receiving node for
/// all), else to a made-up node id of its own.
pub async fn register_paid_to(
    channel: Channel,
    d: &Daemon,
    paid_to: Option<[u8; 33]>,
) -> Result<(), BenchError> {
    let mut op = RegistryClient::with_interceptor(channel.clone(), Bearer::new(&d.operator_token)?);
    for n in 1..=CONTRIBUTORS {
        let kp = keypair(n)?;
        let key = tribute_channels::PublicKey::from(kp.x_only_public_key().0);
        let mut node_id = [0x02; 33];
        node_id[1..].copy_from_slice(&key.to_bytes());
        let node_id = paid_to.unwrap_or(node_id);
        let reg = ContributorRegistration {
            network: Network::Regtest,
            contributor_key: key,
            node_id: Some(node_id),
            bolt12_offer: None,
            registered_at: Timestamp(1_700_000_000),
        };
        let signed =
            Signed::sign(reg, &kp, &[1; 32]).map_err(|e| BenchError::msg(e.to_string()))?;
        op.register_contributor(pb::RegisterContributorRequest {
            signed_registration: signed.encode(),
        })
        .await
        .map_err(status("register contributor"))?;
        let licence = Licence {
            network: Network::Regtest,
            dataset_hash: dataset(n),
            contributor_key: key,
            spdx_license_id: "CC-BY-4.0".into(),
            uses: Uses::of(&[Use::Training, Use::Retrieval]),
            not_before: Timestamp(1_600_000_000),
            not_after: Timestamp::MAX,
            signed_at: Timestamp(1_600_000_000),
        };
        let signed =
            Signed::sign(licence, &kp, &[2; 32]).map_err(|e| BenchError::msg(e.to_string()))?;
        op.register_licence(pb::RegisterLicenceRequest { signed_licence: signed.encode() })
            .await
            .map_err(status("register licence"))?;
    }
    let mut prov = RegistryClient::with_interceptor(channel, Bearer::new(&d.provider_token)?);
    prov.register_model(pb::RegisterModelRequest {
        model_id: MODEL.into(),
        contributor_share_ppm: SHARE_PPM,
        tariff: Some(pb::Tariff {
            per_request_nsat: TARIFF_NSAT.0,
            per_input_token_nsat: TARIFF_NSAT.1,
            per_output_token_nsat: TARIFF_NSAT.2,
        }),
    })
    .await
    .map_err(status("register model"))?;
    prov.register_training_run(pb::RegisterTrainingRunRequest {
        run_id: format!("{MODEL}-run-1"),
        model_id: MODEL.into(),
        started_at: 1_700_000_000,
        finished_at: 1_700_003_600,
        datasets: (1..=CONTRIBUTORS)
            .map(|n| pb::DatasetWeight { dataset_hash: dataset(n).0.to_vec(), weight: weight(n) })
            .collect(),
    })
    .await
    .map_err(status("register training run"))?;
    Ok(())
}

/// splitmix64: cheap, deterministic variety.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Request `i` of a phase: a distinct id, token usage varied (1..=4096 in, 1..=1024 out) so
/// prices, pools and every share vary from request to request.
pub fn meter_request(prefix: &str, task: usize, i: u64) -> pb::MeterRequest {
    let r = mix(i ^ ((task as u64) << 40));
    pb::MeterRequest {
        request_id: format!("{prefix}-{task}-{i}"),
        model_id: MODEL.into(),
        price: Some(pb::meter_request::Price::Usage(pb::Usage {
            input_tokens: 1 + r % 4096,
            output_tokens: 1 + (r >> 32) % 1024,
        })),
        attribution: vec![],
        include_shares: false,
    }
}

/// The daemon's runtime and the clients' runtime, with their worker counts (at least one
/// each); the ledger writer is the daemon's own OS thread. All share the machine's cores.
pub fn runtimes(
    daemon_workers: usize,
    client_workers: usize,
) -> Result<(tokio::runtime::Runtime, tokio::runtime::Runtime), BenchError> {
    let build = |workers: usize, name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name(name)
            .enable_all()
            .build()
            .map_err(|e| BenchError::msg(e.to_string()))
    };
    Ok((build(daemon_workers, "daemon-worker")?, build(client_workers, "client-worker")?))
}
