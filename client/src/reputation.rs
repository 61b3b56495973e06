//! Evaluation records from the CLI: the unsigned JSON body an evaluator (or the built-in
//! valuator) writes, turned into a signed `tribute/evaluation/v1` record; and reputations
//! printed for people or as JSON.
//!
//! The JSON body (documented in `docs/REPUTATION.md`):
//!
//! ```json
//! {"evaluation_id": "...", "model_id": "...", "attribution_version": 1,
//!  "benchmark_id": "...", "benchmark_sha256": "<hex>", "metric": "...",
//!  "higher_is_better": true, "full_score": 0.83,
//!  "datasets": [{"dataset": "<hex>", "method": "knn-shapley", "value": 0.12,
//!                "samples": 1000, "ci_low": 0.10, "ci_high": 0.14},
//!               {"dataset": "<hex>", "method": "leave-one-out", "ablation_score": 0.80}]}
//! ```
//!
//! Scores are JSON numbers, converted to parts per billion (rounded to nearest); NaN,
//! infinities and magnitudes above 1e9 are refused. `evaluated_at` (Unix seconds) is
//! optional; the CLI fills in the current time.

use crate::config::CliConfig;
use crate::connect::Bearer;
use crate::contributor::Contributor;
use crate::error::ClientError;
use crate::keys::{random_bytes, ContributorKey};
use crate::time::unix_now;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tonic::transport::Channel;
use tribute_channels::auth::AuthChallenge;
use tribute_channels::codec::Encode;
use tribute_channels::evaluation::{
    Evaluation, Measurement, MeasurementKind, Score, LEAVE_ONE_OUT,
};
use tribute_channels::ids::{BenchmarkId, EvaluationId, Label};
use tribute_channels::reputation::{Contribution, Report, Reputation};
use tribute_channels::Signed;
use tribute_channels::{DatasetHash, ModelId, Network, PublicKey, Timestamp};
use tribute_proto::v1 as pb;
use tribute_proto::v1::auth_client::AuthClient;
use tribute_proto::v1::reputation_client::ReputationClient;

/// One dataset's entry in the JSON body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInput {
    /// Dataset hash, 64 hex digits.
    pub dataset: String,
    /// `leave-one-out` or a valuation method (`knn-shapley`, `influence`, …).
    pub method: String,
    /// Leave-one-out: the score of the model trained without the dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ablation_score: Option<f64>,
    /// Valuation: the estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Valuation: samples behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// Valuation: interval low end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci_low: Option<f64>,
    /// Valuation: interval high end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci_high: Option<f64>,
}

/// The unsigned JSON body of an evaluation record (what `tribute evaluator submit` reads and
/// the KNN valuator writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationInput {
    /// Unique id (the idempotency key).
    pub evaluation_id: String,
    /// The model.
    pub model_id: String,
    /// The attribution version evaluated.
    pub attribution_version: u64,
    /// The benchmark's name.
    pub benchmark_id: String,
    /// SHA-256 of the benchmark's content, 64 hex digits.
    pub benchmark_sha256: String,
    /// The metric's name.
    pub metric: String,
    /// Whether higher scores are better.
    pub higher_is_better: bool,
    /// The full model's score.
    pub full_score: f64,
    /// When it was evaluated (Unix seconds); default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_at: Option<u64>,
    /// Per-dataset measurements.
    pub datasets: Vec<DatasetInput>,
}

fn bad(field: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Config(format!("{field}: {e}"))
}

fn score(field: &str, v: Option<f64>) -> Result<Score, ClientError> {
    let v = v.ok_or_else(|| bad(field, "required"))?;
    Score::from_f64(v).map_err(|e| bad(field, e))
}

impl EvaluationInput {
    /// Parses the JSON body.
    pub fn from_json(text: &str) -> Result<Self, ClientError> {
        serde_json::from_str(text).map_err(|e| bad("evaluation JSON", e))
    }

