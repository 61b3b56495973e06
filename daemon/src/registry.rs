//! The registry: contributors, dataset licences (and revocations), models, training runs
//! and the attribution vectors derived from them.
//!
//! The durable record is SQLite; the metering hot path reads an immutable in-memory
//! [`Snapshot`] swapped atomically on every change (changes are rare, reads are per
//! request). Every registration is checked completely before anything is written.

use crate::error::ApiError;
use crate::store::{self, StoreError};
use arc_swap::ArcSwap;
use ldk_node::bitcoin::constants::ChainHash;
use ldk_node::bitcoin::secp256k1::Keypair;
use ldk_node::lightning::offers::offer::Offer;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use tonic::Code;
use tribute_channels::attribution::AttributionVector;
use tribute_channels::codec::Encode;
use tribute_channels::licence::{Licence, Revocation, Use};
use tribute_channels::pricing::{Tariff, PPM};
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::reputation::QualityPolicy;
use tribute_channels::split::Weights;
use tribute_channels::training::{LicenceRecord, TrainingRun};
use tribute_channels::{DatasetHash, ModelId, Network, Nsat, PublicKey, Signed, Timestamp};
use tribute_proto::v1::ErrorReason;

/// A licence with its revocation, if any.
#[derive(Clone, Debug)]
pub struct LicenceEntry {
    /// The signed licence.
    pub licence: Signed<Licence>,
    /// Its signed revocation.
    pub revocation: Option<Signed<Revocation>>,
}

impl LicenceEntry {
    /// Whether it allows `use_` at `at`.
    pub fn allows(&self, network: Network, use_: Use, at: Timestamp) -> bool {
        self.licence
            .message
            .allows(self.revocation.as_ref().map(|r| &r.message), network, use_, at)
            .is_ok()
    }
}

/// One attribution version of a model, with its split weights ready.
#[derive(Debug)]
pub struct Version {
    /// The vector.
    pub vector: AttributionVector,
    /// Per-contributor weights derived from it.
    pub weights: Arc<Weights>,
    /// Set when the version was made by a quality policy (not by a training run).
    pub quality: Option<QualityVersion>,
}

/// How a quality-weighted version was made: a policy applied at `as_of` to the datasets of
/// a run-derived version (`docs/REPUTATION.md`, "Quality-weighted payouts").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualityVersion {
    /// The run-derived version whose weights were adjusted.
    pub base_version: u64,
    /// The policy's name.
    pub policy_id: String,
    /// The policy's version (a new one makes a new attribution version).
    pub policy_version: u32,
    /// The policy's clamps and gain.
    pub policy: QualityPolicy,
    /// Reference time of the reputations used.
    pub as_of: Timestamp,
    /// The factor applied to each dataset, ppm, in the vector's dataset order.
    pub factors_ppm: Vec<u32>,
}

/// A model with its tariff and all its attribution versions.
#[derive(Debug, Clone)]
pub struct Model {
    /// Id.
    pub model_id: ModelId,
    /// Contributors' share of the price, ppm.
    pub contributor_share_ppm: u32,
    /// Price list.
    pub tariff: Tariff,
    /// `versions[v - 1]` is version `v`.
    pub versions: Vec<Arc<Version>>,
}

impl Model {
    /// The current attribution version, if any run was accepted.
    pub fn current(&self) -> Option<&Arc<Version>> {
        self.versions.last()
    }

    /// The newest version made by a training run (the base of the next run and of any
    /// quality policy).
    pub fn run_base(&self) -> Option<&Arc<Version>> {
        self.versions.iter().rev().find(|v| v.quality.is_none())
    }
}

/// An immutable view of the registry.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The daemon's network (every registered record is for it).
    pub network: Network,
    /// Contributors by key.
    pub contributors: HashMap<PublicKey, Signed<ContributorRegistration>>,
    /// Licences by dataset.
    pub licences: HashMap<DatasetHash, Vec<LicenceEntry>>,
    /// Models by id.
    pub models: HashMap<ModelId, Arc<Model>>,
    /// Accepted run ids → model.
    pub runs: HashMap<String, (ModelId, u64)>,
}

impl Snapshot {
    /// The owner of a dataset (all its licences share one contributor).
    pub fn owner(&self, dataset: &DatasetHash) -> Option<PublicKey> {
        self.licences
            .get(dataset)
            .and_then(|l| l.first())
            .map(|e| e.licence.message.contributor_key)
    }
}

