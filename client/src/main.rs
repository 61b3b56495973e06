//! `tribute`: the command-line tool for contributors and providers.

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tribute_channels::licence::{Use, Uses};
use tribute_channels::{DatasetHash, Timestamp};
use tribute_client::admin::AdminCommand;
use tribute_client::config::PayoutMethod;
use tribute_client::config::{CliConfig, GlobalArgs};
use tribute_client::connect::Bearer;
use tribute_client::contributor::{Contributor, LicenceStatus};
use tribute_client::demo::DemoOptions;
use tribute_client::keys::{prepare_private_dir, ContributorKey};
use tribute_client::manifest::{Manifest, Progress};
use tribute_client::node::{
    NodeConfig, NodeStatus, NodeStore, PaymentClaim, PayoutDestination, NODE_DB_FILE,
};
use tribute_client::payments;
use tribute_client::report::ReportCommand;
use tribute_client::time::{parse_time, unix_now};
use tribute_client::valuation::cli::EvaluateCommand;
use tribute_client::{ClientError, Meter, Provider, RetryPolicy};
use tribute_proto::v1 as pb;
use tribute_proto::v1::registry_client::RegistryClient;
use tribute_proto::v1::reputation_client::ReputationClient;

const ABOUT: &str =
    "Tribute: contributors license datasets and check they are paid; providers meter inference.";

const EXAMPLES: &str = "\
Examples:
  tribute contributor init
  tribute contributor register --node-id 02ab…(66 hex)
  tribute contributor register-dataset ./my-corpus --licence CC-BY-4.0 --uses training,retrieval
  tribute contributor revoke ./my-corpus
  tribute contributor run                  # the receiving node; `tribute contributor status` reads its records
  export TRIBUTE_CLI_TOKEN=trb_…           # a provider token
  tribute provider register-model --model llm-a --share-ppm 200000 --per-request-nsat 5000000
  tribute provider register-run --model llm-a --run-id run-1 --started-at now --dataset <HASH>=1
  tribute provider meter --model llm-a --request-id req-1 --input-tokens 900 --output-tokens 120
  tribute provider evaluate knn-shapley --train-embeddings … -k 5 --model llm-a --attribution-version 3 --benchmark-id b1 --out eval.json

Configuration: --config FILE (TOML, see client/example.config.toml) < TRIBUTE_CLI_* environment < flags.";

