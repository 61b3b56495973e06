//! `tribute.v1.Reputation`: evaluation records in, reputations out.

use super::{blocking, dataset_hash, optional_key};
use crate::auth::{authorize, policy};
use crate::error::ApiError;
use crate::ledger::unix_now;
use crate::reputation::ReputationBook;
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};
use tribute_channels::reputation::{Contribution, QualityPolicy, Report, Reputation};
use tribute_channels::Timestamp;
use tribute_proto::v1 as pb;
use tribute_proto::v1::reputation_server::Reputation as ReputationRpc;
use tribute_proto::v1::ErrorReason;

/// The reputation service.
pub struct ReputationService {
    book: Arc<ReputationBook>,
    max_message_bytes: usize,
}

impl ReputationService {
    /// Serves `book`.
    pub fn new(book: Arc<ReputationBook>, max_message_bytes: usize) -> Self {
        ReputationService { book, max_message_bytes }
    }
}

fn as_of(requested: u64) -> Timestamp {
    Timestamp(if requested == 0 { unix_now() } else { requested })
}

/// A reputation on the wire.
pub fn score_pb(r: &Reputation) -> pb::ReputationScore {
    pb::ReputationScore {
        score_ppb: r.score_ppb,
        half_width_ppb: r.half_width_ppb,
        evaluations: r.evaluations,
        measurements: r.measurements,
    }
}

fn contribution_pb(
    c: &Contribution,
    record: Option<&tribute_channels::evaluation::Evaluation>,
) -> pb::ContributionInfo {
    pb::ContributionInfo {
        evaluation_id: c.evaluation_id.as_str().to_owned(),
        model_id: record.map(|e| e.model_id.as_str().to_owned()).unwrap_or_default(),
        attribution_version: record.map_or(0, |e| e.attribution_version),
        benchmark_id: c.benchmark_id.as_str().to_owned(),
        metric: record.map(|e| e.metric.as_str().to_owned()).unwrap_or_default(),
        method: c.method.clone(),
        evaluator_key: record.map(|e| e.evaluator_key.to_bytes().to_vec()).unwrap_or_default(),
        evaluated_at: c.evaluated_at.0,
        contribution_ppb: c.contribution_ppb,
        half_width_ppb: c.half_width_ppb,
        decay_ppb: c.decay_ppb,
    }
}

fn list(
    report: &Report,
    owner: impl Fn(&tribute_channels::DatasetHash) -> Option<tribute_channels::PublicKey>,
    only: Option<tribute_channels::PublicKey>,
) -> pb::ListReputationResponse {
    pb::ListReputationResponse {
        as_of: report.as_of.0,
        datasets: report
            .datasets
            .iter()
            .filter(|(d, _)| only.is_none() || owner(d) == only)
            .map(|(d, r)| pb::DatasetReputation {
                dataset_hash: d.0.to_vec(),
                contributor_key: owner(d).map(|k| k.to_bytes().to_vec()).unwrap_or_default(),
                score: Some(score_pb(r)),
                as_of: report.as_of.0,
                contributions: vec![],
                signed_evaluations: vec![],
            })
            .collect(),
        contributors: report
            .contributors
            .iter()
            .filter(|(k, _)| only.is_none_or(|o| o == **k))
            .map(|(k, r)| pb::ContributorReputation {
                contributor_key: k.to_bytes().to_vec(),
                score: Some(score_pb(r)),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl ReputationRpc for ReputationService {
    async fn submit_evaluation(
        &self,
        req: Request<pb::SubmitEvaluationRequest>,
    ) -> Result<Response<pb::SubmitEvaluationResponse>, Status> {
        super::check_size(req.get_ref(), self.max_message_bytes)?;
        let caller = authorize(&req, policy::SUBMIT_EVALUATION)?;
        let bytes = req.into_inner().signed_evaluation;
        let book = self.book.clone();
        let s = blocking(move || book.submit(&caller, &bytes, Timestamp(unix_now()))).await?;
        let e = &s.record.signed.message;
        Ok(Response::new(pb::SubmitEvaluationResponse {
            evaluation_id: e.evaluation_id.as_str().to_owned(),
            already_recorded: s.already_recorded,
            measurements: e.measurements.len() as u32,
        }))
    }

    async fn get_reputation(
        &self,
        req: Request<pb::GetReputationRequest>,
    ) -> Result<Response<pb::DatasetReputation>, Status> {
        authorize(&req, policy::READ_REPUTATION)?;
        let r = req.into_inner();
        let dataset = dataset_hash(&r.dataset_hash, "dataset_hash")?;
        let owner = self.book.registry().snapshot().owner(&dataset).ok_or_else(|| {
            ApiError::new(Code::NotFound, ErrorReason::UnknownDataset, "unknown dataset")
                .with("dataset_hash", dataset.to_hex())
        })?;
        let book = self.book.clone();
        let at = as_of(r.as_of);
        let (report, records) = blocking(move || Ok((book.report(at), book.records()))).await?;
        let by_id: std::collections::BTreeMap<&str, _> =
            records.iter().map(|s| (s.signed.message.evaluation_id.as_str(), s)).collect();
        let behind: Vec<&Contribution> =
            report.contributions.iter().filter(|c| c.dataset == dataset).collect();
        Ok(Response::new(pb::DatasetReputation {
            dataset_hash: dataset.0.to_vec(),
            contributor_key: owner.to_bytes().to_vec(),
            score: report.datasets.get(&dataset).map(score_pb),
            as_of: at.0,
            contributions: behind
                .iter()
                .map(|c| {
                    contribution_pb(
                        c,
                        by_id.get(c.evaluation_id.as_str()).map(|s| &s.signed.message),
                    )
                })
                .collect(),
            signed_evaluations: behind
                .iter()
                .filter_map(|c| by_id.get(c.evaluation_id.as_str()).map(|s| s.bytes.clone()))
                .collect(),
        }))
    }

    async fn list_reputation(
        &self,
        req: Request<pb::ListReputationRequest>,
    ) -> Result<Response<pb::ListReputationResponse>, Status> {
        authorize(&req, policy::READ_REPUTATION)?;
        let r = req.into_inner();
        let only = optional_key(&r.contributor_key, "contributor_key")?;
        let book = self.book.clone();
        let at = as_of(r.as_of);
        let report = blocking(move || Ok(book.report(at))).await?;
        let snap = self.book.registry().snapshot();
        Ok(Response::new(list(&report, |d| snap.owner(d), only)))
    }

    async fn apply_quality_policy(
        &self,
        req: Request<pb::ApplyQualityPolicyRequest>,
    ) -> Result<Response<pb::Attribution>, Status> {
        authorize(&req, policy::REGISTER_MODEL)?;
        let r = req.into_inner();
        let model_id = tribute_channels::ModelId::new(r.model_id.as_str())
            .map_err(|e| ApiError::malformed("model_id", e.to_string()))?;
        let quality =
            QualityPolicy { gain_ppm: r.gain_ppm, floor_ppm: r.floor_ppm, cap_ppm: r.cap_ppm };
        let book = self.book.clone();
        let at = as_of(r.as_of);
        let v = blocking(move || {
            book.apply_quality_policy(
                &model_id,
                &r.policy_id,
                r.policy_version,
                quality,
                at,
                Timestamp(unix_now()),
            )
        })
        .await?;
        Ok(Response::new(super::registry::attribution_pb(&v)))
    }
}
