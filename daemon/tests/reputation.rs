//! Evaluation records and reputation against a real daemon over loopback gRPC: every
//! refusal names its code and reason and stores nothing; a resubmitted record is answered
//! idempotently and counts once; the reputation served equals the one recomputed from the
//! database file, also after a restart.

mod common;

use common::*;
use tonic::Code;
use tribute_channels::codec::Encode;
use tribute_channels::evaluation::{Evaluation, Measurement, MeasurementKind, Score};
use tribute_channels::ids::{BenchmarkId, EvaluationId, Label};
use tribute_channels::reputation::Params;
use tribute_channels::{DatasetHash, ModelId, Network, Signed, Timestamp};
use tribute_daemon::auth::Role;
use tribute_proto::v1 as pb;
use tribute_proto::v1::reputation_client::ReputationClient;
use tribute_proto::v1::ErrorReason;

const A: u64 = 41;
const B: u64 = 42;
/// The evaluator.
const E: u64 = 43;
/// A key that holds no evaluator token.
const F: u64 = 44;
const EVALUATED_AT: u64 = 1_780_000_000;
const AS_OF: u64 = EVALUATED_AT + 86_400;

fn score(x: f64) -> Score {
    Score::from_f64(x).expect("score")
}

fn loo(dataset: DatasetHash, ablation: f64) -> Measurement {
    Measurement { dataset, kind: MeasurementKind::LeaveOneOut { ablation_score: score(ablation) } }
}

fn shapley(dataset: DatasetHash, value: f64, low: f64, high: f64) -> Measurement {
    Measurement {
        dataset,
        kind: MeasurementKind::Valuation {
            method: Label::new("knn-shapley").expect("label"),
            value: score(value),
            samples: 1000,
            ci_low: score(low),
            ci_high: score(high),
        },
    }
}

fn record(id: &str, evaluator: u64, model: &str, version: u64, m: Vec<Measurement>) -> Evaluation {
    let mut e = Evaluation {
        network: Network::Regtest,
        evaluation_id: EvaluationId::new(id).expect("id"),
        evaluator_key: pubkey(evaluator),
        model_id: ModelId::new(model).expect("id"),
        attribution_version: version,
        benchmark_id: BenchmarkId::new("mmlu-mini").expect("id"),
        benchmark_sha256: [5; 32],
        metric: Label::new("accuracy").expect("label"),
        higher_is_better: true,
        evaluated_at: Timestamp(EVALUATED_AT),
        full_score: score(0.83),
        measurements: m,
    };
    e.canonicalize();
    e
}

fn sign(e: Evaluation, key: u64) -> Vec<u8> {
    Signed::sign(e, &keypair(key), &[4; 32]).expect("sign").encode()
}

async fn client(d: &TestDaemon, token: &str) -> ReputationClient<Authed> {
    ReputationClient::with_interceptor(d.channel().await, Bearer(Some(token.to_owned())))
}

