//! Settlement end to end with real ldk-node nodes on the dev chain: the daemon's node and two
//! contributor nodes, channels opened through the operator RPCs, metering, and settlement
//! rounds. One contributor is paid by keysend, the other through the BOLT12 offer it
//! registered. Each contributor node receives exactly `floor(accrued) - settled` msat per
//! round, the keysend with TLVs naming the settlement, the channel and the state, the offer
//! payment with a payer note naming the settlement; the preimage hashes to the payment hash
//! recorded in the settlement and carried by the signed state; sub-msat remainders stay in
//! the channels; and `Σ pools == Σ accrued == Σ (settled + outstanding)`.

mod common;
mod common_ln;

use common::*;
use common_ln::{free_port, wait_in_mempool, TestDir};
use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::bitcoin::{Address, Amount};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tribute_channels::channel::{ChannelParams, ChannelState, PayeeChannel};
use tribute_channels::codec::Encode;
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::{Network, Signed, Timestamp};
use tribute_daemon::devchain::DevChain;
use tribute_daemon::lightning::{
    ChainSourceConfig, DynLightningBackend, LdkBackend, LdkBackendConfig, LightningBackend,
    LightningEvent,
};
use tribute_daemon::server::StartOptions;
use tribute_daemon::settlement::{
    payer_note_of, EngineOptions, FaultPoint, TLV_CHANNEL_ID, TLV_SETTLEMENT_ID, TLV_STATE_SEQ,
};
use tribute_proto::v1 as pb;
use tribute_proto::v1::operator_client::OperatorClient;

const MODEL: &str = "llm-ln";
const OWNERS: [(u64, u64); 2] = [(41, 3), (42, 2)];
const FUNDING_SATS: u64 = 2_000_000;
const CHANNEL_SATS: u64 = 500_000;
const WAIT: Duration = Duration::from_secs(90);

fn node_config(
    chain: &DevChain,
    dir: &TestDir,
    port: u16,
    trusted: Vec<[u8; 33]>,
) -> LdkBackendConfig {
    LdkBackendConfig {
        listening_addresses: vec![format!("127.0.0.1:{port}")],
        trusted_peers_no_reserve: trusted,
        // An alias (with the listening address) lets a node take part in announced channels.
        node_alias: Some(format!("tribute-test-{port}")),
        ..LdkBackendConfig::new(
            dir.path.clone(),
            ldk_node::bitcoin::Network::Regtest,
            ChainSourceConfig::dev_chain(chain),
        )
    }
}

/// A daemon config that settles only when asked (`Operator.SettleNow`), from 1 msat on.
fn settle_on_demand(dir: &std::path::Path) -> tribute_daemon::config::Config {
    let mut config = test_config(dir);
    config.settlement.settle_every_secs = 86_400;
    config.settlement.settle_threshold_msat = 1_000_000_000;
    config.settlement.max_outstanding_msat = 1_000_000_000;
    config.settlement.min_payout_msat = 1;
    config
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The payment with `hash` a contributor node received: (payment hash, amount, TLVs).
/// Other payments' events (a restarted node replays those it had not acknowledged) are
/// skipped.
async fn received(
    node: &LdkBackend,
    hash: &[u8],
    what: &str,
) -> ([u8; 32], u64, Vec<(u64, Vec<u8>)>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, node.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("event queue open");
        if let LightningEvent::PaymentReceived { payment_hash, amount_msat, custom_tlvs } = event {
            if payment_hash.as_slice() == hash {
                return (payment_hash, amount_msat, custom_tlvs);
            }
        }
    }
}

/// The model over [`OWNERS`]' datasets, each contributor registered (again, newer) with the
/// node id of its node in `contributors` and the offer in `offers`, if any (an offer is
/// what it is paid through then).
async fn setup_paid_model(
    d: &TestDaemon,
    contributors: &[(LdkBackend, String)],
    offers: &[Option<String>],
) {
    setup_model(d, MODEL, &OWNERS, 800_000).await;
    let payouts: Vec<_> = OWNERS
        .iter()
        .zip(contributors)
        .zip(offers)
        .map(|(((n, _), (node, _)), offer)| (*n, node.node_id(), offer.clone()))
        .collect();
    register_payouts(d, &payouts).await;
}

