//! The authorization matrix: every RPC × {no credentials, provider, contributor on its own
//! channel, contributor on another's, accountant, operator, expired token, revoked token,
//! evaluator}
//! against the table committed in `docs/AUTHORIZATION.md`.
//!
//! A cell is `ok` when the call got past authentication and authorization (it may still
//! fail on its content: an empty request is enough to show the door is open), `denied` for
//! PERMISSION_DENIED, `unauth` for UNAUTHENTICATED, `hidden` for NOT_FOUND where the thing
//! exists but belongs to someone else.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tribute_channels::channel::ChannelState;
use tribute_channels::codec::Encode;
use tribute_channels::licence::Revocation;
use tribute_channels::{Signed, Timestamp};
use tribute_daemon::auth::Role;
use tribute_daemon::ledger::unix_now;
use tribute_daemon::lightning::ScriptedBackend;
use tribute_daemon::server::StartOptions;
use tribute_proto::v1 as pb;
use tribute_proto::v1::operator_client::OperatorClient;

const CALLERS: [&str; 9] = [
    "none",
    "provider",
    "contributor_own",
    "contributor_other",
    "accountant",
    "operator",
    "expired",
    "revoked",
    "evaluator",
];

/// Contributor A (the caller in the contributor columns) and B (the other one).
const A: u64 = 31;
const B: u64 = 32;
/// The evaluator's key.
const E: u64 = 33;

fn class(r: Result<(), tonic::Status>) -> &'static str {
    match r {
        Ok(()) => "ok",
        Err(s) => match s.code() {
            Code::Unauthenticated => "unauth",
            Code::PermissionDenied => "denied",
            Code::NotFound if s.message().contains("no such") => "hidden",
            _ => "ok",
        },
    }
}

