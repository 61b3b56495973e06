//! Licence rules, training-run validation, attribution vectors, registrations and login.

mod common;

use common::{keypair, pubkey};
use tribute_channels::attribution::{request_weights, AttributionError, AttributionVector};
use tribute_channels::auth::{AuthChallenge, AuthError};
use tribute_channels::codec::Encode;
use tribute_channels::licence::{Licence, LicenceProblem, Revocation, Use, Uses};
use tribute_channels::registration::{ContributorRegistration, RegistrationError};
use tribute_channels::training::{LicenceRecord, TrainingRun, TrainingRunError};
use tribute_channels::{DatasetHash, DecodeError, ModelId, Network, RunId, Signed, Timestamp};

const T0: u64 = 1_700_000_000;

fn licence(dataset: u8, owner: u64, uses: &[Use]) -> Licence {
    Licence {
        network: Network::Regtest,
        dataset_hash: DatasetHash([dataset; 32]),
        contributor_key: pubkey(owner),
        spdx_license_id: "MIT OR Apache-2.0".into(),
        uses: Uses::of(uses),
        not_before: Timestamp(T0),
        not_after: Timestamp(T0 + 1000),
        signed_at: Timestamp(T0),
    }
}

fn run(datasets: &[(u8, u64)], started: u64) -> TrainingRun {
    TrainingRun {
        network: Network::Regtest,
        run_id: RunId::new("r1").expect("id"),
        model_id: ModelId::new("m").expect("id"),
        provider_key: pubkey(1),
        started_at: Timestamp(started),
        finished_at: Timestamp(started + 10),
        datasets: datasets.iter().map(|(d, w)| (DatasetHash([*d; 32]), *w)).collect(),
    }
}

#[test]
fn licence_windows_uses_and_revocation() {
    let l = licence(1, 2, &[Use::Training]);
    let net = Network::Regtest;
    assert_eq!(l.allows(None, net, Use::Training, Timestamp(T0)), Ok(()));
    assert_eq!(l.allows(None, net, Use::Training, Timestamp(T0 + 1000)), Ok(()));
    assert_eq!(
        l.allows(None, net, Use::Training, Timestamp(T0 - 1)),
        Err(LicenceProblem::NotYetValid)
    );
    assert_eq!(
        l.allows(None, net, Use::Training, Timestamp(T0 + 1001)),
        Err(LicenceProblem::Expired)
    );
    assert_eq!(
        l.allows(None, net, Use::Retrieval, Timestamp(T0)),
        Err(LicenceProblem::UseNotPermitted(Use::Retrieval))
    );
    assert_eq!(
        l.allows(None, Network::Bitcoin, Use::Training, Timestamp(T0)),
        Err(LicenceProblem::WrongNetwork)
    );
    let late = Licence { signed_at: Timestamp(T0 + 5), ..l.clone() };
    assert_eq!(
        late.allows(None, net, Use::Training, Timestamp(T0 + 4)),
        Err(LicenceProblem::SignedAfterUse)
    );
    let rev = Revocation {
        network: net,
        dataset_hash: l.dataset_hash,
        contributor_key: l.contributor_key,
        licence_id: l.id(),
        revoked_at: Timestamp(T0 + 500),
    };
    assert_eq!(l.allows(Some(&rev), net, Use::Training, Timestamp(T0 + 499)), Ok(()));
    assert_eq!(
        l.allows(Some(&rev), net, Use::Training, Timestamp(T0 + 500)),
        Err(LicenceProblem::Revoked)
    );
    // A revocation of another licence does not touch this one.
    let other = Revocation { licence_id: [0; 32], ..rev };
    assert!(other.check_matches(&l).is_err());
    assert_eq!(l.allows(Some(&other), net, Use::Training, Timestamp(T0 + 600)), Ok(()));
}

