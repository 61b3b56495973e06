//! The daemon's configuration: one [`Config`], read once at start-up.
//!
//! Sources, later ones winning: built-in defaults < the TOML file (`--config PATH` or
//! `TRIBUTE_CONFIG`) < environment variables `TRIBUTE_<SECTION>__<FIELD>` (e.g.
//! `TRIBUTE_METER__MAX_BATCH=1024`, `TRIBUTE_LISTEN=127.0.0.1:6000`) < command-line flags.
//! `daemon/example.config.toml` documents every field with its default; a test loads it, so
//! it cannot drift from this file.
//!
//! Unknown keys in the file are errors (a typo must not silently leave a default in force).
//! Environment variables are only read for the known top-level names, so unrelated
//! `TRIBUTE_*` variables (the CLI's, say) do not break the daemon.

use crate::store::Durability;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use tribute_channels::Network;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "TRIBUTE_";

/// Separator of nested keys in environment variable names (`TRIBUTE_METER__MAX_BATCH`).
pub const ENV_SEPARATOR: &str = "__";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type or an unknown key; the
    /// message names the key and the source it came from.
    #[error("configuration: {0}")]
    Load(Box<figment::Error>),
    /// Every value parsed, but the combination is not acceptable.
    #[error("configuration: `{field}` {reason}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `meter.queue_capacity`.
        field: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Load(Box::new(e))
    }
}

/// The whole configuration. See `daemon/example.config.toml` for every field annotated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the database, key files and the Lightning node's data.
    pub data_dir: PathBuf,
    /// The Bitcoin network: `regtest`, `signet`, `testnet`, `testnet4` or `bitcoin`.
    #[serde(with = "network_serde")]
    pub network: Network,
    /// The gRPC listener.
    pub listen: SocketAddr,
    /// The Prometheus metrics listener; `None` (written `"off"`) disables it.
    #[serde(with = "optional_addr_serde")]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS for the gRPC listener; required on a non-loopback address.
    pub tls: Option<TlsConfig>,
    /// Authentication.
    pub auth: AuthConfig,
    /// Storage.
    pub storage: StorageConfig,
    /// The metering pipeline.
    pub meter: MeterConfig,
    /// Settlement over Lightning.
    pub settlement: SettlementConfig,
    /// The embedded Lightning node.
    pub lightning: LightningConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Default gRPC port.
pub const DEFAULT_LISTEN_PORT: u16 = 50051;
/// Default metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 9451;

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("tribute-data"),
            network: Network::Regtest,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_LISTEN_PORT),
            metrics_listen: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                DEFAULT_METRICS_PORT,
            )),
            tls: None,
            auth: AuthConfig::default(),
            storage: StorageConfig::default(),
            meter: MeterConfig::default(),
            settlement: SettlementConfig::default(),
            lightning: LightningConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// TLS (rustls) for the gRPC listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_path: PathBuf,
    /// PEM private key.
    pub key_path: PathBuf,
}

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require a bearer token on every call but `Auth.GetChallenge` / `Auth.Login`. May be
    /// `false` only on a loopback listener (a single-user development setup).
    pub required: bool,
    /// Lifetime of a contributor session token issued by challenge login, in seconds.
    pub session_ttl_secs: u64,
    /// How long a login challenge may be answered, in seconds.
    pub challenge_ttl_secs: u64,
    /// Most unanswered challenges kept; past it the oldest is dropped.
    pub max_outstanding_challenges: usize,
    /// Most live session tokens kept; past it the oldest is dropped (its holder logs in
    /// again).
    pub max_sessions: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: true,
            session_ttl_secs: 3600,
            challenge_ttl_secs: 60,
            max_outstanding_challenges: 10_000,
            max_sessions: 100_000,
        }
    }
}

/// Storage settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `full` (a commit survives power loss; the default for money) or `normal` (the last
    /// commits may be lost on power loss, not on a crash).
    pub durability: Durability,
}