/// Registers each contributor `n` (again, newer) to be paid to `node_id`, or through
/// `offer` when given.
async fn register_payouts(d: &TestDaemon, payouts: &[(u64, [u8; 33], Option<String>)]) {
    let mut reg = d.registry(Some(&d.operator_token)).await;
    for (n, node_id, offer) in payouts {
        let r = ContributorRegistration {
            network: Network::Regtest,
            contributor_key: pubkey(*n),
            node_id: Some(*node_id),
            bolt12_offer: offer.clone(),
            registered_at: Timestamp(1_700_000_500),
        };
        reg.register_contributor(pb::RegisterContributorRequest {
            signed_registration: Signed::sign(r, &keypair(*n), &[5; 32]).expect("sign").encode(),
        })
        .await
        .expect("register node id");
    }
}

/// `Operator.ListSettlements` with `status` (empty: all), of contributor `n` if given;
/// `None` if the call failed.
async fn settlements(
    op: &OperatorClient<Authed>,
    status: &str,
    contributor: Option<u64>,
) -> Option<Vec<pb::Settlement>> {
    let request = pb::ListSettlementsRequest {
        status: status.into(),
        contributor_key: contributor.map(|n| pubkey(n).to_bytes().to_vec()).unwrap_or_default(),
        ..Default::default()
    };
    Some(op.clone().list_settlements(request).await.ok()?.into_inner().settlements)
}

async fn operator(d: &TestDaemon) -> OperatorClient<Authed> {
    OperatorClient::with_interceptor(d.channel().await, Bearer(Some(d.operator_token.clone())))
}