/// The registry service state.
pub struct Registry {
    network: Network,
    provider: Keypair,
    conn: Mutex<Connection>,
    snapshot: ArcSwap<Snapshot>,
}

fn bad_signature(what: &str) -> ApiError {
    ApiError::new(
        Code::InvalidArgument,
        ErrorReason::BadSignature,
        format!("{what}: bad signature"),
    )
}

fn decode_signed<M: tribute_channels::Message>(
    bytes: &[u8],
    field: &str,
) -> Result<Signed<M>, ApiError> {
    let signed = Signed::<M>::decode(bytes)
        .map_err(|e| ApiError::malformed(field, format!("{field}: {e}")))?;
    signed.verify().map_err(|_| bad_signature(field))?;
    Ok(signed)
}

fn wrong_network(field: &str) -> ApiError {
    ApiError::new(
        Code::InvalidArgument,
        ErrorReason::WrongNetwork,
        format!("{field} is for another network"),
    )
    .with("field", field)
}

/// A signed record's timestamp as an i64 column. One past `i64::MAX` is bad input (the
/// signer chose it), not a storage fault.
fn timestamp_column(t: Timestamp, field: &str) -> Result<i64, ApiError> {
    i64::try_from(t.0).map_err(|_| ApiError::malformed(field, "timestamp above 2^63 - 1"))
}

fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
    // back on drop), so a poisoned lock is still usable.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Loads the registry from the database.
    pub fn load(conn: Connection, network: Network, provider: Keypair) -> Result<Self, StoreError> {
        let snapshot = load_snapshot(&conn, network)?;
        Ok(Registry {
            network,
            provider,
            conn: Mutex::new(conn),
            snapshot: ArcSwap::from_pointee(snapshot),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The network.
    pub fn network(&self) -> Network {
        self.network
    }

    /// The provider's state-signing key (it signs training runs).
    pub fn provider_key(&self) -> PublicKey {
        PublicKey::from(self.provider.x_only_public_key().0)
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut next = Snapshot::clone(&self.snapshot.load());
        f(&mut next);
        self.snapshot.store(Arc::new(next));
    }

    /// Registers (or replaces with a newer) contributor registration.
    pub fn register_contributor(
        &self,
        bytes: &[u8],
    ) -> Result<Signed<ContributorRegistration>, ApiError> {
        let signed: Signed<ContributorRegistration> = decode_signed(bytes, "signed_registration")?;
        let reg = &signed.message;
        if reg.network != self.network {
            return Err(wrong_network("signed_registration"));
        }
        if let Some(offer) = &reg.bolt12_offer {
            // The form was checked on decoding; an offer for another chain would only fail
            // at the first payout.
            let offer = Offer::from_str(offer).map_err(|e| {
                ApiError::malformed("signed_registration", format!("bolt12_offer: {e:?}"))
            })?;
            if !offer.supports_chain(ChainHash::using_genesis_block(self.network.to_bitcoin())) {
                return Err(wrong_network("signed_registration"));
            }
        }
        let conn = lock(&self.conn);
        let snap = self.snapshot();
        if let Some(existing) = snap.contributors.get(&reg.contributor_key) {
            if existing == &signed {
                return Ok(signed);
            }
            if existing.message.registered_at >= reg.registered_at {
                return Err(ApiError::new(
                    Code::AlreadyExists,
                    ErrorReason::Conflict,
                    "a registration at least as new exists",
                ));
            }
        }
        conn.execute(
            "INSERT INTO contributors (contributor_key, node_id, bolt12_offer, registered_at, signed)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (contributor_key) DO UPDATE SET node_id = excluded.node_id,
               bolt12_offer = excluded.bolt12_offer, registered_at = excluded.registered_at,
               signed = excluded.signed",
            params![
                reg.contributor_key.to_bytes(),
                reg.node_id.map(|n| n.to_vec()),
                reg.bolt12_offer,
                timestamp_column(reg.registered_at, "signed_registration")?,
                signed.encode(),
            ],
        )
        .map_err(StoreError::from)?;
        self.update(|s| {
            s.contributors.insert(reg.contributor_key, signed.clone());
        });
        Ok(signed)
    }

    /// Registers a signed dataset licence.
    pub fn register_licence(&self, bytes: &[u8]) -> Result<LicenceEntry, ApiError> {
        let signed: Signed<Licence> = decode_signed(bytes, "signed_licence")?;
        let l = &signed.message;
        if l.network != self.network {
            return Err(wrong_network("signed_licence"));
        }
        let conn = lock(&self.conn);
        let snap = self.snapshot();
        let existing = snap.licences.get(&l.dataset_hash).map(Vec::as_slice).unwrap_or_default();
        if let Some(e) = existing.iter().find(|e| e.licence == signed) {
            return Ok(e.clone());
        }
        if existing.iter().any(|e| e.licence.message.contributor_key != l.contributor_key) {
            return Err(ApiError::new(
                Code::AlreadyExists,
                ErrorReason::Conflict,
                "dataset is licensed by another contributor",
            )
            .with("dataset_hash", l.dataset_hash.to_hex()));
        }
        conn.execute(
            "INSERT INTO licences (licence_id, dataset_hash, contributor_key, signed) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (licence_id) DO NOTHING",
            params![l.id(), l.dataset_hash.0, l.contributor_key.to_bytes(), signed.encode()],
        )
        .map_err(StoreError::from)?;
        let entry = LicenceEntry { licence: signed.clone(), revocation: None };
        self.update(|s| s.licences.entry(l.dataset_hash).or_default().push(entry.clone()));
        Ok(entry)
    }

    /// Records a signed revocation of a registered licence.
    pub fn revoke_licence(&self, bytes: &[u8]) -> Result<LicenceEntry, ApiError> {
        let signed: Signed<Revocation> = decode_signed(bytes, "signed_revocation")?;
        let r = &signed.message;
        if r.network != self.network {
            return Err(wrong_network("signed_revocation"));
        }
        let conn = lock(&self.conn);
        let snap = self.snapshot();
        let entry = snap
            .licences
            .get(&r.dataset_hash)
            .and_then(|v| v.iter().find(|e| e.licence.message.id() == r.licence_id))
            .filter(|e| r.matches(&e.licence.message))
            .ok_or_else(|| {
                ApiError::new(Code::NotFound, ErrorReason::UnknownDataset, "no such licence")
                    .with("licence_id", hex::encode(r.licence_id))
            })?;
        if let Some(prev) = &entry.revocation {
            // The earliest revocation stands; a repeat is answered idempotently.
            if prev.message.revoked_at <= r.revoked_at {
                return Ok(entry.clone());
            }
        }
        conn.execute(
            "UPDATE licences SET revoked_at = ?2, revocation = ?3 WHERE licence_id = ?1",
            params![
                r.licence_id,
                timestamp_column(r.revoked_at, "signed_revocation")?,
                signed.encode()
            ],
        )
        .map_err(StoreError::from)?;
        let (dataset, licence_id) = (r.dataset_hash, r.licence_id);
        let updated = LicenceEntry { licence: entry.licence.clone(), revocation: Some(signed) };
        self.update(|s| {
            if let Some(list) = s.licences.get_mut(&dataset) {
                for e in list.iter_mut().filter(|e| e.licence.message.id() == licence_id) {
                    *e = updated.clone();
                }
            }
        });
        Ok(updated)
    }

    /// Registers a model; identical re-registration is idempotent, a different one conflicts.
    pub fn register_model(
        &self,
        model_id: ModelId,
        share_ppm: u32,
        tariff: Tariff,
    ) -> Result<Arc<Model>, ApiError> {
        if share_ppm > PPM {
            return Err(ApiError::malformed("contributor_share_ppm", "share above 1,000,000 ppm"));
        }
        tariff.validate().map_err(|e| {
            ApiError::new(Code::InvalidArgument, ErrorReason::PriceOutOfRange, e.to_string())
                .with("field", "tariff")
        })?;
        let conn = lock(&self.conn);
        if let Some(m) = self.snapshot().models.get(&model_id) {
            if m.contributor_share_ppm == share_ppm && m.tariff == tariff {
                return Ok(m.clone());
            }
            return Err(ApiError::new(
                Code::AlreadyExists,
                ErrorReason::Conflict,
                "model exists with other terms",
            )
            .with("model_id", model_id.as_str()));
        }
        let col = |n: Nsat| {
            i64::try_from(n.0).map_err(|_| ApiError::malformed("tariff", "price too large"))
        };
        conn.execute(
            "INSERT INTO models (model_id, contributor_share_ppm, per_request_nsat, per_input_token_nsat, per_output_token_nsat)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                model_id.as_str(),
                share_ppm,
                col(tariff.per_request_nsat)?,
                col(tariff.per_input_token_nsat)?,
                col(tariff.per_output_token_nsat)?,
            ],
        )
        .map_err(StoreError::from)?;
        let model = Arc::new(Model {
            model_id: model_id.clone(),
            contributor_share_ppm: share_ppm,
            tariff,
            versions: vec![],
        });
        self.update(|s| {
            s.models.insert(model_id, model.clone());
        });
        Ok(model)
    }

    /// Checks, signs and records a training run; returns the signed run and its version.
    pub fn register_training_run(
        &self,
        mut run: TrainingRun,
    ) -> Result<(Signed<TrainingRun>, u64), ApiError> {
        run.network = self.network;
        run.provider_key = PublicKey::from(self.provider.x_only_public_key().0);
        run.canonicalize();
        run.validate().map_err(|e| ApiError::malformed("datasets", e.to_string()))?;
        let conn = lock(&self.conn);
        let snap = self.snapshot();
        let model = snap.models.get(&run.model_id).ok_or_else(|| {
            ApiError::new(Code::NotFound, ErrorReason::UnknownModel, "unknown model")
                .with("model_id", run.model_id.as_str())
        })?;
        if let Some((model_id, version)) = snap.runs.get(run.run_id.as_str()) {
            let existing = &model.versions.get((*version as usize).saturating_sub(1));
            let same = model_id == &run.model_id && existing.is_some();
            let stored: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT signed FROM training_runs WHERE run_id = ?1",
                    params![run.run_id.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(StoreError::from)?;
            if let (true, Some(bytes)) = (same, stored) {
                let prev = Signed::<TrainingRun>::decode(&bytes).map_err(ApiError::storage)?;
                if prev.message == run {
                    return Ok((prev, *version));
                }
            }
            return Err(ApiError::new(
                Code::AlreadyExists,
                ErrorReason::Conflict,
                "run id used with other content",
            )
            .with("run_id", run.run_id.as_str()));
        }
        run.check_licences(|h| {
            snap.licences
                .get(h)
                .map(|v| {
                    v.iter()
                        .map(|e| LicenceRecord {
                            licence: &e.licence.message,
                            revocation: e.revocation.as_ref().map(|r| &r.message),
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .map_err(|rejected| {
            let names: Vec<String> = rejected
                .offending
                .iter()
                .map(|(h, p)| format!("{}:{}", h.to_hex(), problem_name(p)))
                .collect();
            ApiError::new(
                Code::FailedPrecondition,
                ErrorReason::UnlicensedDataset,
                rejected.to_string(),
            )
            .with("datasets", names.join(","))
        })?;
        let base = model
            .run_base()
            .map(|v| v.vector.clone())
            .unwrap_or_else(|| AttributionVector::empty(run.model_id.clone()));
        let mut vector = base.with_run(&run, |h| snap.owner(h)).map_err(|e| {
            ApiError::new(Code::InvalidArgument, ErrorReason::BadAttribution, e.to_string())
        })?;
        // Runs build on the newest run-derived vector; the version number counts every
        // version, quality-weighted ones included.
        vector.version = model.versions.len() as u64 + 1;
        let weights = Arc::new(vector.contributor_weights().map_err(|e| {
            ApiError::new(Code::InvalidArgument, ErrorReason::BadAttribution, e.to_string())
        })?);
        let version = vector.version;
        let signed = Signed::sign(run, &self.provider, &fresh_aux()).map_err(ApiError::storage)?;
        conn.execute(
            "INSERT INTO training_runs (run_id, model_id, attribution_version, signed) VALUES (?1, ?2, ?3, ?4)",
            params![signed.message.run_id.as_str(), signed.message.model_id.as_str(), store::u64_to_column(version, "version")?, signed.encode()],
        )
        .map_err(StoreError::from)?;
        let mut next_model = Model::clone(model);
        next_model.versions.push(Arc::new(Version { vector, weights, quality: None }));
        let next_model = Arc::new(next_model);
        self.update(|s| {
            s.models.insert(next_model.model_id.clone(), next_model.clone());
            s.runs.insert(
                signed.message.run_id.as_str().to_owned(),
                (next_model.model_id.clone(), version),
            );
        });
        Ok((signed, version))
    }
}

/// A stable name for a licence problem (error metadata).
pub fn problem_name(p: &tribute_channels::licence::LicenceProblem) -> &'static str {
    use tribute_channels::licence::LicenceProblem as P;
    match p {
        P::NotFound => "NOT_FOUND",
        P::UseNotPermitted(_) => "USE_NOT_PERMITTED",
        P::NotYetValid => "NOT_YET_VALID",
        P::Expired => "EXPIRED",
        P::SignedAfterUse => "SIGNED_AFTER_USE",
        P::Revoked => "REVOKED",
        P::WrongNetwork => "WRONG_NETWORK",
    }
}

/// 32 fresh random bytes (BIP340 aux randomness, nonces, tokens).
pub fn fresh_aux() -> [u8; 32] {
    let mut b = [0u8; 32];
    // getrandom only fails if the OS has no entropy source at all; then signing with
    // zero aux randomness is still a valid, deterministic BIP340 signature.
    let _ = getrandom::getrandom(&mut b);
    b
}

/// Reads the registry's records from the database into a snapshot (no signature is
/// checked again: they were checked when registered). Also used by `reconcile`, which has no
/// provider key pair to build a [`Registry`] with.
pub fn load_snapshot(conn: &Connection, network: Network) -> Result<Snapshot, StoreError> {
    let mut snap = Snapshot {
        network,
        contributors: HashMap::new(),
        licences: HashMap::new(),
        models: HashMap::new(),
        runs: HashMap::new(),
    };
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    let mut stmt = conn.prepare("SELECT signed FROM contributors")?;
    for row in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))? {
        let s = Signed::<ContributorRegistration>::decode(&row?)
            .map_err(|e| corrupt("contributor", &e))?;
        snap.contributors.insert(s.message.contributor_key, s);
    }
    let mut stmt = conn.prepare("SELECT signed, revocation FROM licences ORDER BY rowid")?;
    for row in
        stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<Vec<u8>>>(1)?)))?
    {
        let (l, r) = row?;
        let licence = Signed::<Licence>::decode(&l).map_err(|e| corrupt("licence", &e))?;
        let revocation = r
            .map(|r| Signed::<Revocation>::decode(&r))
            .transpose()
            .map_err(|e| corrupt("revocation", &e))?;
        snap.licences
            .entry(licence.message.dataset_hash)
            .or_default()
            .push(LicenceEntry { licence, revocation });
    }
    let mut stmt = conn.prepare(
        "SELECT model_id, contributor_share_ppm, per_request_nsat, per_input_token_nsat, per_output_token_nsat FROM models",
    )?;
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, u32>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })? {
        let (id, ppm, a, b, c) = row?;
        let model_id = ModelId::new(id).map_err(|e| corrupt("model", &e))?;
        let n = |v: i64| u128::try_from(v).map(Nsat).map_err(|e| corrupt("tariff", &e));
        let tariff = Tariff {
            per_request_nsat: n(a)?,
            per_input_token_nsat: n(b)?,
            per_output_token_nsat: n(c)?,
        };
        snap.models.insert(
            model_id.clone(),
            Arc::new(Model { model_id, contributor_share_ppm: ppm, tariff, versions: vec![] }),
        );
    }
    // Versions are made by training runs and by quality policies; replay both in version
    // order per model.
    enum Step {
        Run(Vec<u8>),
        Quality(QualityRow),
    }
    let mut steps: std::collections::BTreeMap<(String, i64), Step> = Default::default();
    let mut stmt =
        conn.prepare("SELECT model_id, attribution_version, signed FROM training_runs")?;
    for row in stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?))
    })? {
        let (model, version, bytes) = row?;
        steps.insert((model, version), Step::Run(bytes));
    }
    for q in quality_rows(conn)? {
        if steps.insert((q.model_id.clone(), q.attribution_version), Step::Quality(q)).is_some() {
            return Err(corrupt("attribution", &"two records for one version"));
        }
    }
    for ((model_id, version), step) in steps {
        let model_id = ModelId::new(model_id).map_err(|e| corrupt("attribution", &e))?;
        let model =
            snap.models.get(&model_id).ok_or_else(|| corrupt("attribution", &"unknown model"))?;
        if i64::try_from(model.versions.len() + 1).ok() != Some(version) {
            return Err(corrupt("attribution", &"version sequence broken"));
        }
        let mut next = Model::clone(model);
        match step {
            Step::Run(bytes) => {
                let run = Signed::<TrainingRun>::decode(&bytes)
                    .map_err(|e| corrupt("training run", &e))?
                    .message;
                if run.model_id != model_id {
                    return Err(corrupt("training run", &"model differs from its row"));
                }
                let base = model
                    .run_base()
                    .map(|v| v.vector.clone())
                    .unwrap_or_else(|| AttributionVector::empty(run.model_id.clone()));
                let mut vector = base
                    .with_run(&run, |h| snap.owner(h))
                    .map_err(|e| corrupt("attribution", &e))?;
                vector.version = model.versions.len() as u64 + 1;
                let weights =
                    Arc::new(vector.contributor_weights().map_err(|e| corrupt("attribution", &e))?);
                next.versions.push(Arc::new(Version { vector, weights, quality: None }));
                snap.runs.insert(
                    run.run_id.as_str().to_owned(),
                    (run.model_id.clone(), vector_version(&next)),
                );
            }
            Step::Quality(q) => {
                let version =
                    quality_version(model, &q).map_err(|e| corrupt("quality version", &e))?;
                next.versions.push(Arc::new(version));
            }
        }
        snap.models.insert(model_id, Arc::new(next));
    }
    Ok(snap)
}

