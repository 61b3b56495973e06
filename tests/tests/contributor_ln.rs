//! The contributor's receiving node with its own Lightning node, end to end: a real daemon
//! with its real ldk-node on the dev chain, two contributors whose receiving nodes each run
//! an embedded ldk-node, register it as their payout destination, verify every signed state
//! and record every payout they receive. After each settlement the nodes' own records equal
//! the daemon's view to the nsat (accrued) and the msat (settled), and what their Lightning
//! nodes received equals what was settled — also after a node was stopped while requests
//! were metered, and while a settlement was under way. Alice is paid by keysend, Bob through
//! a BOLT12 offer of his node.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tribute_channels::{Network, PublicKey};
use tribute_client::keys::ContributorKey;
use tribute_client::node::{self, NodeConfig, NodeStatus, NodeStore, PaymentClaim};
use tribute_client::node::{PayoutDestination, NODE_DB_FILE};
use tribute_client::payments;
use tribute_client::provider::{Meter, Provider, ProviderConfig, RetryPolicy};
use tribute_daemon::devchain::DevChain;
use tribute_daemon::lightning::{DynLightningBackend, LdkBackend};
use tribute_daemon::server::StartOptions;
use tribute_daemon::settlement::EngineOptions;
use tribute_proto::v1 as pb;
use tribute_tests::ln::{eventually, free_port, fund_and_open, node_config, Peer};
use tribute_tests::*;

const MODEL: &str = "model-paid-to-nodes";

/// A contributor: its home (key, node records, Lightning data), and its receiving node
/// with its Lightning node while running.
struct Member {
    name: &'static str,
    home: PathBuf,
    key: PublicKey,
    port: u16,
    /// Paid through a BOLT12 offer of its node (else by keysend).
    offer: bool,
    running: Option<Running>,
}

struct Running {
    ln: LdkBackend,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), node::NodeError>>,
}

impl Member {
    fn store_path(&self) -> PathBuf {
        self.home.join(NODE_DB_FILE)
    }

    /// Starts the Lightning node, then the receiving node, as `tribute contributor run` does.
    /// `payer`: the daemon's node id and address, kept connected.
    async fn start(&mut self, chain: &DevChain, d: &TestDaemon, payer: &([u8; 33], String)) {
        let mut cfg =
            node_config(chain, &payments::lightning_dir(&self.home), self.port, vec![payer.0]);
        cfg.peers = vec![payer.clone()];
        let ln = payments::start_lightning(&self.store_path(), cfg).await.expect("lightning");
        let config = NodeConfig {
            endpoint: d.endpoint(),
            store_path: self.store_path(),
            network: Some(Network::Regtest),
            provider_key: Some(d.running().provider_key),
            reconnect: RetryPolicy {
                max_attempts: u32::MAX,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(500),
            },
            payout: Some(PayoutDestination { node_id: ln.node_id(), offer: self.offer }),
        };
        let key = ContributorKey::load(&self.home.join("contributor.key")).unwrap();
        let (stop, stopped) = watch::channel(false);
        if self.offer {
            // As `tribute contributor run` does: the offer is made once the node can.
            tokio::spawn(payments::register_offer_when_ready(
                self.store_path(),
                ln.clone(),
                d.endpoint(),
                key.clone(),
                None,
                Duration::from_millis(200),
                stopped.clone(),
            ));
        }
        let task = tokio::spawn(node::run(config, key, stopped));
        self.running = Some(Running { ln, stop, task });
    }

    /// Stops the receiving node and its Lightning node.
    async fn stop(&mut self) {
        let r = self.running.take().expect("running");
        r.stop.send(true).unwrap();
        r.task.await.unwrap().expect("the node stops cleanly");
        r.ln.stop().await.expect("the lightning node stops");
    }

    fn ln(&self) -> &LdkBackend {
        &self.running.as_ref().expect("running").ln
    }

    fn status(&self) -> Option<NodeStatus> {
        NodeStore::open(&self.store_path()).ok()?.status().ok()
    }
}

/// The daemon's view of a channel: (accrued nsat, settled msat).
async fn daemon_view(d: &TestDaemon, key: PublicKey) -> (u128, u64) {
    let c = d.channel_of(key).await;
    (c.accrued_nsat.parse().unwrap(), c.settled_msat)
}