#[tokio::test(flavor = "multi_thread")]
async fn real_nodes_receive_exactly_what_the_channels_owe() {
    let chain = DevChain::start().await.expect("dev chain");
    let dirs =
        (TestDir::new("settle-daemon-ln-"), TestDir::new("settle-c1-"), TestDir::new("settle-c2-"));
    let daemon_node = Arc::new(
        LdkBackend::start(node_config(&chain, &dirs.0, free_port(), vec![]))
            .await
            .expect("daemon node"),
    );
    let mut contributors = Vec::new();
    let mut contributor_configs = Vec::new();
    for dir in [&dirs.1, &dirs.2] {
        let port = free_port();
        let cfg = node_config(&chain, dir, port, vec![daemon_node.node_id()]);
        let node = LdkBackend::start(cfg.clone()).await.expect("contributor node");
        contributors.push((node, format!("127.0.0.1:{port}")));
        contributor_configs.push(cfg);
    }

    let data = tempfile::tempdir().expect("tempdir");
    let config = settle_on_demand(data.path());
    let options = StartOptions {
        lightning: Some(daemon_node.clone() as DynLightningBackend),
        settlement: EngineOptions {
            tick: Duration::from_millis(200),
            poll_interval: Duration::from_millis(100),
            round_patience: Duration::from_secs(30),
            failure_backoff: Duration::from_secs(1),
            ..EngineOptions::default()
        },
    };
    let d = TestDaemon::start_with_options(config, options).await;
    let mut op = operator(&d).await;

    // Fund the daemon's node through the operator RPCs and the faucet.
    let address = op
        .new_onchain_address(pb::NewOnchainAddressRequest {})
        .await
        .expect("address")
        .into_inner()
        .address;
    let address: Address = address.parse::<Address<_>>().expect("address").assume_checked();
    chain.faucet(&address, Amount::from_sat(FUNDING_SATS)).expect("faucet");
    chain.mine_blocks(1).expect("mine");
    eventually("the daemon's funding", || async {
        let _ = daemon_node.sync_wallets().await;
        let b = op
            .clone()
            .get_onchain_balance(pb::GetOnchainBalanceRequest {})
            .await
            .ok()?
            .into_inner();
        (b.spendable_sat >= FUNDING_SATS).then_some(())
    })
    .await;

    // A channel to each contributor node, opened through the operator RPC: announced to the
    // keysend contributor, private to the one paid through its offer. With two peers, the
    // daemon's node can pay an offer only as an announced node (LDK builds the invoice
    // request's reply path through an announced node or the only peer): the announced
    // channel is what makes it one.
    for (k, (node, addr)) in contributors.iter().enumerate() {
        op.open_lightning_channel(pb::OpenLightningChannelRequest {
            node_id: node.node_id().to_vec(),
            address: addr.clone(),
            amount_sat: CHANNEL_SATS,
            push_msat: 0,
            announce: k == 0,
        })
        .await
        .expect("open channel");
        // One funding transaction at a time (each spends the wallet's change).
        eventually("the funding transaction", || async { (chain.mempool_len() > 0).then_some(()) })
            .await;
        let txids = chain.mempool_txids();
        wait_in_mempool(&chain, txids[0], "funding tx").await;
        chain.mine_blocks(1).expect("mine");
        let _ = daemon_node.sync_wallets().await;
    }
    chain.mine_blocks(6).expect("mine");
    for (node, _) in &contributors {
        let _ = node.sync_wallets().await;
    }
    let _ = daemon_node.sync_wallets().await;
    eventually("both channels usable", || async {
        let list = op
            .clone()
            .list_lightning_channels(pb::ListLightningChannelsRequest {})
            .await
            .ok()?
            .into_inner();
        let announced: Vec<bool> = list.channels.iter().map(|c| c.announced).collect();
        (list.channels.len() == 2
            && list.channels.iter().all(|c| c.usable)
            && announced.iter().filter(|a| **a).count() == 1)
            .then_some(())
    })
    .await;
    let info = op.get_node_info(pb::GetNodeInfoRequest {}).await.expect("node info").into_inner();
    assert_eq!(info.usable_channels, 2);
    eventually("the daemon's node in its own gossip graph", || async {
        daemon_node.is_announced().then_some(())
    })
    .await;

    // Contributors registered with their nodes' ids, the second with an offer of its node
    // (made over its private channel); a model trained on their datasets.
    let offer = contributors[1]
        .0
        .node()
        .bolt12_payment()
        .receive_variable_amount("tribute payouts", None)
        .expect("offer")
        .to_string();
    setup_paid_model(&d, &contributors, &[None, Some(offer.clone())]).await;

    let mut settled_before = [0u64; 2];
    for round in 0..2u64 {
        let mut meter = d.metering(Some(&d.provider_token)).await;
        for i in 0..150u64 {
            meter
                .meter(usage_request(&format!("r{round}-{i}"), MODEL, 100_000 + 17 * i, 50_000 + i))
                .await
                .expect("meter");
        }
        d.running().flush().await;
        let mut chans = d.channels(Some(&d.operator_token)).await;
        let mut owed = [0u64; 2];
        for (k, (n, _)) in OWNERS.iter().enumerate() {
            let c = chans
                .get_channel(pb::GetChannelRequest {
                    contributor_key: pubkey(*n).to_bytes().to_vec(),
                    channel_id: vec![],
                })
                .await
                .expect("channel")
                .into_inner();
            let accrued: u128 = c.accrued_nsat.parse().expect("n");
            owed[k] = u64::try_from(accrued / 1_000_000).expect("fits") - settled_before[k];
            assert!(owed[k] > 0);
        }

        op.settle_now(pb::SettleNowRequest {}).await.expect("settle now");
        let done = eventually("the round's settlements", || async {
            let list = settlements(&op, "succeeded", None).await?;
            (list.len() == 2 * (round as usize + 1)).then_some(list)
        })
        .await;

        for (k, ((n, _), (node, _))) in OWNERS.iter().zip(&contributors).enumerate() {
            let s = done
                .iter()
                .find(|s| {
                    s.contributor_key == pubkey(*n).to_bytes().to_vec()
                        && s.settlement_id > 2 * round
                })
                .expect("this round's settlement");
            assert_eq!(s.amount_msat, owed[k], "contributor {n} round {round}");
            assert_eq!(sha256::Hash::hash(&s.preimage).to_byte_array().to_vec(), s.payment_hash);
            // What the contributor's node received: that amount, under that hash, with TLVs.
            let got = received(
                node,
                &s.payment_hash,
                &format!("contributor {n}'s payment in round {round}"),
            )
            .await;
            let (hash, amount, tlvs) = &got;
            assert_eq!(hash.to_vec(), s.payment_hash);
            assert_eq!(*amount, s.amount_msat);
            if k == 0 {
                assert_eq!(s.method, "keysend");
                let tlv = |t| tlvs.iter().find(|(ty, _)| *ty == t).map(|(_, v)| v.clone());
                assert_eq!(tlv(TLV_SETTLEMENT_ID), Some(s.settlement_id.to_be_bytes().to_vec()));
                assert_eq!(tlv(TLV_CHANNEL_ID), Some(s.channel_id.clone()));
                assert_eq!(tlv(TLV_STATE_SEQ), Some(s.state_seq.to_be_bytes().to_vec()));
            } else {
                // Paid through the offer, under the payer note that names the settlement, as
                // the contributor's node recorded it.
                assert_eq!((s.method.as_str(), s.destination.as_str()), ("bolt12", &*offer));
                let note = payer_note_of(&d.running().provider_key, s.settlement_id);
                assert_eq!(
                    offer_payments_received(node, &s.payment_hash),
                    vec![(s.amount_msat, Some(note))]
                );
            }
            // The signed state carries it, and the payee side accepts it.
            let mut chans = d.channels(Some(&d.operator_token)).await;
            let c = chans
                .get_channel(pb::GetChannelRequest {
                    contributor_key: pubkey(*n).to_bytes().to_vec(),
                    channel_id: vec![],
                })
                .await
                .expect("channel")
                .into_inner();
            let signed =
                Signed::<ChannelState>::decode(&c.latest_state.expect("state").signed_state)
                    .expect("state");
            let params = ChannelParams {
                network: Network::Regtest,
                provider_key: d.running().provider_key,
                contributor_key: pubkey(*n),
                nonce: c.nonce.as_slice().try_into().expect("nonce"),
            };
            let state = PayeeChannel::new(&params)
                .accept(signed)
                .expect("accepted")
                .latest()
                .expect("latest")
                .message;
            assert_eq!(state.last_settlement_hash.to_vec(), s.payment_hash);
            assert_eq!(Some(state.seq), s.settled_state_seq);
            assert_eq!(state.settled_msat.0, settled_before[k] + s.amount_msat);
            // Sub-msat remainder stays in the channel.
            assert_eq!(
                c.outstanding_nsat.parse::<u128>().expect("n"),
                state.accrued_nsat.0 % 1_000_000
            );
            settled_before[k] = state.settled_msat.0;
        }
        // Conservation to the nsat.
        let list = d
            .channels(Some(&d.operator_token))
            .await
            .list_channels(pb::ListChannelsRequest {})
            .await
            .expect("list")
            .into_inner()
            .channels;
        let accrued: u128 = list.iter().map(|c| c.accrued_nsat.parse::<u128>().expect("n")).sum();
        let split: u128 = list
            .iter()
            .map(|c| {
                u128::from(c.settled_msat) * 1_000_000
                    + c.outstanding_nsat.parse::<u128>().expect("n")
            })
            .sum();
        assert_eq!(accrued, db_total_pools(&d.db_path()));
        assert_eq!(split, accrued);
    }

    // A contributor node offline during a round: its settlement fails definitely, the amount
    // stays owed, and after the node is back a later round pays it.
    let (offline, _) = contributors.remove(0);
    offline.stop().await.expect("stop contributor node");
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..100u64 {
        meter
            .meter(usage_request(&format!("off-{i}"), MODEL, 90_000 + i, 40_000))
            .await
            .expect("meter");
    }
    op.settle_now(pb::SettleNowRequest {}).await.expect("settle now");
    let failed = eventually("the offline contributor's settlement to fail", || async {
        settlements(&op, "failed", None).await?.into_iter().next()
    })
    .await;
    assert_eq!(failed.contributor_key, pubkey(OWNERS[0].0).to_bytes().to_vec());
    let back = LdkBackend::start(contributor_configs[0].clone()).await.expect("node back");
    let retried = eventually("the owed amount to be paid once the node is back", || async {
        let list = settlements(&op, "succeeded", Some(OWNERS[0].0)).await?;
        list.into_iter().find(|s| s.settlement_id > failed.settlement_id)
    })
    .await;
    // Nothing accrued in between: the retry pays exactly what the failed settlement owed.
    assert_eq!(retried.amount_msat, failed.amount_msat);
    let got =
        received(&back, &retried.payment_hash, "the retried payment on the node that came back")
            .await;
    assert_eq!(got.0.to_vec(), retried.payment_hash);
    assert_eq!(got.1, retried.amount_msat);
    back.stop().await.expect("stop");

    let mut d = d;
    d.stop().await;
    for (node, _) in &contributors {
        node.stop().await.expect("stop contributor node");
    }
    daemon_node.stop().await.expect("stop daemon node");
    chain.shutdown().await;
}