#[derive(Parser)]
#[command(name = "tribute", version, about = ABOUT, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What a data contributor does: key, dataset licences, the receiving node.
    #[command(subcommand)]
    Contributor(ContributorCommand),
    /// What an inference provider does: meter requests, register models and training runs,
    /// value datasets (`provider evaluate knn-shapley`).
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// The whole system on this machine, on embedded defaults: a dev chain, tributed with
    /// its Lightning node, contributors with theirs, simulated inference traffic, settlement
    /// rounds over Lightning, and a summary checked against every party's own records.
    #[command(
        after_help = "Examples:\n  tribute demo\n  tribute demo --contributors 5 --requests 100000 --rounds 3\n  tribute demo --keep-running      # then look around: gRPC, /metrics; Ctrl-C stops"
    )]
    Demo(DemoArgs),
    /// What an operator does: balances and liquidity, settlements, settle-now, pause and
    /// resume, tokens, backups, the node and its funding (an operator token).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// What an evaluator does: submit signed evaluation records of datasets (an evaluator
    /// token bound to the evaluator key).
    #[command(subcommand)]
    Evaluator(tribute_client::reputation::EvaluatorCommand),
    /// What an accountant reads: a contributor's statement for a period, the journal of
    /// every balance change — from a database backup, as text, CSV or JSON.
    #[command(subcommand)]
    Report(ReportCommand),
    /// Re-derive every ledger invariant from a database file's raw records (a backup from
    /// `tribute admin backup`): exits 0 when all hold, 1 naming each broken record.
    #[command(
        after_help = "Example:\n  tribute admin backup ledger.sqlite && tribute reconcile ledger.sqlite --provider-key <HEX>"
    )]
    Reconcile {
        /// The database file (read-only).
        db: PathBuf,
        /// The provider's published state key (64 hex); unset: the key the file records.
        #[arg(long, value_name = "HEX")]
        provider_key: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Contributors, each with its own Lightning node and receiving node (1–8).
    #[arg(long, default_value_t = 3)]
    contributors: usize,
    /// Inference requests to meter in all.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Settlement rounds (the requests are spread over them).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Keep everything here instead of a temp dir (must be empty or absent).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Seed of the simulated traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// After the summary, keep the daemon and nodes running until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// No progress bars or step lines (the summary is still printed).
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum ContributorCommand {
    /// Create the contributor directory (mode 0700) and key (mode 0600).
    #[command(after_help = "Example:\n  tribute --home ~/.tribute contributor init")]
    Init,
    /// Print the contributor key and where things are kept.
    Show,
    /// Hash a dataset directory: print its dataset hash, optionally write its manifest.
    #[command(
        after_help = "Example:\n  tribute contributor manifest ./my-corpus --output my-corpus.manifest\n\nThe format is in docs/MANIFEST.md."
    )]
    Manifest {
        /// The dataset directory.
        dir: PathBuf,
        /// Write the manifest here (refuses to overwrite).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Register where payouts go (signed by the contributor key).
    Register {
        /// Lightning node id for keysend payouts (66 hex digits).
        #[arg(long, value_name = "HEX")]
        node_id: Option<String>,
        /// BOLT12 offer (lno1…) for offer payouts.
        #[arg(long, value_name = "OFFER")]
        offer: Option<String>,
    },
    /// License a dataset: hash it (or read its manifest), sign the licence, register it.
    #[command(
        after_help = "Examples:\n  tribute contributor register-dataset ./my-corpus --licence CC-BY-4.0 --uses training\n  tribute contributor register-dataset my-corpus.manifest --licence MIT --uses training,retrieval --not-after 2027-01-01"
    )]
    RegisterDataset(RegisterDataset),
    /// Revoke a licence of a dataset (by directory, manifest file or dataset hash).
    #[command(after_help = "Example:\n  tribute contributor revoke 3f2a…(64 hex) --at 2026-12-31")]
    Revoke {
        /// Dataset directory, manifest file, or dataset hash (64 hex digits).
        dataset: String,
        /// Which licence, when the dataset has several unrevoked ones.
        #[arg(long, value_name = "HEX")]
        licence_id: Option<String>,
        /// From when (default now): now, Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long, default_value = "now")]
        at: String,
    },
    /// List this contributor's licences as the daemon has them.
    Licences,
    /// This contributor's datasets' reputation, with the evaluations behind each score.
    #[command(after_help = "Example:\n  tribute contributor reputation --as-of 2026-12-01 --json")]
    Reputation {
        /// Reference time for the decay (default now).
        #[arg(long, default_value = "now")]
        as_of: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the receiving node: follow the channel, verify and keep every signed state,
    /// keep proofs of misbehaviour, reconnect with backoff. Stops on Ctrl-C / SIGTERM.
    #[command(
        after_help = "Example:\n  RUST_LOG=info tribute contributor run\n\nWith `[lightning] enabled = true` (and `network`) in the configuration, the node also runs\nits own Lightning node (ldk-node, data in HOME/ldk), registers it as the payout destination\n(`[payout] method = \"keysend\"` or `\"offer\"`), records every payout it receives and\nmatches it to the signed state that claims it (see `tribute contributor status`)."
    )]
    Run,
    /// What this node's own records say: accrued, settled, outstanding, settlements,
    /// refused states and proofs (never the daemon's word).
    Status,
}