/// Default of `meter.max_in_flight`: see docs/PERFORMANCE.md, "Overload".
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// The metering pipeline's bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeterConfig {
    /// Most requests written in one group-commit transaction.
    pub max_batch: usize,
    /// Most requests waiting for the writer; past it `Meter` answers `OVERLOADED`.
    pub queue_capacity: usize,
    /// Most metering requests in flight (admitted, not yet answered), `Meter` and
    /// `MeterStream` together; past it a request is shed at once with
    /// `RESOURCE_EXHAUSTED` + `OVERLOADED`, before anything is recorded (`admission`).
    pub max_in_flight: usize,
    /// Highest price accepted for one request, in nanosatoshi.
    pub max_price_nsat: u64,
    /// Largest encoded request accepted, in bytes.
    pub max_message_bytes: usize,
    /// Shortest interval between two signed states pushed to one subscriber, in ms.
    pub stream_interval_ms: u64,
    /// Events buffered per channel subscriber before it gets a gap marker.
    pub subscriber_buffer: usize,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            max_batch: 4096,
            queue_capacity: 65_536,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_price_nsat: 1_000_000_000_000_000,
            max_message_bytes: 64 * 1024,
            stream_interval_ms: 100,
            subscriber_buffer: 4096,
        }
    }
}

/// When and how accrued balances are paid out. Read by the settlement engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SettlementConfig {
    /// Settle every channel with something owed at least this often, in seconds.
    pub settle_every_secs: u64,
    /// Settle a channel as soon as its unsettled balance reaches this, in msat.
    pub settle_threshold_msat: u64,
    /// Exposure cap per channel: past it settlement is triggered at once, in msat.
    pub max_outstanding_msat: u64,
    /// Smaller payouts wait for more to accrue, in msat.
    pub min_payout_msat: u64,
    /// Most routing fee paid per payout, in parts per million of the amount.
    pub max_fee_ppm: u32,
    /// The fee budget of a payout is never below this, in msat: a BOLT12 payment crosses
    /// at least the blinded path's introduction hop, whose base fee (1 sat by default in
    /// LDK) a ppm budget on a small payout would not cover.
    pub min_fee_budget_msat: u64,
    /// Most payouts in flight at once to one destination (a node id, or an offer): the
    /// payouts to one node share the channel to it, which carries a bounded number of HTLCs
    /// (LDK accepts 50 by default, CLN 30), and an HTLC still counts there for a while after
    /// its payment has succeeded.
    pub max_in_flight_per_node: u32,
    /// Keep a channel open to every peer the operator opened one to: when it closes without
    /// the operator closing it (the peer closed it, or the node force-closed it after a
    /// crash), open a new one of the same size (`keeper`).
    pub keep_channels_open: bool,
}

impl Default for SettlementConfig {
    fn default() -> Self {
        SettlementConfig {
            settle_every_secs: 3600,
            settle_threshold_msat: 100_000,
            max_outstanding_msat: 1_000_000,
            min_payout_msat: 1_000,
            max_fee_ppm: 5_000,
            min_fee_budget_msat: 1_000,
            max_in_flight_per_node: 30,
            keep_channels_open: true,
        }
    }
}

/// Where the embedded Lightning node gets the chain from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainSource {
    /// The in-process regtest simulator (tests and the demo; regtest only).
    #[default]
    Devchain,
    /// A bitcoind JSON-RPC endpoint.
    BitcoindRpc,
    /// An Esplora HTTP server.
    Esplora,
}