#[test]
fn licence_form_is_checked_on_decode() {
    let mut bad = licence(1, 2, &[Use::Training]);
    bad.spdx_license_id = "MIT\n".into();
    assert!(bad.validate().is_err());
    assert!(Licence::decode(&bad.encode()).is_err());
    let mut bytes = licence(1, 2, &[Use::Training]).encode();
    // uses byte is right after version, network, hash, key, spdx (1 + len).
    let uses_at = 1 + 1 + 32 + 32 + 1 + "MIT OR Apache-2.0".len();
    bytes[uses_at] = 0;
    assert_eq!(Licence::decode(&bytes), Err(DecodeError::InvalidField("uses")));
    bytes[uses_at] = 4;
    assert_eq!(Licence::decode(&bytes), Err(DecodeError::InvalidField("uses")));
}

#[test]
fn training_run_names_every_offending_dataset() {
    let training = licence(1, 2, &[Use::Training]);
    let retrieval_only = licence(2, 3, &[Use::Retrieval]);
    let revoked = licence(3, 4, &[Use::Training]);
    let rev = Revocation {
        network: Network::Regtest,
        dataset_hash: revoked.dataset_hash,
        contributor_key: revoked.contributor_key,
        licence_id: revoked.id(),
        revoked_at: Timestamp(T0 + 5),
    };
    let signed_late = Licence { signed_at: Timestamp(T0 + 50), ..licence(5, 6, &[Use::Training]) };
    let lookup = |h: &DatasetHash| -> Vec<LicenceRecord<'_>> {
        match h.0[0] {
            1 => vec![LicenceRecord { licence: &training, revocation: None }],
            2 => vec![LicenceRecord { licence: &retrieval_only, revocation: None }],
            3 => vec![LicenceRecord { licence: &revoked, revocation: Some(&rev) }],
            5 => vec![LicenceRecord { licence: &signed_late, revocation: None }],
            _ => vec![],
        }
    };
    let r = run(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)], T0 + 10);
    r.validate().expect("well formed");
    let rejected = r.check_licences(lookup).expect_err("rejected");
    assert_eq!(
        rejected.offending,
        vec![
            (DatasetHash([2; 32]), LicenceProblem::UseNotPermitted(Use::Training)),
            (DatasetHash([3; 32]), LicenceProblem::Revoked),
            (DatasetHash([4; 32]), LicenceProblem::NotFound),
            (DatasetHash([5; 32]), LicenceProblem::SignedAfterUse),
        ]
    );
    // Before the revocation, and with only licensed datasets, the run is fine.
    assert_eq!(run(&[(1, 1), (3, 1)], T0 + 4).check_licences(lookup), Ok(()));
    // A second, valid licence for the same dataset is enough.
    let relicensed = licence(2, 3, &[Use::Training, Use::Retrieval]);
    let lookup2 = |h: &DatasetHash| -> Vec<LicenceRecord<'_>> {
        match h.0[0] {
            2 => vec![
                LicenceRecord { licence: &retrieval_only, revocation: None },
                LicenceRecord { licence: &relicensed, revocation: None },
            ],
            _ => vec![],
        }
    };
    assert_eq!(run(&[(2, 1)], T0 + 10).check_licences(lookup2), Ok(()));
}

#[test]
fn training_run_form() {
    assert_eq!(run(&[], T0).validate(), Err(TrainingRunError::DatasetCount));
    assert_eq!(run(&[(2, 1), (1, 1)], T0).validate(), Err(TrainingRunError::Unsorted));
    assert_eq!(run(&[(1, 1), (1, 2)], T0).validate(), Err(TrainingRunError::Unsorted));
    assert_eq!(run(&[(1, 0)], T0).validate(), Err(TrainingRunError::ZeroWeight));
    let mut r = run(&[(2, 1), (1, 1)], T0);
    r.canonicalize();
    assert_eq!(r.validate(), Ok(()));
    let mut backwards = run(&[(1, 1)], T0);
    backwards.finished_at = Timestamp(T0 - 1);
    assert_eq!(backwards.validate(), Err(TrainingRunError::FinishedBeforeStart));
    assert!(TrainingRun::decode(&backwards.encode()).is_err());
    // Signed by the provider, and only by it.
    let signed = Signed::sign(r.clone(), &keypair(1), &[0; 32]).expect("sign");
    assert!(signed.verify().is_ok());
    assert!(Signed::sign(r, &keypair(2), &[0; 32]).is_err());
}