/// A `quality_versions` row.
#[derive(Debug, Clone)]
struct QualityRow {
    model_id: String,
    attribution_version: i64,
    info: QualityVersion,
    /// `(dataset, adjusted weight)` in the base vector's order.
    weights: Vec<(DatasetHash, u64)>,
}

/// Entries of the `datasets` column: dataset hash (32 bytes), factor ppm (u32 BE), adjusted
/// weight (u64 BE), in the base vector's dataset order.
const QUALITY_ENTRY_BYTES: usize = 32 + 4 + 8;

fn quality_rows(conn: &Connection) -> Result<Vec<QualityRow>, StoreError> {
    // A backup from before schema V4 has no such table: it has no quality versions.
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quality_versions')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let corrupt = |e: &str| StoreError::Corrupt(format!("quality version: {e}"));
    let mut stmt = conn.prepare(
        "SELECT model_id, attribution_version, base_version, policy_id, policy_version, gain_ppm,
                floor_ppm, cap_ppm, as_of, datasets FROM quality_versions",
    )?;
    let mut out = Vec::new();
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let blob: Vec<u8> = r.get(9)?;
        if blob.len() % QUALITY_ENTRY_BYTES != 0 {
            return Err(corrupt("datasets column length"));
        }
        let mut factors_ppm = Vec::new();
        let mut weights = Vec::new();
        for e in blob.chunks_exact(QUALITY_ENTRY_BYTES) {
            let mut h = [0u8; 32];
            h.copy_from_slice(&e[..32]);
            let mut f = [0u8; 4];
            f.copy_from_slice(&e[32..36]);
            let mut w = [0u8; 8];
            w.copy_from_slice(&e[36..]);
            factors_ppm.push(u32::from_be_bytes(f));
            weights.push((DatasetHash(h), u64::from_be_bytes(w)));
        }
        out.push(QualityRow {
            model_id: r.get(0)?,
            attribution_version: r.get(1)?,
            info: QualityVersion {
                base_version: store::u64_from_column(r.get(2)?, "base_version")?,
                policy_id: r.get(3)?,
                policy_version: r.get(4)?,
                policy: QualityPolicy {
                    gain_ppm: r.get(5)?,
                    floor_ppm: r.get(6)?,
                    cap_ppm: r.get(7)?,
                },
                as_of: Timestamp(store::u64_from_column(r.get(8)?, "as_of")?),
                factors_ppm,
            },
            weights,
        });
    }
    Ok(out)
}