    /// The record this body describes, for `evaluator` on `network`, checked with
    /// [`Evaluation::validate`] (measurements are sorted into canonical order).
    pub fn to_evaluation(
        &self,
        evaluator: PublicKey,
        network: Network,
        now: Timestamp,
    ) -> Result<Evaluation, ClientError> {
        let mut benchmark_sha256 = [0u8; 32];
        hex::decode_to_slice(self.benchmark_sha256.trim(), &mut benchmark_sha256)
            .map_err(|_| bad("benchmark_sha256", "must be 64 hex digits"))?;
        let mut measurements = Vec::with_capacity(self.datasets.len());
        for (i, d) in self.datasets.iter().enumerate() {
            let f = |name: &str| format!("datasets[{i}].{name}");
            let dataset =
                DatasetHash::from_hex(d.dataset.trim()).map_err(|e| bad(&f("dataset"), e))?;
            let kind = if d.method == LEAVE_ONE_OUT {
                MeasurementKind::LeaveOneOut {
                    ablation_score: score(&f("ablation_score"), d.ablation_score)?,
                }
            } else {
                MeasurementKind::Valuation {
                    method: Label::new(d.method.clone()).map_err(|e| bad(&f("method"), e))?,
                    value: score(&f("value"), d.value)?,
                    samples: d.samples.ok_or_else(|| bad(&f("samples"), "required"))?,
                    ci_low: score(&f("ci_low"), d.ci_low)?,
                    ci_high: score(&f("ci_high"), d.ci_high)?,
                }
            };
            measurements.push(Measurement { dataset, kind });
        }
        let mut e = Evaluation {
            network,
            evaluation_id: EvaluationId::new(self.evaluation_id.clone())
                .map_err(|e| bad("evaluation_id", e))?,
            evaluator_key: evaluator,
            model_id: ModelId::new(self.model_id.clone()).map_err(|e| bad("model_id", e))?,
            attribution_version: self.attribution_version,
            benchmark_id: BenchmarkId::new(self.benchmark_id.clone())
                .map_err(|e| bad("benchmark_id", e))?,
            benchmark_sha256,
            metric: Label::new(self.metric.clone()).map_err(|e| bad("metric", e))?,
            higher_is_better: self.higher_is_better,
            evaluated_at: self.evaluated_at.map(Timestamp).unwrap_or(now),
            full_score: score("full_score", Some(self.full_score))?,
            measurements,
        };
        e.canonicalize();
        e.validate().map_err(|err| bad("evaluation", err))?;
        Ok(e)
    }
}

/// ppb as a decimal fraction of the full score, e.g. `+0.036144578`.
pub fn ppb_decimal(v: i64) -> String {
    let sign = if v < 0 { "-" } else { "+" };
    let a = v.unsigned_abs();
    format!("{sign}{}.{:09}", a / 1_000_000_000, a % 1_000_000_000)
}

/// A reputation as JSON (ppb as integers, plus decimals for reading).
pub fn reputation_json(r: &Reputation) -> serde_json::Value {
    serde_json::json!({
        "score_ppb": r.score_ppb,
        "score": ppb_decimal(r.score_ppb),
        "half_width_ppb": r.half_width_ppb,
        "evaluations": r.evaluations,
        "measurements": r.measurements,
    })
}

fn contribution_json(c: &Contribution) -> serde_json::Value {
    serde_json::json!({
        "evaluation_id": c.evaluation_id.as_str(),
        "benchmark_id": c.benchmark_id.as_str(),
        "dataset": c.dataset.to_hex(),
        "contributor_key": c.contributor.map(|k| k.to_hex()),
        "method": c.method,
        "evaluated_at": c.evaluated_at.0,
        "contribution_ppb": c.contribution_ppb,
        "half_width_ppb": c.half_width_ppb,
        "decay_ppb": c.decay_ppb,
    })
}

/// The whole report as JSON.
pub fn report_json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "as_of": r.as_of.0,
        "params": {
            "half_life_secs": r.params.half_life_secs,
            "loo_half_width_ppb": r.params.loo_half_width_ppb,
            "min_half_width_ppb": r.params.min_half_width_ppb,
            "max_half_width_ppb": r.params.max_half_width_ppb,
            "max_abs_contribution_ppb": r.params.max_abs_contribution_ppb,
        },
        "datasets": r.datasets.iter().map(|(d, rep)| {
            let mut v = reputation_json(rep);
            v["dataset"] = serde_json::Value::String(d.to_hex());
            v
        }).collect::<Vec<_>>(),
        "contributors": r.contributors.iter().map(|(k, rep)| {
            let mut v = reputation_json(rep);
            v["contributor_key"] = serde_json::Value::String(k.to_hex());
            v
        }).collect::<Vec<_>>(),
        "contributions": r.contributions.iter().map(contribution_json).collect::<Vec<_>>(),
    })
}