/// `lightning.enabled` with the dev chain as chain source: the daemon runs its own node (seed
/// in its data dir), the operator RPCs reach it, and it stops with the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_runs_its_own_node_from_config() {
    let chain = DevChain::start().await.expect("dev chain");
    let data = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(data.path());
    config.lightning.enabled = true;
    config.lightning.bitcoind_rpc_host = chain.rpc_addr().ip().to_string();
    config.lightning.bitcoind_rpc_port = chain.rpc_addr().port();
    config.lightning.listen_port = free_port();
    let mut d = TestDaemon::start_with(config.clone()).await;
    let info = operator(&d)
        .await
        .get_node_info(pb::GetNodeInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id.len(), 33);
    assert_eq!(info.network, "regtest");
    d.stop().await;
    assert!(data.path().join("ldk").is_dir(), "the node's data is in the daemon's data dir");
    // Same seed after a restart: the same node.
    let mut d = TestDaemon::start_with(config).await;
    let again = operator(&d)
        .await
        .get_node_info(pb::GetNodeInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(again.node_id, info.node_id);
    d.stop().await;
    chain.shutdown().await;
}

/// `tributed devchain` serves the chain to nodes in other processes until SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn tributed_devchain_serves_rpc_until_terminated() {
    use std::io::BufRead;
    let port = free_port();
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tributed"))
        .args([
            "--data-dir",
            data.path().to_str().expect("utf-8"),
            "devchain",
            "--rpc-port",
            &port.to_string(),
            "--mine-every-secs",
            "0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn tributed devchain");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert!(line.contains(&format!("127.0.0.1:{port}")) && line.contains("height 101"), "{line}");
    // A node in this process uses it as its chain source.
    let dir = TestDir::new("devchain-cli-");
    let node = LdkBackend::start(LdkBackendConfig::new(
        dir.path.clone(),
        ldk_node::bitcoin::Network::Regtest,
        ChainSourceConfig::BitcoindRpc {
            host: "127.0.0.1".into(),
            port,
            user: "devchain".into(),
            password: "devchain".into(),
        },
    ))
    .await
    .expect("node on the CLI's dev chain");
    let info = node.node_info().await.expect("info");
    assert_eq!(info.block_height, 101);
    node.stop().await.expect("stop");
    let pid = child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// The succeeded inbound offer payments with `hash` a node holds: (amount, payer note).
fn offer_payments_received(node: &LdkBackend, hash: &[u8]) -> Vec<(u64, Option<String>)> {
    use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};
    node.node()
        .list_payments_with_filter(|p| {
            p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded
        })
        .into_iter()
        .filter_map(|p| match p.kind {
            PaymentKind::Bolt12Offer { hash: Some(h), payer_note, .. } if h.0 == hash => {
                Some((p.amount_msat.unwrap_or(0), payer_note.map(|n| n.0)))
            }
            _ => None,
        })
        .collect()
}