/// The embedded Lightning node (ldk-node). Read by the Lightning backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LightningConfig {
    /// Run the embedded Lightning node (and settle through it). Off: metering and streaming
    /// only, nothing is paid out.
    pub enabled: bool,
    /// `devchain` (a dev chain's RPC, e.g. `tributed devchain`, at `bitcoind_rpc_host` /
    /// `bitcoind_rpc_port`, credentials `devchain`/`devchain` unless set), `bitcoind_rpc`
    /// or `esplora`.
    pub chain_source: ChainSource,
    /// bitcoind RPC host (`chain_source = "bitcoind_rpc"`).
    pub bitcoind_rpc_host: String,
    /// bitcoind RPC port.
    pub bitcoind_rpc_port: u16,
    /// bitcoind RPC user.
    pub bitcoind_rpc_user: Option<String>,
    /// bitcoind RPC password (never printed).
    pub bitcoind_rpc_password: Option<SecretString>,
    /// Esplora base URL (`chain_source = "esplora"`).
    pub esplora_url: Option<String>,
    /// Port the Lightning node accepts peer connections on.
    pub listen_port: u16,
    /// The node's alias in its node announcement (at most 32 bytes). Needed to open announced
    /// channels — and with several peers the node can pay BOLT12 offers only once it has an
    /// announced channel (DESIGN.md, "Lightning").
    pub node_alias: Option<String>,
    /// Addresses announced to the network, `host:port` (empty: the listening address).
    pub announcement_addresses: Vec<String>,
    /// Node ids (66 hex digits) whose channels to us need no on-chain anchor reserve on our
    /// side. A contributor's node lists the provider's node here, so it can take the
    /// provider's channel with an empty wallet (DESIGN.md, "Lightning").
    pub trusted_peers_no_reserve: Vec<String>,
    /// Peers to keep connected, `node_id@host:port` (a contributor's node lists the
    /// provider's node: its channel is inbound, so nothing else reconnects to it promptly
    /// after a restart).
    pub peers: Vec<String>,
}

impl Default for LightningConfig {
    fn default() -> Self {
        LightningConfig {
            enabled: false,
            chain_source: ChainSource::Devchain,
            bitcoind_rpc_host: "127.0.0.1".into(),
            bitcoind_rpc_port: 18443,
            bitcoind_rpc_user: None,
            bitcoind_rpc_password: None,
            esplora_url: None,
            listen_port: 9735,
            node_alias: None,
            announcement_addresses: Vec::new(),
            trusted_peers_no_reserve: Vec::new(),
            peers: Vec::new(),
        }
    }
}

