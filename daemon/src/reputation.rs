//! Evaluation records and the reputation computed from them.
//!
//! [`ReputationBook`] checks a submitted record completely against the registry before
//! writing it (signature, form, evaluator, model and version, attributed datasets,
//! conflict of interest, idempotency) and keeps every accepted record verbatim in the
//! `evaluations` table and in memory. Reputation is never stored: it is recomputed from
//! the signed records with [`tribute_channels::reputation::aggregate`] for an explicit
//! `as_of`, so `tribute report reputation` gets the same bits from a backup.

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::registry::{QualityVersion, Registry, Snapshot, Version};
use crate::store::{self, StoreError};
use rusqlite::{params, Connection};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use tonic::Code;
use tribute_channels::codec::Encode;
use tribute_channels::evaluation::{Evaluation, EvaluationError};
use tribute_channels::ids::Label;
use tribute_channels::reputation::{aggregate, Params, QualityPolicy, Report};
use tribute_channels::{DatasetHash, ModelId, PublicKey, Signed, Timestamp};
use tribute_proto::v1::ErrorReason;

/// How far in the future a record's `evaluated_at` may be (clock skew), in seconds: a
/// record dated later would escape time decay.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// An accepted record: decoded, and its exact signed bytes.
#[derive(Clone, Debug)]
pub struct StoredEvaluation {
    /// The record.
    pub signed: Signed<Evaluation>,
    /// Its canonical signed bytes, as stored.
    pub bytes: Vec<u8>,
}

/// The outcome of a submission.
#[derive(Clone, Debug)]
pub struct Submitted {
    /// The record now stored.
    pub record: StoredEvaluation,
    /// True when the same record was already stored (nothing was written).
    pub already_recorded: bool,
}

/// Accepted evaluation records, durable in SQLite and mirrored in memory.
pub struct ReputationBook {
    registry: Arc<Registry>,
    conn: Mutex<Connection>,
    /// By evaluation id; written only under `conn`'s lock, after the row is committed.
    records: RwLock<BTreeMap<String, StoredEvaluation>>,
}

/// The owner of `dataset` in the attribution version `e` evaluated (`None` if the model or
/// version is unknown, or the dataset not in it).
pub fn owner_in_version(
    snap: &Snapshot,
    e: &Evaluation,
    dataset: &DatasetHash,
) -> Option<PublicKey> {
    let model = snap.models.get(&e.model_id)?;
    let version =
        model.versions.get(usize::try_from(e.attribution_version).ok()?.checked_sub(1)?)?;
    let i = version.vector.datasets.binary_search_by_key(dataset, |d| d.dataset_hash).ok()?;
    Some(version.vector.datasets[i].contributor_key)
}

fn load_records(conn: &Connection) -> Result<BTreeMap<String, StoredEvaluation>, StoreError> {
    let mut stmt = conn.prepare("SELECT evaluation_id, signed FROM evaluations")?;
    let mut out = BTreeMap::new();
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))? {
        let (id, bytes) = row?;
        let signed = Signed::<Evaluation>::decode(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("evaluation {id}: {e}")))?;
        if signed.message.evaluation_id.as_str() != id {
            return Err(StoreError::Corrupt(format!("evaluation {id}: id column differs")));
        }
        out.insert(id, StoredEvaluation { signed, bytes });
    }
    Ok(out)
}

impl ReputationBook {
    /// Loads every accepted record.
    pub fn load(conn: Connection, registry: Arc<Registry>) -> Result<Self, StoreError> {
        let records = RwLock::new(load_records(&conn)?);
        Ok(ReputationBook { registry, conn: Mutex::new(conn), records })
    }

