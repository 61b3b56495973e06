//! Metering, request side: validation and pricing of one request, done on the caller's
//! task (in parallel across requests) so the single writer only sequences and commits.
//!
//! Validation order is fixed and complete before anything is queued: a rejected request
//! changes nothing.

use crate::error::ApiError;
use crate::registry::Snapshot;
use ldk_node::bitcoin::hashes::{sha256, Hash, HashEngine};
use std::sync::Arc;
use tonic::Code;
use tribute_channels::attribution::{request_weights, AttributionError};
use tribute_channels::licence::Use;
use tribute_channels::pricing::{contributor_pool, Usage};
use tribute_channels::receipt::{leaf_hash_of, Receipt};
use tribute_channels::split::{SplitScratch, Weights};
use tribute_channels::{DatasetHash, ModelId, Nsat, PublicKey, RequestId, Timestamp};
use tribute_proto::v1::ErrorReason;

/// Most entries in a per-request attribution.
pub const MAX_REQUEST_ATTRIBUTION: usize = 1024;

/// How a request is priced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriceInput {
    /// By the model's tariff.
    Usage(Usage),
    /// Explicitly, in nsat.
    Explicit(u64),
}

/// A metering request as received (already decoded from the wire).
#[derive(Clone, Debug)]
pub struct MeterInput {
    /// Idempotency key.
    pub request_id: String,
    /// Model.
    pub model_id: String,
    /// Price or usage; `None` is malformed.
    pub price: Option<PriceInput>,
    /// Per-request attribution (raw dataset hash bytes, weight).
    pub attribution: Vec<(Vec<u8>, u64)>,
}

/// A validated, priced and split request, ready for the writer.
#[derive(Debug)]
pub struct Prepared {
    /// Idempotency key.
    pub request_id: RequestId,
    /// Hash of everything that defines the request (not the id): a replay must match it.
    pub content_hash: [u8; 32],
    /// Model.
    pub model_id: ModelId,
    /// Model attribution version used (0 for per-request attribution).
    pub attribution_version: u64,
    /// Canonical per-request attribution, if any (stored).
    pub attribution: Option<Vec<u8>>,
    /// Price.
    pub price_nsat: u64,
    /// Contributor pool.
    pub pool_nsat: u64,
    /// The weights split by.
    pub weights: Arc<Weights>,
    /// Shares aligned with `weights.entries()`.
    pub shares: Vec<Nsat>,
    /// Merkle leaf of the receipt.
    pub leaf: [u8; 32],
}

impl Prepared {
    /// The receipt (with shares) of this request.
    pub fn receipt(&self) -> Receipt {
        receipt_of(
            &self.request_id,
            &self.model_id,
            self.attribution_version,
            self.pool_nsat,
            &self.weights,
            &self.shares,
        )
    }
}

/// The receipt of a request from its parts.
pub fn receipt_of(
    request_id: &RequestId,
    model_id: &ModelId,
    attribution_version: u64,
    pool_nsat: u64,
    weights: &Weights,
    shares: &[Nsat],
) -> Receipt {
    Receipt {
        request_id: request_id.clone(),
        model_id: model_id.clone(),
        attribution_version,
        pool_nsat: Nsat(u128::from(pool_nsat)),
        shares: weights.entries().iter().map(|(k, _)| *k).zip(shares.iter().copied()).collect(),
    }
}

thread_local! {
    /// The split's working memory, reused by every request prepared on this thread.
    static SCRATCH: std::cell::RefCell<SplitScratch> = std::cell::RefCell::new(SplitScratch::new());
}

fn price_error(msg: &str) -> ApiError {
    ApiError::new(Code::InvalidArgument, ErrorReason::PriceOutOfRange, msg.to_owned())
        .with("field", "price")
}

