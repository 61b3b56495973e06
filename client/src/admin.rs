//! `tribute admin …`: what an operator does against a running daemon, over the `Operator`
//! and `Channels` services with an operator token — balances and Lightning liquidity,
//! settlements, settlement control, tokens, backups, the node and its funding.

use crate::config::CliConfig;
use crate::connect::{Authed, Bearer};
use crate::error::ClientError;
use crate::time::{parse_time, unix_now};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use ldk_node::bitcoin::hashes::{sha256, Hash, HashEngine};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use tribute_proto::v1 as pb;
use tribute_proto::v1::channels_client::ChannelsClient;
use tribute_proto::v1::operator_client::OperatorClient;

/// `tribute admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Every contributor channel (accrued, settled, outstanding) and the Lightning
    /// channels' liquidity.
    Channels {
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Settlements, newest first.
    #[command(
        after_help = "Example:\n  tribute admin settlements --status failed --from 2026-11-01 --contributor 3f2a…(64 hex)"
    )]
    Settlements {
        /// Only `pending`, `succeeded` or `failed` ones.
        #[arg(long, value_enum)]
        status: Option<SettlementStatus>,
        /// Only this contributor's (64 hex digits).
        #[arg(long, value_name = "HEX")]
        contributor: Option<String>,
        /// Created at or after: now, Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.
        #[arg(long)]
        from: Option<String>,
        /// Created before (same forms).
        #[arg(long)]
        until: Option<String>,
        /// At most this many (the daemon caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a settlement round now.
    SettleNow,
    /// Stop starting settlements (pending ones are still resolved).
    Pause,
    /// Start settling again.
    Resume,
    /// Bearer tokens: create, list, revoke.
    #[command(subcommand)]
    Tokens(TokenCommand),
    /// Write a consistent copy of the live database to FILE (streamed, SHA-256 checked).
    #[command(after_help = "Example:\n  tribute admin backup ledger-2026-11-30.sqlite")]
    Backup {
        /// Destination file (must not exist).
        file: PathBuf,
    },
    /// The daemon's Lightning node: id, height, channels, capacity, on-chain balance.
    Node,
    /// A fresh on-chain address to fund the node.
    FundingAddress,
    /// Open a channel from the daemon's node to a contributor's node.
    #[command(
        after_help = "Example:\n  tribute admin open-channel --node-id 02ab…(66 hex) --address 203.0.113.7:9735 --amount-sat 1000000"
    )]
    OpenChannel {
        /// The contributor node's id (66 hex digits).
        #[arg(long, value_name = "HEX")]
        node_id: String,
        /// Its address, host:port.
        #[arg(long)]
        address: String,
        /// Channel size in sat.
        #[arg(long)]
        amount_sat: u64,
        /// Push this much to the other side at opening, msat.
        #[arg(long, default_value_t = 0)]
        push_msat: u64,
        /// Announce the channel (public); private by default.
        #[arg(long)]
        announce: bool,
    },
    /// Close a Lightning channel (cooperatively unless --force).
    CloseChannel {
        /// The channel id (64 hex digits, from `tribute admin channels`).
        channel_id: String,
        /// Force-close (broadcast the latest commitment).
        #[arg(long)]
        force: bool,
    },
}

/// Settlement states.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SettlementStatus {
    /// Paid or being paid, outcome not known yet.
    Pending,
    /// Paid.
    Succeeded,
    /// Definitely not paid (the amount stays owed and is retried).
    Failed,
}

/// `tribute admin tokens` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once.
    #[command(
        after_help = "Examples:\n  tribute admin tokens create --role provider --label inference-fleet\n  tribute admin tokens create --role accountant --expires-in-secs 2592000"
    )]
    Create {
        /// provider, operator, accountant, contributor or evaluator.
        #[arg(long)]
        role: String,
        /// Contributor tokens: the contributor key; evaluator tokens: the evaluator key that
        /// signs evaluation records (64 hex digits).
        #[arg(long, value_name = "HEX")]
        contributor: Option<String>,
        /// A note (at most 128 bytes).
        #[arg(long, default_value = "")]
        label: String,
        /// Expire after this many seconds.
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// Every token (never a secret).
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
    Revoke {
        /// The token id (from `list`).
        token_id: String,
    },
}

