//! `tribute.v1.Receipts`: a receipt with its inclusion proof and the signed batch root.

use super::blocking;
use crate::auth::{authorize, policy, Role};
use crate::error::ApiError;
use crate::grpc::metering::response;
use crate::ledger::{find_event, shares_of, MeterOutcome, SharedIds};
use crate::registry::Registry;
use crate::store::{self, SharedConn};
use rusqlite::params;
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};
use tribute_channels::codec::Encode;
use tribute_channels::merkle::MerkleTree;
use tribute_channels::receipt::Receipt;
use tribute_channels::{ModelId, Nsat, RequestId};
use tribute_proto::v1 as pb;
use tribute_proto::v1::receipts_server::Receipts;
use tribute_proto::v1::ErrorReason;

/// The receipts service.
pub struct ReceiptsService {
    registry: Arc<Registry>,
    reader: SharedConn,
    ids: SharedIds,
}

impl ReceiptsService {
    /// Serves receipts from `reader`, finding requests through `ids`.
    pub fn new(registry: Arc<Registry>, reader: SharedConn, ids: SharedIds) -> Self {
        ReceiptsService { registry, reader, ids }
    }
}

#[tonic::async_trait]
impl Receipts for ReceiptsService {
    async fn get_receipt(
        &self,
        req: Request<pb::GetReceiptRequest>,
    ) -> Result<Response<pb::ReceiptProof>, Status> {
        let caller = authorize(&req, policy::READ_RECEIPT)?;
        let request_id = RequestId::new(req.into_inner().request_id).map_err(|e| {
            ApiError::new(Code::InvalidArgument, ErrorReason::InvalidRequestId, e.to_string())
                .with("field", "request_id")
        })?;
        let (reader, ids, registry) =
            (self.reader.clone(), self.ids.clone(), self.registry.clone());
        let proof = blocking(move || {
            let conn = store::lock(&reader);
            let unknown = || {
                ApiError::new(Code::NotFound, ErrorReason::UnknownReceipt, "no such request")
                    .with("request_id", request_id.as_str())
            };
            let row = find_event(&conn, &ids, request_id.as_str())?.ok_or_else(unknown)?;
            let (leaves, signed_root): (Vec<u8>, Vec<u8>) = conn
                .query_row(
                    "SELECT leaves, signed_root FROM receipt_batches WHERE batch_seq = ?1",
                    params![store::u64_to_column(row.batch_seq, "batch_seq")?],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(ApiError::storage)?;
            let leaves: Vec<[u8; 32]> =
                leaves.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect();
            let tree = MerkleTree::new(leaves)
                .map_err(|e| ApiError::storage(format!("batch {}: {e}", row.batch_seq)))?;
            let inclusion = tree
                .proof(row.leaf_index)
                .map_err(|e| ApiError::storage(format!("batch {}: {e}", row.batch_seq)))?;
            let shares = shares_of(&registry.snapshot(), &row).ok_or_else(|| {
                ApiError::storage(format!("cannot recompute the split of {}", row.request_id))
            })?;
            // A contributor reads only receipts that pay it (others' requests are not its
            // business): the same answer as for an unknown request.
            if caller.role == Role::Contributor && !caller.auth_disabled {
                let mine = caller
                    .contributor_key
                    .is_some_and(|k| shares.iter().any(|(key, n)| *key == k && n.0 > 0));
                if !mine {
                    return Err(unknown());
                }
            }
            let receipt = Receipt {
                request_id: request_id.clone(),
                model_id: ModelId::new(row.model_id.as_str()).map_err(ApiError::storage)?,
                attribution_version: row.attribution_version,
                pool_nsat: Nsat(u128::from(row.pool_nsat)),
                shares: shares.clone(),
            };
            let outcome = MeterOutcome {
                request_id: row.request_id.clone(),
                model_id: row.model_id.clone(),
                attribution_version: row.attribution_version,
                price_nsat: row.price_nsat,
                pool_nsat: row.pool_nsat,
                batch_seq: row.batch_seq,
                leaf_index: row.leaf_index,
                replayed: false,
                shares: Some(shares),
            };
            Ok(pb::ReceiptProof {
                receipt: response(outcome).receipt,
                receipt_bytes: receipt.encode(),
                inclusion_proof: inclusion.encode(),
                signed_batch_root: signed_root,
            })
        })
        .await?;
        Ok(Response::new(proof))
    }
}
