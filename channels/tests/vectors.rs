//! Committed test vectors for every signed message type (`tests/vectors/signed.json`):
//! secret key, aux randomness, the message, its canonical bytes, the tagged digest and the
//! BIP340 signature. Any change to an encoding or a tag breaks this test.
//!
//! Regenerate (only for a deliberate format change, with a new version number):
//! `TRIBUTE_UPDATE_VECTORS=1 cargo test -p tribute-channels --test vectors`.

mod common;

use bitcoin::secp256k1::{self, schnorr};
use common::{keypair, pubkey};
use serde::{Deserialize, Serialize};
use tribute_channels::auth::AuthChallenge;
use tribute_channels::channel::{derive_channel_id, ChannelState, ChannelStatus};
use tribute_channels::codec::Encode;
use tribute_channels::evaluation::{Evaluation, Measurement, MeasurementKind, Score};
use tribute_channels::ids::{BenchmarkId, EvaluationId, Label};
use tribute_channels::licence::{Licence, Revocation, Use, Uses};
use tribute_channels::receipt::ReceiptBatchRoot;
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::sign::{secp, tagged_hash, Message, Signed, ALL_TAGS};
use tribute_channels::training::TrainingRun;
use tribute_channels::{DatasetHash, ModelId, Msat, Network, Nsat, RunId, Timestamp};

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Vector {
    kind: String,
    tag: String,
    secret_key: String,
    aux_rand: String,
    message: String,
    bytes: String,
    digest: String,
    signature: String,
}

const AUX: [u8; 32] = [0x42; 32];

fn vector<M: Message + std::fmt::Debug>(kind: &str, signer_n: u64, m: M) -> Vector {
    let kp = keypair(signer_n);
    let bytes = m.encode();
    let digest = m.signing_digest();
    let message = format!("{m:?}");
    let signed = Signed::sign(m, &kp, &AUX).expect("signer matches");
    // Round trip through the wire form, and verification.
    let decoded = Signed::<M>::decode_verified(&signed.encode()).expect("round trip");
    assert_eq!(decoded.message.encode(), bytes);
    Vector {
        kind: kind.into(),
        tag: M::TAG.into(),
        secret_key: hex::encode(kp.secret_bytes()),
        aux_rand: hex::encode(AUX),
        message,
        bytes: hex::encode(&bytes),
        digest: hex::encode(digest),
        signature: hex::encode(signed.signature.as_ref()),
    }
}