impl LightningConfig {
    /// Checks the section on its own (`network`: the chain the node runs on).
    pub fn validate(&self, network: Network) -> Result<(), ConfigError> {
        let l = self;
        match l.chain_source {
            ChainSource::Devchain if network != Network::Regtest => {
                return invalid("lightning.chain_source", "`devchain` works only on regtest");
            }
            ChainSource::BitcoindRpc => {
                if l.bitcoind_rpc_host.is_empty() {
                    return invalid("lightning.bitcoind_rpc_host", "is required for bitcoind_rpc");
                }
                if l.bitcoind_rpc_user.as_deref().unwrap_or_default().is_empty() {
                    return invalid("lightning.bitcoind_rpc_user", "is required for bitcoind_rpc");
                }
                if l.bitcoind_rpc_password.as_ref().is_none_or(|p| p.0.is_empty()) {
                    return invalid(
                        "lightning.bitcoind_rpc_password",
                        "is required for bitcoind_rpc",
                    );
                }
            }
            ChainSource::Esplora => {
                let url = l.esplora_url.as_deref().unwrap_or_default();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return invalid("lightning.esplora_url", "must be an http(s) URL for esplora");
                }
            }
            ChainSource::Devchain => {}
        }
        if let Some(alias) = &l.node_alias {
            if alias.is_empty() || alias.len() > 32 {
                return invalid("lightning.node_alias", "must be 1 to 32 bytes");
            }
        }
        for peer in &l.trusted_peers_no_reserve {
            if parse_node_id(peer).is_none() {
                return invalid(
                    "lightning.trusted_peers_no_reserve",
                    format!("{peer:?} is not a node id (66 hex digits)"),
                );
            }
        }
        for peer in &l.peers {
            if parse_peer(peer).is_none() {
                return invalid(
                    "lightning.peers",
                    format!("{peer:?} is not node_id@host:port (66 hex digits, an address)"),
                );
            }
        }
        Ok(())
    }

    /// The embedded node's settings: its directory, the chain, listening on `listen_port`
    /// (all interfaces), alias, announcement addresses and trusted peers (the section is
    /// validated).
    pub fn backend_config(
        &self,
        data_dir: PathBuf,
        network: Network,
    ) -> crate::lightning::LdkBackendConfig {
        let mut ln = crate::lightning::LdkBackendConfig::new(
            data_dir,
            network.to_bitcoin(),
            self.chain_source_config(),
        );
        ln.listening_addresses = vec![format!("0.0.0.0:{}", self.listen_port)];
        ln.node_alias = self.node_alias.clone();
        ln.announcement_addresses = self.announcement_addresses.clone();
        ln.trusted_peers_no_reserve =
            self.trusted_peers_no_reserve.iter().filter_map(|p| parse_node_id(p)).collect();
        ln.peers = self.peers.iter().filter_map(|p| parse_peer(p)).collect();
        ln
    }

    /// Where the embedded node reads the chain (the config is validated).
    pub fn chain_source_config(&self) -> crate::lightning::ChainSourceConfig {
        use crate::lightning::ChainSourceConfig as C;
        let rpc = |user: &str, password: &str| C::BitcoindRpc {
            host: self.bitcoind_rpc_host.clone(),
            port: self.bitcoind_rpc_port,
            user: self.bitcoind_rpc_user.clone().unwrap_or_else(|| user.to_owned()),
            password: self
                .bitcoind_rpc_password
                .as_ref()
                .map_or_else(|| password.to_owned(), |p| p.expose().to_owned()),
        };
        match self.chain_source {
            ChainSource::Devchain => rpc("devchain", "devchain"),
            ChainSource::BitcoindRpc => rpc("", ""),
            ChainSource::Esplora => {
                C::Esplora { url: self.esplora_url.clone().unwrap_or_default() }
            }
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` `EnvFilter` directives, e.g. `info,tribute_daemon=debug`. `RUST_LOG`, when
    /// set, is for the caller to prefer.
    pub filter: String,
    /// One JSON object per line instead of human-readable text.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { filter: "info".into(), json: false }
    }
}

/// A string that is never printed by `Debug` (passwords in the config).
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl SecretString {
    /// The secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(***)")
    }
}

impl<'de> Deserialize<'de> for SecretString {
    /// Accepts numbers and booleans as text too: environment values are parsed before they
    /// are typed, so `TRIBUTE_LIGHTNING__BITCOIND_RPC_PASSWORD=1234` arrives as a number.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SecretString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretString, E> {
                Ok(SecretString(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SecretString, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SecretString, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SecretString, E> {
                Ok(SecretString(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<SecretString, E> {
                Ok(SecretString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Command-line overrides: the flags `tributed` accepts for the most common settings.
/// Flatten into the binary's arguments with `#[command(flatten)]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "TRIBUTE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Data directory (database, keys, Lightning node).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bitcoin network: regtest, signet, testnet, testnet4 or bitcoin.
    #[arg(long, value_parser = parse_network)]
    pub network: Option<Network>,
    /// gRPC listen address.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Metrics listen address, or `off`.
    #[arg(long, value_name = "ADDR|off")]
    pub metrics_listen: Option<OptionalAddr>,
    /// Log filter (`tracing` `EnvFilter` directives).
    #[arg(long, value_name = "FILTER")]
    pub log_filter: Option<String>,
    /// Log JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

impl ConfigArgs {
    /// Loads the configuration these arguments point at, with them applied on top.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref(), self)
    }

    /// The overrides as a figment provider (only the flags that were given).
    fn provider(&self) -> Figment {
        let mut f = Figment::new();
        if let Some(v) = &self.data_dir {
            f = f.merge(Serialized::default("data_dir", v));
        }
        if let Some(v) = self.network {
            f = f.merge(Serialized::default("network", network_name(v)));
        }
        if let Some(v) = self.listen {
            f = f.merge(Serialized::default("listen", v.to_string()));
        }
        if let Some(OptionalAddr(v)) = self.metrics_listen {
            f = f.merge(Serialized::default("metrics_listen", optional_addr_text(v)));
        }
        if let Some(v) = &self.log_filter {
            f = f.merge(Serialized::default("log.filter", v));
        }
        if self.log_json {
            f = f.merge(Serialized::default("log.json", true));
        }
        f
    }
}

/// A listen address that may be switched off: parsed from `off` (or an empty string) as
/// `None`, from anything else as a socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_optional_addr(s).map(OptionalAddr)
    }
}