    /// The registry records are checked against.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Every accepted record, by evaluation id.
    pub fn records(&self) -> Vec<StoredEvaluation> {
        self.records.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The aggregate at `as_of` with the default parameters.
    pub fn report(&self, as_of: Timestamp) -> Report {
        let snap = self.registry.snapshot();
        let records = self.records();
        aggregate(
            records.iter().map(|r| &r.signed.message),
            |e, d| owner_in_version(&snap, e, d),
            as_of,
            &Params::DEFAULT,
        )
    }

    /// Checks and stores a signed record submitted by `caller` at `now`. Every refusal
    /// leaves the database and the book unchanged.
    pub fn submit(
        &self,
        caller: &Caller,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<Submitted, ApiError> {
        let signed = Signed::<Evaluation>::decode(bytes).map_err(|e| {
            ApiError::malformed("signed_evaluation", format!("signed_evaluation: {e}"))
        })?;
        signed.verify().map_err(|_| {
            ApiError::new(
                Code::InvalidArgument,
                ErrorReason::BadSignature,
                "signed_evaluation: bad signature",
            )
            .with("field", "signed_evaluation")
        })?;
        let e = &signed.message;
        e.validate().map_err(|err| match err {
            EvaluationError::MalformedInterval(d) => ApiError::new(
                Code::InvalidArgument,
                ErrorReason::MalformedInterval,
                err.to_string(),
            )
            .with("dataset", d.to_hex()),
            _ => ApiError::malformed("signed_evaluation", err.to_string()),
        })?;
        if e.network != self.registry.network() {
            return Err(ApiError::new(
                Code::InvalidArgument,
                ErrorReason::WrongNetwork,
                "signed_evaluation is for another network",
            )
            .with("field", "signed_evaluation"));
        }
        if e.evaluated_at.0 > now.0.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(ApiError::malformed("signed_evaluation", "evaluated_at is in the future"));
        }
        // The evaluator role is held by a token bound to the signing key.
        let holds_role = caller.auth_disabled
            || (caller.role == Role::Evaluator && caller.contributor_key == Some(e.evaluator_key));
        if !holds_role {
            return Err(ApiError::new(
                Code::PermissionDenied,
                ErrorReason::EvaluatorNotAuthorized,
                "the record is not signed by the evaluator key this token is bound to",
            )
            .with("evaluator_key", e.evaluator_key.to_hex()));
        }
        let snap = self.registry.snapshot();
        let model = snap.models.get(&e.model_id).ok_or_else(|| {
            ApiError::new(Code::NotFound, ErrorReason::UnknownModel, "unknown model")
                .with("model_id", e.model_id.as_str())
        })?;
        let known_version = usize::try_from(e.attribution_version)
            .ok()
            .and_then(|v| v.checked_sub(1))
            .and_then(|i| model.versions.get(i))
            .is_some();
        if !known_version {
            return Err(ApiError::new(
                Code::NotFound,
                ErrorReason::UnknownAttributionVersion,
                "the model has no such attribution version",
            )
            .with("model_id", e.model_id.as_str())
            .with("attribution_version", e.attribution_version.to_string()));
        }
        let mut missing = Vec::new();
        let mut own = Vec::new();
        for m in &e.measurements {
            match owner_in_version(&snap, e, &m.dataset) {
                None => missing.push(m.dataset.to_hex()),
                Some(k) if k == e.evaluator_key => own.push(m.dataset.to_hex()),
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            return Err(ApiError::new(
                Code::FailedPrecondition,
                ErrorReason::DatasetNotAttributed,
                format!("{} dataset(s) not in the evaluated attribution version", missing.len()),
            )
            .with("datasets", missing.join(",")));
        }
        if !own.is_empty() {
            return Err(ApiError::new(
                Code::PermissionDenied,
                ErrorReason::ConflictOfInterest,
                "an evaluator may not score its own contributor key's datasets",
            )
            .with("datasets", own.join(",")));
        }
        let id = e.evaluation_id.as_str().to_owned();
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.records.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            // The same record, even signed again (BIP340 signatures differ with their
            // auxiliary randomness) or rerun later (only `evaluated_at` differs), is the
            // same evaluation: the first bytes stay, so a rerun cannot refresh its decay.
            let rerun = Evaluation {
                evaluated_at: existing.signed.message.evaluated_at,
                ..signed.message.clone()
            };
            if existing.signed.message == rerun {
                return Ok(Submitted { record: existing.clone(), already_recorded: true });
            }
            return Err(ApiError::new(
                Code::AlreadyExists,
                ErrorReason::ExistsWithDifferentContent,
                "evaluation id used with other content",
            )
            .with("evaluation_id", id));
        }
        conn.execute(
            "INSERT INTO evaluations (evaluation_id, evaluator_key, model_id, attribution_version,
                                      evaluated_at, received_at, signed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                id,
                e.evaluator_key.to_bytes(),
                e.model_id.as_str(),
                store::u64_to_column(e.attribution_version, "attribution_version")?,
                store::u64_to_column(e.evaluated_at.0, "evaluated_at")?,
                store::u64_to_column(now.0, "received_at")?,
                bytes,
            ],
        )
        .map_err(StoreError::from)?;
        let record = StoredEvaluation { signed: signed.clone(), bytes: bytes.to_vec() };
        self.records.write().unwrap_or_else(|p| p.into_inner()).insert(id, record.clone());
        drop(conn);
        Ok(Submitted { record, already_recorded: false })
    }
}

