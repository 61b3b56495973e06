//! The settlement saga over the scripted Lightning backend (fault injection): real daemon,
//! real gRPC, real SQLite; only the Lightning node is scripted. What is checked each time:
//! every contributor is paid exactly `floor(accrued) - settled` msat exactly once, the
//! preimage hashes to the payment hash recorded in the settlement and in the signed state,
//! sub-msat remainders stay in the channels, and `Σ pools == Σ accrued == Σ (settled +
//! outstanding)` to the nsat.

mod common;

use common::*;
use ldk_node::bitcoin::hashes::{sha256, Hash};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tribute_channels::channel::{ChannelParams, ChannelState, PayeeChannel};
use tribute_channels::codec::Encode;
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::{Network, PublicKey, Signed, Timestamp};
use tribute_daemon::config::Config;
use tribute_daemon::lightning::{
    AttemptRequest, DynLightningBackend, FailureReason, Resolution, ScriptStep, ScriptedBackend,
};
use tribute_daemon::server::StartOptions;
use tribute_daemon::settlement::{
    list_settlements, preimage_of, EngineOptions, FaultPoint, SettlementRow, TLV_CHANNEL_ID,
    TLV_SETTLEMENT_ID, TLV_STATE_SEQ,
};
use tribute_proto::v1 as pb;

const MODEL: &str = "llm-s";
const OWNERS: [(u64, u64); 3] = [(31, 5), (32, 3), (33, 2)];

fn config(dir: &std::path::Path) -> Config {
    let mut c = test_config(dir);
    // Only the operator's "settle now" (or a failure's retry) starts settlements here.
    c.settlement.settle_every_secs = 86_400;
    c.settlement.settle_threshold_msat = 1_000_000_000;
    c.settlement.max_outstanding_msat = 1_000_000_000;
    c.settlement.min_payout_msat = 1;
    c
}

fn options(backend: &Arc<ScriptedBackend>, fault: Option<FaultPoint>) -> StartOptions {
    StartOptions {
        lightning: Some(backend.clone() as DynLightningBackend),
        settlement: EngineOptions {
            tick: Duration::from_millis(50),
            poll_interval: Duration::from_millis(10),
            round_patience: Duration::from_secs(2),
            failure_backoff: Duration::from_secs(1),
            max_in_flight: 8,
            fault,
        },
    }
}

async fn meter_some(d: &TestDaemon, prefix: &str, n: u64) {
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..n {
        meter
            .meter(usage_request(&format!("{prefix}-{i}"), MODEL, 10_000 + i * 37, 5_000 + i))
            .await
            .expect("meter");
    }
}

async fn channels(d: &TestDaemon) -> Vec<pb::Channel> {
    let mut c = d.channels(Some(&d.operator_token)).await;
    c.list_channels(pb::ListChannelsRequest {}).await.expect("list").into_inner().channels
}

fn settlements(d: &TestDaemon) -> Vec<SettlementRow> {
    let conn = rusqlite::Connection::open(d.db_path()).expect("open");
    list_settlements(&conn, "ORDER BY settlement_id", []).expect("settlements")
}

fn secret(d: &TestDaemon) -> [u8; 32] {
    tribute_daemon::keys::load_or_create_secret(&d.dir.join("settlement.secret")).expect("secret")
}

/// `Σ pools == Σ accrued == Σ (settled + outstanding)`, to the nsat, from the API.
async fn check_conservation(d: &TestDaemon) {
    let chans = channels(d).await;
    let accrued: u128 = chans.iter().map(|c| c.accrued_nsat.parse::<u128>().expect("n")).sum();
    let settled_plus_outstanding: u128 = chans
        .iter()
        .map(|c| {
            u128::from(c.settled_msat) * 1_000_000 + c.outstanding_nsat.parse::<u128>().expect("n")
        })
        .sum();
    assert_eq!(accrued, db_total_pools(&d.db_path()));
    assert_eq!(settled_plus_outstanding, accrued);
}