/// Top-level keys read from the environment; anything else under `TRIBUTE_` is ignored.
const ENV_SECTIONS: &[&str] = &[
    "data_dir",
    "network",
    "listen",
    "metrics_listen",
    "tls",
    "auth",
    "storage",
    "meter",
    "settlement",
    "lightning",
    "log",
];

impl Config {
    /// Loads defaults < the file at `config_path` (if given; it must exist) < `TRIBUTE_*`
    /// environment variables < `overrides`, then [`validate`](Self::validate)s the result.
    pub fn load(config_path: Option<&Path>, overrides: &ConfigArgs) -> Result<Config, ConfigError> {
        let config: Config = Self::figment(config_path, overrides).extract()?;
        config.validate()?;
        Ok(config)
    }

    /// The layered sources, for callers that want to inspect where a value came from.
    pub fn figment(config_path: Option<&Path>, overrides: &ConfigArgs) -> Figment {
        let mut f = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = config_path {
            // `file_exact`: a path that was named must exist; no search of parent dirs.
            f = f.merge(Toml::file_exact(path));
        }
        let env = Env::prefixed(ENV_PREFIX).split(ENV_SEPARATOR).filter(|key| {
            let top = key.as_str().split('.').next().unwrap_or_default();
            ENV_SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(top))
        });
        f.merge(env).merge(overrides.provider())
    }

    /// Checks what types alone cannot: bounds and combinations. The listener policy of
    /// [`crate::auth::check_listen_policy`] is part of it, so a config that would expose
    /// the API without TLS or without authentication never loads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        crate::auth::check_listen_policy(&self.listen, self.tls.is_some(), self.auth.required)
            .or_else(|reason| invalid("listen", reason))?;
        if let Some(tls) = &self.tls {
            if tls.cert_path.as_os_str().is_empty() {
                return invalid("tls.cert_path", "must not be empty");
            }
            if tls.key_path.as_os_str().is_empty() {
                return invalid("tls.key_path", "must not be empty");
            }
        }

        let a = &self.auth;
        if a.session_ttl_secs == 0 {
            return invalid("auth.session_ttl_secs", "must be at least 1");
        }
        if a.challenge_ttl_secs == 0 {
            return invalid("auth.challenge_ttl_secs", "must be at least 1");
        }
        if a.max_outstanding_challenges == 0 {
            return invalid("auth.max_outstanding_challenges", "must be at least 1");
        }
        if a.max_sessions == 0 {
            return invalid("auth.max_sessions", "must be at least 1");
        }

        let m = &self.meter;
        if m.max_batch == 0 {
            return invalid("meter.max_batch", "must be at least 1");
        }
        if m.queue_capacity < m.max_batch {
            return invalid(
                "meter.queue_capacity",
                format!("must be at least meter.max_batch ({})", m.max_batch),
            );
        }
        if m.max_in_flight == 0 {
            return invalid("meter.max_in_flight", "must be at least 1");
        }
        if m.max_price_nsat == 0 {
            return invalid("meter.max_price_nsat", "must be at least 1");
        }
        // Below this not even an empty request with a request id fits.
        if m.max_message_bytes < 256 {
            return invalid("meter.max_message_bytes", "must be at least 256");
        }
        if m.stream_interval_ms == 0 {
            return invalid("meter.stream_interval_ms", "must be at least 1");
        }
        if m.subscriber_buffer == 0 {
            return invalid("meter.subscriber_buffer", "must be at least 1");
        }

        let s = &self.settlement;
        if s.settle_every_secs == 0 {
            return invalid("settlement.settle_every_secs", "must be at least 1");
        }
        if s.min_payout_msat == 0 {
            return invalid("settlement.min_payout_msat", "must be at least 1");
        }
        if s.settle_threshold_msat < s.min_payout_msat {
            return invalid(
                "settlement.settle_threshold_msat",
                format!("must be at least settlement.min_payout_msat ({})", s.min_payout_msat),
            );
        }
        if s.max_outstanding_msat < s.settle_threshold_msat {
            return invalid(
                "settlement.max_outstanding_msat",
                format!(
                    "must be at least settlement.settle_threshold_msat ({})",
                    s.settle_threshold_msat
                ),
            );
        }
        if s.max_in_flight_per_node == 0 {
            return invalid("settlement.max_in_flight_per_node", "must be at least 1");
        }
        if s.max_fee_ppm > 1_000_000 {
            return invalid("settlement.max_fee_ppm", "must be at most 1000000 (100%)");
        }

        self.lightning.validate(self.network)?;

        if self.log.filter.trim().is_empty() {
            return invalid("log.filter", "must not be empty (e.g. `info`)");
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { field, reason: reason.into() })
}

