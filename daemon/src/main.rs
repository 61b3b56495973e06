//! `tributed`: the Tribute daemon.
//!
//! ```text
//! tributed run                                   # serve (config: --config / TRIBUTE_* / flags)
//! tributed token create --role provider          # print a new bearer token (shown once)
//! tributed token create --role contributor --contributor <KEY-HEX>
//! tributed token list | tributed token revoke <TOKEN-ID>
//! tributed backup <DEST>                         # consistent copy of the live database
//! tributed reconcile [--data-dir DIR | --db FILE] [--json] [--provider-key HEX]
//! ```

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tribute_channels::{PublicKey, Timestamp};
use tribute_daemon::auth::{Role, TokenStore};
use tribute_daemon::config::{Config, ConfigArgs};
use tribute_daemon::devchain::{DevChain, DevChainConfig};
use tribute_daemon::ledger::unix_now;
use tribute_daemon::{reconcile, server, store};

/// mimalloc: markedly cheaper than the system allocator for the many small, short-lived
/// allocations of each gRPC call (measured in docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tributed",
    version,
    about = "Tribute: pays the people whose data trained a model, per use."
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT/SIGTERM, then drain and stop.
    Run,
    /// Manage bearer tokens (works while the daemon runs; changes apply within 2 s).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Write a consistent copy of the live database to DEST (which must not exist).
    Backup {
        /// Destination file.
        dest: PathBuf,
    },
    /// Re-derive every ledger invariant from the database's raw records (read-only; safe
    /// on a live daemon's database or on a backup) and print a report. Exits 0 when every
    /// invariant holds, 1 when any finding names a broken record, 2 when the database
    /// cannot be read.
    Reconcile(ReconcileArgs),
    /// Run the regtest simulator on its own, for Lightning nodes in other processes
    /// (`lightning.chain_source = "devchain"`). It validates no scripts and does no real
    /// proof of work: never for real money. Runs until SIGINT/SIGTERM.
    Devchain {
        /// RPC port on 127.0.0.1.
        #[arg(long, default_value_t = 18443)]
        rpc_port: u16,
        /// Mine a block this often, in seconds (0: only when asked through RPC).
        #[arg(long, default_value_t = 1)]
        mine_every_secs: u64,
    },
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    tributed reconcile --data-dir ./tribute-data\n  \
    tributed reconcile --db backup.sqlite --provider-key <HEX> --json")]