/// Every succeeded settlement: paid once, its preimage hashes to its payment hash, its
/// amount is what the backend sent, and the channel's signed state carries it.
fn check_paid_once(d: &TestDaemon, backend: &ScriptedBackend) {
    let sent = backend.sent_payments();
    for s in settlements(d).iter().filter(|s| s.status == "succeeded") {
        let preimage = s.preimage.expect("preimage");
        let hash = sha256::Hash::hash(&preimage).to_byte_array();
        assert_eq!(Some(hash), s.payment_hash, "settlement {}", s.settlement_id);
        let id = s.payment_id.expect("payment id");
        let paid: Vec<_> = sent.iter().filter(|p| p.payment_id.0 == id).collect();
        assert_eq!(paid.len(), 1, "settlement {} paid {} times", s.settlement_id, paid.len());
        assert_eq!(paid[0].amount_msat, s.amount_msat);
        assert_eq!(backend.times_paid(&tribute_daemon::lightning::PaymentId(id)), 1);
    }
    // Nothing was paid that no settlement accounts for.
    let ids: Vec<[u8; 32]> = settlements(d).iter().filter_map(|s| s.payment_id).collect();
    assert!(sent.iter().all(|p| ids.contains(&p.payment_id.0)), "a payment outside the ledger");
}

/// The latest signed state of `n`'s channel, checked by a payee.
async fn latest_state(d: &TestDaemon, n: u64) -> ChannelState {
    let mut c = d.channels(Some(&d.operator_token)).await;
    let ch = c
        .get_channel(pb::GetChannelRequest {
            contributor_key: pubkey(n).to_bytes().to_vec(),
            channel_id: vec![],
        })
        .await
        .expect("channel")
        .into_inner();
    let signed = Signed::<ChannelState>::decode(&ch.latest_state.expect("state").signed_state)
        .expect("decodes");
    let params = ChannelParams {
        network: Network::Regtest,
        provider_key: d.running().provider_key,
        contributor_key: pubkey(n),
        nonce: ch.nonce.as_slice().try_into().expect("nonce"),
    };
    PayeeChannel::new(&params)
        .accept(signed)
        .expect("payee accepts")
        .latest()
        .expect("latest")
        .message
}

#[tokio::test(flavor = "multi_thread")]
async fn a_round_pays_each_contributor_its_whole_msat_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::new());
    let d = TestDaemon::start_with_options(config(dir.path()), options(&backend, None)).await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    meter_some(&d, "a", 120).await;
    d.running().flush().await;
    let before: HashMap<Vec<u8>, pb::Channel> =
        channels(&d).await.into_iter().map(|c| (c.contributor_key.clone(), c)).collect();

    d.running().settlement.settle_now_and_wait().await;

    let rows = settlements(&d);
    assert_eq!(rows.len(), OWNERS.len(), "{rows:?}");
    let secret = secret(&d);
    for (n, _) in OWNERS {
        let key = pubkey(n);
        let ch = &before[&key.to_bytes().to_vec()];
        let accrued: u128 = ch.accrued_nsat.parse().expect("n");
        let owed = u64::try_from(accrued / 1_000_000).expect("fits");
        let row = rows.iter().find(|r| r.contributor_key == key).expect("settled");
        assert_eq!(row.status, "succeeded");
        assert_eq!(row.amount_msat, owed);
        // The keysend: derived preimage, TLVs naming settlement, channel and seq.
        let attempt = backend
            .attempts()
            .into_iter()
            .find_map(|a| match a.request {
                AttemptRequest::Keysend(k)
                    if k.preimage
                        == preimage_of(&secret, &d.running().provider_key, row.settlement_id) =>
                {
                    Some(k)
                }
                _ => None,
            })
            .expect("keysend with the derived preimage");
        assert_eq!(attempt.amount_msat, owed);
        let tlv = |t| attempt.custom_tlvs.iter().find(|(ty, _)| *ty == t).map(|(_, v)| v.clone());
        assert_eq!(tlv(TLV_SETTLEMENT_ID), Some(row.settlement_id.to_be_bytes().to_vec()));
        assert_eq!(tlv(TLV_CHANNEL_ID), Some(row.channel_id.0.to_vec()));
        assert_eq!(tlv(TLV_STATE_SEQ), Some(row.state_seq.to_be_bytes().to_vec()));
        // The signed state carries the payment; the sub-msat remainder stays owed.
        let state = latest_state(&d, n).await;
        assert_eq!(state.settled_msat.0, owed);
        assert_eq!(Some(state.last_settlement_hash), row.payment_hash);
        assert_eq!(Some(state.seq), row.settled_state_seq);
        assert_eq!(state.accrued_nsat.0 - u128::from(owed) * 1_000_000, accrued % 1_000_000);
    }
    check_paid_once(&d, &backend);
    check_conservation(&d).await;

    // Nothing more is owed in whole msat: another round pays nothing.
    d.running().settlement.settle_now_and_wait().await;
    assert_eq!(settlements(&d).len(), OWNERS.len());
    // More metering, another round: each pays the new whole msat only.
    meter_some(&d, "b", 80).await;
    d.running().settlement.settle_now_and_wait().await;
    assert_eq!(
        settlements(&d).iter().filter(|s| s.status == "succeeded").count(),
        2 * OWNERS.len()
    );
    for (n, _) in OWNERS {
        let state = latest_state(&d, n).await;
        assert_eq!(u128::from(state.settled_msat.0), state.accrued_nsat.0 / 1_000_000);
    }
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
}