/// The version a quality row makes on top of `model`: the base version's datasets with
/// the row's weights. Fails unless the base is a run-derived version of the model and the
/// row names exactly its datasets.
fn quality_version(model: &Model, q: &QualityRow) -> Result<Version, String> {
    let base = usize::try_from(q.info.base_version)
        .ok()
        .and_then(|v| v.checked_sub(1))
        .and_then(|i| model.versions.get(i))
        .filter(|v| v.quality.is_none())
        .ok_or("base version is not a run-derived version")?;
    if base.vector.datasets.len() != q.weights.len()
        || base.vector.datasets.iter().zip(&q.weights).any(|(d, (h, _))| d.dataset_hash != *h)
    {
        return Err("datasets differ from the base version's".into());
    }
    let mut vector = base.vector.clone();
    vector.version = model.versions.len() as u64 + 1;
    for (d, (_, w)) in vector.datasets.iter_mut().zip(&q.weights) {
        d.weight = *w;
    }
    let weights = Arc::new(vector.contributor_weights().map_err(|e| e.to_string())?);
    Ok(Version { vector, weights, quality: Some(q.info.clone()) })
}

impl Registry {
    /// Records a quality-weighted version of `model_id`: the datasets of its newest
    /// run-derived version with `adjusted` weights (`(dataset, factor ppm, weight)` in that
    /// version's order). Applying the same policy version to the same base again is
    /// idempotent (the existing version is returned); the same policy id and version with
    /// other content is `CONFLICT`.
    pub fn add_quality_version(
        &self,
        model_id: &ModelId,
        info: QualityVersion,
        weights: Vec<(DatasetHash, u64)>,
        now: Timestamp,
    ) -> Result<Arc<Version>, ApiError> {
        let conn = lock(&self.conn);
        let snap = self.snapshot();
        let model = snap.models.get(model_id).ok_or_else(|| {
            ApiError::new(Code::NotFound, ErrorReason::UnknownModel, "unknown model")
                .with("model_id", model_id.as_str())
        })?;
        if let Some(prev) = model.versions.iter().find(|v| {
            v.quality.as_ref().is_some_and(|p| {
                p.policy_id == info.policy_id && p.policy_version == info.policy_version
            })
        }) {
            let same_weights = prev
                .vector
                .datasets
                .iter()
                .map(|d| (d.dataset_hash, d.weight))
                .eq(weights.iter().copied());
            if prev.quality.as_ref() == Some(&info) && same_weights {
                return Ok(prev.clone());
            }
            return Err(ApiError::new(
                Code::AlreadyExists,
                ErrorReason::Conflict,
                "this policy id and version were applied with other content",
            )
            .with("policy_id", info.policy_id.as_str())
            .with("policy_version", info.policy_version.to_string()));
        }
        let version = model.versions.len() as i64 + 1;
        let row = QualityRow {
            model_id: model_id.as_str().to_owned(),
            attribution_version: version,
            info: info.clone(),
            weights,
        };
        let made = quality_version(model, &row).map_err(|e| {
            ApiError::new(Code::FailedPrecondition, ErrorReason::BadAttribution, e)
                .with("model_id", model_id.as_str())
        })?;
        if info.factors_ppm.len() != row.weights.len() {
            return Err(ApiError::storage("one factor per dataset is required"));
        }
        let mut blob = Vec::with_capacity(row.weights.len() * QUALITY_ENTRY_BYTES);
        for ((h, w), f) in row.weights.iter().zip(&info.factors_ppm) {
            blob.extend_from_slice(&h.0);
            blob.extend_from_slice(&f.to_be_bytes());
            blob.extend_from_slice(&w.to_be_bytes());
        }
        conn.execute(
            "INSERT INTO quality_versions (model_id, attribution_version, base_version, policy_id,
                 policy_version, gain_ppm, floor_ppm, cap_ppm, as_of, datasets, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                model_id.as_str(),
                version,
                store::u64_to_column(info.base_version, "base_version")?,
                info.policy_id,
                info.policy_version,
                info.policy.gain_ppm,
                info.policy.floor_ppm,
                info.policy.cap_ppm,
                store::u64_to_column(info.as_of.0, "as_of")?,
                blob,
                store::u64_to_column(now.0, "created_at")?,
            ],
        )
        .map_err(StoreError::from)?;
        let made = Arc::new(made);
        let mut next = Model::clone(model);
        next.versions.push(made.clone());
        let next = Arc::new(next);
        self.update(|s| {
            s.models.insert(next.model_id.clone(), next.clone());
        });
        Ok(made)
    }
}

fn vector_version(m: &Model) -> u64 {
    m.versions.len() as u64
}