#[derive(Args)]
struct RegisterDataset {
    /// Dataset directory, or a manifest file written by `tribute contributor manifest`.
    path: PathBuf,
    /// SPDX licence expression, e.g. CC-BY-4.0.
    #[arg(long, value_name = "SPDX")]
    licence: String,
    /// Permitted uses: training, retrieval (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    uses: Vec<UseArg>,
    /// Start of validity (default now).
    #[arg(long, default_value = "now")]
    not_before: String,
    /// End of validity (default: none).
    #[arg(long)]
    not_after: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum UseArg {
    Training,
    Retrieval,
}

#[derive(Subcommand)]
enum ProviderCommand {
    /// Register a model: its contributor share and tariff (idempotent for equal content).
    #[command(
        after_help = "Example:\n  tribute provider register-model --model llm-a --share-ppm 200000 --per-request-nsat 5000000 --per-output-token-nsat 20"
    )]
    RegisterModel {
        /// The model id.
        #[arg(long)]
        model: String,
        /// Share of each request's price paid to contributors, in parts per million.
        #[arg(long)]
        share_ppm: u32,
        /// Price per request, in nanosatoshi.
        #[arg(long, default_value_t = 0)]
        per_request_nsat: u64,
        /// Price per input token, in nanosatoshi.
        #[arg(long, default_value_t = 0)]
        per_input_token_nsat: u64,
        /// Price per output token, in nanosatoshi.
        #[arg(long, default_value_t = 0)]
        per_output_token_nsat: u64,
    },
    /// Record a training run over licensed datasets: a new attribution version.
    #[command(
        after_help = "Example:\n  tribute provider register-run --model llm-a --run-id run-7 --started-at 2026-11-01 --finished-at 2026-11-03 \\\n      --dataset 3f2a…(64 hex)=3 --dataset 9b01…=1"
    )]
    RegisterRun {
        /// The model trained.
        #[arg(long)]
        model: String,
        /// The run id.
        #[arg(long)]
        run_id: String,
        /// When training started: now, Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long)]
        started_at: String,
        /// When training finished (default: started_at).
        #[arg(long)]
        finished_at: Option<String>,
        /// A dataset and its weight, `HASH=WEIGHT` (repeat for each dataset).
        #[arg(long = "dataset", value_name = "HASH=WEIGHT", required = true)]
        datasets: Vec<String>,
    },
    /// Weight a model's payouts by its datasets' measured reputation: a new attribution
    /// version with weights `w × f(reputation)` (docs/REPUTATION.md).
    #[command(
        after_help = "Example:\n  tribute provider quality-policy --model llm-a --policy-id q --policy-version 1 \\\n      --gain-ppm 1000000 --floor-ppm 0 --cap-ppm 2000000\n\nf(r) = clamp(10^6 + gain_ppm * r / 10^9, floor_ppm, cap_ppm) in ppm; floor 0 lets a dataset\nmeasured to hurt the model earn nothing. A later training run returns the model to\nunweighted payouts until the policy is applied again."
    )]
    QualityPolicy {
        /// The model.
        #[arg(long)]
        model: String,
        /// The policy's name.
        #[arg(long)]
        policy_id: String,
        /// The policy's version.
        #[arg(long, default_value_t = 1)]
        policy_version: u32,
        /// Weight gained per unit of reputation, ppm.
        #[arg(long, default_value_t = 1_000_000)]
        gain_ppm: u32,
        /// Lowest factor, ppm (0: a harmful dataset can be floored to nothing).
        #[arg(long, default_value_t = 0)]
        floor_ppm: u32,
        /// Highest factor, ppm (at most 10,000,000).
        #[arg(long, default_value_t = 2_000_000)]
        cap_ppm: u32,
        /// Reputation as of: now, Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long, default_value = "now")]
        as_of: String,
    },
    /// Meter one inference request (retried with the same id on transient failures).
    #[command(
        after_help = "Examples:\n  tribute provider meter --model llm-a --request-id req-1 --input-tokens 900 --output-tokens 120\n  tribute provider meter --model llm-a --request-id req-2 --price-nsat 5000000"
    )]
    Meter {
        /// The model.
        #[arg(long)]
        model: String,
        /// The request id (idempotency key).
        #[arg(long)]
        request_id: String,
        /// Input tokens (priced by the model's tariff).
        #[arg(long, conflicts_with = "price_nsat")]
        input_tokens: Option<u64>,
        /// Output tokens.
        #[arg(long, conflicts_with = "price_nsat")]
        output_tokens: Option<u64>,
        /// An explicit price in nanosatoshi.
        #[arg(long)]
        price_nsat: Option<u64>,
    },
    /// Measure datasets with a built-in valuator and write an evaluation record (JSON) for
    /// `tribute evaluator submit`.
    #[command(subcommand)]
    Evaluate(EvaluateCommand),
}

/// Shows a progress bar on a terminal for datasets of at least this many bytes.
const PROGRESS_MIN_BYTES: u64 = 32 << 20;

struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn scanned(&mut self, files: u64, bytes: u64) {
        if bytes >= PROGRESS_MIN_BYTES || files >= 10_000 {
            let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "hashing {msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar.set_message(format!("{files} files"));
            self.0 = Some(bar);
        }
    }
    fn hashed(&mut self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

fn hash_dataset(path: &Path) -> Result<(Manifest, DatasetHash), ClientError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
    let manifest = if meta.is_dir() {
        Manifest::build(path, &mut Bar(None))?
    } else {
        Manifest::read(path).map_err(|e| {
            ClientError::Config(format!(
                "{} is a file, so it was read as a manifest, and it is not one: {e}",
                path.display()
            ))
        })?
    };
    let hash = manifest.dataset_hash();
    Ok((manifest, hash))
}

fn dataset_arg(s: &str) -> Result<DatasetHash, ClientError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) && !Path::new(s).exists() {
        return DatasetHash::from_hex(&s.to_ascii_lowercase())
            .map_err(|e| ClientError::Config(e.to_string()));
    }
    Ok(hash_dataset(Path::new(s))?.1)
}

fn time_arg(name: &str, s: &str, now: Timestamp) -> Result<Timestamp, ClientError> {
    parse_time(s, now).map_err(|e| ClientError::Config(format!("--{name}: {e}")))
}