/// Timeouts that turn out to have succeeded or failed, a refusal, the node down: every
/// amount is paid once in the end and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn faults_never_pay_twice_and_the_owed_amount_is_paid_in_the_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::with_script([
        ScriptStep::timeout_then_success(),
        ScriptStep::timeout_then_failure(),
        ScriptStep::refused(),
    ]));
    backend.set_pending_polls(3);
    let d = TestDaemon::start_with_options(config(dir.path()), options(&backend, None)).await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    meter_some(&d, "f", 60).await;
    d.running().settlement.settle_now_and_wait().await;
    // A definite failure is final for its settlement (the retry is a new one), so this
    // holds however soon the retries come.
    let rows = settlements(&d);
    assert!(rows.iter().any(|s| s.status == "succeeded"), "{rows:?}");
    assert_eq!(rows.iter().filter(|s| s.status == "failed").count(), 2, "{rows:?}");
    check_paid_once(&d, &backend);
    check_conservation(&d).await;

    // The two failed amounts stay owed and are retried after the backoff, under new ids.
    wait_until(|| settlements(&d).iter().filter(|s| s.status == "succeeded").count() == 3).await;
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
    for (n, _) in OWNERS {
        let state = latest_state(&d, n).await;
        assert_eq!(u128::from(state.settled_msat.0), state.accrued_nsat.0 / 1_000_000);
    }

    // The node goes away: intents stay pending, nothing is paid twice when it is back.
    backend.set_available(false);
    meter_some(&d, "g", 30).await;
    d.running().settlement.settle_now_and_wait().await;
    assert!(settlements(&d).iter().any(|s| s.status == "pending"));
    backend.set_available(true);
    wait_until(|| settlements(&d).iter().all(|s| s.status != "pending")).await;
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "condition not reached in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A crash (the engine stopping dead at a fault point, then the daemon stopping) between
/// intent and payment, between payment and finalize, and before finalize: after a restart
/// on the same database and the same node, each settlement is paid exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_the_saga_pays_exactly_once_after_restart() {
    for (i, fault) in [
        FaultPoint::AfterIntent,
        FaultPoint::AfterPay,
        FaultPoint::BeforeFinalize,
        FaultPoint::DuringFinalize,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = Arc::new(ScriptedBackend::new());
        if fault == FaultPoint::AfterPay {
            // Still in flight when the process dies; it completes while it is down.
            backend.push_steps([
                ScriptStep::Pending(Resolution::Succeed),
                ScriptStep::Pending(Resolution::Succeed),
                ScriptStep::Pending(Resolution::Succeed),
            ]);
            backend.set_pending_polls(1);
        }
        let mut d =
            TestDaemon::start_with_options(config(dir.path()), options(&backend, Some(fault)))
                .await;
        setup_model(&d, MODEL, &OWNERS, 700_000).await;
        meter_some(&d, &format!("c{i}"), 50).await;
        d.running().settlement.settle_now_and_wait().await;
        let rows = settlements(&d);
        assert!(rows.iter().all(|s| s.status == "pending"), "{fault:?}: {rows:?}");
        let sent_before = backend.sent_payments().len();
        match fault {
            FaultPoint::AfterIntent => {
                assert_eq!(backend.attempts().len(), 0, "nothing handed over")
            }
            _ => assert!(!backend.attempts().is_empty()),
        }
        d.stop().await;

        let d = TestDaemon::start_with_options(config(dir.path()), options(&backend, None)).await;
        wait_until(|| settlements(&d).iter().all(|s| s.status == "succeeded")).await;
        assert_eq!(
            settlements(&d).len(),
            OWNERS.len(),
            "{fault:?}: no new settlement before recovery"
        );
        assert!(sent_before <= OWNERS.len());
        assert_eq!(backend.sent_payments().len(), OWNERS.len(), "{fault:?}");
        check_paid_once(&d, &backend);
        check_conservation(&d).await;
        for (n, _) in OWNERS {
            let state = latest_state(&d, n).await;
            assert_eq!(
                u128::from(state.settled_msat.0),
                state.accrued_nsat.0 / 1_000_000,
                "{fault:?}"
            );
        }
    }
}