/// Waits until the daemon has settled every whole msat of every channel.
async fn settled_in_full(d: &TestDaemon, members: &[Member]) {
    d.running().flush().await;
    let deadline = tokio::time::Instant::now() + tribute_tests::ln::WAIT;
    for m in members {
        loop {
            let (accrued, settled) = daemon_view(d, m.key).await;
            if u128::from(settled) == accrued / 1_000_000 {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let all = d
                    .operator()
                    .await
                    .list_settlements(pb::ListSettlementsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .settlements;
                let channels = d
                    .operator()
                    .await
                    .list_lightning_channels(pb::ListLightningChannelsRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                panic!("{}'s channel never settled in full: {all:#?}\n{channels:#?}", m.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until `m`'s own records equal the daemon's view, and checks that every payout its
/// Lightning node received is tied to a settlement and that they sum to what was settled.
async fn node_matches_daemon(d: &TestDaemon, m: &Member) -> NodeStatus {
    let (accrued, settled) = daemon_view(d, m.key).await;
    let st = eventually(&format!("{}'s node to catch up", m.name), || async {
        let st = m.status()?;
        (st.accrued_nsat().0 == accrued
            && st.settled_msat().0 == settled
            && st.received_msat().0 == settled)
            .then_some(st)
    })
    .await;
    assert_eq!(st.outstanding_nsat().0, accrued - u128::from(settled) * 1_000_000);
    assert_eq!(st.lightning_node_id, Some(m.ln().node_id()));
    for (p, claim) in st.payouts() {
        assert!(
            matches!(claim, PaymentClaim::State(_) | PaymentClaim::Notice | PaymentClaim::Named),
            "{p:?}"
        );
        // Every payout names its settlement: a keysend with TLVs that also name this node's
        // channel, an offer payment with a payer note that also names the provider.
        assert!(p.settlement_id.is_some(), "{p:?}");
        if m.offer {
            assert_eq!(p.kind, payments::PaymentKind::Bolt12);
            assert_eq!(p.note_names().map(|n| n.1), Some(d.running().provider_key), "{p:?}");
        } else {
            assert_eq!(p.kind, payments::PaymentKind::Keysend);
            assert_eq!(p.channel_id, Some(st.channels.last().unwrap().channel_id), "{p:?}");
        }
    }
    assert_eq!(st.unmatched_payments().count(), 0);
    assert_eq!(st.claimed_not_received().count(), 0, "{:?}", st.claimed);
    assert_eq!(st.notices_not_matched().count(), 0);
    assert_eq!(st.proofs().count(), 0);
    // Each settlement the daemon reports succeeded is one payment the node received, with
    // the same amount and payment hash.
    let mut op = d.operator().await;
    let done = op
        .list_settlements(pb::ListSettlementsRequest {
            status: "succeeded".into(),
            contributor_key: m.key.to_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .settlements;
    assert_eq!(done.len(), st.payouts().count());
    for s in &done {
        let p = st
            .payments
            .iter()
            .find(|p| p.payment_hash.as_slice() == s.payment_hash.as_slice())
            .unwrap_or_else(|| panic!("{} never received settlement {}", m.name, s.settlement_id));
        assert_eq!(p.amount_msat, s.amount_msat);
        assert_eq!(p.settlement_id, Some(s.settlement_id));
    }
    st
}

async fn meter(provider: &Provider, prefix: &str, n: u64) {
    for i in 0..n {
        provider
            .meter(
                &Meter::usage(&format!("{prefix}-{i}"), MODEL, 40_000 + 7 * i, 9_000 + i).unwrap(),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn contributor_nodes_verify_every_state_and_receive_every_payout() {
    init_logging();
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let dir = tempfile::tempdir().unwrap();
    let chain = DevChain::start().await.expect("dev chain");
    let daemon_port = free_port();
    let daemon_ln = Arc::new(
        LdkBackend::start(node_config(&chain, &dir.path().join("daemon-ln"), daemon_port, vec![]))
            .await
            .expect("the daemon's node"),
    );
    let payer = (daemon_ln.node_id(), format!("127.0.0.1:{daemon_port}"));
    let options = StartOptions {
        lightning: Some(daemon_ln.clone() as DynLightningBackend),
        settlement: EngineOptions {
            tick: Duration::from_millis(200),
            poll_interval: Duration::from_millis(100),
            round_patience: Duration::from_secs(30),
            failure_backoff: Duration::from_millis(500),
            ..EngineOptions::default()
        },
    };
    let d =
        TestDaemon::start_with(&dir.path().join("daemon"), "127.0.0.1:0".parse().unwrap(), options)
            .await;

    // Two contributors license datasets; a model is trained on them.
    let mut members = Vec::new();
    let mut datasets = Vec::new();
    for (name, weight, offer) in [("alice", 3, false), ("bob", 2, true)] {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let (key, hash) = contributor_with_dataset(&d, &home, name).await;
        datasets.push((hash, weight));
        members.push(Member { name, home, key, port: free_port(), offer, running: None });
    }
    setup_model(&d, MODEL, &datasets, 800_000).await;
    phase("daemon and model up");

    // Their receiving nodes start with their Lightning nodes and register them.
    for m in &mut members {
        m.start(&chain, &d, &payer).await;
    }
    let reg = d.registry(&d.operator_token).await;
    for m in &members {
        let want = m.ln().node_id().to_vec();
        eventually(&format!("{}'s node registered as its payout destination", m.name), || {
            let mut reg = reg.clone();
            let want = want.clone();
            async move {
                let c = reg
                    .get_contributor(pb::GetContributorRequest {
                        contributor_key: m.key.to_bytes().to_vec(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (c.node_id == want).then_some(())
            }
        })
        .await;
    }
    let op = d.operator().await;
    let peers: Vec<Peer> = members
        .iter()
        .map(|m| Peer {
            node: m.ln(),
            address: format!("127.0.0.1:{}", m.port),
            // With two peers the daemon's node pays offers only as an announced node.
            announce: !m.offer,
        })
        .collect();
    phase("contributor nodes registered");
    fund_and_open(&op, &chain, Some(&daemon_ln), 2_000_000, 500_000, &peers).await;
    drop(peers);
    eventually("the daemon's node in its own gossip graph", || async {
        daemon_ln.is_announced().then_some(())
    })
    .await;
    // Bob's node makes its offer once it can (it needs the channel) and registers it.
    let bob = members[1].key;
    eventually("bob's offer registered", || {
        let mut reg = reg.clone();
        async move {
            let c = reg
                .get_contributor(pb::GetContributorRequest {
                    contributor_key: bob.to_bytes().to_vec(),
                })
                .await
                .ok()?
                .into_inner();
            (!c.bolt12_offer.is_empty()).then_some(())
        }
    })
    .await;
    phase("channels usable");

    let provider =
        Provider::connect(ProviderConfig::new(d.endpoint(), &d.provider_token)).await.unwrap();

    // 1. Metered, settled: both nodes verified every state and received every payout.
    meter(&provider, "first", 40).await;
    phase("first requests metered");
    op.clone().settle_now(pb::SettleNowRequest {}).await.unwrap();
    settled_in_full(&d, &members).await;
    for m in &members {
        let st = node_matches_daemon(&d, m).await;
        assert_eq!(st.payouts().count(), 1, "{}", m.name);
        assert_eq!(st.rejections.len(), 0);
    }

    phase("first round matched");
    // 2. Alice's node (receiving node and Lightning node) stops while requests are metered,
    // and starts again: it catches up to the latest state.
    let metering = {
        let provider = provider.clone();
        tokio::spawn(async move { meter(&provider, "second", 60).await })
    };
    members[0].stop().await;
    metering.await.unwrap();
    members[0].start(&chain, &d, &payer).await;
    d.running().flush().await;
    let (accrued, _) = daemon_view(&d, members[0].key).await;
    eventually("alice's node to catch up after a stop", || async {
        (members[0].status()?.accrued_nsat().0 == accrued).then_some(())
    })
    .await;
    eventually("alice's channel usable again", || async {
        let list = op
            .clone()
            .list_lightning_channels(pb::ListLightningChannelsRequest {})
            .await
            .ok()?
            .into_inner();
        (list.channels.iter().filter(|c| c.usable).count() == 2).then_some(())
    })
    .await;

    phase("alice caught up after a stop");
    // 3. Alice's node stops while a settlement is under way: her payout cannot be
    // delivered and is retried; bob's is paid. She starts again and is paid, exactly once.
    members[0].stop().await;
    op.clone().settle_now(pb::SettleNowRequest {}).await.unwrap();
    eventually("bob's second payout", || async {
        let (accrued, settled) = daemon_view(&d, members[1].key).await;
        (u128::from(settled) == accrued / 1_000_000).then_some(())
    })
    .await;
    phase("bob paid while alice is away");
    members[0].start(&chain, &d, &payer).await;
    settled_in_full(&d, &members).await;
    phase("alice paid after her restart");
    for m in &members {
        let st = node_matches_daemon(&d, m).await;
        assert_eq!(st.payouts().count(), 2, "{}", m.name);
    }

    phase("second round matched");
    for m in &mut members {
        m.stop().await;
    }
    drop(provider);
    let mut d = d;
    d.stop().await;
    daemon_ln.stop().await.unwrap();
    chain.shutdown().await;
    phase("all stopped");
}
