//! `tribute.v1.Registry`.

use super::{blocking, dataset_hash, key, optional_key};
use crate::auth::{authorize, policy, require_own_channel, Role};
use crate::error::ApiError;
use crate::registry::{LicenceEntry, Model, Registry};
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};
use tribute_channels::codec::Encode;
use tribute_channels::licence::Use;
use tribute_channels::pricing::Tariff;
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::training::TrainingRun;
use tribute_channels::{ModelId, Nsat, RunId, Signed, Timestamp};
use tribute_proto::v1 as pb;
use tribute_proto::v1::registry_server::Registry as RegistryRpc;
use tribute_proto::v1::ErrorReason;

/// The registry service.
pub struct RegistryService {
    registry: Arc<Registry>,
    max_message_bytes: usize,
}

impl RegistryService {
    /// Serves `registry`.
    pub fn new(registry: Arc<Registry>, max_message_bytes: usize) -> Self {
        RegistryService { registry, max_message_bytes }
    }
}

fn contributor_pb(s: &Signed<ContributorRegistration>) -> pb::Contributor {
    let r = &s.message;
    pb::Contributor {
        contributor_key: r.contributor_key.to_bytes().to_vec(),
        node_id: r.node_id.map(|n| n.to_vec()).unwrap_or_default(),
        bolt12_offer: r.bolt12_offer.clone().unwrap_or_default(),
        registered_at: r.registered_at.0,
        signed_registration: s.encode(),
    }
}

fn licence_pb(e: &LicenceEntry) -> pb::LicenceInfo {
    let l = &e.licence.message;
    pb::LicenceInfo {
        licence_id: l.id().to_vec(),
        dataset_hash: l.dataset_hash.0.to_vec(),
        contributor_key: l.contributor_key.to_bytes().to_vec(),
        spdx_license_id: l.spdx_license_id.clone(),
        permits_training: l.uses.contains(Use::Training),
        permits_retrieval: l.uses.contains(Use::Retrieval),
        not_before: l.not_before.0,
        not_after: l.not_after.0,
        signed_at: l.signed_at.0,
        revoked_at: e.revocation.as_ref().map_or(0, |r| r.message.revoked_at.0),
        signed_licence: e.licence.encode(),
        signed_revocation: e.revocation.as_ref().map(|r| r.encode()).unwrap_or_default(),
    }
}

fn model_pb(m: &Model) -> pb::Model {
    let n = |v: Nsat| u64::try_from(v.0).unwrap_or(u64::MAX);
    pb::Model {
        model_id: m.model_id.as_str().to_owned(),
        contributor_share_ppm: m.contributor_share_ppm,
        tariff: Some(pb::Tariff {
            per_request_nsat: n(m.tariff.per_request_nsat),
            per_input_token_nsat: n(m.tariff.per_input_token_nsat),
            per_output_token_nsat: n(m.tariff.per_output_token_nsat),
        }),
        attribution_version: m.versions.len() as u64,
    }
}

/// An attribution version on the wire (with its quality policy, if one made it).
pub(crate) fn attribution_pb(v: &crate::registry::Version) -> pb::Attribution {
    let factors = v.quality.as_ref().map(|q| q.factors_ppm.as_slice()).unwrap_or_default();
    pb::Attribution {
        model_id: v.vector.model_id.as_str().to_owned(),
        version: v.vector.version,
        entries: v
            .vector
            .datasets
            .iter()
            .enumerate()
            .map(|(i, d)| pb::AttributionEntry {
                dataset_hash: d.dataset_hash.0.to_vec(),
                contributor_key: d.contributor_key.to_bytes().to_vec(),
                weight: d.weight,
                quality_factor_ppm: factors.get(i).copied().unwrap_or(0),
            })
            .collect(),
        quality_policy: v.quality.as_ref().map(|q| pb::QualityPolicyInfo {
            base_version: q.base_version,
            policy_id: q.policy_id.clone(),
            policy_version: q.policy_version,
            gain_ppm: q.policy.gain_ppm,
            floor_ppm: q.policy.floor_ppm,
            cap_ppm: q.policy.cap_ppm,
            as_of: q.as_of.0,
        }),
    }
}

