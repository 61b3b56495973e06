//! Assembles and runs the daemon: data directory and keys, the database, the registry, the
//! ledger writer, authentication, and the gRPC server (with health and reflection).
//!
//! Shutdown is graceful: the listener stops taking calls, in-flight calls finish, and the
//! ledger commits everything it accepted and signs the last states before the process
//! exits.

use crate::auth::{
    check_listen_policy, AuthService, Authenticator, ChallengeBook, ChallengeLimits, TokenStore,
};
use crate::config::Config;
use crate::grpc::{
    ChannelsService, MeteringService, OperatorService, ReceiptsService, RegistryService,
};
use crate::hub::Hub;
use crate::keys;
use crate::ledger::{Ledger, LedgerConfig, LedgerHandle};
use crate::lightning::{DynLightningBackend, LdkBackend};
use crate::metrics::{self, Metrics};
use crate::registry::Registry;
use crate::settlement::{EngineOptions, SettlementControl, SettlementEngine};
use crate::store::{self, StoreError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tribute_channels::PublicKey;
use tribute_proto::v1::auth_server::AuthServer;
use tribute_proto::v1::channels_server::ChannelsServer;
use tribute_proto::v1::metering_server::MeteringServer;
use tribute_proto::v1::operator_server::OperatorServer;
use tribute_proto::v1::receipts_server::ReceiptsServer;
use tribute_proto::v1::registry_server::RegistryServer;

/// How often tokens changed by another process (the `tributed token` command) are picked up.
pub const TOKEN_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Configuration refused.
    #[error("configuration: {0}")]
    Config(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Key files.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// I/O (listening, data directory).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// File names inside the data directory.
pub mod files {
    /// The ledger database.
    pub const DATABASE: &str = "tribute.sqlite";
    /// The provider's state-signing key.
    pub const PROVIDER_KEY: &str = "provider.key";
    /// The secret keysend preimages are derived from.
    pub const SETTLEMENT_SECRET: &str = "settlement.secret";
    /// The embedded Lightning node's directory (seed, channel state, logs).
    pub const LIGHTNING_DIR: &str = "ldk";
}

/// The database path of a data directory.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join(files::DATABASE)
}

/// How long shutdown waits for the settlement engine to finish what it is doing.
const ENGINE_STOP_GRACE: Duration = Duration::from_secs(2);

/// How often the WAL is checkpointed off the writer's thread.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// A running daemon.
pub struct RunningDaemon {
    /// The address the gRPC server listens on (the real port when 0 was asked).
    pub grpc_addr: SocketAddr,
    /// The address `/metrics` is served on, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The provider's state-signing key.
    pub provider_key: PublicKey,
    /// The daemon's metrics.
    pub metrics: Arc<Metrics>,
    /// The token store (for tests and the admin surface).
    pub tokens: Arc<TokenStore>,
    /// Operator control of settlement (no effect without a Lightning backend).
    pub settlement: SettlementControl,
    /// Dropped before waiting for the writer, which runs until every handle is gone.
    ledger: LedgerHandle,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl RunningDaemon {
    /// Stops gracefully and waits until everything accepted is committed.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        let (stop, task) = self.into_stopper();
        let _ = stop.send(());
        task.await.map_err(|e| DaemonError::Io(std::io::Error::other(e)))?
    }

    /// Waits until the daemon stops by itself (it only does on error).
    pub async fn wait(self) -> Result<(), DaemonError> {
        let (_stop, task) = self.into_stopper();
        task.await.map_err(|e| DaemonError::Io(std::io::Error::other(e)))?
    }

    /// Asks the daemon to stop without waiting.
    pub fn into_stopper(self) -> (oneshot::Sender<()>, JoinHandle<Result<(), DaemonError>>) {
        drop(self.ledger);
        (self.shutdown, self.task)
    }

    /// Signs, stores and publishes every channel head that changed since its last signed
    /// state now, instead of at the next signing round (as shutdown does). Returns when
    /// they are durable.
    pub async fn flush(&self) {
        self.ledger.flush().await;
    }
}

/// Creates the data directory (mode 0700) if needed.
pub fn prepare_data_dir(dir: &Path) -> Result<(), std::io::Error> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    Ok(())
}

/// Checks the database belongs to this network and provider key (a data directory is never
/// reused across either), recording them on first start.
fn check_identity(
    conn: &rusqlite::Connection,
    config: &Config,
    provider: &PublicKey,
) -> Result<(), DaemonError> {
    let network = crate::config::network_name(config.network).as_bytes().to_vec();
    let key = provider.to_bytes().to_vec();
    for (name, want) in [("network", network), ("provider_key", key)] {
        match store::meta_get(conn, name)? {
            None => store::meta_set(conn, name, &want)?,
            Some(have) if have == want => {}
            Some(have) => {
                return Err(DaemonError::Config(format!(
                    "database {name} is {}, this daemon's is {}: use another data directory",
                    String::from_utf8_lossy(&have),
                    String::from_utf8_lossy(&want)
                )))
            }
        }
    }
    Ok(())
}