/// Validates and prices a request against a registry snapshot.
pub fn prepare(
    snap: &Snapshot,
    input: MeterInput,
    now: Timestamp,
    max_price_nsat: u64,
) -> Result<Prepared, ApiError> {
    let request_id = RequestId::new(input.request_id).map_err(|e| {
        ApiError::new(Code::InvalidArgument, ErrorReason::InvalidRequestId, e.to_string())
            .with("field", "request_id")
    })?;
    let model_id =
        ModelId::new(input.model_id).map_err(|e| ApiError::malformed("model_id", e.to_string()))?;
    let model = snap.models.get(&model_id).ok_or_else(|| {
        ApiError::new(Code::NotFound, ErrorReason::UnknownModel, "unknown model")
            .with("model_id", model_id.as_str())
    })?;
    let price = match input.price {
        None => return Err(ApiError::malformed("price", "usage or price_nsat is required")),
        Some(PriceInput::Explicit(p)) => Nsat(u128::from(p)),
        Some(PriceInput::Usage(u)) => {
            model.tariff.price(u).map_err(|_| price_error("price overflows"))?
        }
    };
    if price.is_zero() {
        return Err(price_error("price is zero"));
    }
    let price_nsat = u64::try_from(price.0)
        .ok()
        .filter(|p| *p <= max_price_nsat)
        .ok_or_else(|| price_error("price above the per-request cap"))?;
    let pool = contributor_pool(price, model.contributor_share_ppm)
        .map_err(|_| price_error("pool overflows"))?;
    // pool <= price <= max_price: fits u64.
    let pool_nsat = u64::try_from(pool.0).map_err(|_| price_error("pool overflows"))?;

    let mut content = sha256::Hash::engine();
    content.input(model_id.as_str().as_bytes());
    content.input(&[0]);
    match input.price {
        Some(PriceInput::Explicit(p)) => {
            content.input(&[1]);
            content.input(&p.to_be_bytes());
        }
        Some(PriceInput::Usage(u)) => {
            content.input(&[2]);
            content.input(&u.input_tokens.to_be_bytes());
            content.input(&u.output_tokens.to_be_bytes());
        }
        None => {}
    }

    let (attribution_version, weights, attribution) = if input.attribution.is_empty() {
        let version = model.current().ok_or_else(|| {
            ApiError::new(
                Code::FailedPrecondition,
                ErrorReason::BadAttribution,
                "model has no training run and the request names no attribution",
            )
            .with("model_id", model_id.as_str())
        })?;
        (version.vector.version, version.weights.clone(), None)
    } else {
        let (weights, canonical) = per_request(snap, &input.attribution, now)?;
        (0, Arc::new(weights), Some(canonical))
    };
    content.input(&[3]);
    if let Some(a) = &attribution {
        content.input(a);
    }
    let content_hash = sha256::Hash::from_engine(content).to_byte_array();

    let mut shares = Vec::with_capacity(weights.len());
    SCRATCH.with(|s| weights.split_into_with(pool, &mut shares, &mut s.borrow_mut()));
    // Streamed straight into SHA-256: no receipt or encoding is built per request.
    let leaf = leaf_hash_of(
        &request_id,
        &model_id,
        attribution_version,
        pool,
        weights.entries().iter().map(|(key, _)| key).zip(shares.iter().copied()),
    );
    Ok(Prepared {
        request_id,
        content_hash,
        model_id,
        attribution_version,
        attribution,
        price_nsat,
        pool_nsat,
        weights,
        shares,
        leaf,
    })
}

/// Per-request attribution: every dataset must be known and licensed for retrieval now.
fn per_request(
    snap: &Snapshot,
    raw: &[(Vec<u8>, u64)],
    now: Timestamp,
) -> Result<(Weights, Vec<u8>), ApiError> {
    if raw.len() > MAX_REQUEST_ATTRIBUTION {
        return Err(ApiError::new(
            Code::InvalidArgument,
            ErrorReason::BadAttribution,
            "too many attribution entries",
        ));
    }
    let mut entries = Vec::with_capacity(raw.len());
    for (hash, weight) in raw {
        let hash: [u8; 32] = hash
            .as_slice()
            .try_into()
            .map_err(|_| ApiError::malformed("attribution.dataset_hash", "must be 32 bytes"))?;
        entries.push((DatasetHash(hash), *weight));
    }
    entries.sort_unstable_by_key(|e| e.0);
    let mut unlicensed = Vec::new();
    let owner = |h: &DatasetHash| -> Option<PublicKey> {
        let list = snap.licences.get(h)?;
        list.iter()
            .find(|e| e.allows(snap.network, Use::Retrieval, now))
            .map(|e| e.licence.message.contributor_key)
    };
    for (h, _) in &entries {
        if owner(h).is_none() {
            unlicensed.push(h.to_hex());
        }
    }
    if !unlicensed.is_empty() {
        let unknown = entries.iter().all(|(h, _)| !snap.licences.contains_key(h));
        let (code, reason) = if unknown {
            (Code::NotFound, ErrorReason::UnknownDataset)
        } else {
            (Code::FailedPrecondition, ErrorReason::UnlicensedDataset)
        };
        return Err(ApiError::new(
            code,
            reason,
            "attribution names datasets not licensed for retrieval now",
        )
        .with("datasets", unlicensed.join(",")));
    }
    let weights = request_weights(&entries, owner).map_err(|e| match e {
        AttributionError::DuplicateDataset(h) => {
            ApiError::new(Code::InvalidArgument, ErrorReason::BadAttribution, "dataset named twice")
                .with("datasets", h.to_hex())
        }
        other => {
            ApiError::new(Code::InvalidArgument, ErrorReason::BadAttribution, other.to_string())
        }
    })?;
    let mut canonical = Vec::with_capacity(entries.len() * 40);
    for (h, w) in &entries {
        canonical.extend_from_slice(&h.0);
        canonical.extend_from_slice(&w.to_be_bytes());
    }
    Ok((weights, canonical))
}

/// Decodes a stored per-request attribution.
pub fn decode_attribution(bytes: &[u8]) -> Option<Vec<(DatasetHash, u64)>> {
    if bytes.len() % 40 != 0 {
        return None;
    }
    bytes
        .chunks_exact(40)
        .map(|c| {
            Some((
                DatasetHash(c[..32].try_into().ok()?),
                u64::from_be_bytes(c[32..].try_into().ok()?),
            ))
        })
        .collect()
}