/// A contributor that registered a BOLT12 offer is paid through it, in two rounds.
#[tokio::test(flavor = "multi_thread")]
async fn a_contributor_with_an_offer_is_paid_through_it_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::new());
    let d = TestDaemon::start_with_options(config(dir.path()), options(&backend, None)).await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    // A regtest offer: the daemon refuses offers for another chain at registration.
    let node = ldk_node::bitcoin::secp256k1::PublicKey::from_keypair(&keypair(34));
    let offer = ldk_node::lightning::offers::offer::OfferBuilder::new(node)
        .chain(ldk_node::bitcoin::Network::Regtest)
        .build()
        .expect("offer")
        .to_string();
    let reg = ContributorRegistration {
        network: Network::Regtest,
        contributor_key: pubkey(33),
        node_id: None,
        bolt12_offer: Some(offer.clone()),
        registered_at: Timestamp(1_700_000_100),
    };
    let mut op = d.registry(Some(&d.operator_token)).await;
    op.register_contributor(pb::RegisterContributorRequest {
        signed_registration: Signed::sign(reg, &keypair(33), &[3; 32]).expect("sign").encode(),
    })
    .await
    .expect("newer registration with an offer");
    for round in 0..2 {
        meter_some(&d, &format!("o{round}"), 40).await;
        d.running().settlement.settle_now_and_wait().await;
    }
    let key: PublicKey = pubkey(33);
    let offer_rows: Vec<SettlementRow> =
        settlements(&d).into_iter().filter(|s| s.contributor_key == key).collect();
    assert_eq!(offer_rows.len(), 2);
    assert!(offer_rows.iter().all(|s| s.method == "bolt12" && s.status == "succeeded"));
    let offer_attempts = backend
        .attempts()
        .into_iter()
        .filter(|a| matches!(&a.request, AttemptRequest::Offer(o) if o.offer == offer))
        .count();
    assert_eq!(offer_attempts, 2);
    let state = latest_state(&d, 33).await;
    assert_eq!(Some(state.last_settlement_hash), offer_rows[1].payment_hash);
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
}

/// Three contributors paid to one node: the node takes one payout, then gives up on it
/// with `RouteNotFound` (the first hop refused the HTLC: the channel is full of our other
/// payouts to that node). Nothing of it is in flight, so it is sent again in the same round
/// under the same id and preimage, and every payout succeeds once. (With the contributors
/// on three nodes the same failure is final: `faults_never_pay_twice_…`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_payout_the_full_channel_failed_is_sent_again_in_the_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::with_script([
        ScriptStep::Pending(Resolution::Succeed),
        ScriptStep::Pending(Resolution::Fail(FailureReason::RouteNotFound)),
        ScriptStep::Pending(Resolution::Succeed),
    ]));
    backend.set_pending_polls(3);
    let d = TestDaemon::start_with_options(config(dir.path()), options(&backend, None)).await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    // Contributors 32 and 33 are paid to 31's node.
    let mut node_id = [0x02; 33];
    node_id[1..].copy_from_slice(&pubkey(31).to_bytes());
    let mut registry = d.registry(Some(&d.operator_token)).await;
    for n in [32, 33] {
        let reg = ContributorRegistration {
            network: Network::Regtest,
            contributor_key: pubkey(n),
            node_id: Some(node_id),
            bolt12_offer: None,
            registered_at: Timestamp(1_700_000_100),
        };
        registry
            .register_contributor(pb::RegisterContributorRequest {
                signed_registration: Signed::sign(reg, &keypair(n), &[3; 32])
                    .expect("sign")
                    .encode(),
            })
            .await
            .expect("newer registration");
    }
    meter_some(&d, "x", 30).await;
    d.running().settlement.settle_now_and_wait().await;
    let rows = settlements(&d);
    assert_eq!(rows.len(), OWNERS.len(), "{rows:?}");
    assert!(rows.iter().all(|s| s.status == "succeeded"), "{rows:?}");
    // One of them was handed to the node twice, under one id.
    let mut per_id: HashMap<[u8; 32], usize> = HashMap::new();
    for a in backend.attempts() {
        if let AttemptRequest::Keysend(k) = &a.request {
            *per_id.entry(k.payment_id().0).or_default() += 1;
        }
    }
    let mut counts: Vec<usize> = per_id.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![1, 1, 2], "{per_id:?}");
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
}