struct Clients {
    operator: OperatorClient<Authed>,
    channels: ChannelsClient<Authed>,
}

async fn clients(config: &CliConfig) -> Result<Clients, ClientError> {
    let token = config.token.as_deref().ok_or_else(|| {
        ClientError::Config(
            "an operator token is needed: set TRIBUTE_CLI_TOKEN or pass --token".into(),
        )
    })?;
    let channel = config.endpoint()?.connect().await?;
    Ok(Clients {
        operator: OperatorClient::with_interceptor(channel.clone(), Bearer::new(Some(token))?),
        channels: ChannelsClient::with_interceptor(channel, Bearer::new(Some(token))?),
    })
}

fn rpc(call: &'static str) -> impl Fn(tonic::Status) -> ClientError {
    move |s| ClientError::rpc(call, &s)
}

fn hex_arg<const N: usize>(name: &str, s: &str) -> Result<[u8; N], ClientError> {
    let bytes = hex::decode(s.trim())
        .map_err(|e| ClientError::Config(format!("--{name}: not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| ClientError::Config(format!("--{name}: must be {} hex digits", 2 * N)))
}

fn key_hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "-".into()
    } else {
        hex::encode(bytes)
    }
}

fn time_text(t: u64) -> String {
    if t == 0 {
        "-".into()
    } else {
        crate::time::format_time(t)
    }
}

fn print_json(value: &serde_json::Value) -> Result<(), ClientError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ClientError::Config(format!("JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Runs one `tribute admin` command, printing to stdout.
pub async fn run(config: &CliConfig, cmd: AdminCommand) -> Result<(), ClientError> {
    let mut c = clients(config).await?;
    match cmd {
        AdminCommand::Channels { json } => channels(&mut c, json).await,
        AdminCommand::Settlements { status, contributor, from, until, limit, json } => {
            let now = unix_now();
            let time = |name: &str, s: Option<String>| -> Result<u64, ClientError> {
                s.map(|s| {
                    parse_time(&s, now)
                        .map(|t| t.0)
                        .map_err(|e| ClientError::Config(format!("--{name}: {e}")))
                })
                .transpose()
                .map(Option::unwrap_or_default)
            };
            let request = pb::ListSettlementsRequest {
                status: status.map(|s| format!("{s:?}").to_ascii_lowercase()).unwrap_or_default(),
                contributor_key: contributor
                    .map(|k| hex_arg::<32>("contributor", &k).map(|k| k.to_vec()))
                    .transpose()?
                    .unwrap_or_default(),
                created_from: time("from", from)?,
                created_until: time("until", until)?,
                limit,
            };
            let list = c
                .operator
                .list_settlements(request)
                .await
                .map_err(rpc("Operator.ListSettlements"))?
                .into_inner()
                .settlements;
            settlements(&list, json)
        }
        AdminCommand::SettleNow => {
            c.operator
                .settle_now(pb::SettleNowRequest {})
                .await
                .map_err(rpc("Operator.SettleNow"))?;
            println!("settlement round started; `tribute admin settlements` shows its progress");
            Ok(())
        }
        AdminCommand::Pause | AdminCommand::Resume => {
            let paused = matches!(cmd, AdminCommand::Pause);
            let r = c
                .operator
                .set_settlement_paused(pb::SetSettlementPausedRequest { paused })
                .await
                .map_err(rpc("Operator.SetSettlementPaused"))?
                .into_inner();
            println!("settlement {}", if r.paused { "paused" } else { "running" });
            Ok(())
        }
        AdminCommand::Tokens(t) => tokens(&mut c, t).await,
        AdminCommand::Backup { file } => backup(&mut c, &file).await,
        AdminCommand::Node => {
            let info = c
                .operator
                .get_node_info(pb::GetNodeInfoRequest {})
                .await
                .map_err(rpc("Operator.GetNodeInfo"))?
                .into_inner();
            let balance = c
                .operator
                .get_onchain_balance(pb::GetOnchainBalanceRequest {})
                .await
                .map_err(rpc("Operator.GetOnchainBalance"))?
                .into_inner();
            println!("node_id:            {}", hex::encode(&info.node_id));
            println!("network:            {}", info.network);
            println!("block_height:       {}", info.block_height);
            println!("channels:           {} ({} usable)", info.channels, info.usable_channels);
            println!("outbound_msat:      {}", info.outbound_capacity_msat);
            println!("inbound_msat:       {}", info.inbound_capacity_msat);
            println!(
                "onchain_sat:        {} ({} spendable)",
                balance.total_sat, balance.spendable_sat
            );
            println!(
                "settlement:         {}",
                if info.settlement_paused { "paused" } else { "running" }
            );
            Ok(())
        }
        AdminCommand::FundingAddress => {
            let a = c
                .operator
                .new_onchain_address(pb::NewOnchainAddressRequest {})
                .await
                .map_err(rpc("Operator.NewOnchainAddress"))?
                .into_inner();
            println!("{}", a.address);
            Ok(())
        }
        AdminCommand::OpenChannel { node_id, address, amount_sat, push_msat, announce } => {
            let r = c
                .operator
                .open_lightning_channel(pb::OpenLightningChannelRequest {
                    node_id: hex_arg::<33>("node-id", &node_id)?.to_vec(),
                    address,
                    amount_sat,
                    push_msat,
                    announce,
                })
                .await
                .map_err(rpc("Operator.OpenLightningChannel"))?
                .into_inner();
            println!("opening; user_channel_id {} (usable after confirmation)", r.user_channel_id);
            Ok(())
        }
        AdminCommand::CloseChannel { channel_id, force } => {
            c.operator
                .close_lightning_channel(pb::CloseLightningChannelRequest {
                    channel_id: hex_arg::<32>("channel-id", &channel_id)?.to_vec(),
                    force,
                })
                .await
                .map_err(rpc("Operator.CloseLightningChannel"))?;
            println!("closing {channel_id}{}", if force { " (forced)" } else { "" });
            Ok(())
        }
    }
}

async fn channels(c: &mut Clients, json: bool) -> Result<(), ClientError> {
    let ledger = c
        .channels
        .list_channels(pb::ListChannelsRequest {})
        .await
        .map_err(rpc("Channels.ListChannels"))?
        .into_inner()
        .channels;
    // A daemon without a Lightning node still has channels to show.
    let lightning =
        match c.operator.list_lightning_channels(pb::ListLightningChannelsRequest {}).await {
            Ok(r) => Some(r.into_inner().channels),
            Err(s)
                if crate::error::RpcError::from_status("", &s).reason
                    == Some(tribute_proto::v1::ErrorReason::LightningDisabled) =>
            {
                None
            }
            Err(s) => return Err(ClientError::rpc("Operator.ListLightningChannels", &s)),
        };
    if json {
        return print_json(&json!({
            "channels": ledger.iter().map(|ch| json!({
                "channel_id": hex::encode(&ch.channel_id),
                "contributor_key": hex::encode(&ch.contributor_key),
                "status": ch.status,
                "seq": ch.seq,
                "accrued_nsat": ch.accrued_nsat,
                "settled_msat": ch.settled_msat,
                "outstanding_nsat": ch.outstanding_nsat,
            })).collect::<Vec<_>>(),
            "lightning_channels": lightning.as_ref().map(|l| l.iter().map(|ch| json!({
                "channel_id": hex::encode(&ch.channel_id),
                "counterparty_node_id": hex::encode(&ch.counterparty_node_id),
                "capacity_sat": ch.capacity_sat,
                "outbound_capacity_msat": ch.outbound_capacity_msat,
                "inbound_capacity_msat": ch.inbound_capacity_msat,
                "ready": ch.ready,
                "usable": ch.usable,
                "announced": ch.announced,
            })).collect::<Vec<_>>()),
        }));
    }
    println!(
        "{:<64}  {:<7} {:>6} {:>24} {:>14} {:>20}",
        "contributor", "status", "seq", "accrued (msat)", "settled (msat)", "outstanding (msat)"
    );
    for ch in &ledger {
        let nsat = |s: &str| {
            s.parse::<u128>().map(crate::amounts::msat_decimal).unwrap_or_else(|_| s.to_owned())
        };
        println!(
            "{:<64}  {:<7} {:>6} {:>24} {:>14} {:>20}",
            hex::encode(&ch.contributor_key),
            ch.status,
            ch.seq,
            nsat(&ch.accrued_nsat),
            crate::amounts::grouped(u128::from(ch.settled_msat)),
            nsat(&ch.outstanding_nsat),
        );
    }
    println!();
    match lightning {
        None => println!("(this daemon runs without a Lightning node)"),
        Some(list) => {
            println!(
                "{:<64}  {:<66} {:>12} {:>16} {:>16}  state",
                "lightning channel", "peer", "capacity sat", "outbound msat", "inbound msat"
            );
            for ch in &list {
                let state = match (ch.usable, ch.ready) {
                    (true, _) => "usable",
                    (false, true) => "ready (peer offline)",
                    (false, false) => "opening",
                };
                println!(
                    "{:<64}  {:<66} {:>12} {:>16} {:>16}  {state}{}",
                    hex::encode(&ch.channel_id),
                    hex::encode(&ch.counterparty_node_id),
                    crate::amounts::grouped(u128::from(ch.capacity_sat)),
                    crate::amounts::grouped(u128::from(ch.outbound_capacity_msat)),
                    crate::amounts::grouped(u128::from(ch.inbound_capacity_msat)),
                    if ch.announced { ", public" } else { "" },
                );
            }
            let out: u64 = list.iter().map(|c| c.outbound_capacity_msat).sum();
            println!(
                "total outbound (what settlement can pay now): {} msat",
                crate::amounts::grouped(u128::from(out))
            );
        }
    }
    Ok(())
}

fn settlements(list: &[pb::Settlement], json: bool) -> Result<(), ClientError> {
    if json {
        return print_json(&serde_json::Value::Array(
            list.iter()
                .map(|s| {
                    json!({
                        "settlement_id": s.settlement_id,
                        "channel_id": hex::encode(&s.channel_id),
                        "contributor_key": hex::encode(&s.contributor_key),
                        "amount_msat": s.amount_msat,
                        "state_seq": s.state_seq,
                        "method": s.method,
                        "destination": s.destination,
                        "payment_hash": hex::encode(&s.payment_hash),
                        "preimage": hex::encode(&s.preimage),
                        "fee_msat": s.fee_msat,
                        "status": s.status,
                        "error": s.error,
                        "settled_state_seq": s.settled_state_seq,
                        "created_at": s.created_at,
                        "updated_at": s.updated_at,
                    })
                })
                .collect(),
        ));
    }
    println!(
        "{:>6}  {:<20}  {:<64}  {:>14}  {:>8}  {:<7}  {:<10}  payment hash / error",
        "id", "created", "contributor", "amount msat", "fee msat", "method", "status"
    );
    for s in list {
        let detail = if s.status == "failed" { s.error.clone() } else { key_hex(&s.payment_hash) };
        println!(
            "{:>6}  {:<20}  {:<64}  {:>14}  {:>8}  {:<7}  {:<10}  {detail}",
            s.settlement_id,
            time_text(s.created_at),
            hex::encode(&s.contributor_key),
            crate::amounts::grouped(u128::from(s.amount_msat)),
            s.fee_msat.map_or_else(|| "-".to_owned(), |f| f.to_string()),
            s.method,
            s.status,
        );
    }
    if list.is_empty() {
        println!("(none)");
    }
    Ok(())
}

async fn tokens(c: &mut Clients, cmd: TokenCommand) -> Result<(), ClientError> {
    match cmd {
        TokenCommand::Create { role, contributor, label, expires_in_secs } => {
            let t = c
                .operator
                .create_token(pb::CreateTokenRequest {
                    role,
                    contributor_key: contributor
                        .map(|k| hex_arg::<32>("contributor", &k).map(|k| k.to_vec()))
                        .transpose()?
                        .unwrap_or_default(),
                    label,
                    expires_in_secs: expires_in_secs.unwrap_or(0),
                })
                .await
                .map_err(rpc("Operator.CreateToken"))?
                .into_inner();
            println!("token_id:   {}", t.token_id);
            println!("token:      {}", t.secret);
            println!("expires_at: {}", time_text(t.expires_at));
            eprintln!("(the token is shown only now; the daemon keeps only its hash)");
            Ok(())
        }
        TokenCommand::List { json } => {
            let list = c
                .operator
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(rpc("Operator.ListTokens"))?
                .into_inner()
                .tokens;
            if json {
                return print_json(&serde_json::Value::Array(
                    list.iter()
                        .map(|t| {
                            json!({
                                "token_id": t.token_id,
                                "role": t.role,
                                "contributor_key": hex::encode(&t.contributor_key),
                                "label": t.label,
                                "created_at": t.created_at,
                                "expires_at": t.expires_at,
                                "revoked_at": t.revoked_at,
                            })
                        })
                        .collect(),
                ));
            }
            println!(
                "{:<18}  {:<12}  {:<20}  {:<20}  {:<20}  {:<64}  label",
                "token_id", "role", "created", "expires", "revoked", "contributor"
            );
            for t in &list {
                println!(
                    "{:<18}  {:<12}  {:<20}  {:<20}  {:<20}  {:<64}  {}",
                    t.token_id,
                    t.role,
                    time_text(t.created_at),
                    time_text(t.expires_at),
                    time_text(t.revoked_at),
                    key_hex(&t.contributor_key),
                    t.label
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { token_id } => {
            c.operator
                .revoke_token(pb::RevokeTokenRequest { token_id: token_id.clone() })
                .await
                .map_err(rpc("Operator.RevokeToken"))?;
            println!("revoked {token_id}");
            Ok(())
        }
    }
}

/// Streams the backup into `FILE.partial`, checks its size and SHA-256, then renames it.
async fn backup(c: &mut Clients, file: &Path) -> Result<(), ClientError> {
    const CALL: &str = "Operator.Backup";
    if file.exists() {
        return Err(ClientError::Config(format!("{} exists; not overwriting it", file.display())));
    }
    let partial = file.with_extension("partial");
    let io = |e: std::io::Error| ClientError::Config(format!("{}: {e}", partial.display()));
    let mut out =
        std::fs::OpenOptions::new().write(true).create_new(true).open(&partial).map_err(io)?;
    let result = async {
        let mut chunks =
            c.operator.backup(pb::BackupRequest {}).await.map_err(rpc(CALL))?.into_inner();
        let mut engine = sha256::Hash::engine();
        let mut written = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(rpc(CALL))?;
            if chunk.offset != written {
                return Err(ClientError::protocol(
                    CALL,
                    format!("chunk at {} after {written} bytes", chunk.offset),
                ));
            }
            out.write_all(&chunk.data).map_err(io)?;
            engine.input(&chunk.data);
            written += chunk.data.len() as u64;
            if chunk.last {
                let digest = sha256::Hash::from_engine(engine).to_byte_array();
                if chunk.size != written || chunk.sha256 != digest {
                    return Err(ClientError::protocol(
                        CALL,
                        "size or SHA-256 does not match what arrived",
                    ));
                }
                out.sync_all().map_err(io)?;
                return Ok((written, digest));
            }
        }
        Err(ClientError::protocol(CALL, "the stream ended before the last chunk"))
    }
    .await;
    match result {
        Ok((size, digest)) => {
            std::fs::rename(&partial, file).map_err(io)?;
            println!("backup:  {}", file.display());
            println!("size:    {size} bytes");
            println!("sha256:  {}", hex::encode(digest));
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}