fn print_licence(l: &LicenceStatus) {
    let mut uses = Vec::new();
    if l.training {
        uses.push("training");
    }
    if l.retrieval {
        uses.push("retrieval");
    }
    println!("dataset_hash: {}", l.dataset_hash);
    println!("licence_id:   {}", hex::encode(l.licence_id));
    println!("licence:      {}", l.spdx_license_id);
    println!("uses:         {}", uses.join(","));
    println!("not_before:   {}", l.not_before.0);
    if l.not_after != Timestamp::MAX {
        println!("not_after:    {}", l.not_after.0);
    }
    match l.revoked_at {
        Some(t) => println!("revoked_at:   {}", t.0),
        None => println!("revoked_at:   -"),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn print_status(st: &NodeStatus) {
    if let Some((network, provider, contributor)) = &st.identity {
        println!("contributor_key:  {contributor}");
        println!("provider_key:     {provider}");
        println!("network:          {network:?}");
    }
    println!("accrued_nsat:     {}", st.accrued_nsat().0);
    println!("settled_msat:     {}", st.settled_msat().0);
    println!("outstanding_nsat: {}", st.outstanding_nsat().0);
    match &st.lightning_node_id {
        Some(id) => {
            println!("received_msat:    {}", st.received_msat().0);
            println!("lightning_node:   {}", hex::encode(id));
        }
        None => println!("received_msat:    - (no Lightning node has run here)"),
    }
    for c in &st.channels {
        match &c.latest {
            Some(s) => println!(
                "channel:          {} seq {} accrued_nsat {} settled_msat {} {:?}",
                c.channel_id,
                s.message.seq,
                s.message.accrued_nsat.0,
                s.message.settled_msat.0,
                s.message.status
            ),
            None => println!("channel:          {} (no state yet)", c.channel_id),
        }
    }
    let pending = st.settlements.iter().filter(|s| s.state == "pending").count();
    println!(
        "settlements:      {} notices, {} msat succeeded, {} pending",
        st.settlements.len(),
        st.noticed_succeeded_msat().0,
        pending
    );
    for c in st.claimed_without_notice() {
        println!(
            "discrepancy:      state seq {} claims settlement {} (+{} msat) with no succeeded notice",
            c.seq,
            hex::encode(c.payment_hash),
            c.settled_increase_msat
        );
    }
    for n in st.notices_without_state() {
        println!(
            "discrepancy:      succeeded notice {} ({} msat) not yet in a signed state",
            hex::encode(&n.payment_hash),
            n.amount_msat
        );
    }
    for (p, claim) in st.payouts() {
        let by = match claim {
            PaymentClaim::State(seq) => format!("claimed by state seq {seq}"),
            PaymentClaim::Notice => "named by a settlement notice".to_owned(),
            PaymentClaim::Named => "names this channel; no state carries its hash".to_owned(),
        };
        println!(
            "payment:          {} {} msat {} settlement {} {by}",
            hex::encode(p.payment_hash),
            p.amount_msat,
            p.kind.as_str(),
            p.settlement_id.map_or_else(|| "-".to_owned(), |id| id.to_string()),
        );
    }
    for p in st.unmatched_payments() {
        println!(
            "payment:          {} {} msat {} not a payout of this channel",
            hex::encode(p.payment_hash),
            p.amount_msat,
            p.kind.as_str()
        );
    }
    for c in st.claimed_not_received() {
        println!(
            "discrepancy:      state seq {} claims settlement {} (+{} msat) that this node's Lightning node never received",
            c.seq,
            hex::encode(c.payment_hash),
            c.settled_increase_msat
        );
    }
    for (n, p) in st.notices_not_matched() {
        match p {
            None => println!(
                "discrepancy:      settlement {} ({} msat) succeeded by the daemon's word, never received",
                hex::encode(&n.payment_hash),
                n.amount_msat
            ),
            Some(p) => println!(
                "discrepancy:      settlement {} noticed as {} msat, received {} msat",
                hex::encode(&n.payment_hash),
                n.amount_msat,
                p.amount_msat
            ),
        }
    }
    if st.lightning_node_id.is_some() && st.settled_msat() != st.received_msat() {
        println!(
            "discrepancy:      signed states say {} msat settled, this node received {} msat",
            st.settled_msat().0,
            st.received_msat().0
        );
    }
    if st.settled_msat() != st.noticed_succeeded_msat() {
        println!(
            "discrepancy:      signed states say {} msat settled, succeeded notices {} msat",
            st.settled_msat().0,
            st.noticed_succeeded_msat().0
        );
    }
    println!("refused_states:   {}", st.rejections.len());
    println!("proofs:           {}", st.proofs().count());
    for r in &st.rejections {
        println!(
            "refused:          {} {} at {}{}: {}",
            r.kind,
            r.channel_id,
            r.at.0,
            if r.is_proof { " PROOF" } else { "" },
            r.detail
        );
    }
}

async fn login(config: &CliConfig) -> Result<Contributor, ClientError> {
    let key = ContributorKey::load(&config.key_path())?;
    Contributor::login(&config.endpoint()?, key, config.network()?, config.pinned_provider_key()?)
        .await
}

async fn contributor(config: &CliConfig, cmd: ContributorCommand) -> Result<(), ClientError> {
    let now = unix_now();
    match cmd {
        ContributorCommand::Init => {
            prepare_private_dir(&config.home)?;
            let path = config.key_path();
            match ContributorKey::load(&path) {
                Ok(k) => {
                    println!("already initialised: {}", path.display());
                    println!("contributor_key: {}", k.public());
                }
                Err(tribute_client::keys::KeyError::Missing { .. }) => {
                    let k = ContributorKey::create(&path)?;
                    println!(
                        "created {} (mode 0600): back it up, it is your identity",
                        path.display()
                    );
                    println!("contributor_key: {}", k.public());
                }
                Err(e) => return Err(e.into()),
            }
        }
        ContributorCommand::Show => {
            let k = ContributorKey::load(&config.key_path())?;
            println!("contributor_key: {}", k.public());
            println!("key_file:        {}", config.key_path().display());
            println!("home:            {}", config.home.display());
            println!("daemon:          {}", config.daemon);
        }
        ContributorCommand::Manifest { dir, output } => {
            let (manifest, hash) = hash_dataset(&dir)?;
            if let Some(out) = output {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&out)
                    .map_err(|e| ClientError::Config(format!("{}: {e}", out.display())))?;
                f.write_all(&manifest.to_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| ClientError::Config(format!("{}: {e}", out.display())))?;
                eprintln!("wrote {} ({} files)", out.display(), manifest.entries().len());
            }
            println!("{hash}");
        }
        ContributorCommand::Register { node_id, offer } => {
            let node_id = node_id
                .map(|h| {
                    tribute_daemon::config::parse_node_id(&h).ok_or_else(|| {
                        ClientError::Config("--node-id must be a node id (66 hex digits)".into())
                    })
                })
                .transpose()?;
            if node_id.is_none() && offer.is_none() {
                return Err(ClientError::Config("give --node-id, --offer or both".into()));
            }
            let c = login(config).await?;
            c.register(node_id, offer, now).await?;
            println!("registered contributor {}", c.key().public());
        }
        ContributorCommand::RegisterDataset(a) => {
            let not_before = time_arg("not-before", &a.not_before, now)?;
            let not_after = match &a.not_after {
                Some(s) => time_arg("not-after", s, now)?,
                None => Timestamp::MAX,
            };
            let uses: Vec<Use> = a
                .uses
                .iter()
                .map(|u| match u {
                    UseArg::Training => Use::Training,
                    UseArg::Retrieval => Use::Retrieval,
                })
                .collect();
            // Hash first: a slow hash must not outlive a login session.
            let (manifest, hash) = hash_dataset(&a.path)?;
            eprintln!("dataset {hash} ({} files)", manifest.entries().len());
            let c = login(config).await?;
            let l = c
                .register_licence(hash, &a.licence, Uses::of(&uses), not_before, not_after, now)
                .await?;
            print_licence(&l);
        }
        ContributorCommand::Revoke { dataset, licence_id, at } => {
            let hash = dataset_arg(&dataset)?;
            let licence_id = licence_id
                .map(|h| {
                    let mut b = [0u8; 32];
                    hex::decode_to_slice(h.trim(), &mut b).map(|()| b).map_err(|_| {
                        ClientError::Config("--licence-id must be 64 hex digits".into())
                    })
                })
                .transpose()?;
            let at = time_arg("at", &at, now)?;
            let c = login(config).await?;
            let l = c.revoke(hash, licence_id, at).await?;
            print_licence(&l);
        }
        ContributorCommand::Run => {
            let key = ContributorKey::load(&config.key_path())?;
            let store_path = config.home.join(NODE_DB_FILE);
            let node_err = |e: tribute_client::node::NodeError| ClientError::Config(e.to_string());
            // The Lightning node first: payouts are taken even while the daemon is away.
            let lightning = match config.network()? {
                Some(network) if config.lightning.enabled => {
                    let dir = payments::lightning_dir(&config.home);
                    let ln = payments::start_lightning(
                        &store_path,
                        config.lightning.backend_config(dir, network),
                    )
                    .await
                    .map_err(node_err)?;
                    let offer = config.payout.method == PayoutMethod::Offer;
                    eprintln!(
                        "lightning node {} listening on port {}",
                        hex::encode(ln.node_id()),
                        config.lightning.listen_port
                    );
                    Some((ln.clone(), PayoutDestination { node_id: ln.node_id(), offer }))
                }
                _ => None,
            };
            let node = NodeConfig {
                endpoint: config.endpoint()?,
                store_path,
                network: config.network()?,
                provider_key: config.pinned_provider_key()?,
                reconnect: RetryPolicy {
                    max_attempts: u32::MAX,
                    initial_backoff: std::time::Duration::from_millis(200),
                    max_backoff: std::time::Duration::from_secs(30),
                },
                payout: lightning.as_ref().map(|(_, p)| p.clone()),
            };
            let (stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = stop.send(true);
            });
            if let Some((ln, PayoutDestination { offer: true, .. })) = &lightning {
                // Made (and registered) once the node can: it needs its channel first.
                tokio::spawn(payments::register_offer_when_ready(
                    node.store_path.clone(),
                    ln.clone(),
                    node.endpoint.clone(),
                    key.clone(),
                    node.provider_key,
                    std::time::Duration::from_secs(5),
                    stopped.clone(),
                ));
            }
            eprintln!("contributor {} following {}", key.public(), config.daemon);
            let result = tribute_client::node::run(node, key, stopped).await;
            if let Some((ln, _)) = lightning {
                if let Err(e) = ln.stop().await {
                    tracing::warn!("stopping the lightning node: {e}");
                }
            }
            result.map_err(node_err)?;
        }
        ContributorCommand::Status => {
            let path = config.home.join(NODE_DB_FILE);
            if !path.exists() {
                return Err(ClientError::Config(format!(
                    "no node records at {}: run `tribute contributor run` first",
                    path.display()
                )));
            }
            let store = NodeStore::open(&path).map_err(|e| ClientError::Config(e.to_string()))?;
            let st = store.status().map_err(|e| ClientError::Config(e.to_string()))?;
            print_status(&st);
        }
        ContributorCommand::Reputation { as_of, json } => {
            let as_of = time_arg("as-of", &as_of, now)?;
            let c = login(config).await?;
            tribute_client::reputation::contributor_view(&c, as_of.0, json).await?;
        }
        ContributorCommand::Licences => {
            let c = login(config).await?;
            let all = c.licences(None).await?;
            if all.is_empty() {
                println!("no licences");
            }
            for (i, l) in all.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_licence(l);
            }
        }
    }
    Ok(())
}

