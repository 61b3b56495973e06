//! The `tribute` CLI's configuration.
//!
//! Sources, later ones winning: built-in defaults < the TOML file (`--config PATH` or
//! `TRIBUTE_CLI_CONFIG`) < environment variables `TRIBUTE_CLI_<FIELD>` (nested:
//! `TRIBUTE_CLI_PROVIDER__CONNECTIONS=8`) < command-line flags. The prefix is not the
//! daemon's `TRIBUTE_`, so one shell can configure both without one reading the other's
//! `data_dir`. `client/example.config.toml` documents every field; a test loads it.

use crate::connect::DaemonEndpoint;
use crate::error::ClientError;
use crate::provider::{ProviderConfig, RetryPolicy};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tribute_channels::{Network, PublicKey};
use tribute_daemon::config::LightningConfig;

/// Prefix of the environment variables the CLI reads.
pub const ENV_PREFIX: &str = "TRIBUTE_CLI_";

/// The CLI's settings.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CliConfig {
    /// The daemon's gRPC URL.
    pub daemon: String,
    /// Bearer token (provider, operator, or a contributor token). Contributors may leave it
    /// out: they log in with their key.
    pub token: Option<String>,
    /// PEM file of the CA that signed the daemon's TLS certificate (for `https://`).
    pub tls_ca: Option<PathBuf>,
    /// Name to check the daemon's certificate against, if not the URL's host.
    pub tls_domain: Option<String>,
    /// The contributor's directory: key file and the node's records.
    pub home: PathBuf,
    /// The network the daemon must be on (`regtest`, `signet`, `testnet`, `testnet4`,
    /// `bitcoin`); unset: take the daemon's.
    pub network: Option<String>,
    /// Pin the daemon's provider key (64 hex digits); unset: take the daemon's.
    pub provider_key: Option<String>,
    /// Bound on connecting, in seconds.
    pub connect_timeout_secs: u64,
    /// Provider SDK settings.
    pub provider: ProviderSection,
    /// The receiving node's own Lightning node (`tribute contributor run`), with the same
    /// keys as the daemon's `[lightning]` section; off by default.
    pub lightning: LightningConfig,
    /// How the receiving node asks to be paid.
    pub payout: PayoutSection,
}

/// How the receiving node asks to be paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PayoutSection {
    /// `keysend` (to the node id) or `offer` (a BOLT12 offer of the node, made once and
    /// kept in the node's records).
    pub method: PayoutMethod,
}

impl Default for PayoutSection {
    fn default() -> Self {
        PayoutSection { method: PayoutMethod::Keysend }
    }
}

/// How the provider pays this contributor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayoutMethod {
    /// Keysend to the node id, with TLVs naming the settlement.
    Keysend,
    /// A BOLT12 offer of the node, with a payer note naming the settlement.
    Offer,
}

impl std::fmt::Debug for CliConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliConfig")
            .field("daemon", &self.daemon)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca)
            .field("home", &self.home)
            .field("network", &self.network)
            .field("provider_key", &self.provider_key)
            .field("provider", &self.provider)
            .field("lightning", &self.lightning)
            .field("payout", &self.payout)
            .finish()
    }
}

/// Provider SDK settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderSection {
    /// HTTP/2 connections in the pool.
    pub connections: usize,
    /// Bound on one call, retries included, in ms.
    pub call_deadline_ms: u64,
    /// Bound on one attempt, in ms.
    pub attempt_timeout_ms: u64,
    /// Most attempts per call.
    pub max_attempts: u32,
    /// First backoff, in ms (doubles, with jitter).
    pub initial_backoff_ms: u64,
    /// Largest backoff, in ms.
    pub max_backoff_ms: u64,
}

impl Default for ProviderSection {
    fn default() -> Self {
        ProviderSection {
            connections: 4,
            call_deadline_ms: 10_000,
            attempt_timeout_ms: 3_000,
            max_attempts: 8,
            initial_backoff_ms: 25,
            max_backoff_ms: 2_000,
        }
    }
}

impl Default for CliConfig {
    fn default() -> Self {
        let home = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".tribute"))
            .unwrap_or_else(|| PathBuf::from(".tribute"));
        CliConfig {
            daemon: "http://127.0.0.1:50051".into(),
            token: None,
            tls_ca: None,
            tls_domain: None,
            home,
            network: None,
            provider_key: None,
            connect_timeout_secs: 5,
            provider: ProviderSection::default(),
            lightning: LightningConfig::default(),
            payout: PayoutSection::default(),
        }
    }
}