/// What a daemon is started with beside its configuration.
#[derive(Default)]
pub struct StartOptions {
    /// The Lightning backend settlements are paid through; without one, nothing is settled
    /// (metering and streaming work as usual).
    pub lightning: Option<DynLightningBackend>,
    /// Settlement engine tunables (tests shorten them, or set a fault point).
    pub settlement: EngineOptions,
}

/// Starts the daemon.
pub async fn start(config: Config) -> Result<RunningDaemon, DaemonError> {
    start_with(config, StartOptions::default()).await
}

/// Starts the daemon with a Lightning backend and engine options.
pub async fn start_with(
    config: Config,
    options: StartOptions,
) -> Result<RunningDaemon, DaemonError> {
    config.validate().map_err(|e| DaemonError::Config(e.to_string()))?;
    check_listen_policy(&config.listen, config.tls.is_some(), config.auth.required)
        .map_err(DaemonError::Config)?;
    prepare_data_dir(&config.data_dir)?;
    let provider = keys::load_or_create_keypair(&config.data_dir.join(files::PROVIDER_KEY))?;
    let settlement_secret =
        keys::load_or_create_secret(&config.data_dir.join(files::SETTLEMENT_SECRET))?;
    let provider_key = PublicKey::from(provider.x_only_public_key().0);
    let db = database_path(&config.data_dir);
    crate::grpc::remove_stale_backups(&config.data_dir);
    let durability = config.storage.durability;
    let writer_conn = store::initialize(&db, durability)?;
    writer_conn
        .pragma_update(None, "wal_autocheckpoint", store::WRITER_AUTOCHECKPOINT_PAGES)
        .map_err(StoreError::from)?;
    let checkpointer = store::Checkpointer::start(&db, durability, CHECKPOINT_INTERVAL)?;
    check_identity(&writer_conn, &config, &provider_key)?;

    let registry =
        Arc::new(Registry::load(store::connect(&db, durability)?, config.network, provider)?);
    let tokens = Arc::new(TokenStore::open(store::connect(&db, durability)?)?);
    let reputation = Arc::new(crate::reputation::ReputationBook::load(
        store::connect(&db, durability)?,
        registry.clone(),
    )?);
    let reader = Arc::new(Mutex::new(store::connect(&db, durability)?));
    let hub = Hub::new(config.meter.subscriber_buffer);
    let metrics = Metrics::new();
    let ledger = Ledger::start(
        writer_conn,
        config.network,
        provider,
        registry.clone(),
        hub.clone(),
        metrics.clone(),
        LedgerConfig {
            max_batch: config.meter.max_batch,
            queue_capacity: config.meter.queue_capacity,
            sign_interval: Duration::from_millis(config.meter.stream_interval_ms),
        },
    )?;
    // The embedded Lightning node, when configured and none was given.
    let mut own_node = None;
    let mut options = options;
    if options.lightning.is_none() && config.lightning.enabled {
        let ln = config
            .lightning
            .backend_config(config.data_dir.join(files::LIGHTNING_DIR), config.network);
        let node = Arc::new(
            LdkBackend::start(ln)
                .await
                .map_err(|e| DaemonError::Config(format!("lightning node: {e}")))?,
        );
        tracing::info!(node_id = %hex::encode(node.node_id()), "lightning node started");
        options.lightning = Some(node.clone() as DynLightningBackend);
        own_node = Some(node);
    }
    let settlement = SettlementControl::default();
    let (stop_engine, engine_stopped) = tokio::sync::watch::channel(false);
    let engine = match options.lightning.clone() {
        Some(backend) => {
            let engine = SettlementEngine::new(
                store::connect(&db, durability)?,
                backend,
                ledger.handle(),
                registry.clone(),
                config.settlement.clone(),
                options.settlement,
                settlement_secret,
                config.network,
                provider_key,
                settlement.clone(),
            );
            Some(tokio::spawn(engine.run(engine_stopped.clone())))
        }
        None => None,
    };
    let targets =
        crate::keeper::ChannelTargets::new(Arc::new(Mutex::new(store::connect(&db, durability)?)));
    let keeper = match &options.lightning {
        Some(node) if config.settlement.keep_channels_open => Some(tokio::spawn(
            crate::keeper::run(targets.clone(), node.clone(), metrics.clone(), engine_stopped),
        )),
        _ => None,
    };
    let challenges = Arc::new(ChallengeBook::new(
        config.network,
        provider_key,
        ChallengeLimits::from(&config.auth),
    ));
    let auth = Arc::new(Authenticator::new(tokens.clone(), challenges, config.auth.required));

    let listener = TcpListener::bind(config.listen).await?;
    let grpc_addr = listener.local_addr()?;
    let max = config.meter.max_message_bytes;
    let hard_max = max.saturating_mul(crate::grpc::HARD_LIMIT_FACTOR);
    let handle = ledger.handle();
    let ledger_handle = ledger.handle();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<MeteringServer<MeteringService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tribute_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| DaemonError::Config(format!("reflection: {e}")))?;
    let i = auth.interceptor();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let cert = std::fs::read(&tls.cert_path)?;
        let key = std::fs::read(&tls.key_path)?;
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| DaemonError::Config(format!("tls: {e}")))?;
    }
    let router = builder
        .add_service(health)
        .add_service(reflection)
        .add_service(AuthServer::new(AuthService::new(auth.clone())).max_decoding_message_size(max))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            RegistryServer::new(RegistryService::new(registry.clone(), max))
                .max_decoding_message_size(hard_max),
            i.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            tribute_proto::v1::reputation_server::ReputationServer::new(
                crate::grpc::ReputationService::new(reputation, max),
            )
            .max_decoding_message_size(hard_max),
            i.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            MeteringServer::new(MeteringService::new(
                registry.clone(),
                handle.clone(),
                config.meter.max_price_nsat,
                max,
                config.meter.max_in_flight,
                metrics.clone(),
            ))
            .max_decoding_message_size(hard_max),
            i.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ChannelsServer::new(ChannelsService::new(
                hub.clone(),
                reader.clone(),
                config.network,
                provider_key,
                crate::grpc::Database { path: db.clone(), durability },
            ))
            .max_decoding_message_size(max),
            i.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ReceiptsServer::new(ReceiptsService::new(
                registry.clone(),
                reader.clone(),
                handle.ids().clone(),
            ))
            .max_decoding_message_size(max),
            i.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            OperatorServer::new(OperatorService::new(
                options.lightning.clone(),
                settlement.clone(),
                reader.clone(),
                tokens.clone(),
                crate::grpc::Database { path: db.clone(), durability },
                targets,
            ))
            .max_decoding_message_size(max),
            i,
        ));
    drop(handle);

    let (shutdown, stop) = oneshot::channel::<()>();
    let (stop_all, _) = tokio::sync::broadcast::channel::<()>(1);
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let mut stopped = stop_all.subscribe();
            let (bound, _task) = metrics::serve(
                addr,
                metrics.clone(),
                reader.clone(),
                config.network,
                provider_key,
                options.lightning.clone(),
                async move {
                    let _ = stopped.recv().await;
                },
            )
            .await?;
            Some(bound)
        }
        None => None,
    };
    let reload_tokens = tokens.clone();
    let reloader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TOKEN_RELOAD_INTERVAL);
        loop {
            tick.tick().await;
            let t = reload_tokens.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || t.reload()).await {
                tracing::warn!("token reload failed: {e}");
            }
        }
    });
    tracing::info!(%grpc_addr, provider_key = %provider_key, "tributed listening");
    let task = tokio::spawn(async move {
        let served = router
            // tonic ignores the builder's `tcp_nodelay` with an incoming stream of our own,
            // and Nagle's algorithm against the peer's delayed ACK stalls a connection for
            // ~40 ms now and then under load; the incoming sets it on every accepted socket.
            .serve_with_incoming_shutdown(incoming(listener), async move {
                let _ = stop.await;
                let _ = stop_all.send(());
                // Channel streams never end by themselves: end them so the server can drain.
                hub.close();
            })
            .await;
        reloader.abort();
        // The engine holds a ledger handle: stop it first (a pending settlement stays
        // pending and is resolved at the next start).
        let _ = stop_engine.send(true);
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
        if let Some(mut engine) = engine {
            if tokio::time::timeout(ENGINE_STOP_GRACE, &mut engine).await.is_err() {
                // Mid-payment: stop it where it is, as a crash would (the saga allows it).
                engine.abort();
                let _ = engine.await;
            }
        }
        if let Some(node) = own_node {
            if let Err(e) = node.stop().await {
                tracing::warn!("stopping the lightning node: {e}");
            }
        }
        // The router (and every ledger handle in it) is gone: drain and stop the writer.
        let _ = tokio::task::spawn_blocking(move || {
            ledger.shutdown();
            checkpointer.stop();
        })
        .await;
        tracing::info!("tributed stopped");
        served.map_err(DaemonError::from)
    });
    Ok(RunningDaemon {
        grpc_addr,
        metrics_addr,
        provider_key,
        metrics,
        tokens,
        ledger: ledger_handle,
        settlement,
        shutdown,
        task,
    })
}

/// The accepted connections of `listener`, each with `TCP_NODELAY` (gRPC answers are small
/// writes that must not wait for the peer's ACK).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = accepted.next().await.unwrap().unwrap();
        assert!(server_side.nodelay().unwrap(), "TCP_NODELAY must be set on accepted sockets");
    }
}
