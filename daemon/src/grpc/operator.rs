//! `tribute.v1.Operator`: the daemon's Lightning node and settlement, for the operator.

use super::{blocking, optional_key};
use crate::auth::{authorize, policy};
use crate::error::ApiError;
use crate::lightning::{ChannelId, DynLightningBackend, LightningError, OpenChannelRequest};
use crate::settlement::{list_settlements, SettlementControl, SettlementRow};
use crate::store::{self, SharedConn};
use tonic::{Code, Request, Response, Status};
use tribute_proto::v1 as pb;
use tribute_proto::v1::operator_server::Operator;
use tribute_proto::v1::ErrorReason;

/// Most settlements one `ListSettlements` returns.
const MAX_LIST: u32 = 1000;

/// The operator service.
pub struct OperatorService {
    lightning: Option<DynLightningBackend>,
    settlement: SettlementControl,
    reader: SharedConn,
}

impl OperatorService {
    /// Operates `lightning` (if the daemon has a node) and `settlement`; reads settlements
    /// from `reader`.
    pub fn new(
        lightning: Option<DynLightningBackend>,
        settlement: SettlementControl,
        reader: SharedConn,
    ) -> Self {
        OperatorService { lightning, settlement, reader }
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
        let id = node
            .open_channel(OpenChannelRequest {
                node_id,
                addr: r.address,
                amount_sat: r.amount_sat,
                push_msat: r.push_msat,
                announce: r.announce,
            })
            .await
            .map_err(ln_error)?;
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
        self.node()?.close_channel(&ChannelId(id), r.force).await.map_err(ln_error)?;
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
        let until = if r.created_until == 0 {
            i64::MAX
        } else {
            store::u64_to_column(r.created_until, "created_until").map_err(ApiError::from)?
        };
        let from = store::u64_to_column(r.created_from, "created_from").map_err(ApiError::from)?;
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
}