/// What a contributor node holds as received: (payment hash, amount) of each succeeded
/// inbound payment, from the node's own payment store.
fn inbound(node: &LdkBackend) -> Vec<([u8; 32], u64)> {
    use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};
    node.node()
        .list_payments_with_filter(|p| {
            p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded
        })
        .into_iter()
        .filter_map(|p| match p.kind {
            PaymentKind::Spontaneous { hash, .. } => Some((hash.0, p.amount_msat.unwrap_or(0))),
            _ => None,
        })
        .collect()
}

/// A crash at each step of the saga with real nodes: the daemon stops dead at a fault point
/// (after the intent, after the payment was handed to the node, before finalizing, inside
/// the finalize transaction), then
/// the daemon and its Lightning node are stopped and started again from their data dirs.
/// Each settlement ends paid exactly once, as the receiving nodes' own records show.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_each_step_pays_exactly_once_on_real_nodes() {
    let chain = DevChain::start().await.expect("dev chain");
    let dirs =
        (TestDir::new("crash-daemon-ln-"), TestDir::new("crash-c1-"), TestDir::new("crash-c2-"));
    let daemon_node_config = node_config(&chain, &dirs.0, free_port(), vec![]);
    let mut daemon_node =
        Arc::new(LdkBackend::start(daemon_node_config.clone()).await.expect("daemon node"));
    let mut contributors = Vec::new();
    for dir in [&dirs.1, &dirs.2] {
        let port = free_port();
        let node = LdkBackend::start(node_config(&chain, dir, port, vec![daemon_node.node_id()]))
            .await
            .expect("contributor node");
        contributors.push((node, format!("127.0.0.1:{port}")));
    }
    // Fund the daemon's node and open a private channel to each contributor node.
    let address = daemon_node.onchain_address().await.expect("address");
    chain.faucet(&address, Amount::from_sat(FUNDING_SATS)).expect("faucet");
    chain.mine_blocks(1).expect("mine");
    eventually("funding", || async {
        let _ = daemon_node.sync_wallets().await;
        (daemon_node.onchain_balance().await.ok()?.spendable_sat >= FUNDING_SATS).then_some(())
    })
    .await;
    for (node, addr) in &contributors {
        daemon_node.connect(node.node_id(), addr).await.expect("connect");
        daemon_node
            .open_channel(tribute_daemon::lightning::OpenChannelRequest {
                node_id: node.node_id(),
                addr: addr.clone(),
                amount_sat: CHANNEL_SATS,
                push_msat: 0,
                announce: false,
            })
            .await
            .expect("open");
        eventually("the funding transaction", || async { (chain.mempool_len() > 0).then_some(()) })
            .await;
        chain.mine_blocks(1).expect("mine");
        let _ = daemon_node.sync_wallets().await;
    }
    chain.mine_blocks(6).expect("mine");
    for (node, _) in &contributors {
        let _ = node.sync_wallets().await;
    }
    eventually("both channels usable", || async {
        let _ = daemon_node.sync_wallets().await;
        let list = daemon_node.list_channels().await.ok()?;
        (list.len() == 2 && list.iter().all(|c| c.usable)).then_some(())
    })
    .await;

    let data = tempfile::tempdir().expect("tempdir");
    let config = settle_on_demand(data.path());
    let options = |node: &Arc<LdkBackend>, fault| StartOptions {
        lightning: Some(node.clone() as DynLightningBackend),
        settlement: EngineOptions {
            tick: Duration::from_millis(200),
            poll_interval: Duration::from_millis(50),
            round_patience: Duration::from_secs(30),
            fault,
            ..EngineOptions::default()
        },
    };
    let mut first = true;
    for (round, fault) in [
        FaultPoint::AfterIntent,
        FaultPoint::AfterPay,
        FaultPoint::BeforeFinalize,
        FaultPoint::DuringFinalize,
    ]
    .into_iter()
    .enumerate()
    {
        let mut d =
            TestDaemon::start_with_options(config.clone(), options(&daemon_node, Some(fault)))
                .await;
        if first {
            setup_paid_model(&d, &contributors, &[None, None]).await;
            first = false;
        }
        let mut meter = d.metering(Some(&d.provider_token)).await;
        for i in 0..100u64 {
            meter
                .meter(usage_request(&format!("k{round}-{i}"), MODEL, 80_000 + i, 30_000))
                .await
                .expect("meter");
        }
        d.running().settlement.settle_now_and_wait().await;
        // The crash: the daemon and its node go down with the settlements pending.
        d.stop().await;
        daemon_node.stop().await.expect("stop daemon node");
        daemon_node = Arc::new(
            LdkBackend::start(daemon_node_config.clone()).await.expect("daemon node again"),
        );
        let d = TestDaemon::start_with_options(config.clone(), options(&daemon_node, None)).await;
        let op = operator(&d).await;
        // Resolved: nothing pending, and every channel paid down to its sub-msat remainder
        // (a definite failure on the way, e.g. before the restarted node has reconnected to
        // its peers, is retried under a new settlement).
        let mut last = Vec::new();
        let deadline = Instant::now() + WAIT;
        let rows = loop {
            let list = op.clone().list_settlements(pb::ListSettlementsRequest::default()).await;
            let chans = d
                .channels(Some(&d.operator_token))
                .await
                .list_channels(pb::ListChannelsRequest {})
                .await;
            if let (Ok(list), Ok(chans)) = (list, chans) {
                let rows = list.into_inner().settlements;
                let paid_down = chans
                    .into_inner()
                    .channels
                    .iter()
                    .all(|c| c.outstanding_nsat.parse::<u128>().expect("n") < 1_000_000);
                if paid_down && rows.iter().all(|s| s.status != "pending") {
                    break rows;
                }
                last = rows;
            }
            assert!(
                Instant::now() < deadline,
                "{fault:?}: not resolved in {WAIT:?}; settlements: {last:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // On the receiving nodes: exactly the succeeded settlements' hashes, once each, for
        // their amounts; nothing of a failed one.
        for ((n, _), (node, _)) in OWNERS.iter().zip(&contributors) {
            let key = pubkey(*n).to_bytes().to_vec();
            let paid: Vec<_> = rows
                .iter()
                .filter(|s| s.contributor_key == key && s.status == "succeeded")
                .collect();
            let got = eventually("the node's records", || async {
                let got = inbound(node);
                (got.len() >= paid.len()).then_some(got)
            })
            .await;
            assert_eq!(got.len(), paid.len(), "{fault:?}: contributor {n} received {got:?}");
            for s in &paid {
                let hits: Vec<_> =
                    got.iter().filter(|(h, _)| h.to_vec() == s.payment_hash).collect();
                assert_eq!(hits.len(), 1, "{fault:?}: settlement {} on the node", s.settlement_id);
                assert_eq!(hits[0].1, s.amount_msat);
            }
            for s in rows.iter().filter(|s| s.contributor_key == key && s.status == "failed") {
                assert!(
                    got.iter().all(|(h, _)| h.to_vec() != s.payment_hash),
                    "failed settlement {} was paid",
                    s.settlement_id
                );
            }
        }
        let mut d = d;
        d.stop().await;
    }
    for (node, _) in &contributors {
        node.stop().await.expect("stop");
    }
    daemon_node.stop().await.expect("stop");
    chain.shutdown().await;
}

/// Issue 4: one round of 100 payouts to one contributor node over one private channel pays
/// every one of them within the round. The channel carries at most 50 HTLCs (LDK's default)
/// and an HTLC keeps its place there for a while after its payment succeeded, so once more
/// than 50 payouts had started the node refused about half at send (with 40 driven at once
/// only ~40 HTLCs were ever ours, yet the channel was found full); the engine now keeps at
/// most `max_in_flight_per_node` in flight to one node and sends a refused one again as soon
/// as another finishes.
#[tokio::test(flavor = "multi_thread")]
async fn a_round_of_100_payouts_to_one_node_pays_them_all() {
    const PAYOUTS: u64 = 100;
    let chain = DevChain::start().await.expect("dev chain");
    let dirs = (TestDir::new("many-daemon-ln-"), TestDir::new("many-c-"));
    let daemon_node = Arc::new(
        LdkBackend::start(node_config(&chain, &dirs.0, free_port(), vec![]))
            .await
            .expect("daemon node"),
    );
    let port = free_port();
    let node = LdkBackend::start(node_config(&chain, &dirs.1, port, vec![daemon_node.node_id()]))
        .await
        .expect("contributor node");
    let address = daemon_node.onchain_address().await.expect("address");
    chain.faucet(&address, Amount::from_sat(FUNDING_SATS)).expect("faucet");
    chain.mine_blocks(1).expect("mine");
    eventually("funding", || async {
        let _ = daemon_node.sync_wallets().await;
        (daemon_node.onchain_balance().await.ok()?.spendable_sat >= FUNDING_SATS).then_some(())
    })
    .await;
    daemon_node
        .open_channel(tribute_daemon::lightning::OpenChannelRequest {
            node_id: node.node_id(),
            addr: format!("127.0.0.1:{port}"),
            amount_sat: CHANNEL_SATS,
            push_msat: 0,
            announce: false,
        })
        .await
        .expect("open");
    eventually("the funding transaction", || async { (chain.mempool_len() > 0).then_some(()) })
        .await;
    chain.mine_blocks(6).expect("mine");
    let _ = node.sync_wallets().await;
    eventually("the channel usable", || async {
        let _ = daemon_node.sync_wallets().await;
        let list = daemon_node.list_channels().await.ok()?;
        (list.len() == 1 && list[0].usable).then_some(())
    })
    .await;

    let data = tempfile::tempdir().expect("tempdir");
    let config = settle_on_demand(data.path());
    let options = StartOptions {
        lightning: Some(daemon_node.clone() as DynLightningBackend),
        settlement: EngineOptions {
            tick: Duration::from_millis(200),
            poll_interval: Duration::from_millis(5),
            round_patience: Duration::from_secs(60),
            // A definite failure is not retried within this test.
            failure_backoff: Duration::from_secs(600),
            max_in_flight: 40,
            ..EngineOptions::default()
        },
    };
    let mut d = TestDaemon::start_with_options(config, options).await;
    let owners: Vec<(u64, u64)> = (1..=PAYOUTS).map(|n| (100 + n, 1 + n % 5)).collect();
    setup_model(&d, MODEL, &owners, 800_000).await;
    let payouts: Vec<_> = owners.iter().map(|(n, _)| (*n, node.node_id(), None)).collect();
    register_payouts(&d, &payouts).await;
    let mut meter = d.metering(Some(&d.provider_token)).await;
    for i in 0..300u64 {
        meter
            .meter(usage_request(&format!("m-{i}"), MODEL, 100_000 + i, 50_000))
            .await
            .expect("meter");
    }
    d.running().flush().await;

    let started = Instant::now();
    d.running().settlement.settle_now_and_wait().await;
    let round = started.elapsed();
    let op = operator(&d).await;
    let rows = settlements(&op, "", None).await.expect("settlements");
    let failed: Vec<_> = rows.iter().filter(|s| s.status != "succeeded").collect();
    assert!(failed.is_empty(), "not paid within the round: {failed:#?}");
    assert_eq!(rows.len() as u64, PAYOUTS);
    eprintln!("{PAYOUTS} payouts to one node in one round: {round:.2?}");
    // The node received each once, for its amount.
    let got = eventually("the node's records", || async {
        let got = inbound(&node);
        (got.len() as u64 >= PAYOUTS).then_some(got)
    })
    .await;
    assert_eq!(got.len() as u64, PAYOUTS);
    for s in &rows {
        assert!(got.iter().any(|(h, a)| h.to_vec() == s.payment_hash && *a == s.amount_msat));
    }

    d.stop().await;
    node.stop().await.expect("stop");
    daemon_node.stop().await.expect("stop");
    chain.shutdown().await;
}