#[test]
fn attribution_vectors_are_versioned_sums_per_contributor() {
    let model = ModelId::new("m").expect("id");
    // datasets 1 and 2 belong to contributor 2, dataset 3 to contributor 3.
    let owner = |h: &DatasetHash| match h.0[0] {
        1 | 2 => Some(pubkey(2)),
        3 => Some(pubkey(3)),
        _ => None,
    };
    let runs = [run(&[(1, 5), (3, 10)], T0), run(&[(2, 5), (3, 10)], T0 + 100)];
    let v = AttributionVector::derive(model.clone(), &runs, owner).expect("derive");
    assert_eq!(v.version, 2);
    let w = v.contributor_weights().expect("weights");
    let mut expect = [(pubkey(2), 10u64), (pubkey(3), 20)];
    expect.sort();
    assert_eq!(w.entries(), &expect[..]);
    let v1 = AttributionVector::empty(model.clone()).with_run(&runs[0], owner).expect("v1");
    assert_eq!(v1.version, 1);
    assert_eq!(
        AttributionVector::empty(model).with_run(&run(&[(9, 1)], T0), owner),
        Err(AttributionError::UnknownDataset(DatasetHash([9; 32])))
    );
    let overflow = [run(&[(1, u64::MAX)], T0), run(&[(1, 1)], T0)];
    assert_eq!(
        AttributionVector::derive(ModelId::new("m").expect("id"), &overflow, owner),
        Err(AttributionError::WeightOverflow)
    );
    // Per-request attribution goes through the same owner mapping.
    let w =
        request_weights(&[(DatasetHash([1; 32]), 1), (DatasetHash([2; 32]), 2)], owner).expect("w");
    assert_eq!(w.entries(), &[(pubkey(2), 3)]);
    assert_eq!(
        request_weights(&[(DatasetHash([1; 32]), 1), (DatasetHash([1; 32]), 2)], owner),
        Err(AttributionError::DuplicateDataset(DatasetHash([1; 32])))
    );
}

#[test]
fn registration_needs_a_valid_destination() {
    let mut reg = ContributorRegistration {
        network: Network::Regtest,
        contributor_key: pubkey(2),
        node_id: None,
        bolt12_offer: None,
        registered_at: Timestamp(T0),
    };
    assert_eq!(reg.validate(), Err(RegistrationError::NoPayoutDestination));
    reg.node_id = Some([0x05; 33]);
    assert_eq!(reg.validate(), Err(RegistrationError::BadNodeId));
    reg.node_id = None;
    reg.bolt12_offer = Some("lnbc1xyz".into());
    assert_eq!(reg.validate(), Err(RegistrationError::BadOffer));
    reg.bolt12_offer = Some("lno1qqqq".into());
    assert_eq!(reg.validate(), Ok(()));
    assert_eq!(ContributorRegistration::decode(&reg.encode()), Ok(reg));
}

#[test]
fn login_answers_are_bound_to_their_challenge() {
    let challenge = AuthChallenge {
        network: Network::Regtest,
        audience: pubkey(1),
        contributor_key: pubkey(2),
        nonce: [7; 32],
        issued_at: Timestamp(T0),
        expires_at: Timestamp(T0 + 60),
    };
    let answer = Signed::sign(challenge.clone(), &keypair(2), &[0; 32]).expect("sign");
    assert_eq!(challenge.check_answer(&answer, Timestamp(T0 + 1)), Ok(pubkey(2)));
    assert_eq!(challenge.check_answer(&answer, Timestamp(T0 + 61)), Err(AuthError::Expired));
    let other = AuthChallenge { nonce: [8; 32], ..challenge.clone() };
    let replayed = Signed::sign(other, &keypair(2), &[0; 32]).expect("sign");
    assert_eq!(
        challenge.check_answer(&replayed, Timestamp(T0 + 1)),
        Err(AuthError::ChallengeMismatch)
    );
    let mut forged = answer;
    forged.signature = replayed.signature;
    assert_eq!(challenge.check_answer(&forged, Timestamp(T0 + 1)), Err(AuthError::BadSignature));
}