/// The report as text lines.
pub fn report_text(r: &Report) -> String {
    let mut out = format!("reputation as of {}\n", r.as_of.0);
    let line = |name: &str, rep: &Reputation| {
        format!(
            "{name}  {} ±{} ({} evaluations, {} measurements)\n",
            ppb_decimal(rep.score_ppb),
            ppb_decimal(i64::try_from(rep.half_width_ppb).unwrap_or(i64::MAX))
                .trim_start_matches('+'),
            rep.evaluations,
            rep.measurements
        )
    };
    out.push_str("datasets:\n");
    for (d, rep) in &r.datasets {
        out.push_str(&line(&d.to_hex(), rep));
    }
    out.push_str("contributors:\n");
    for (k, rep) in &r.contributors {
        out.push_str(&line(&k.to_hex(), rep));
    }
    out
}

/// `tribute evaluator …`.
#[derive(Debug, clap::Subcommand)]
pub enum EvaluatorCommand {
    /// Sign an evaluation record (the JSON body, see docs/REPUTATION.md) with the evaluator
    /// key and submit it (needs an evaluator token bound to that key).
    #[command(
        after_help = "Example:\n  TRIBUTE_CLI_TOKEN=trb_… tribute evaluator submit eval.json --key evaluator.key"
    )]
    Submit {
        /// The JSON body.
        file: PathBuf,
        /// The evaluator's key file (64 hex digits, mode 0600; a provider may use its own).
        #[arg(long)]
        key: PathBuf,
    },
}

/// Runs one `tribute evaluator` command.
pub async fn run_evaluator(config: &CliConfig, cmd: EvaluatorCommand) -> Result<(), ClientError> {
    match cmd {
        EvaluatorCommand::Submit { file, key } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| bad(&file.display().to_string(), e))?;
            let input = EvaluationInput::from_json(&text)?;
            let key = ContributorKey::load(&key)?;
            let token = config.token.as_deref().ok_or_else(|| {
                ClientError::Config(
                    "an evaluator token is needed: set TRIBUTE_CLI_TOKEN or pass --token".into(),
                )
            })?;
            let channel = config.endpoint()?.connect().await?;
            let network = match config.network()? {
                Some(n) => n,
                None => daemon_network(channel.clone(), key.public()).await?,
            };
            let e = input.to_evaluation(key.public(), network, unix_now())?;
            let signed = Signed::sign(e, key.keypair(), &random_bytes()?)
                .map_err(|e| ClientError::Config(e.to_string()))?;
            let r = ReputationClient::with_interceptor(channel, Bearer::new(Some(token))?)
                .submit_evaluation(pb::SubmitEvaluationRequest {
                    signed_evaluation: signed.encode(),
                })
                .await
                .map_err(|s| ClientError::rpc("Reputation.SubmitEvaluation", &s))?
                .into_inner();
            println!(
                "{} evaluation {} ({} measurements)",
                if r.already_recorded { "already recorded:" } else { "recorded" },
                r.evaluation_id,
                r.measurements
            );
            Ok(())
        }
    }
}

/// The daemon's network, from an auth challenge (which needs no credentials).
async fn daemon_network(channel: Channel, key: PublicKey) -> Result<Network, ClientError> {
    const CALL: &str = "Auth.GetChallenge";
    let answer = AuthClient::new(channel)
        .get_challenge(pb::GetChallengeRequest { contributor_key: key.to_bytes().to_vec() })
        .await
        .map_err(|s| ClientError::rpc(CALL, &s))?
        .into_inner();
    AuthChallenge::decode(&answer.challenge)
        .map(|c| c.network)
        .map_err(|e| ClientError::protocol(CALL, format!("challenge does not decode: {e}")))
}

