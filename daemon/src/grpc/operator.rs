//! `tribute.v1.Operator`: the daemon's Lightning node and settlement, for the operator.

use super::{blocking, optional_key};
use crate::auth::{authorize, policy, Role, TokenInfo, TokenStore};
use crate::error::ApiError;
use crate::keeper::ChannelTargets;
use crate::ledger::unix_now;
use crate::lightning::{ChannelId, DynLightningBackend, LightningError, OpenChannelRequest};
use crate::settlement::{list_settlements, SettlementControl, SettlementRow};
use crate::store::Durability;
use crate::store::{self, SharedConn};
use ldk_node::bitcoin::hashes::{sha256, Hash, HashEngine};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tribute_channels::Timestamp;
use tribute_proto::v1 as pb;
use tribute_proto::v1::operator_server::Operator;
use tribute_proto::v1::ErrorReason;

/// Most settlements one `ListSettlements` returns.
const MAX_LIST: u32 = 1000;

/// Size of a `Backup` chunk (well under the default 4 MiB message limit).
const BACKUP_CHUNK: usize = 1 << 20;

/// Prefix of the files a `Backup` writes in the data directory while it streams them
/// (removed when the stream ends; a crash mid-stream leaves one behind, removed at the next
/// start, see [`remove_stale_backups`]).
const BACKUP_TMP_PREFIX: &str = "backup-in-progress-";

/// The ledger database the operator service backs up, and how to open it.
#[derive(Clone, Debug)]
pub struct Database {
    /// The file.
    pub path: PathBuf,
    /// Its durability setting (for the backup's connection).
    pub durability: Durability,
}

/// The operator service.
pub struct OperatorService {
    lightning: Option<DynLightningBackend>,
    settlement: SettlementControl,
    reader: SharedConn,
    tokens: Arc<TokenStore>,
    database: Database,
    targets: ChannelTargets,
}

impl OperatorService {
    /// Operates `lightning` (if the daemon has a node) and `settlement`; reads settlements
    /// from `reader`; administers `tokens`; backs up `database`; records the channels it
    /// opens in `targets` (kept open by the keeper).
    pub fn new(
        lightning: Option<DynLightningBackend>,
        settlement: SettlementControl,
        reader: SharedConn,
        tokens: Arc<TokenStore>,
        database: Database,
        targets: ChannelTargets,
    ) -> Self {
        OperatorService { lightning, settlement, reader, tokens, database, targets }
    }

    fn node(&self) -> Result<&DynLightningBackend, ApiError> {
        self.lightning.as_ref().ok_or_else(|| {
            ApiError::new(
                Code::FailedPrecondition,
                ErrorReason::LightningDisabled,
                "this daemon runs without a Lightning node",
            )
        })
    }
}

fn ln_error(e: LightningError) -> ApiError {
    let code = match &e {
        LightningError::Permanent(_) => Code::InvalidArgument,
        LightningError::Unavailable(_) | LightningError::Transient(_) => Code::Unavailable,
        LightningError::PaymentFailed(_) | LightningError::Duplicate(_) => Code::FailedPrecondition,
    };
    ApiError::new(code, ErrorReason::LightningError, e.to_string()).with("kind", e.kind_name())
}

fn node_id(bytes: &[u8]) -> Result<[u8; 33], ApiError> {
    let id: [u8; 33] = bytes
        .try_into()
        .map_err(|_| ApiError::malformed("node_id", "must be a 33-byte compressed public key"))?;
    ldk_node::bitcoin::secp256k1::PublicKey::from_slice(&id)
        .map_err(|_| ApiError::malformed("node_id", "not a valid public key"))?;
    Ok(id)
}

/// Removes backup files a stream left behind when the daemon stopped mid-way.
pub fn remove_stale_backups(data_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(BACKUP_TMP_PREFIX) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn token_pb(t: TokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        token_id: t.token_id,
        role: t.role.as_str().to_owned(),
        contributor_key: t.contributor_key.map(|k| k.to_bytes().to_vec()).unwrap_or_default(),
        label: t.label,
        created_at: t.created_at.0,
        expires_at: t.expires_at.map_or(0, |e| e.0),
        revoked_at: t.revoked_at.map_or(0, |r| r.0),
    }
}