/// The Lightning node is down when the daemon starts with settlements pending: nothing new
/// starts before they are resolved, and once the node is back each is paid exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn backend_down_at_start_up_recovers_before_anything_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::new());
    let mut d = TestDaemon::start_with_options(
        config(dir.path()),
        options(&backend, Some(FaultPoint::AfterIntent)),
    )
    .await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    meter_some(&d, "d", 40).await;
    d.running().settlement.settle_now_and_wait().await;
    assert_eq!(settlements(&d).len(), OWNERS.len());
    d.stop().await;

    backend.set_available(false);
    let d = TestDaemon::start_with_options(config(dir.path()), options(&backend, None)).await;
    meter_some(&d, "e", 40).await;
    // Rounds run and fail to reach the node: the old intents stay pending, no new one starts.
    for _ in 0..3 {
        d.running().settlement.settle_now_and_wait().await;
    }
    let rows = settlements(&d);
    assert_eq!(rows.len(), OWNERS.len(), "{rows:?}");
    assert!(rows.iter().all(|s| s.status == "pending"));
    assert!(backend.sent_payments().is_empty());

    backend.set_available(true);
    wait_until(|| {
        settlements(&d).iter().filter(|s| s.status == "succeeded").count() >= OWNERS.len()
    })
    .await;
    // Recovery first, then the amount accrued since is paid by new settlements.
    d.running().settlement.settle_now_and_wait().await;
    wait_until(|| settlements(&d).iter().all(|s| s.status == "succeeded")).await;
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
    for (n, _) in OWNERS {
        let state = latest_state(&d, n).await;
        assert_eq!(u128::from(state.settled_msat.0), state.accrued_nsat.0 / 1_000_000);
    }
}

/// Each contributor has a succeeded settlement and none is pending (more rounds may follow
/// while metering goes on; each is checked the same way).
fn every_contributor_paid(d: &TestDaemon) -> bool {
    let rows = settlements(d);
    rows.iter().all(|s| s.status != "pending")
        && OWNERS.iter().all(|(n, _)| {
            rows.iter().any(|s| s.contributor_key == pubkey(*n) && s.status == "succeeded")
        })
}

/// Without an operator's command: a channel past `settle_threshold_msat` is settled on its
/// own; with a high threshold, `settle_every_secs` settles what is owed; `min_payout_msat`
/// holds smaller amounts back.
#[tokio::test(flavor = "multi_thread")]
async fn threshold_and_interval_trigger_settlement_on_their_own() {
    // Threshold: 10 msat; no interval in sight.
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::new());
    let mut c = config(dir.path());
    c.settlement.settle_threshold_msat = 10;
    c.settlement.max_outstanding_msat = 10;
    c.settlement.min_payout_msat = 10;
    let d = TestDaemon::start_with_options(c, options(&backend, None)).await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    // Enough that the smallest share (2/10) passes the threshold too.
    meter_some(&d, "t", 200).await;
    wait_until(|| every_contributor_paid(&d)).await;
    assert!(settlements(&d).iter().all(|s| s.amount_msat >= 10));
    check_paid_once(&d, &backend);
    check_conservation(&d).await;

    // Interval: 1 s, thresholds far away; min_payout keeps 1-msat amounts back.
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::new());
    let mut c = config(dir.path());
    c.settlement.settle_every_secs = 1;
    c.settlement.min_payout_msat = 5;
    let d = TestDaemon::start_with_options(c, options(&backend, None)).await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    meter_some(&d, "u", 200).await;
    wait_until(|| every_contributor_paid(&d)).await;
    assert!(settlements(&d).iter().all(|s| s.amount_msat >= 5));
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
}

/// An operator's SettleNow given while settlement is paused is kept, not dropped by the
/// rounds that run paused: resuming settles everything owed with no further trigger (the
/// interval and thresholds here are far off).
#[tokio::test(flavor = "multi_thread")]
async fn settle_now_while_paused_is_honoured_on_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(ScriptedBackend::new());
    let d = TestDaemon::start_with_options(config(dir.path()), options(&backend, None)).await;
    setup_model(&d, MODEL, &OWNERS, 700_000).await;
    meter_some(&d, "p", 30).await;
    d.running().flush().await;
    let control = &d.running().settlement;
    control.pause();
    control.settle_now();
    // Several paused rounds go by (tick 50 ms): none starts a settlement.
    control.wait_rounds(3).await;
    assert!(settlements(&d).is_empty());
    control.resume();
    wait_until(|| {
        let rows = settlements(&d);
        rows.len() == OWNERS.len() && rows.iter().all(|r| r.status == "succeeded")
    })
    .await;
    check_paid_once(&d, &backend);
    check_conservation(&d).await;
}