async fn registry(
    config: &CliConfig,
) -> Result<RegistryClient<tribute_client::connect::Authed>, ClientError> {
    let token = config.token.as_deref().ok_or_else(|| {
        ClientError::Config(
            "a provider token is needed: set TRIBUTE_CLI_TOKEN or pass --token".into(),
        )
    })?;
    let channel = config.endpoint()?.connect().await?;
    Ok(RegistryClient::with_interceptor(channel, Bearer::new(Some(token))?))
}

fn dataset_weight(s: &str) -> Result<pb::DatasetWeight, ClientError> {
    let bad = || {
        ClientError::Config(format!(
            "--dataset {s:?}: expected HASH=WEIGHT (64 hex digits, a positive integer)"
        ))
    };
    let (h, w) = s.split_once('=').ok_or_else(bad)?;
    let hash = DatasetHash::from_hex(&h.trim().to_ascii_lowercase()).map_err(|_| bad())?;
    let weight: u64 = w.trim().parse().map_err(|_| bad())?;
    Ok(pb::DatasetWeight { dataset_hash: hash.0.to_vec(), weight })
}

async fn provider(config: &CliConfig, cmd: ProviderCommand) -> Result<(), ClientError> {
    let now = unix_now();
    match cmd {
        ProviderCommand::Evaluate(e) => {
            // CPU-bound on its own threads; nothing else runs on this runtime meanwhile.
            tokio::task::block_in_place(|| tribute_client::valuation::cli::run(e))?;
        }
        ProviderCommand::RegisterModel {
            model,
            share_ppm,
            per_request_nsat,
            per_input_token_nsat,
            per_output_token_nsat,
        } => {
            if share_ppm > 1_000_000 {
                return Err(ClientError::Config("--share-ppm must be at most 1000000".into()));
            }
            let m = registry(config)
                .await?
                .register_model(pb::RegisterModelRequest {
                    model_id: model,
                    contributor_share_ppm: share_ppm,
                    tariff: Some(pb::Tariff {
                        per_request_nsat,
                        per_input_token_nsat,
                        per_output_token_nsat,
                    }),
                })
                .await
                .map_err(|s| ClientError::rpc("Registry.RegisterModel", &s))?
                .into_inner();
            println!("model:               {}", m.model_id);
            println!("share_ppm:           {}", m.contributor_share_ppm);
            println!("attribution_version: {}", m.attribution_version);
        }
        ProviderCommand::RegisterRun { model, run_id, started_at, finished_at, datasets } => {
            let started = time_arg("started-at", &started_at, now)?;
            let finished = match &finished_at {
                Some(f) => time_arg("finished-at", f, now)?,
                None => started,
            };
            let datasets =
                datasets.iter().map(|d| dataset_weight(d)).collect::<Result<Vec<_>, _>>()?;
            let r = registry(config)
                .await?
                .register_training_run(pb::RegisterTrainingRunRequest {
                    run_id,
                    model_id: model,
                    started_at: started.0,
                    finished_at: finished.0,
                    datasets,
                })
                .await
                .map_err(|s| ClientError::rpc("Registry.RegisterTrainingRun", &s))?
                .into_inner();
            println!("run:                 {}", r.run_id);
            println!("model:               {}", r.model_id);
            println!("attribution_version: {}", r.attribution_version);
        }
        ProviderCommand::QualityPolicy {
            model,
            policy_id,
            policy_version,
            gain_ppm,
            floor_ppm,
            cap_ppm,
            as_of,
        } => {
            let as_of = time_arg("as-of", &as_of, now)?;
            let token = config.token.as_deref().ok_or_else(|| {
                ClientError::Config(
                    "a provider or operator token is needed: set TRIBUTE_CLI_TOKEN or pass --token"
                        .into(),
                )
            })?;
            let channel = config.endpoint()?.connect().await?;
            let a = ReputationClient::with_interceptor(channel, Bearer::new(Some(token))?)
                .apply_quality_policy(pb::ApplyQualityPolicyRequest {
                    model_id: model,
                    policy_id,
                    policy_version,
                    gain_ppm,
                    floor_ppm,
                    cap_ppm,
                    as_of: as_of.0,
                })
                .await
                .map_err(|s| ClientError::rpc("Reputation.ApplyQualityPolicy", &s))?
                .into_inner();
            println!("model:               {}", a.model_id);
            println!("attribution_version: {}", a.version);
            if let Some(q) = &a.quality_policy {
                println!("base_version:        {}", q.base_version);
                println!("policy:              {} v{}", q.policy_id, q.policy_version);
            }
            for e in &a.entries {
                println!(
                    "dataset:             {} weight {} factor_ppm {}",
                    hex::encode(&e.dataset_hash),
                    e.weight,
                    e.quality_factor_ppm
                );
            }
        }
        ProviderCommand::Meter { model, request_id, input_tokens, output_tokens, price_nsat } => {
            let m = match (price_nsat, input_tokens, output_tokens) {
                (Some(p), None, None) => Meter::priced(&request_id, &model, p)?,
                (None, i, o) if i.is_some() || o.is_some() => {
                    Meter::usage(&request_id, &model, i.unwrap_or(0), o.unwrap_or(0))?
                }
                _ => {
                    return Err(ClientError::Config(
                        "give --price-nsat, or --input-tokens/--output-tokens".into(),
                    ))
                }
            };
            let mut pc = config.provider_config()?;
            pc.connections = 1;
            let p = Provider::connect(pc).await?;
            let r = p.meter(&m.with_shares()).await?;
            println!("request_id:          {}", r.request_id);
            println!("model:               {}", r.model_id);
            println!("attribution_version: {}", r.attribution_version);
            println!("price_nsat:          {}", r.price_nsat.0);
            println!("pool_nsat:           {}", r.pool_nsat.0);
            println!("batch:               {} leaf {}", r.batch_seq, r.leaf_index);
            println!("replayed:            {}", r.replayed);
            for (k, n) in &r.shares {
                println!("share:               {k} {}", n.0);
            }
        }
    }
    Ok(())
}