fn all_vectors() -> Vec<Vector> {
    let contributor = pubkey(2);
    let provider = pubkey(1);
    let dataset = DatasetHash([0x11; 32]);
    let licence = Licence {
        network: Network::Regtest,
        dataset_hash: dataset,
        contributor_key: contributor,
        spdx_license_id: "CC-BY-4.0".into(),
        uses: Uses::of(&[Use::Training, Use::Retrieval]),
        not_before: Timestamp(1_700_000_000),
        not_after: Timestamp::MAX,
        signed_at: Timestamp(1_700_000_000),
    };
    let channel_id = derive_channel_id(&provider, &contributor, &[0x33; 32]);
    vec![
        vector(
            "contributor-registration",
            2,
            ContributorRegistration {
                network: Network::Regtest,
                contributor_key: contributor,
                node_id: Some({
                    let mut id = [0x02; 33];
                    id[1..].copy_from_slice(&contributor.to_bytes());
                    id
                }),
                bolt12_offer: Some(
                    "lno1qgsqvgnwgcg35z6ee2h3yczraddm72xrfua9uve2rlrm9deu7xyfzr".into(),
                ),
                registered_at: Timestamp(1_700_000_001),
            },
        ),
        vector("licence", 2, licence.clone()),
        vector(
            "licence-revocation",
            2,
            Revocation {
                network: Network::Regtest,
                dataset_hash: dataset,
                contributor_key: contributor,
                licence_id: licence.id(),
                revoked_at: Timestamp(1_800_000_000),
            },
        ),
        vector(
            "training-run",
            1,
            TrainingRun {
                network: Network::Regtest,
                run_id: RunId::new("run-1").expect("id"),
                model_id: ModelId::new("model-a").expect("id"),
                provider_key: provider,
                started_at: Timestamp(1_700_000_100),
                finished_at: Timestamp(1_700_003_700),
                datasets: vec![(dataset, 3), (DatasetHash([0x22; 32]), 1)],
            },
        ),
        vector(
            "channel-state",
            1,
            ChannelState {
                network: Network::Regtest,
                channel_id,
                provider_key: provider,
                seq: 7,
                accrued_nsat: Nsat(12_345_678_901),
                settled_msat: Msat(12_000),
                last_settlement_hash: [0x44; 32],
                status: ChannelStatus::Active,
            },
        ),
        vector(
            "receipt-batch",
            1,
            ReceiptBatchRoot {
                network: Network::Regtest,
                provider_key: provider,
                batch_seq: 9,
                receipt_count: 1000,
                merkle_root: [0x55; 32],
            },
        ),
        vector(
            "evaluation",
            3,
            Evaluation {
                network: Network::Regtest,
                evaluation_id: EvaluationId::new("eval-1").expect("id"),
                evaluator_key: pubkey(3),
                model_id: ModelId::new("model-a").expect("id"),
                attribution_version: 1,
                benchmark_id: BenchmarkId::new("bench-1").expect("id"),
                benchmark_sha256: [0x77; 32],
                metric: Label::new("accuracy").expect("label"),
                higher_is_better: true,
                evaluated_at: Timestamp(1_700_000_200),
                full_score: Score(830_000_000),
                measurements: vec![
                    Measurement {
                        dataset,
                        kind: MeasurementKind::LeaveOneOut { ablation_score: Score(800_000_000) },
                    },
                    Measurement {
                        dataset: DatasetHash([0x22; 32]),
                        kind: MeasurementKind::Valuation {
                            method: Label::new("knn-shapley").expect("label"),
                            value: Score(-12_000_000),
                            samples: 1000,
                            ci_low: Score(-20_000_000),
                            ci_high: Score(-4_000_000),
                        },
                    },
                ],
            },
        ),
        vector(
            "auth-challenge",
            2,
            AuthChallenge {
                network: Network::Regtest,
                audience: provider,
                contributor_key: contributor,
                nonce: [0x66; 32],
                issued_at: Timestamp(1_700_000_000),
                expires_at: Timestamp(1_700_000_060),
            },
        ),
    ]
}

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/signed.json");

#[test]
fn vectors_match_the_committed_file() {
    let vectors = all_vectors();
    if std::env::var_os("TRIBUTE_UPDATE_VECTORS").is_some() {
        let json = serde_json::to_string_pretty(&vectors).expect("json");
        std::fs::write(PATH, json + "\n").expect("write vectors");
    }
    let committed: Vec<Vector> =
        serde_json::from_str(&std::fs::read_to_string(PATH).expect("vectors file")).expect("parse");
    assert_eq!(committed.len(), ALL_TAGS.len(), "one vector per signed message type");
    assert_eq!(committed, vectors);
}

#[test]
fn committed_signatures_verify_only_under_their_own_tag() {
    let committed: Vec<Vector> =
        serde_json::from_str(&std::fs::read_to_string(PATH).expect("vectors file")).expect("parse");
    for v in &committed {
        let bytes = hex::decode(&v.bytes).expect("hex");
        let sig =
            schnorr::Signature::from_slice(&hex::decode(&v.signature).expect("hex")).expect("sig");
        let sk = secp256k1::SecretKey::from_slice(&hex::decode(&v.secret_key).expect("hex"))
            .expect("sk");
        let (xonly, _) = sk.x_only_public_key(secp());
        assert_eq!(hex::encode(tagged_hash(&v.tag, &bytes)), v.digest, "{}", v.kind);
        for tag in ALL_TAGS {
            let digest = secp256k1::Message::from_digest(tagged_hash(tag, &bytes));
            let ok = secp().verify_schnorr(&sig, &digest, &xonly).is_ok();
            assert_eq!(ok, *tag == v.tag, "{} signature under tag {tag}", v.kind);
        }
    }
}