struct ReconcileArgs {
    /// Data directory whose ledger (`tribute.sqlite`) to reconcile (default: the
    /// configured one).
    #[arg(long, value_name = "DIR", conflicts_with = "db")]
    data_dir: Option<PathBuf>,
    /// A database file to reconcile (e.g. a copy made with `tributed backup`).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// The provider's state key as the provider published it (hex, x-only): signatures
    /// are checked against it and the database's recorded key must match it. Default: the
    /// key the database records.
    #[arg(long, value_name = "HEX")]
    provider_key: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit code of `reconcile` when a finding names a broken record.
const EXIT_FINDINGS: u8 = 1;
/// Exit code of `reconcile` when the database cannot be read.
const EXIT_UNREADABLE: u8 = 2;

/// `tributed reconcile`: needs no runtime and no configuration beyond where the database is.
fn run_reconcile(config: &ConfigArgs, args: &ReconcileArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("tributed reconcile: {msg}");
        ExitCode::from(EXIT_UNREADABLE)
    };
    let db = match (&args.db, &args.data_dir) {
        (Some(db), _) => db.clone(),
        (None, Some(dir)) => server::database_path(dir),
        (None, None) => match config.load() {
            Ok(c) => server::database_path(&c.data_dir),
            Err(e) => return fail(e.to_string()),
        },
    };
    let provider_key = match args.provider_key.as_deref().map(PublicKey::from_hex).transpose() {
        Ok(k) => k,
        Err(e) => return fail(format!("--provider-key: {e}")),
    };
    let options = reconcile::Options { provider_key, ..reconcile::Options::default() };
    let report = match reconcile::reconcile_file_with(&db, &options) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => return fail(e.to_string()),
        }
    } else {
        print!("{report}");
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FINDINGS)
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (it is stored only as a hash: save it now).
    Create {
        /// provider, contributor, operator, accountant or evaluator.
        #[arg(long)]
        role: Role,
        /// The key (hex) a contributor or evaluator token is bound to.
        #[arg(long)]
        contributor: Option<String>,
        /// A label for the token list.
        #[arg(long, default_value = "")]
        label: String,
        /// Lifetime in seconds (default: no expiry).
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke {
        /// The token id shown by `create` and `list`.
        token_id: String,
    },
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn token_store(config: &Config) -> Result<TokenStore, String> {
    server::prepare_data_dir(&config.data_dir).map_err(|e| e.to_string())?;
    let db = server::database_path(&config.data_dir);
    drop(store::initialize(&db, config.storage.durability).map_err(|e| e.to_string())?);
    let conn = store::connect(&db, config.storage.durability).map_err(|e| e.to_string())?;
    TokenStore::open(conn).map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(cli: Cli) -> Result<(), String> {
    let config = cli.config.load().map_err(|e| e.to_string())?;
    match cli.command {
        Command::Run => {
            init_tracing(&config);
            let daemon = server::start(config).await.map_err(|e| e.to_string())?;
            let (stop, mut task) = daemon.into_stopper();
            tokio::select! {
                _ = shutdown_signal() => {
                    tracing::info!("stopping: draining accepted requests");
                    let _ = stop.send(());
                    task_wait(task).await
                }
                done = &mut task => done.map_err(|e| e.to_string())?.map_err(|e| e.to_string()),
            }
        }
        Command::Token { command } => {
            let tokens = token_store(&config)?;
            let now = Timestamp(unix_now());
            match command {
                TokenCommand::Create { role, contributor, label, expires_in_secs } => {
                    let key = contributor
                        .map(|k| PublicKey::from_hex(&k))
                        .transpose()
                        .map_err(|e| format!("--contributor: {e}"))?;
                    let expires = expires_in_secs.map(|s| Timestamp(now.0.saturating_add(s)));
                    let t = tokens
                        .create(role, key, &label, expires, now)
                        .map_err(|e| e.to_string())?;
                    println!("token_id: {}", t.token_id);
                    println!("token:    {}", t.secret);
                }
                TokenCommand::List => {
                    for t in tokens.list().map_err(|e| e.to_string())? {
                        println!(
                            "{}\t{}\t{}\t{}\t{}",
                            t.token_id,
                            t.role,
                            t.contributor_key.map(|k| k.to_hex()).unwrap_or_else(|| "-".into()),
                            if t.revoked_at.is_some() { "revoked" } else { "active" },
                            t.label
                        );
                    }
                }
                TokenCommand::Revoke { token_id } => {
                    tokens.revoke(&token_id, now).map_err(|e| e.to_string())?;
                    println!("revoked {token_id}");
                }
            }
            Ok(())
        }
        Command::Devchain { rpc_port, mine_every_secs } => {
            init_tracing(&config);
            let chain = DevChain::start_with(DevChainConfig {
                rpc_bind_addr: std::net::SocketAddr::from((
                    std::net::Ipv4Addr::LOCALHOST,
                    rpc_port,
                )),
                ..DevChainConfig::default()
            })
            .await
            .map_err(|e| e.to_string())?;
            if mine_every_secs > 0 {
                chain.start_auto_mining(std::time::Duration::from_secs(mine_every_secs));
            }
            println!(
                "dev chain: RPC http://{} user {} password {}, height {}",
                chain.rpc_addr(),
                chain.rpc_user(),
                chain.rpc_password(),
                chain.height()
            );
            shutdown_signal().await;
            chain.shutdown().await;
            Ok(())
        }
        // Dispatched in `main` before the runtime starts (it needs no runtime).
        Command::Reconcile(_) => Err("reconcile runs without the runtime".into()),
        Command::Backup { dest } => {
            let db = server::database_path(&config.data_dir);
            let conn = store::connect(&db, config.storage.durability).map_err(|e| e.to_string())?;
            store::backup(&conn, &dest).map_err(|e| e.to_string())?;
            println!("backed up {} to {}", db.display(), dest.display());
            Ok(())
        }
    }
}

async fn task_wait(
    task: tokio::task::JoinHandle<Result<(), server::DaemonError>>,
) -> Result<(), String> {
    task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Reconcile(args) = &cli.command {
        return run_reconcile(&cli.config, args);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tributed: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tributed: {e}");
            ExitCode::FAILURE
        }
    }
}