/// `tribute reconcile`: 0 clean, 1 findings, 2 unreadable or bad arguments.
fn reconcile(db: &Path, provider_key: Option<&str>, json: bool) -> ExitCode {
    use tribute_daemon::reconcile::{reconcile_file_with, Options};
    let provider_key = match provider_key.map(tribute_channels::PublicKey::from_hex).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: --provider-key: {e}");
            return ExitCode::from(2);
        }
    };
    let options = Options { provider_key, ..Options::default() };
    match reconcile_file_with(db, &options) {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: JSON: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{report}");
            }
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn demo(args: DemoArgs) -> Result<(), ClientError> {
    let options = DemoOptions {
        contributors: args.contributors,
        requests: args.requests,
        rounds: args.rounds,
        data_dir: args.data_dir,
        seed: args.seed,
        progress: !args.quiet,
    };
    let keep_running = args.keep_running;
    let hold = keep_running.then(|| Box::pin(shutdown_signal()) as _);
    let report = tribute_client::demo::run(
        options,
        |report| {
            println!("{}", report.render());
            if keep_running {
                println!("Still running (Ctrl-C stops):");
                println!("  gRPC      http://{}", report.grpc_addr);
                if let Some(m) = report.metrics_addr {
                    println!("  dashboard http://{m}/");
                    println!("  metrics   http://{m}/metrics");
                }
                println!("  operator  TRIBUTE_CLI_TOKEN={}", report.operator_token);
                println!("  data      {}", report.data_dir.display());
            }
        },
        hold,
    )
    .await?;
    report.ensure_checks()?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Contributor(c) => {
            async {
                let config = CliConfig::load(&cli.global)?;
                contributor(&config, c).await
            }
            .await
        }
        Command::Provider(p) => {
            async {
                let config = CliConfig::load(&cli.global)?;
                provider(&config, p).await
            }
            .await
        }
        Command::Demo(args) => demo(args).await,
        Command::Admin(a) => {
            async {
                let config = CliConfig::load(&cli.global)?;
                tribute_client::admin::run(&config, a).await
            }
            .await
        }
        Command::Evaluator(e) => {
            async {
                let config = CliConfig::load(&cli.global)?;
                tribute_client::reputation::run_evaluator(&config, e).await
            }
            .await
        }
        Command::Report(r) => tribute_client::report::run(r),
        Command::Reconcile { db, provider_key, json } => {
            return reconcile(&db, provider_key.as_deref(), json);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