/// Flags that override the file and the environment (only those given).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// TOML configuration file.
    #[arg(long, global = true, env = "TRIBUTE_CLI_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The daemon's URL, e.g. http://127.0.0.1:50051 [env: TRIBUTE_CLI_DAEMON].
    #[arg(long, global = true, value_name = "URL")]
    pub daemon: Option<String>,
    /// Bearer token; prefer the environment (TRIBUTE_CLI_TOKEN) so it stays out of `ps`.
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// PEM CA certificate for an https:// daemon [env: TRIBUTE_CLI_TLS_CA].
    #[arg(long, global = true, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// Name to check the daemon's certificate against, if not the URL's host
    /// [env: TRIBUTE_CLI_TLS_DOMAIN].
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_domain: Option<String>,
    /// Contributor directory (key, records) [env: TRIBUTE_CLI_HOME; default ~/.tribute].
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

impl GlobalArgs {
    fn provider(&self) -> Figment {
        let mut f = Figment::new();
        if let Some(v) = &self.daemon {
            f = f.merge(Serialized::default("daemon", v));
        }
        if let Some(v) = &self.token {
            f = f.merge(Serialized::default("token", v));
        }
        if let Some(v) = &self.tls_ca {
            f = f.merge(Serialized::default("tls_ca", v));
        }
        if let Some(v) = &self.tls_domain {
            f = f.merge(Serialized::default("tls_domain", v));
        }
        if let Some(v) = &self.home {
            f = f.merge(Serialized::default("home", v));
        }
        f
    }
}

impl CliConfig {
    /// Loads defaults < file < environment < flags and checks the result.
    pub fn load(args: &GlobalArgs) -> Result<CliConfig, ClientError> {
        Self::load_from(args.config.as_deref(), args)
    }

    /// Like [`load`](Self::load) with an explicit file.
    pub fn load_from(path: Option<&Path>, args: &GlobalArgs) -> Result<CliConfig, ClientError> {
        let mut f = Figment::from(Serialized::defaults(CliConfig::default()));
        if let Some(p) = path {
            f = f.merge(Toml::file_exact(p));
        }
        let f = f
            .merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]))
            .merge(args.provider());
        let c: CliConfig =
            f.extract().map_err(|e| ClientError::Config(format!("configuration: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ClientError> {
        let bad = |m: String| Err(ClientError::Config(format!("configuration: {m}")));
        if self.connect_timeout_secs == 0 {
            return bad("`connect_timeout_secs` must be at least 1".into());
        }
        let p = &self.provider;
        if p.connections == 0 || p.connections > 64 {
            return bad("`provider.connections` must be 1..=64".into());
        }
        if p.max_attempts == 0 {
            return bad("`provider.max_attempts` must be at least 1".into());
        }
        if p.call_deadline_ms == 0 || p.attempt_timeout_ms == 0 {
            return bad(
                "`provider.call_deadline_ms` and `attempt_timeout_ms` must be positive".into()
            );
        }
        let network = self.network()?;
        self.pinned_provider_key()?;
        self.endpoint_shape()?;
        if self.lightning.enabled {
            let network = network.ok_or_else(|| {
                ClientError::Config(
                    "configuration: `lightning.enabled` needs `network` (the Lightning node is \
                     started before the daemon is asked)"
                        .into(),
                )
            })?;
            self.lightning.validate(network).map_err(|e| ClientError::Config(e.to_string()))?;
        }
        Ok(())
    }

    fn endpoint_shape(&self) -> Result<(), ClientError> {
        if !(self.daemon.starts_with("http://") || self.daemon.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "configuration: `daemon` must be an http:// or https:// URL, not {:?}",
                self.daemon
            )));
        }
        Ok(())
    }

    /// The expected network, if configured.
    pub fn network(&self) -> Result<Option<Network>, ClientError> {
        self.network.as_deref().map(parse_network).transpose()
    }

    /// The pinned provider key, if configured.
    pub fn pinned_provider_key(&self) -> Result<Option<PublicKey>, ClientError> {
        self.provider_key
            .as_deref()
            .map(|h| {
                PublicKey::from_hex(h).map_err(|_| {
                    ClientError::Config(
                        "configuration: `provider_key` must be 64 hex digits of an x-only key"
                            .into(),
                    )
                })
            })
            .transpose()
    }

    /// The daemon endpoint, with the CA file read.
    pub fn endpoint(&self) -> Result<DaemonEndpoint, ClientError> {
        let tls_ca_pem =
            match &self.tls_ca {
                None => None,
                Some(p) => Some(std::fs::read(p).map_err(|e| {
                    ClientError::Config(format!("TLS CA file {}: {e}", p.display()))
                })?),
            };
        Ok(DaemonEndpoint {
            url: self.daemon.clone(),
            tls_ca_pem,
            tls_domain: self.tls_domain.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
        })
    }

    /// The provider SDK settings; needs a token.
    pub fn provider_config(&self) -> Result<ProviderConfig, ClientError> {
        let token = self.token.clone().ok_or_else(|| {
            ClientError::Config(
                "a provider token is needed: set TRIBUTE_CLI_TOKEN or pass --token".into(),
            )
        })?;
        let p = &self.provider;
        let mut c = ProviderConfig::new(self.endpoint()?, token);
        c.connections = p.connections;
        c.call_deadline = Duration::from_millis(p.call_deadline_ms);
        c.attempt_timeout = Duration::from_millis(p.attempt_timeout_ms);
        c.retry = RetryPolicy {
            max_attempts: p.max_attempts,
            initial_backoff: Duration::from_millis(p.initial_backoff_ms),
            max_backoff: Duration::from_millis(p.max_backoff_ms),
        };
        Ok(c)
    }

    /// The contributor key file.
    pub fn key_path(&self) -> PathBuf {
        self.home.join(crate::keys::CONTRIBUTOR_KEY_FILE)
    }
}