fn model_id(s: &str) -> Result<ModelId, ApiError> {
    ModelId::new(s).map_err(|e| ApiError::malformed("model_id", e.to_string()))
}

fn unknown_model(id: &str) -> ApiError {
    ApiError::new(Code::NotFound, ErrorReason::UnknownModel, "unknown model").with("model_id", id)
}

/// Contributors may only register for themselves; operators for anyone.
fn own_signer<T>(req: &Request<T>, signer: &tribute_channels::PublicKey) -> Result<(), ApiError> {
    let caller = authorize(req, policy::REGISTER_CONTRIBUTION)?;
    if caller.role == Role::Contributor {
        require_own_channel(&caller, signer)?;
    }
    Ok(())
}

fn peek_signer<M: tribute_channels::Message>(
    bytes: &[u8],
    field: &str,
) -> Result<tribute_channels::PublicKey, ApiError> {
    // Only to decide authorization; the registry decodes and verifies fully.
    Signed::<M>::decode(bytes)
        .map(|s| s.message.signer())
        .map_err(|e| ApiError::malformed(field, e.to_string()))
}

#[tonic::async_trait]
impl RegistryRpc for RegistryService {
    async fn register_contributor(
        &self,
        req: Request<pb::RegisterContributorRequest>,
    ) -> Result<Response<pb::Contributor>, Status> {
        super::check_size(req.get_ref(), self.max_message_bytes)?;
        let bytes = &req.get_ref().signed_registration;
        own_signer(&req, &peek_signer::<ContributorRegistration>(bytes, "signed_registration")?)?;
        let registry = self.registry.clone();
        let bytes = bytes.clone();
        let s = blocking(move || registry.register_contributor(&bytes)).await?;
        Ok(Response::new(contributor_pb(&s)))
    }

    async fn get_contributor(
        &self,
        req: Request<pb::GetContributorRequest>,
    ) -> Result<Response<pb::Contributor>, Status> {
        authorize(&req, policy::READ_REGISTRY)?;
        let k = key(&req.get_ref().contributor_key, "contributor_key")?;
        let snap = self.registry.snapshot();
        let s = snap.contributors.get(&k).ok_or_else(|| {
            ApiError::new(Code::NotFound, ErrorReason::UnknownContributor, "unknown contributor")
                .with("contributor_key", k.to_hex())
        })?;
        Ok(Response::new(contributor_pb(s)))
    }

    async fn register_licence(
        &self,
        req: Request<pb::RegisterLicenceRequest>,
    ) -> Result<Response<pb::LicenceInfo>, Status> {
        super::check_size(req.get_ref(), self.max_message_bytes)?;
        let bytes = &req.get_ref().signed_licence;
        own_signer(
            &req,
            &peek_signer::<tribute_channels::licence::Licence>(bytes, "signed_licence")?,
        )?;
        let registry = self.registry.clone();
        let bytes = bytes.clone();
        let e = blocking(move || registry.register_licence(&bytes)).await?;
        Ok(Response::new(licence_pb(&e)))
    }

    async fn revoke_licence(
        &self,
        req: Request<pb::RevokeLicenceRequest>,
    ) -> Result<Response<pb::LicenceInfo>, Status> {
        super::check_size(req.get_ref(), self.max_message_bytes)?;
        let bytes = &req.get_ref().signed_revocation;
        own_signer(
            &req,
            &peek_signer::<tribute_channels::licence::Revocation>(bytes, "signed_revocation")?,
        )?;
        let registry = self.registry.clone();
        let bytes = bytes.clone();
        let e = blocking(move || registry.revoke_licence(&bytes)).await?;
        Ok(Response::new(licence_pb(&e)))
    }