/// A contributor's own view: each of its datasets' reputation at `as_of` (0 = now) with
/// the contributions (and evaluation records) behind it.
pub async fn contributor_view(c: &Contributor, as_of: u64, json: bool) -> Result<(), ClientError> {
    let mut rep = ReputationClient::with_interceptor(c.channel(), Bearer::new(Some(c.token()))?);
    let list = rep
        .list_reputation(pb::ListReputationRequest {
            contributor_key: c.key().public().to_bytes().to_vec(),
            as_of,
        })
        .await
        .map_err(|s| ClientError::rpc("Reputation.ListReputation", &s))?
        .into_inner();
    let mut datasets = Vec::with_capacity(list.datasets.len());
    for d in &list.datasets {
        datasets.push(
            rep.get_reputation(pb::GetReputationRequest {
                dataset_hash: d.dataset_hash.clone(),
                as_of: list.as_of,
            })
            .await
            .map_err(|s| ClientError::rpc("Reputation.GetReputation", &s))?
            .into_inner(),
        );
    }
    let score = |s: &Option<pb::ReputationScore>| {
        s.as_ref().map(|s| {
            serde_json::json!({
                "score_ppb": s.score_ppb, "score": ppb_decimal(s.score_ppb),
                "half_width_ppb": s.half_width_ppb, "evaluations": s.evaluations,
                "measurements": s.measurements,
            })
        })
    };
    if json {
        let v = serde_json::json!({
            "as_of": list.as_of,
            "contributor_key": c.key().public().to_hex(),
            "overall": list.contributors.first().map(|k| score(&k.score)),
            "datasets": datasets.iter().map(|d| serde_json::json!({
                "dataset": hex::encode(&d.dataset_hash),
                "reputation": score(&d.score),
                "contributions": d.contributions.iter().map(|c| serde_json::json!({
                    "evaluation_id": c.evaluation_id, "model_id": c.model_id,
                    "attribution_version": c.attribution_version, "benchmark_id": c.benchmark_id,
                    "metric": c.metric, "method": c.method,
                    "evaluator_key": hex::encode(&c.evaluator_key), "evaluated_at": c.evaluated_at,
                    "contribution_ppb": c.contribution_ppb, "half_width_ppb": c.half_width_ppb,
                    "decay_ppb": c.decay_ppb,
                })).collect::<Vec<_>>(),
                "signed_evaluations": d.signed_evaluations.iter().map(hex::encode).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| bad("json", e))?);
        return Ok(());
    }
    println!("reputation of {} as of {}", c.key().public(), list.as_of);
    match list.contributors.first().and_then(|k| k.score.as_ref()) {
        Some(s) => println!("overall: {} ±{}", ppb_decimal(s.score_ppb), s.half_width_ppb),
        None => println!("overall: no evaluations yet"),
    }
    for d in &datasets {
        let s = d.score.unwrap_or_default();
        println!(
            "dataset {}: {} ±{} ppb ({} evaluations)",
            hex::encode(&d.dataset_hash),
            ppb_decimal(s.score_ppb),
            s.half_width_ppb,
            s.evaluations
        );
        for c in &d.contributions {
            println!(
                "  {} {} v{} {} {} by {}: {} ±{} ppb, decay {} ppb",
                c.evaluation_id,
                c.model_id,
                c.attribution_version,
                c.benchmark_id,
                c.method,
                hex::encode(&c.evaluator_key),
                ppb_decimal(c.contribution_ppb),
                c.half_width_ppb,
                c.decay_ppb
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"evaluation_id": "e-1", "model_id": "m", "attribution_version": 1,
        "benchmark_id": "mmlu", "benchmark_sha256": "0505050505050505050505050505050505050505050505050505050505050505",
        "metric": "accuracy", "higher_is_better": true, "full_score": 0.83,
        "datasets": [{"dataset": "0202020202020202020202020202020202020202020202020202020202020202", "method": "knn-shapley", "value": 0.12,
                      "samples": 1000, "ci_low": 0.10, "ci_high": 0.14},
                     {"dataset": "0101010101010101010101010101010101010101010101010101010101010101", "method": "leave-one-out", "ablation_score": 0.80}]}"#;

    #[test]
    fn the_agreed_json_becomes_a_canonical_record() {
        let key =
            PublicKey::from_hex("79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
                .expect("key");
        let e = EvaluationInput::from_json(BODY)
            .expect("parses")
            .to_evaluation(key, Network::Regtest, Timestamp(7))
            .expect("valid");
        assert_eq!(e.full_score, Score(830_000_000));
        assert_eq!(e.evaluated_at, Timestamp(7));
        assert_eq!(e.measurements[0].dataset, DatasetHash([1; 32]), "sorted");
        assert!(matches!(e.measurements[0].kind, MeasurementKind::LeaveOneOut { .. }));
        let bad_interval = BODY.replace("\"ci_low\": 0.10", "\"ci_low\": 0.13");
        let bad_interval = bad_interval.replace("\"ci_high\": 0.14", "\"ci_high\": 0.11");
        assert!(EvaluationInput::from_json(&bad_interval)
            .expect("parses")
            .to_evaluation(key, Network::Regtest, Timestamp(7))
            .is_err());
        assert_eq!(ppb_decimal(-36_144_578), "-0.036144578");
    }
}