impl ReputationBook {
    /// Opts `model_id` into quality-weighted payouts under `policy` (named `policy_id`,
    /// version `policy_version`): a new attribution version whose weights are the newest
    /// run-derived version's, each `floor(w · f(r) / 10^6)` with `r` the dataset's
    /// reputation at `as_of` (unmeasured datasets: the neutral factor, clamped).
    pub fn apply_quality_policy(
        &self,
        model_id: &ModelId,
        policy_id: &str,
        policy_version: u32,
        policy: QualityPolicy,
        as_of: Timestamp,
        now: Timestamp,
    ) -> Result<Arc<Version>, ApiError> {
        policy.validate().map_err(|e| {
            ApiError::new(Code::InvalidArgument, ErrorReason::InvalidQualityPolicy, e.to_string())
        })?;
        Label::new(policy_id).map_err(|e| ApiError::malformed("policy_id", e.to_string()))?;
        let snap = self.registry.snapshot();
        let model = snap.models.get(model_id).ok_or_else(|| {
            ApiError::new(Code::NotFound, ErrorReason::UnknownModel, "unknown model")
                .with("model_id", model_id.as_str())
        })?;
        let base = model.run_base().ok_or_else(|| {
            ApiError::new(
                Code::FailedPrecondition,
                ErrorReason::BadAttribution,
                "the model has no training run to weight",
            )
            .with("model_id", model_id.as_str())
        })?;
        let report = self.report(as_of);
        let factors_ppm: Vec<u32> = base
            .vector
            .datasets
            .iter()
            .map(|d| policy.factor_ppm(report.datasets.get(&d.dataset_hash)))
            .collect();
        let weights = base
            .vector
            .datasets
            .iter()
            .zip(&factors_ppm)
            .map(|(d, f)| (d.dataset_hash, QualityPolicy::adjusted_weight(d.weight, *f)))
            .collect();
        let info = QualityVersion {
            base_version: base.vector.version,
            policy_id: policy_id.to_owned(),
            policy_version,
            policy,
            as_of,
            factors_ppm,
        };
        self.registry.add_quality_version(model_id, info, weights, now)
    }
}

/// Why a reputation report could not be made from a file.
#[derive(Debug, thiserror::Error)]
pub enum ReputationReportError {
    /// The file could not be opened or is not a ledger.
    #[error(transparent)]
    Open(#[from] crate::reconcile::ReconcileError),
    /// Reading failed.
    #[error("reading the database: {0}")]
    Store(#[from] StoreError),
}

/// Recomputes the reputation report at `as_of` from the signed records in the database
/// file at `path` (a backup or a live daemon's file, opened read-only): every record's
/// signature is checked again, and owners come from the registry in the same file.
pub fn report_of_file(
    path: &Path,
    as_of: Timestamp,
    params: &Params,
) -> Result<(Report, Vec<StoredEvaluation>), ReputationReportError> {
    let conn = crate::reconcile::open_read_only(path)?;
    let tx = conn.unchecked_transaction().map_err(StoreError::from)?;
    let network = store::meta_get(&tx, "network")?
        .and_then(|n| crate::config::parse_network(&String::from_utf8_lossy(&n)).ok())
        .ok_or_else(|| StoreError::Corrupt("meta has no valid network".into()))?;
    let snap = crate::registry::load_snapshot(&tx, network)?;
    let records = load_records(&tx)?;
    for (id, r) in &records {
        r.signed
            .verify()
            .map_err(|_| StoreError::Corrupt(format!("evaluation {id}: bad signature")))?;
    }
    let records: Vec<StoredEvaluation> = records.into_values().collect();
    let report = aggregate(
        records.iter().map(|r| &r.signed.message),
        |e, d| owner_in_version(&snap, e, d),
        as_of,
        params,
    );
    Ok((report, records))
}