    async fn list_licences(
        &self,
        req: Request<pb::ListLicencesRequest>,
    ) -> Result<Response<pb::ListLicencesResponse>, Status> {
        authorize(&req, policy::READ_REGISTRY)?;
        let r = req.get_ref();
        let by_key = optional_key(&r.contributor_key, "contributor_key")?;
        let by_dataset = if r.dataset_hash.is_empty() {
            None
        } else {
            Some(dataset_hash(&r.dataset_hash, "dataset_hash")?)
        };
        let snap = self.registry.snapshot();
        let mut licences: Vec<pb::LicenceInfo> = snap
            .licences
            .iter()
            .filter(|(h, _)| by_dataset.is_none_or(|d| d == **h))
            .flat_map(|(_, v)| v.iter())
            .filter(|e| by_key.is_none_or(|k| k == e.licence.message.contributor_key))
            .map(licence_pb)
            .collect();
        licences.sort_by(|a, b| {
            (&a.dataset_hash, &a.licence_id).cmp(&(&b.dataset_hash, &b.licence_id))
        });
        Ok(Response::new(pb::ListLicencesResponse { licences }))
    }

    async fn register_model(
        &self,
        req: Request<pb::RegisterModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        super::check_size(req.get_ref(), self.max_message_bytes)?;
        authorize(&req, policy::REGISTER_MODEL)?;
        let r = req.into_inner();
        let id = model_id(&r.model_id)?;
        let t = r.tariff.ok_or_else(|| ApiError::malformed("tariff", "required"))?;
        let tariff = Tariff {
            per_request_nsat: Nsat(t.per_request_nsat.into()),
            per_input_token_nsat: Nsat(t.per_input_token_nsat.into()),
            per_output_token_nsat: Nsat(t.per_output_token_nsat.into()),
        };
        let registry = self.registry.clone();
        let share = r.contributor_share_ppm;
        let m = blocking(move || registry.register_model(id, share, tariff)).await?;
        Ok(Response::new(model_pb(&m)))
    }

    async fn get_model(
        &self,
        req: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        authorize(&req, policy::READ_REGISTRY)?;
        let id = model_id(&req.get_ref().model_id)?;
        let snap = self.registry.snapshot();
        let m = snap.models.get(&id).ok_or_else(|| unknown_model(id.as_str()))?;
        Ok(Response::new(model_pb(m)))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        authorize(&req, policy::READ_REGISTRY)?;
        let snap = self.registry.snapshot();
        let mut models: Vec<pb::Model> = snap.models.values().map(|m| model_pb(m)).collect();
        models.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn register_training_run(
        &self,
        req: Request<pb::RegisterTrainingRunRequest>,
    ) -> Result<Response<pb::TrainingRunInfo>, Status> {
        super::check_size(req.get_ref(), self.max_message_bytes)?;
        authorize(&req, policy::REGISTER_MODEL)?;
        let r = req.into_inner();
        let mut datasets = Vec::with_capacity(r.datasets.len());
        for d in &r.datasets {
            datasets.push((dataset_hash(&d.dataset_hash, "datasets.dataset_hash")?, d.weight));
        }
        let run = TrainingRun {
            network: self.registry.network(),
            run_id: RunId::new(r.run_id)
                .map_err(|e| ApiError::malformed("run_id", e.to_string()))?,
            model_id: model_id(&r.model_id)?,
            provider_key: self.registry.provider_key(),
            started_at: Timestamp(r.started_at),
            finished_at: Timestamp(r.finished_at),
            datasets,
        };
        let registry = self.registry.clone();
        let (signed, version) = blocking(move || registry.register_training_run(run)).await?;
        Ok(Response::new(pb::TrainingRunInfo {
            run_id: signed.message.run_id.as_str().to_owned(),
            model_id: signed.message.model_id.as_str().to_owned(),
            attribution_version: version,
            signed_run: signed.encode(),
        }))
    }

    async fn get_attribution(
        &self,
        req: Request<pb::GetAttributionRequest>,
    ) -> Result<Response<pb::Attribution>, Status> {
        authorize(&req, policy::READ_REGISTRY)?;
        let r = req.get_ref();
        let id = model_id(&r.model_id)?;
        let snap = self.registry.snapshot();
        let m = snap.models.get(&id).ok_or_else(|| unknown_model(id.as_str()))?;
        let v = if r.version == 0 { m.current() } else { m.versions.get((r.version - 1) as usize) };
        let v = v.ok_or_else(|| {
            ApiError::malformed("version", "no such attribution version")
                .with("model_id", id.as_str())
        })?;
        Ok(Response::new(attribution_pb(v)))
    }
}