/// Parses a network name.
pub fn parse_network(s: &str) -> Result<Network, ClientError> {
    Ok(match s {
        "regtest" => Network::Regtest,
        "signet" => Network::Signet,
        "testnet" => Network::Testnet,
        "testnet4" => Network::Testnet4,
        "bitcoin" | "mainnet" => Network::Bitcoin,
        _ => {
            return Err(ClientError::Config(format!(
                "unknown network {s:?}: use regtest, signet, testnet, testnet4 or bitcoin"
            )))
        }
    })
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use super::*;

    #[test]
    fn example_config_loads_and_matches_the_defaults_it_documents() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("example.config.toml");
        figment::Jail::expect_with(|_| {
            let c = CliConfig::load_from(Some(&path), &GlobalArgs::default()).expect("loads");
            assert_eq!(c.daemon, "http://127.0.0.1:50051");
            assert_eq!(c.provider, ProviderSection::default());
            assert_eq!(c.lightning, LightningConfig::default());
            assert_eq!(c.payout, PayoutSection::default());
            assert_eq!(c.network().expect("network"), Some(Network::Regtest));
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "daemon = \"http://file:1\"\n[provider]\nconnections = 2\n",
            )?;
            jail.set_env("TRIBUTE_CLI_DAEMON", "http://env:2");
            jail.set_env("TRIBUTE_CLI_PROVIDER__CONNECTIONS", "3");
            jail.set_env("TRIBUTE_DATA_DIR", "/daemon/only");
            let c = CliConfig::load_from(Some(Path::new("c.toml")), &GlobalArgs::default())
                .expect("loads");
            assert_eq!((c.daemon.as_str(), c.provider.connections), ("http://env:2", 3));
            let flags = GlobalArgs { daemon: Some("http://flag:3".into()), ..Default::default() };
            let c = CliConfig::load_from(Some(Path::new("c.toml")), &flags).expect("loads");
            assert_eq!(c.daemon, "http://flag:3");
            Ok(())
        });
    }

    #[test]
    fn typos_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "deamon = \"http://x:1\"\n")?;
            assert!(
                CliConfig::load_from(Some(Path::new("typo.toml")), &GlobalArgs::default()).is_err()
            );
            jail.create_file("net.toml", "network = \"moon\"\n")?;
            let e = CliConfig::load_from(Some(Path::new("net.toml")), &GlobalArgs::default())
                .expect_err("bad network");
            assert!(e.to_string().contains("moon"), "{e}");
            jail.create_file("url.toml", "daemon = \"127.0.0.1:50051\"\n")?;
            assert!(
                CliConfig::load_from(Some(Path::new("url.toml")), &GlobalArgs::default()).is_err()
            );
            Ok(())
        });
    }

    #[test]
    fn token_is_not_printed() {
        let c = CliConfig { token: Some("trb_secret".into()), ..CliConfig::default() };
        assert!(!format!("{c:?}").contains("trb_secret"));
    }
}