/// A compressed public key as 66 hex digits (a Lightning node id).
pub fn parse_node_id(s: &str) -> Option<[u8; 33]> {
    let bytes = hex::decode(s.trim()).ok()?;
    let id: [u8; 33] = bytes.try_into().ok()?;
    ldk_node::bitcoin::secp256k1::PublicKey::from_slice(&id).ok()?;
    Some(id)
}

/// `node_id@host:port` → (node id, `host:port`).
pub fn parse_peer(s: &str) -> Option<([u8; 33], String)> {
    let (id, addr) = s.trim().split_once('@')?;
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    Some((parse_node_id(id)?, addr.to_owned()))
}

/// The name a network has in the configuration and on the wire (`WhoAmI`).
pub fn network_name(network: Network) -> &'static str {
    match network {
        Network::Bitcoin => "bitcoin",
        Network::Testnet => "testnet",
        Network::Testnet4 => "testnet4",
        Network::Signet => "signet",
        Network::Regtest => "regtest",
    }
}

/// Parses a network name (see [`network_name`]).
pub fn parse_network(name: &str) -> Result<Network, String> {
    Ok(match name {
        "bitcoin" => Network::Bitcoin,
        "testnet" => Network::Testnet,
        "testnet4" => Network::Testnet4,
        "signet" => Network::Signet,
        "regtest" => Network::Regtest,
        other => {
            return Err(format!(
                "unknown network `{other}`: expected regtest, signet, testnet, testnet4 or bitcoin"
            ))
        }
    })
}

/// Parses `off` (or an empty string) as `None`, anything else as a socket address.
fn parse_optional_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "" | "off" => Ok(None),
        t => t.parse().map(Some).map_err(|e| format!("`{t}`: {e} (or `off`)")),
    }
}

fn optional_addr_text(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
}

mod network_serde {
    use super::*;

    pub fn serialize<S: Serializer>(n: &Network, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(network_name(*n))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
        let name = String::deserialize(d)?;
        parse_network(&name).map_err(serde::de::Error::custom)
    }
}