async fn submit(
    c: &mut ReputationClient<Authed>,
    bytes: Vec<u8>,
) -> Result<pb::SubmitEvaluationResponse, tonic::Status> {
    c.submit_evaluation(pb::SubmitEvaluationRequest { signed_evaluation: bytes })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn evaluations_are_checked_stored_once_and_aggregated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = TestDaemon::start(dir.path()).await;
    setup_model(&d, "m", &[(A, 3), (B, 1)], 500_000).await;
    let evaluator = d.token_for(Role::Evaluator, Some(pubkey(E))).await;
    // Contributor A also holds an evaluator token for its own key.
    let self_evaluator = d.token_for(Role::Evaluator, Some(pubkey(A))).await;
    let mut ev = client(&d, &evaluator).await;

    let good = record(
        "eval-1",
        E,
        "m",
        1,
        vec![loo(dataset(A), 0.80), shapley(dataset(B), -0.01, -0.02, 0.0)],
    );
    let good_bytes = sign(good.clone(), E);

    // Every refusal: its code and reason, and nothing stored.
    let before = db_fingerprint(&d.db_path());
    let mut bad_sig = good_bytes.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    let mut bad_interval = good.clone();
    bad_interval.measurements[1] = shapley(dataset(B), -0.01, 0.0, 0.01);
    let cases: Vec<(&str, String, Vec<u8>, Code, ErrorReason)> = vec![
        (
            "bad signature",
            evaluator.clone(),
            bad_sig,
            Code::InvalidArgument,
            ErrorReason::BadSignature,
        ),
        (
            "unknown model",
            evaluator.clone(),
            sign(record("x1", E, "nope", 1, vec![loo(dataset(A), 0.8)]), E),
            Code::NotFound,
            ErrorReason::UnknownModel,
        ),
        (
            "unknown version",
            evaluator.clone(),
            sign(record("x2", E, "m", 2, vec![loo(dataset(A), 0.8)]), E),
            Code::NotFound,
            ErrorReason::UnknownAttributionVersion,
        ),
        (
            "dataset not in the attribution",
            evaluator.clone(),
            sign(record("x3", E, "m", 1, vec![loo(dataset(A), 0.8), loo(dataset(99), 0.8)]), E),
            Code::FailedPrecondition,
            ErrorReason::DatasetNotAttributed,
        ),
        (
            "malformed interval",
            evaluator.clone(),
            sign(bad_interval, E),
            Code::InvalidArgument,
            ErrorReason::MalformedInterval,
        ),
        (
            "provider without the evaluator role",
            d.provider_token.clone(),
            good_bytes.clone(),
            Code::PermissionDenied,
            ErrorReason::WrongRole,
        ),
        (
            "signed by a key without the role",
            evaluator.clone(),
            sign(record("x4", F, "m", 1, vec![loo(dataset(A), 0.8)]), F),
            Code::PermissionDenied,
            ErrorReason::EvaluatorNotAuthorized,
        ),
        (
            "evaluator scoring its own contributor's dataset",
            self_evaluator.clone(),
            sign(record("x5", A, "m", 1, vec![loo(dataset(A), 0.5), loo(dataset(B), 0.8)]), A),
            Code::PermissionDenied,
            ErrorReason::ConflictOfInterest,
        ),
    ];
    for (what, token, bytes, code, reason) in cases {
        let err = submit(&mut client(&d, &token).await, bytes).await.expect_err(what);
        assert_eq!(
            (err.code(), tribute_proto::error_reason(&err)),
            (code, Some(reason)),
            "{what}: {err:?}"
        );
        assert_eq!(db_fingerprint(&d.db_path()), before, "{what} stored something");
    }

    // Accepted once; the same bytes again are answered idempotently and write nothing.
    let first = submit(&mut ev, good_bytes.clone()).await.expect("accepted");
    assert_eq!(
        (first.evaluation_id.as_str(), first.already_recorded, first.measurements),
        ("eval-1", false, 2)
    );
    let stored = db_fingerprint(&d.db_path());
    assert_ne!(stored, before);
    let again = submit(&mut ev, good_bytes.clone()).await.expect("idempotent");
    assert!(again.already_recorded);
    assert_eq!(db_fingerprint(&d.db_path()), stored);
    // Signed again (another BIP340 aux randomness, so other signature bytes): the same
    // record, answered the same way.
    let resigned = Signed::sign(good.clone(), &keypair(E), &[8; 32]).expect("sign").encode();
    assert_ne!(resigned, good_bytes);
    assert!(submit(&mut ev, resigned).await.expect("idempotent").already_recorded);
    assert_eq!(db_fingerprint(&d.db_path()), stored);
    // Rerun later (only `evaluated_at` differs): the same evaluation; the first one stands.
    let rerun = Evaluation { evaluated_at: Timestamp(EVALUATED_AT + 3_600), ..good.clone() };
    assert!(submit(&mut ev, sign(rerun, E)).await.expect("idempotent").already_recorded);
    assert_eq!(db_fingerprint(&d.db_path()), stored);
    // The same id with other content is refused.
    let other = sign(record("eval-1", E, "m", 1, vec![loo(dataset(A), 0.70)]), E);
    let err = submit(&mut ev, other).await.expect_err("conflict");
    assert_eq!(
        (err.code(), tribute_proto::error_reason(&err)),
        (Code::AlreadyExists, Some(ErrorReason::ExistsWithDifferentContent))
    );
    assert_eq!(db_fingerprint(&d.db_path()), stored);

    // A second evaluation of A, on another benchmark.
    let second = record("eval-2", E, "m", 1, vec![shapley(dataset(A), 0.02, 0.01, 0.03)]);
    submit(&mut ev, sign(second.clone(), E)).await.expect("accepted");

    // What the daemon serves equals the aggregate of the records (each counted once).
    let expected = tribute_channels::reputation::aggregate(
        [&good, &second],
        |_, ds| {
            [(dataset(A), pubkey(A)), (dataset(B), pubkey(B))]
                .into_iter()
                .find(|(h, _)| h == ds)
                .map(|(_, k)| k)
        },
        Timestamp(AS_OF),
        &Params::DEFAULT,
    );
    let mut reader = client(&d, &d.accountant_token).await;
    let a = reader
        .get_reputation(pb::GetReputationRequest {
            dataset_hash: dataset(A).0.to_vec(),
            as_of: AS_OF,
        })
        .await
        .expect("get")
        .into_inner();
    let want_a = expected.datasets[&dataset(A)];
    let got_a = a.score.expect("score");
    assert_eq!(
        (got_a.score_ppb, got_a.half_width_ppb, got_a.evaluations, got_a.measurements),
        (want_a.score_ppb, want_a.half_width_ppb, 2, 2)
    );
    assert!(got_a.score_ppb > 0, "A helps the model");
    assert_eq!(a.contributor_key, pubkey(A).to_bytes().to_vec());
    let ids: Vec<&str> = a.contributions.iter().map(|c| c.evaluation_id.as_str()).collect();
    assert_eq!(ids, ["eval-1", "eval-2"]);
    assert_eq!(a.signed_evaluations[0], good_bytes, "the signed record behind the score");
    let b = reader
        .get_reputation(pb::GetReputationRequest {
            dataset_hash: dataset(B).0.to_vec(),
            as_of: AS_OF,
        })
        .await
        .expect("get")
        .into_inner();
    assert!(b.score.expect("score").score_ppb < 0, "B was measured to hurt the model");

    // The contributor's own view: its datasets only, with the evaluations behind them.
    let login_a = d.login(A).await;
    let own = client(&d, &login_a)
        .await
        .list_reputation(pb::ListReputationRequest {
            contributor_key: pubkey(A).to_bytes().to_vec(),
            as_of: AS_OF,
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(own.datasets.len(), 1);
    assert_eq!(own.datasets[0].dataset_hash, dataset(A).0.to_vec());
    assert_eq!(own.contributors.len(), 1);
    let listed = reader
        .list_reputation(pb::ListReputationRequest { contributor_key: vec![], as_of: AS_OF })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.datasets.len(), 2);

    // The report recomputed from the database file gives the same bits, also after a
    // restart (records are reloaded from their signed bytes).
    d.stop().await;
    let (from_file, records) = tribute_daemon::reputation::report_of_file(
        &d.db_path(),
        Timestamp(AS_OF),
        &Params::DEFAULT,
    )
    .expect("report");
    assert_eq!(records.len(), 2);
    assert_eq!(from_file.datasets, expected.datasets);
    assert_eq!(from_file.contributors, expected.contributors);
    let mut d = TestDaemon::start(dir.path()).await;
    let after = client(&d, &d.accountant_token)
        .await
        .list_reputation(pb::ListReputationRequest { contributor_key: vec![], as_of: AS_OF })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(after, listed);
    d.stop().await;
}

/// Verifies a receipt against its signed batch root; returns (attribution version,
/// shares by contributor key, pool).
async fn verified_receipt(d: &TestDaemon, id: &str) -> (u64, Vec<(Vec<u8>, u64)>, u64) {
    use tribute_channels::merkle::InclusionProof;
    use tribute_channels::receipt::{verify_receipt, Receipt, ReceiptBatchRoot};
    let proof = d
        .receipts(Some(&d.accountant_token))
        .await
        .get_receipt(pb::GetReceiptRequest { request_id: id.into() })
        .await
        .expect("receipt")
        .into_inner();
    let receipt = Receipt::decode(&proof.receipt_bytes).expect("receipt bytes");
    let inclusion = InclusionProof::decode(&proof.inclusion_proof).expect("proof bytes");
    let root = Signed::<ReceiptBatchRoot>::decode(&proof.signed_batch_root).expect("root bytes");
    verify_receipt(&receipt, &inclusion, &root).expect("receipt verifies against the signed root");
    let shown = proof.receipt.expect("receipt");
    let shares = shown.shares.iter().map(|s| (s.contributor_key.clone(), s.nsat)).collect();
    (shown.attribution_version, shares, shown.pool_nsat)
}

async fn attribution(d: &TestDaemon, model: &str, version: u64) -> pb::Attribution {
    d.registry(Some(&d.accountant_token))
        .await
        .get_attribution(pb::GetAttributionRequest { model_id: model.into(), version })
        .await
        .expect("attribution")
        .into_inner()
}

/// The exact split of `pool` by an attribution's per-contributor weights.
fn expected_shares(a: &pb::Attribution, pool: u64) -> Vec<(Vec<u8>, u64)> {
    let mut by_key: std::collections::BTreeMap<Vec<u8>, u64> = Default::default();
    for e in &a.entries {
        *by_key.entry(e.contributor_key.clone()).or_default() += e.weight;
    }
    let weights = tribute_channels::split::Weights::new(by_key.iter().map(|(k, w)| {
        (
            tribute_channels::PublicKey::from_bytes(k.clone().try_into().expect("32"))
                .expect("key"),
            *w,
        )
    }))
    .expect("weights");
    weights
        .split(tribute_channels::Nsat(u128::from(pool)))
        .into_iter()
        .map(|(k, n)| (k.to_bytes().to_vec(), u64::try_from(n.0).expect("fits")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn quality_weighted_payouts_follow_the_adjusted_weights_and_conserve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = TestDaemon::start(dir.path()).await;
    setup_model(&d, "q", &[(A, 3_000_000), (B, 1_000_000)], 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    let meter_n = |prefix: &'static str| {
        let d = &d;
        async move {
            let mut m = d.metering(Some(&d.provider_token)).await;
            for i in 0..5 {
                m.meter(usage_request(&format!("{prefix}-{i}"), "q", 1_000 + i, 37))
                    .await
                    .expect("meter");
            }
        }
    };
    meter_n("v1").await;

    // A helps; B hurts the model.
    let evaluator = d.token_for(Role::Evaluator, Some(pubkey(E))).await;
    let e = record(
        "q-eval",
        E,
        "q",
        1,
        vec![loo(dataset(A), 0.80), shapley(dataset(B), -0.30, -0.35, -0.25)],
    );
    submit(&mut client(&d, &evaluator).await, sign(e.clone(), E)).await.expect("accepted");

    // Policy v1: gain 2x, floor 10 %, cap 150 %.
    let policy = tribute_channels::reputation::QualityPolicy {
        gain_ppm: 2_000_000,
        floor_ppm: 100_000,
        cap_ppm: 1_500_000,
    };
    let apply = |policy_version: u32, p: tribute_channels::reputation::QualityPolicy| {
        let d = &d;
        async move {
            ReputationClient::with_interceptor(
                d.channel().await,
                Bearer(Some(d.provider_token.clone())),
            )
            .apply_quality_policy(pb::ApplyQualityPolicyRequest {
                model_id: "q".into(),
                policy_id: "quality".into(),
                policy_version,
                gain_ppm: p.gain_ppm,
                floor_ppm: p.floor_ppm,
                cap_ppm: p.cap_ppm,
                as_of: AS_OF,
            })
            .await
        }
    };
    // Bad clamps are refused and make no version.
    let before = db_fingerprint(&d.db_path());
    let err = apply(
        1,
        tribute_channels::reputation::QualityPolicy { floor_ppm: 2, cap_ppm: 1, ..policy },
    )
    .await
    .expect_err("bad clamps");
    assert_eq!(tribute_proto::error_reason(&err), Some(ErrorReason::InvalidQualityPolicy));
    assert_eq!(db_fingerprint(&d.db_path()), before);

    let v2 = apply(1, policy).await.expect("applied").into_inner();
    assert_eq!(v2.version, 2);
    let info = v2.quality_policy.clone().expect("names its policy");
    assert_eq!(
        (info.base_version, info.policy_id.as_str(), info.policy_version),
        (1, "quality", 1)
    );
    // The weights are exactly w · f(reputation) with f clamped.
    let rep = tribute_channels::reputation::aggregate(
        [&e],
        |_, ds| {
            [(dataset(A), pubkey(A)), (dataset(B), pubkey(B))]
                .into_iter()
                .find(|(h, _)| h == ds)
                .map(|(_, k)| k)
        },
        Timestamp(AS_OF),
        &Params::DEFAULT,
    );
    for (entry, (n, base)) in v2.entries.iter().zip([(A, 3_000_000u64), (B, 1_000_000)]) {
        assert_eq!(entry.dataset_hash, dataset(n).0.to_vec());
        let f = policy.factor_ppm(rep.datasets.get(&dataset(n)));
        assert_eq!(entry.quality_factor_ppm, f);
        assert_eq!(
            entry.weight,
            tribute_channels::reputation::QualityPolicy::adjusted_weight(base, f)
        );
    }
    assert!(v2.entries[0].quality_factor_ppm > 1_000_000, "A is weighted up");
    assert!(v2.entries[1].quality_factor_ppm < 1_000_000, "B is weighted down");
    // The same policy version again is idempotent.
    assert_eq!(apply(1, policy).await.expect("again").into_inner(), v2);

    // Metered splits follow the adjusted weights exactly.
    meter_n("v2").await;
    for i in 0..5 {
        let (version, shares, pool) = verified_receipt(&d, &format!("v2-{i}")).await;
        assert_eq!(version, 2);
        assert_eq!(shares, expected_shares(&v2, pool), "v2-{i}");
    }

    // Switching the policy makes a new version; earlier receipts still verify.
    let stricter = tribute_channels::reputation::QualityPolicy { floor_ppm: 500_000, ..policy };
    let v3 = apply(2, stricter).await.expect("applied").into_inner();
    assert_eq!(v3.version, 3);
    assert_eq!(v3.entries[1].quality_factor_ppm, 500_000, "B held at the new floor");
    meter_n("v3").await;
    for (prefix, version, attribution) in
        [("v1", 1, attribution(&d, "q", 1).await), ("v2", 2, v2.clone()), ("v3", 3, v3.clone())]
    {
        for i in 0..5 {
            let (v, shares, pool) = verified_receipt(&d, &format!("{prefix}-{i}")).await;
            assert_eq!(v, version);
            assert_eq!(shares, expected_shares(&attribution, pool), "{prefix}-{i}");
        }
    }
    drop(meter.meter(usage_request("v3-0", "q", 1_000, 37)).await.expect("idempotent"));

    // Conservation to the nsat, and the ledger reconciles (splits recomputed from the
    // versions, quality ones included), also after a restart.
    d.running().flush().await;
    d.stop().await;
    assert_eq!(db_total_accrued(&d.db_path()), db_total_pools(&d.db_path()));
    let report = tribute_daemon::reconcile::reconcile_file(&d.db_path()).expect("reconcile");
    assert!(report.is_clean(), "{:?}", report.failures);
    let d = TestDaemon::start(dir.path()).await;
    assert_eq!(attribution(&d, "q", 2).await, v2);
    assert_eq!(attribution(&d, "q", 3).await, v3);
    verified_receipt(&d, "v1-0").await;
    let mut d = d;
    d.stop().await;
}