/// The expected table: RPC → outcome per caller, from docs/AUTHORIZATION.md.
fn expected() -> Vec<(String, Vec<String>)> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/AUTHORIZATION.md"),
    )
    .expect("docs/AUTHORIZATION.md");
    doc.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect();
            (cells[0].clone(), cells[1..].to_vec())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_and_caller_matches_the_committed_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StartOptions {
        lightning: Some(Arc::new(ScriptedBackend::new())),
        ..StartOptions::default()
    };
    let d = TestDaemon::start_with_options(test_config(dir.path()), options).await;
    // A and B each have a channel; "ab" pays both, "b" pays only B.
    setup_model(&d, "ab", &[(A, 1), (B, 1)], 500_000).await;
    setup_model(&d, "b", &[(B, 1)], 500_000).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    meter.meter(usage_request("r-ab", "ab", 1_000, 10)).await.expect("meter");
    meter.meter(usage_request("r-b", "b", 1_000, 10)).await.expect("meter");
    d.running().flush().await;
    let channel_of = |n: u64| {
        let d = &d;
        async move {
            d.channels(Some(&d.operator_token))
                .await
                .get_channel(pb::GetChannelRequest {
                    contributor_key: pubkey(n).to_bytes().to_vec(),
                    channel_id: vec![],
                })
                .await
                .expect("channel")
                .into_inner()
        }
    };
    let (channel_a, channel_b) = (channel_of(A).await.channel_id, channel_of(B).await.channel_id);

    // A proof of equivocation on each channel (forged with the provider's key file).
    let provider = tribute_daemon::keys::load_or_create_keypair(
        &d.dir.join(tribute_daemon::server::files::PROVIDER_KEY),
    )
    .expect("provider key");
    let mut proofs = std::collections::HashMap::new();
    for n in [A, B] {
        let held = channel_of(n).await.latest_state.expect("state").signed_state;
        let mut forked = Signed::<ChannelState>::decode(&held).expect("state").message;
        forked.accrued_nsat.0 += 1;
        let received = Signed::sign(forked, &provider, &[9; 32]).expect("sign").encode();
        proofs.insert(
            n,
            pb::ReportMisbehaviourRequest { held_state: held, received_state: received },
        );
    }
    let now = Timestamp(unix_now());
    let expiring =
        d.running().tokens.create(Role::Operator, None, "x", Some(Timestamp(now.0 + 1)), now);
    let expired = expiring.expect("token").secret;
    let revoked = d.running().tokens.create(Role::Operator, None, "r", None, now).expect("token");
    d.running().tokens.revoke(&revoked.token_id, now).expect("revoke");
    let revoked = revoked.secret;
    let login_a = d.login(A).await;
    let evaluator = d.token_for(Role::Evaluator, Some(pubkey(E))).await;
    while unix_now() <= now.0 + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = |caller: &str| -> Option<String> {
        match caller {
            "none" => None,
            "provider" => Some(d.provider_token.clone()),
            "contributor_own" | "contributor_other" => Some(login_a.clone()),
            "accountant" => Some(d.accountant_token.clone()),
            "operator" => Some(d.operator_token.clone()),
            "expired" => Some(expired.clone()),
            "revoked" => Some(revoked.clone()),
            "evaluator" => Some(evaluator.clone()),
            _ => unreachable!("caller"),
        }
    };
    // The contributor a call is about: A itself, or B for "contributor_other" (operators and
    // others act on A's behalf, which their role allows or not).
    let subject = |caller: &str| if caller == "contributor_other" { B } else { A };

    let mut actual: Vec<(String, Vec<String>)> = Vec::new();
    macro_rules! row {
        ($name:expr, |$ch:ident, $who:ident| $call:expr) => {{
            let mut cells = Vec::new();
            for caller in CALLERS {
                let $who = subject(caller);
                let $ch = (d.channel().await, Bearer(token(caller)));
                let r: Result<(), tonic::Status> = $call;
                cells.push(class(r).to_owned());
            }
            actual.push(($name.to_owned(), cells));
        }};
    }
    use pb::auth_client::AuthClient as Au;
    use pb::channels_client::ChannelsClient as Ch;
    use pb::metering_client::MeteringClient as Me;
    use pb::receipts_client::ReceiptsClient as Re;
    use pb::registry_client::RegistryClient as Rg;
    let key = |n: u64| pubkey(n).to_bytes().to_vec();

    row!("Auth.GetChallenge", |c, w| Au::with_interceptor(c.0, c.1)
        .get_challenge(pb::GetChallengeRequest { contributor_key: key(w) })
        .await
        .map(drop));
    row!("Auth.Login", |c, w| Au::with_interceptor(c.0, c.1)
        .login(pb::LoginRequest { signed_challenge: vec![w as u8] })
        .await
        .map(drop));
    row!("Auth.WhoAmI", |c, _w| Au::with_interceptor(c.0, c.1)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map(drop));
    row!("Registry.RegisterContributor", |c, w| Rg::with_interceptor(c.0, c.1)
        .register_contributor(pb::RegisterContributorRequest {
            signed_registration: signed_registration(w),
        })
        .await
        .map(drop));
    row!("Registry.GetContributor", |c, w| Rg::with_interceptor(c.0, c.1)
        .get_contributor(pb::GetContributorRequest { contributor_key: key(w) })
        .await
        .map(drop));
    row!("Registry.RegisterLicence", |c, w| Rg::with_interceptor(c.0, c.1)
        .register_licence(pb::RegisterLicenceRequest { signed_licence: signed_licence(w, w) })
        .await
        .map(drop));
    row!("Registry.RevokeLicence", |c, w| {
        let revocation = Revocation {
            network: tribute_channels::Network::Regtest,
            dataset_hash: dataset(w),
            contributor_key: pubkey(w),
            licence_id: licence(w, w).id(),
            revoked_at: Timestamp(1_900_000_000),
        };
        let signed = Signed::sign(revocation, &keypair(w), &[3; 32]).expect("sign").encode();
        Rg::with_interceptor(c.0, c.1)
            .revoke_licence(pb::RevokeLicenceRequest { signed_revocation: signed })
            .await
            .map(drop)
    });
    row!("Registry.ListLicences", |c, w| Rg::with_interceptor(c.0, c.1)
        .list_licences(pb::ListLicencesRequest { contributor_key: key(w), dataset_hash: vec![] })
        .await
        .map(drop));
    row!("Registry.RegisterModel", |c, _w| Rg::with_interceptor(c.0, c.1)
        .register_model(pb::RegisterModelRequest::default())
        .await
        .map(drop));
    row!("Registry.GetModel", |c, _w| Rg::with_interceptor(c.0, c.1)
        .get_model(pb::GetModelRequest { model_id: "ab".into() })
        .await
        .map(drop));
    row!("Registry.ListModels", |c, _w| Rg::with_interceptor(c.0, c.1)
        .list_models(pb::ListModelsRequest {})
        .await
        .map(drop));
    row!("Registry.RegisterTrainingRun", |c, _w| Rg::with_interceptor(c.0, c.1)
        .register_training_run(pb::RegisterTrainingRunRequest::default())
        .await
        .map(drop));
    row!("Registry.GetAttribution", |c, _w| Rg::with_interceptor(c.0, c.1)
        .get_attribution(pb::GetAttributionRequest { model_id: "ab".into(), version: 0 })
        .await
        .map(drop));
    use pb::reputation_client::ReputationClient as Rp;
    row!("Reputation.SubmitEvaluation", |c, _w| Rp::with_interceptor(c.0, c.1)
        .submit_evaluation(pb::SubmitEvaluationRequest::default())
        .await
        .map(drop));
    row!("Reputation.GetReputation", |c, w| Rp::with_interceptor(c.0, c.1)
        .get_reputation(pb::GetReputationRequest { dataset_hash: dataset(w).0.to_vec(), as_of: 0 })
        .await
        .map(drop));
    row!("Reputation.ListReputation", |c, w| Rp::with_interceptor(c.0, c.1)
        .list_reputation(pb::ListReputationRequest { contributor_key: key(w), as_of: 0 })
        .await
        .map(drop));
    row!("Reputation.ApplyQualityPolicy", |c, _w| Rp::with_interceptor(c.0, c.1)
        .apply_quality_policy(pb::ApplyQualityPolicyRequest::default())
        .await
        .map(drop));
    row!("Metering.Meter", |c, _w| Me::with_interceptor(c.0, c.1)
        .meter(pb::MeterRequest::default())
        .await
        .map(drop));
    row!("Metering.MeterStream", |c, _w| Me::with_interceptor(c.0, c.1)
        .meter_stream(futures::stream::iter(Vec::<pb::MeterRequest>::new()))
        .await
        .map(drop));
    row!("Channels.SubscribeChannel", |c, w| Ch::with_interceptor(c.0, c.1)
        .subscribe_channel(pb::SubscribeChannelRequest {
            contributor_key: key(w),
            states_only: true
        })
        .await
        .map(drop));
    row!("Channels.GetChannel", |c, w| Ch::with_interceptor(c.0, c.1)
        .get_channel(pb::GetChannelRequest { contributor_key: key(w), channel_id: vec![] })
        .await
        .map(drop));
    row!("Channels.GetChannel by id", |c, w| Ch::with_interceptor(c.0, c.1)
        .get_channel(pb::GetChannelRequest {
            contributor_key: vec![],
            channel_id: if w == B { channel_b.clone() } else { channel_a.clone() },
        })
        .await
        .map(drop));
    row!("Channels.ListChannels", |c, _w| Ch::with_interceptor(c.0, c.1)
        .list_channels(pb::ListChannelsRequest {})
        .await
        .map(drop));
    row!("Channels.ReportMisbehaviour", |c, w| Ch::with_interceptor(c.0, c.1)
        .report_misbehaviour(proofs[&w].clone())
        .await
        .map(drop));
    row!("Receipts.GetReceipt", |c, w| Re::with_interceptor(c.0, c.1)
        .get_receipt(pb::GetReceiptRequest {
            request_id: if w == B { "r-b".into() } else { "r-ab".into() },
        })
        .await
        .map(drop));
    macro_rules! op {
        ($name:expr, $method:ident, $req:expr) => {
            row!($name, |c, _w| OperatorClient::with_interceptor(c.0, c.1)
                .$method($req)
                .await
                .map(drop))
        };
    }
    op!("Operator.GetNodeInfo", get_node_info, pb::GetNodeInfoRequest {});
    op!("Operator.NewOnchainAddress", new_onchain_address, pb::NewOnchainAddressRequest {});
    op!("Operator.GetOnchainBalance", get_onchain_balance, pb::GetOnchainBalanceRequest {});
    op!(
        "Operator.OpenLightningChannel",
        open_lightning_channel,
        pb::OpenLightningChannelRequest::default()
    );
    op!(
        "Operator.CloseLightningChannel",
        close_lightning_channel,
        pb::CloseLightningChannelRequest::default()
    );
    op!(
        "Operator.ListLightningChannels",
        list_lightning_channels,
        pb::ListLightningChannelsRequest {}
    );
    op!("Operator.SettleNow", settle_now, pb::SettleNowRequest {});
    op!(
        "Operator.SetSettlementPaused",
        set_settlement_paused,
        pb::SetSettlementPausedRequest { paused: false }
    );
    op!("Operator.ListSettlements", list_settlements, pb::ListSettlementsRequest::default());
    op!("Operator.CreateToken", create_token, pb::CreateTokenRequest::default());
    op!("Operator.ListTokens", list_tokens, pb::ListTokensRequest {});
    op!("Operator.RevokeToken", revoke_token, pb::RevokeTokenRequest::default());
    op!("Operator.Backup", backup, pb::BackupRequest {});

    let printed: Vec<String> =
        actual.iter().map(|(rpc, cells)| format!("| `{rpc}` | {} |", cells.join(" | "))).collect();
    let expected = expected();
    assert_eq!(
        actual,
        expected,
        "the authorization matrix differs from docs/AUTHORIZATION.md; the daemon answers:\n{}",
        printed.join("\n")
    );
    let mut d = d;
    d.stop().await;
}