/// `Option<SocketAddr>` as text, `"off"` for `None`: TOML has no null, and a default that
/// is `Some` must still be switchable off from the file or the environment.
mod optional_addr_serde {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&optional_addr_text(*a))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        parse_optional_addr(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
// `Jail::expect_with` takes closures returning `figment::Error`, which is large; its API.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::{Jail, Provider};

    const EXAMPLE: &str = include_str!("../example.config.toml");

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("example.config.toml")
    }

    // Every test that loads a Config runs inside a Jail: Jail serialises them, so no test
    // sees another's environment variables.

    #[test]
    fn defaults_validate() {
        Jail::expect_with(|_| {
            let c = Config::load(None, &ConfigArgs::default()).unwrap();
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    #[test]
    fn example_file_loads_validates_and_states_the_defaults() {
        Jail::expect_with(|_| {
            let c = Config::load(Some(&example_path()), &ConfigArgs::default()).unwrap();
            // The example sets every field to its default, so the defaults it documents
            // are the real ones.
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    /// The commented-out examples (optional fields without a default) are valid too.
    #[test]
    fn example_file_commented_examples_parse() {
        let is_example = |rest: &str| {
            rest == "[tls]"
                || rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
        };
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if is_example(rest) => format!("{rest}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        Jail::expect_with(|jail| {
            jail.create_file("full.toml", &uncommented)?;
            let c = Config::load(Some(&jail.directory().join("full.toml")), &ConfigArgs::default())
                .unwrap();
            assert!(c.tls.is_some());
            assert_eq!(c.lightning.bitcoind_rpc_user.as_deref(), Some("tribute"));
            assert!(c.lightning.bitcoind_rpc_password.is_some());
            assert!(c.lightning.esplora_url.is_some());
            Ok(())
        });
    }

    /// Every leaf key of a fully populated config appears in the example as `key =`
    /// (commented out for optional fields that have no default).
    #[test]
    fn example_file_documents_every_field() {
        let mut full = Config {
            tls: Some(TlsConfig { cert_path: "c".into(), key_path: "k".into() }),
            ..Config::default()
        };
        full.lightning.bitcoind_rpc_user = Some("u".into());
        full.lightning.bitcoind_rpc_password = Some(SecretString("p".into()));
        full.lightning.esplora_url = Some("https://e".into());
        full.lightning.node_alias = Some("a".into());
        let data = Figment::from(Serialized::defaults(full)).data().unwrap();
        let dict = data.values().next().unwrap();
        let mut missing = Vec::new();
        let mut stack: Vec<(String, &figment::value::Value)> =
            dict.iter().map(|(k, v)| (k.clone(), v)).collect();
        while let Some((path, value)) = stack.pop() {
            if let Some(d) = value.as_dict() {
                let section = format!("[{path}]");
                if !EXAMPLE.lines().any(|l| l.trim_start_matches(['#', ' ']) == section) {
                    missing.push(section);
                }
                stack.extend(d.iter().map(|(k, v)| (format!("{path}.{k}"), v)));
                continue;
            }
            let leaf = path.rsplit('.').next().unwrap();
            let documented = EXAMPLE
                .lines()
                .any(|l| l.trim_start_matches(['#', ' ']).starts_with(&format!("{leaf} =")));
            if !documented {
                missing.push(path);
            }
        }
        assert!(missing.is_empty(), "not in example.config.toml: {missing:?}");
    }

    #[test]
    fn environment_overrides_file_and_flags_override_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "tribute.toml",
                "network = \"signet\"\nlightning.chain_source = \"esplora\"\n\
                 lightning.esplora_url = \"https://mempool.space/signet/api\"\n\
                 [meter]\nmax_batch = 100\nqueue_capacity = 1000\n",
            )?;
            let path = jail.directory().join("tribute.toml");
            let c = Config::load(Some(&path), &ConfigArgs::default()).unwrap();
            assert_eq!(c.network, Network::Signet);
            assert_eq!(c.meter.max_batch, 100);

            jail.set_env("TRIBUTE_METER__MAX_BATCH", "200");
            jail.set_env("TRIBUTE_LISTEN", "127.0.0.1:6000");
            jail.set_env("TRIBUTE_METRICS_LISTEN", "off");
            jail.set_env("TRIBUTE_STORAGE__DURABILITY", "normal");
            jail.set_env("TRIBUTE_LIGHTNING__BITCOIND_RPC_PASSWORD", "1234");
            // Not a config key: ignored rather than an error.
            jail.set_env("TRIBUTE_TOKEN", "trb_x_y");
            let c = Config::load(Some(&path), &ConfigArgs::default()).unwrap();
            assert_eq!(c.meter.max_batch, 200, "env beats file");
            assert_eq!(c.meter.queue_capacity, 1000, "file beats default");
            assert_eq!(c.listen, "127.0.0.1:6000".parse().unwrap());
            assert_eq!(c.metrics_listen, None);
            assert_eq!(c.storage.durability, Durability::Normal);
            assert_eq!(c.lightning.bitcoind_rpc_password, Some(SecretString("1234".into())));
            assert!(!format!("{c:?}").contains("1234"), "password not in Debug");

            let args = ConfigArgs {
                listen: Some("127.0.0.1:7000".parse().unwrap()),
                metrics_listen: Some("127.0.0.1:7001".parse().unwrap()),
                log_filter: Some("debug".into()),
                log_json: true,
                ..ConfigArgs::default()
            };
            let c = Config::load(Some(&path), &args).unwrap();
            assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap(), "flag beats env");
            assert_eq!(c.metrics_listen, Some("127.0.0.1:7001".parse().unwrap()));
            assert_eq!(c.log, LogConfig { filter: "debug".into(), json: true });
            assert_eq!(c.meter.max_batch, 200);
            Ok(())
        });
    }

    #[test]
    fn config_path_from_environment_via_clap() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: ConfigArgs,
        }
        Jail::expect_with(|jail| {
            jail.create_file("t.toml", "data_dir = \"/var/lib/tribute\"\n")?;
            jail.set_env("TRIBUTE_CONFIG", jail.directory().join("t.toml").display());
            let cli = Cli::try_parse_from(["tributed", "--network", "regtest"]).unwrap();
            let c = cli.config.load().unwrap();
            assert_eq!(c.data_dir, PathBuf::from("/var/lib/tribute"));
            let cli = Cli::try_parse_from(["tributed", "--metrics-listen", "off"]).unwrap();
            assert_eq!(cli.config.metrics_listen, Some(OptionalAddr(None)));
            assert!(Cli::try_parse_from(["tributed", "--network", "mainnet"]).is_err());
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_problem() {
        Jail::expect_with(|jail| {
            let load = |text: &str| {
                jail.create_file("c.toml", text).unwrap();
                Config::load(Some(&jail.directory().join("c.toml")), &ConfigArgs::default())
            };
            let err = load("[meter]\nmax_bach = 1\n").unwrap_err();
            assert!(err.to_string().contains("max_bach"), "unknown key named: {err}");
            let err = load("network = \"mainnet\"\n").unwrap_err();
            assert!(err.to_string().contains("mainnet"), "{err}");
            let err = load("[meter]\nmax_batch = 0\n").unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { field: "meter.max_batch", .. }), "{err}");
            let err = load("[meter]\nmax_batch = 10\nqueue_capacity = 5\n").unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { field: "meter.queue_capacity", .. }),
                "{err}"
            );
            let err = load("[meter]\nmax_in_flight = 0\n").unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { field: "meter.max_in_flight", .. }),
                "{err}"
            );
            let err = load("[meter]\nstream_interval_ms = 0\n").unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { field: "meter.stream_interval_ms", .. }),
                "{err}"
            );
            let err = load("listen = \"0.0.0.0:50051\"\n").unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { field: "listen", .. }), "{err}");
            let err = load(
                "listen = \"0.0.0.0:50051\"\n[tls]\ncert_path = \"c\"\nkey_path = \"k\"\n\
                 [auth]\nrequired = false\n",
            )
            .unwrap_err();
            assert!(err.to_string().contains("unauthenticated"), "{err}");
            load("listen = \"0.0.0.0:50051\"\n[tls]\ncert_path = \"c\"\nkey_path = \"k\"\n")
                .unwrap();
            let err = load("[lightning]\nchain_source = \"bitcoind_rpc\"\n").unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { field: "lightning.bitcoind_rpc_user", .. }),
                "{err}"
            );
            let err = load("network = \"bitcoin\"\n").unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { field: "lightning.chain_source", .. }),
                "{err}"
            );
            let err =
                Config::load(Some(&jail.directory().join("absent.toml")), &ConfigArgs::default())
                    .unwrap_err();
            assert!(err.to_string().contains("absent.toml"), "{err}");
            Ok(())
        });
    }
}