/// Streams the file at `path` as backup chunks into `tx`, the last with size and SHA-256;
/// removes the file at the end, whatever happens.
async fn stream_backup(path: PathBuf, tx: mpsc::Sender<Result<pb::BackupChunk, Status>>) {
    let result: Result<(), Status> = async {
        let io = |e: std::io::Error| Status::from(ApiError::storage(format!("backup: {e}")));
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let mut engine = sha256::Hash::engine();
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; BACKUP_CHUNK];
            let mut filled = 0;
            while filled < data.len() {
                let n = file.read(&mut data[filled..]).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            data.truncate(filled);
            engine.input(&data);
            let last = filled < BACKUP_CHUNK;
            let len = data.len() as u64;
            let chunk = pb::BackupChunk {
                offset,
                data,
                last,
                size: if last { offset + len } else { 0 },
                sha256: if last {
                    sha256::Hash::from_engine(std::mem::take(&mut engine)).to_byte_array().to_vec()
                } else {
                    Vec::new()
                },
            };
            offset += len;
            if tx.send(Ok(chunk)).await.is_err() || last {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(status) = result {
        let _ = tx.send(Err(status)).await;
    }
    let _ = tokio::fs::remove_file(&path).await;
}

fn settlement_pb(s: SettlementRow) -> pb::Settlement {
    pb::Settlement {
        settlement_id: s.settlement_id,
        channel_id: s.channel_id.0.to_vec(),
        contributor_key: s.contributor_key.to_bytes().to_vec(),
        amount_msat: s.amount_msat,
        state_seq: s.state_seq,
        method: s.method,
        destination: s.destination,
        payment_id: s.payment_id.map(|p| p.to_vec()).unwrap_or_default(),
        payment_hash: s.payment_hash.map(|p| p.to_vec()).unwrap_or_default(),
        preimage: s.preimage.map(|p| p.to_vec()).unwrap_or_default(),
        fee_msat: s.fee_msat,
        status: s.status,
        error: s.error.unwrap_or_default(),
        settled_state_seq: s.settled_state_seq,
        created_at: s.created_at,
        updated_at: s.updated_at,
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn get_node_info(
        &self,
        req: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        authorize(&req, policy::ADMIN)?;
        let info = self.node()?.node_info().await.map_err(ln_error)?;
        Ok(Response::new(pb::NodeInfo {
            node_id: info.node_id.to_vec(),
            network: info.network.to_string(),
            block_height: info.block_height,
            channels: info.channels.total,
            usable_channels: info.channels.usable,
            outbound_capacity_msat: info.channels.outbound_capacity_msat,
            inbound_capacity_msat: info.channels.inbound_capacity_msat,
            settlement_paused: self.settlement.is_paused(),
        }))
    }

    async fn new_onchain_address(
        &self,
        req: Request<pb::NewOnchainAddressRequest>,
    ) -> Result<Response<pb::NewOnchainAddressResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        let address = self.node()?.onchain_address().await.map_err(ln_error)?;
        Ok(Response::new(pb::NewOnchainAddressResponse { address: address.to_string() }))
    }

    async fn get_onchain_balance(
        &self,
        req: Request<pb::GetOnchainBalanceRequest>,
    ) -> Result<Response<pb::OnchainBalance>, Status> {
        authorize(&req, policy::ADMIN)?;
        let b = self.node()?.onchain_balance().await.map_err(ln_error)?;
        Ok(Response::new(pb::OnchainBalance {
            total_sat: b.total_sat,
            spendable_sat: b.spendable_sat,
        }))
    }

    async fn open_lightning_channel(
        &self,
        req: Request<pb::OpenLightningChannelRequest>,
    ) -> Result<Response<pb::OpenLightningChannelResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        let r = req.into_inner();
        let node_id = node_id(&r.node_id)?;
        if r.address.trim().is_empty() {
            return Err(ApiError::malformed("address", "host:port of the node is required").into());
        }
        if r.amount_sat == 0 {
            return Err(ApiError::malformed("amount_sat", "must be above zero").into());
        }
        if u128::from(r.push_msat) > u128::from(r.amount_sat) * 1000 {
            return Err(ApiError::malformed("push_msat", "more than the channel's capacity").into());
        }
        let node = self.node()?;
        node.connect(node_id, &r.address).await.map_err(ln_error)?;
        let request = OpenChannelRequest {
            node_id,
            addr: r.address,
            amount_sat: r.amount_sat,
            push_msat: r.push_msat,
            announce: r.announce,
        };
        let id = node.open_channel(request.clone()).await.map_err(ln_error)?;
        // After the open: the keeper never sees a target whose first channel is not listed.
        // The channel is open either way: failing the call now would invite a second open.
        let targets = self.targets.clone();
        if let Err(e) = blocking(move || targets.opened(&request).map_err(ApiError::from)).await {
            tracing::error!(
                peer = %hex::encode(node_id),
                "channel opened, but not recorded to be kept open: {e}"
            );
        }
        Ok(Response::new(pb::OpenLightningChannelResponse { user_channel_id: id.0.to_string() }))
    }

    async fn close_lightning_channel(
        &self,
        req: Request<pb::CloseLightningChannelRequest>,
    ) -> Result<Response<pb::CloseLightningChannelResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        let r = req.into_inner();
        let id: [u8; 32] = r
            .channel_id
            .as_slice()
            .try_into()
            .map_err(|_| ApiError::malformed("channel_id", "must be 32 bytes"))?;
        let node = self.node()?;
        let id = ChannelId(id);
        // Stop keeping the peer first, so the keeper does not reopen what is being closed;
        // if the close is refused, keep it again.
        let peer = node
            .list_channels()
            .await
            .map_err(ln_error)?
            .into_iter()
            .find_map(|c| (c.channel_id == id).then_some(c.counterparty));
        let unkept = match peer {
            Some(peer) => {
                let targets = self.targets.clone();
                let was_kept = blocking(move || Ok(targets.set_kept(&peer, false)?)).await?;
                was_kept.then_some(peer)
            }
            None => None,
        };
        if let Err(e) = node.close_channel(&id, r.force).await {
            if let Some(peer) = unkept {
                let targets = self.targets.clone();
                blocking(move || targets.set_kept(&peer, true).map_err(ApiError::from)).await?;
            }
            return Err(ln_error(e).into());
        }
        Ok(Response::new(pb::CloseLightningChannelResponse {}))
    }

    async fn list_lightning_channels(
        &self,
        req: Request<pb::ListLightningChannelsRequest>,
    ) -> Result<Response<pb::ListLightningChannelsResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        let channels = self.node()?.list_channels().await.map_err(ln_error)?;
        Ok(Response::new(pb::ListLightningChannelsResponse {
            channels: channels
                .into_iter()
                .map(|c| pb::LightningChannel {
                    channel_id: c.channel_id.0.to_vec(),
                    counterparty_node_id: c.counterparty.to_vec(),
                    capacity_sat: c.capacity_sat,
                    outbound_capacity_msat: c.outbound_capacity_msat,
                    inbound_capacity_msat: c.inbound_capacity_msat,
                    ready: c.ready,
                    usable: c.usable,
                    announced: c.announced,
                    user_channel_id: c.user_channel_id.0.to_string(),
                })
                .collect(),
        }))
    }

    async fn settle_now(
        &self,
        req: Request<pb::SettleNowRequest>,
    ) -> Result<Response<pb::SettleNowResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        self.node()?;
        self.settlement.settle_now();
        Ok(Response::new(pb::SettleNowResponse {}))
    }

    async fn set_settlement_paused(
        &self,
        req: Request<pb::SetSettlementPausedRequest>,
    ) -> Result<Response<pb::SetSettlementPausedResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        if req.get_ref().paused {
            self.settlement.pause();
        } else {
            self.settlement.resume();
        }
        Ok(Response::new(pb::SetSettlementPausedResponse { paused: self.settlement.is_paused() }))
    }

    async fn list_settlements(
        &self,
        req: Request<pb::ListSettlementsRequest>,
    ) -> Result<Response<pb::ListSettlementsResponse>, Status> {
        authorize(&req, policy::REPORTS)?;
        let r = req.into_inner();
        if !matches!(r.status.as_str(), "" | "pending" | "succeeded" | "failed") {
            return Err(ApiError::malformed("status", "pending, succeeded, failed or empty").into());
        }
        let key = optional_key(&r.contributor_key, "contributor_key")?;
        let limit = if r.limit == 0 { MAX_LIST } else { r.limit.min(MAX_LIST) };
        // Bounds past the i64 columns' range are past every row: clamp, don't fail.
        let clamp = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        let until = if r.created_until == 0 { i64::MAX } else { clamp(r.created_until) };
        let from = clamp(r.created_from);
        let reader = self.reader.clone();
        let rows = blocking(move || {
            let conn = store::lock(&reader);
            list_settlements(
                &conn,
                "WHERE (?1 = '' OR status = ?1) AND (?2 IS NULL OR contributor_key = ?2)
                   AND created_at >= ?3 AND created_at < ?4
                 ORDER BY settlement_id DESC LIMIT ?5",
                rusqlite::params![
                    r.status,
                    key.map(|k| k.to_bytes().to_vec()),
                    from,
                    until,
                    i64::from(limit)
                ],
            )
            .map_err(ApiError::from)
        })
        .await?;
        Ok(Response::new(pb::ListSettlementsResponse {
            settlements: rows.into_iter().map(settlement_pb).collect(),
        }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        let r = req.into_inner();
        let role: Role = r.role.parse().map_err(|_| {
            ApiError::malformed("role", "provider, operator, accountant, contributor or evaluator")
        })?;
        let key = optional_key(&r.contributor_key, "contributor_key")?;
        let now = Timestamp(unix_now());
        let expires = match r.expires_in_secs {
            0 => None,
            secs => Some(
                now.0
                    .checked_add(secs)
                    .filter(|t| i64::try_from(*t).is_ok())
                    .map(Timestamp)
                    .ok_or_else(|| {
                        ApiError::malformed("expires_in_secs", "expiry above 2^63 - 1 seconds")
                    })?,
            ),
        };
        let tokens = self.tokens.clone();
        let t = blocking(move || tokens.create(role, key, &r.label, expires, now)).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token_id: t.token_id,
            secret: t.secret,
            expires_at: t.expires_at.map_or(0, |e| e.0),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        let tokens = self.tokens.clone();
        let list = blocking(move || tokens.list()).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: list.into_iter().map(token_pb).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        authorize(&req, policy::ADMIN)?;
        let id = req.into_inner().token_id;
        if id.is_empty() {
            return Err(ApiError::malformed("token_id", "required").into());
        }
        let tokens = self.tokens.clone();
        blocking(move || tokens.revoke(&id, Timestamp(unix_now()))).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    type BackupStream = ReceiverStream<Result<pb::BackupChunk, Status>>;

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        authorize(&req, policy::ADMIN)?;
        let db = self.database.clone();
        let dir = db.path.parent().map(PathBuf::from).unwrap_or_default();
        let mut suffix = [0u8; 8];
        getrandom::getrandom(&mut suffix)
            .map_err(|e| ApiError::storage(format!("randomness: {e}")))?;
        let tmp = dir.join(format!("{BACKUP_TMP_PREFIX}{}.sqlite", hex::encode(suffix)));
        let dest = tmp.clone();
        let written = blocking(move || {
            let conn = store::connect(&db.path, db.durability)?;
            store::backup(&conn, &dest).map_err(ApiError::from)
        })
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(stream_backup(tmp, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
