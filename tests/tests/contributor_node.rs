//! The contributor's receiving node against a real daemon: it follows its channel,
//! verifies and stores every state in its own SQLite, catches up after being stopped, and
//! refuses tampered, replayed, regressing and equivocating states — keeping them as proof
//! without touching its stored latest state.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;
use tribute_channels::channel::{ChannelParams, ChannelState, EquivocationProof};
use tribute_channels::codec::Encode;
use tribute_channels::{Network, Nsat, PublicKey, Signed};
use tribute_client::keys::ContributorKey;
use tribute_client::node::{self, Follower, NodeConfig, NodeStore, Seen};
use tribute_client::provider::{Meter, Provider, ProviderConfig, RetryPolicy};
use tribute_tests::*;

const MODEL: &str = "model-for-nodes";

struct World {
    dir: tempfile::TempDir,
    d: TestDaemon,
    alice: PublicKey,
    provider: Provider,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(&dir.path().join("daemon")).await;
    let mut datasets = Vec::new();
    let mut alice = None;
    for (i, name) in ["alice", "bob"].iter().enumerate() {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let (k, h) = contributor_with_dataset(&d, &home, name).await;
        alice.get_or_insert(k);
        datasets.push((h, i as u64 + 2));
    }
    setup_model(&d, MODEL, &datasets, 700_000).await;
    let provider =
        Provider::connect(ProviderConfig::new(d.endpoint(), &d.provider_token)).await.unwrap();
    World { dir, d, alice: alice.unwrap(), provider }
}

impl World {
    fn home(&self) -> PathBuf {
        self.dir.path().join("alice")
    }

    fn store_path(&self) -> PathBuf {
        self.home().join(node::NODE_DB_FILE)
    }

    fn start_node(
        &self,
    ) -> (watch::Sender<bool>, tokio::task::JoinHandle<Result<(), node::NodeError>>) {
        let key = ContributorKey::load(&self.home().join("contributor.key")).unwrap();
        let config = NodeConfig {
            endpoint: self.d.endpoint(),
            store_path: self.store_path(),
            network: Some(Network::Regtest),
            provider_key: None,
            reconnect: RetryPolicy {
                max_attempts: u32::MAX,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
            },
            payout: None,
        };
        let (stop, stopped) = watch::channel(false);
        (stop, tokio::spawn(node::run(config, key, stopped)))
    }

    async fn meter(&self, prefix: &str, n: u64) {
        for i in 0..n {
            self.provider
                .meter(&Meter::usage(&format!("{prefix}-{i}"), MODEL, 10 + i, 3 * i).unwrap())
                .await
                .unwrap();
        }
    }

    /// The daemon's accrued balance for alice, once its latest signed state has caught up.
    async fn daemon_accrued(&self) -> u128 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let c = self.d.channel_of(self.alice).await;
            let signed = c
                .latest_state
                .as_ref()
                .map(|s| Signed::<ChannelState>::decode(&s.signed_state).unwrap());
            let accrued: u128 = c.accrued_nsat.parse().unwrap();
            if signed.is_some_and(|s| s.message.accrued_nsat.0 == accrued) {
                return accrued;
            }
            assert!(tokio::time::Instant::now() < deadline, "daemon never signed its balance");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the node's own records show `accrued`.
    async fn node_reaches(&self, accrued: u128) -> node::NodeStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.store_path().exists() {
                let st = NodeStore::open(&self.store_path()).unwrap().status().unwrap();
                if st.accrued_nsat() == Nsat(accrued) {
                    return st;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node stuck at {:?}, daemon at {accrued}",
                    st.accrued_nsat()
                );
            }
            assert!(tokio::time::Instant::now() < deadline, "node never wrote its records");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn params(&self) -> ChannelParams {
        let c = self.d.channel_of(self.alice).await;
        ChannelParams {
            network: Network::Regtest,
            provider_key: self.d.running().provider_key,
            contributor_key: self.alice,
            nonce: c.nonce.as_slice().try_into().unwrap(),
        }
    }
}

async fn stop(node: (watch::Sender<bool>, tokio::task::JoinHandle<Result<(), node::NodeError>>)) {
    node.0.send(true).unwrap();
    node.1.await.unwrap().expect("node stops cleanly");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_follows_verifies_stores_and_catches_up_after_a_stop() {
    let w = world().await;
    // Started before anything accrued: it waits for its channel to exist.
    let n = w.start_node();
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.meter("a", 40).await;
    let accrued = w.daemon_accrued().await;
    let st = w.node_reaches(accrued).await;
    assert_eq!(st.identity.map(|(_, p, c)| (p, c)), Some((w.d.running().provider_key, w.alice)));
    assert!(st.rejections.is_empty(), "{:?}", st.rejections);
    let seq_before = st.channels[0].latest.unwrap().message.seq;

    // Stopped during metering; started again: it catches up to the latest state.
    stop(n).await;
    w.meter("b", 30).await;
    let n = w.start_node();
    let accrued = w.daemon_accrued().await;
    let st = w.node_reaches(accrued).await;
    assert!(st.channels[0].latest.unwrap().message.seq > seq_before);
    // Its own view equals the daemon's, to the nsat.
    let c = w.d.channel_of(w.alice).await;
    assert_eq!(st.accrued_nsat().0.to_string(), c.accrued_nsat);
    assert_eq!(st.outstanding_nsat().0.to_string(), c.outstanding_nsat);
    assert_eq!(st.settled_msat().0, c.settled_msat);
    assert!(
        st.rejections.is_empty(),
        "re-sent latest states are not refusals: {:?}",
        st.rejections
    );

    // The daemon restarts under it (same address, same data): the node reconnects, logs in
    // again and keeps following.
    let mut w = w;
    let addr = w.d.running().grpc_addr;
    w.d.stop().await;
    w.d = TestDaemon::start_on(&w.dir.path().join("daemon"), addr).await;
    w.meter("c", 20).await;
    let accrued = w.daemon_accrued().await;
    let st = w.node_reaches(accrued).await;
    assert!(st.rejections.is_empty(), "{:?}", st.rejections);
    stop(n).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_replayed_regressing_and_equivocating_states_are_refused_and_kept() {
    let w = world().await;
    let n = w.start_node();
    w.meter("a", 10).await;
    let old_accrued = w.daemon_accrued().await;
    let st = w.node_reaches(old_accrued).await;
    let old = st.channels[0].latest.unwrap();
    w.meter("b", 10).await;
    let accrued = w.daemon_accrued().await;
    let st = w.node_reaches(accrued).await;
    let latest = st.channels[0].latest.unwrap();
    assert!(latest.message.seq > old.message.seq);
    stop(n).await;

    let provider_keypair = tribute_daemon::keys::load_or_create_keypair(
        &w.d.dir.join(tribute_daemon::server::files::PROVIDER_KEY),
    )
    .unwrap();
    let sign = |s: ChannelState| Signed::sign(s, &provider_keypair, &[9; 32]).unwrap().encode();

    let mut store = NodeStore::open(&w.store_path()).unwrap();
    let mut f =
        Follower::load(&mut store, w.params().await, tribute_client::time::unix_now()).unwrap();
    let now = tribute_client::time::unix_now();
    // Right after (re)subscribing the daemon re-sends the latest state: expected, not kept.
    assert_eq!(f.on_state(&mut store, &latest.encode(), now).unwrap(), Seen::Resent);

    let mut tampered = latest.encode();
    tampered[1 + 1 + 32 + 32 + 8 + 15] ^= 1; // lowest byte of accrued_nsat
    let mut equivocating = latest.message;
    equivocating.accrued_nsat.0 += 1;
    let mut lower = latest.message;
    lower.seq += 1;
    lower.accrued_nsat.0 -= 1;
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("BAD_SIGNATURE", tampered, false),
        ("REPLAY", latest.encode(), false),
        ("STATE_REGRESSION", old.encode(), true),
        ("EQUIVOCATION", sign(equivocating), true),
        ("STATE_REGRESSION", sign(lower), true),
        ("MALFORMED", vec![1, 2, 3], false),
    ];
    for (kind, bytes, _) in &cases {
        let seen = f.on_state(&mut store, bytes, now).unwrap();
        assert_eq!(seen, Seen::Refused { kind: kind.to_string() });
        assert_eq!(f.latest(), Some(&latest), "{kind}: the latest state is unchanged");
    }
    drop(store);

    // What the records keep and report.
    let st = NodeStore::open(&w.store_path()).unwrap().status().unwrap();
    assert_eq!(st.channels[0].latest, Some(latest), "stored latest state unchanged");
    assert_eq!(st.rejections.len(), cases.len());
    for (r, (kind, bytes, proof)) in st.rejections.iter().zip(&cases) {
        assert_eq!((&r.kind[..], &r.received, r.is_proof), (*kind, bytes, *proof));
        assert_eq!(
            r.held.as_deref(),
            Some(&latest.encode()[..]),
            "the state held then is kept with it"
        );
    }
    assert_eq!(st.proofs().count(), 3);
    let eq = &st.rejections[3];
    let proof = EquivocationProof {
        first: Signed::decode(eq.held.as_ref().unwrap()).unwrap(),
        second: Signed::decode(&eq.received).unwrap(),
    };
    assert!(proof.is_valid(), "a self-contained proof of equivocation");

    // The node goes on with the real daemon afterwards.
    let n = w.start_node();
    w.meter("c", 5).await;
    let accrued = w.daemon_accrued().await;
    let st = w.node_reaches(accrued).await;
    assert_eq!(st.rejections.len(), cases.len(), "nothing new refused");
    stop(n).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_refuses_a_daemon_with_another_provider_key() {
    let w = world().await;
    let n = w.start_node();
    w.meter("a", 3).await;
    let accrued = w.daemon_accrued().await;
    w.node_reaches(accrued).await;
    stop(n).await;
    // Another daemon (another provider key) at another address, same contributor records.
    let other_dir = w.dir.path().join("other-daemon");
    let other = TestDaemon::start(&other_dir).await;
    let key = ContributorKey::load(&w.home().join("contributor.key")).unwrap();
    let config = NodeConfig {
        endpoint: other.endpoint(),
        store_path: w.store_path(),
        network: None,
        provider_key: None,
        reconnect: RetryPolicy::default(),
        payout: None,
    };
    let (_stop, stopped) = watch::channel(false);
    let err = tokio::time::timeout(Duration::from_secs(10), node::run(config, key, stopped))
        .await
        .expect("fails at once")
        .expect_err("another provider key");
    assert!(err.to_string().contains("provider key"), "{err}");
}

fn state_event(bytes: Vec<u8>) -> tribute_proto::v1::ChannelEvent {
    use tribute_proto::v1 as pb;
    pb::ChannelEvent {
        event: Some(pb::channel_event::Event::State(pb::SignedState {
            signed_state: bytes,
            seq: 0,
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn states_tampered_on_the_wire_are_refused_kept_and_reported_while_the_node_runs_on() {
    let w = world().await;
    let n = w.start_node();
    w.meter("a", 8).await;
    let st = w.node_reaches(w.daemon_accrued().await).await;
    let old = st.channels[0].latest.unwrap();
    w.meter("b", 8).await;
    let st = w.node_reaches(w.daemon_accrued().await).await;
    let latest = st.channels[0].latest.unwrap();
    stop(n).await;

    // Through a gRPC proxy that splices states into the subscription, right after the
    // daemon's own first event (the latest state, re-sent).
    let provider_keypair = tribute_daemon::keys::load_or_create_keypair(
        &w.d.dir.join(tribute_daemon::server::files::PROVIDER_KEY),
    )
    .unwrap();
    let mut tampered = latest.encode();
    tampered[1 + 1 + 32 + 32 + 8 + 15] ^= 1;
    let mut forked = latest.message;
    forked.accrued_nsat.0 += 7;
    let equivocation = Signed::sign(forked, &provider_keypair, &[5; 32]).unwrap().encode();
    let injected = vec![
        state_event(tampered.clone()),
        state_event(old.encode()),
        state_event(equivocation.clone()),
        state_event(latest.encode()),
    ];
    let proxy = tribute_tests::grpc_proxy::GrpcProxy::start(w.d.channel().await, injected).await;
    let key = ContributorKey::load(&w.home().join("contributor.key")).unwrap();
    let config = NodeConfig {
        endpoint: tribute_client::DaemonEndpoint::new(proxy.url()),
        store_path: w.store_path(),
        network: Some(Network::Regtest),
        provider_key: Some(w.d.running().provider_key),
        reconnect: RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        },
        payout: None,
    };
    let (stop_tx, stopped) = watch::channel(false);
    let node_task = tokio::spawn(node::run(config, key, stopped));

    // The forged states arrive right after the re-sent latest one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while NodeStore::open(&w.store_path()).unwrap().status().unwrap().rejections.len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "the forged states never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = NodeStore::open(&w.store_path()).unwrap().status().unwrap();
    assert_eq!(st.channels[0].latest, Some(latest), "stored latest state unchanged");
    // Real states keep coming after the forged ones, and are accepted.
    w.meter("c", 8).await;
    let accrued = w.daemon_accrued().await;
    let st = w.node_reaches(accrued).await;
    let kinds: Vec<&str> = st.rejections.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["BAD_SIGNATURE", "STATE_REGRESSION", "EQUIVOCATION", "REPLAY"]);
    assert_eq!(st.rejections[0].received, tampered);
    assert_eq!(st.rejections[2].received, equivocation);
    assert!(st.rejections.iter().all(|r| r.held.as_deref() == Some(&latest.encode()[..])));
    assert_eq!(st.proofs().count(), 2);
    assert!(st.channels[0].latest.unwrap().message.seq > latest.message.seq);
    // The node reported both proofs; the daemon verified them and kept the equivocation
    // only (the "regression" was an old state re-sent: it proves nothing).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let reports = loop {
        let conn = rusqlite::Connection::open(w.d.db_path()).unwrap();
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = conn
            .prepare("SELECT kind, held, received FROM misbehaviour_reports")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if !rows.is_empty() {
            break rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "the node never reported its proof");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reports, [("equivocation".to_owned(), latest.encode(), equivocation.clone())]);
    assert_eq!(st.accrued_nsat().0.to_string(), w.d.channel_of(w.alice).await.accrued_nsat);
    stop((stop_tx, node_task)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_keeps_settlements_and_catches_up_after_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let (d, backend) = TestDaemon::start_settling(&dir.path().join("daemon")).await;
    let mut datasets = Vec::new();
    let mut alice = None;
    for (i, name) in ["alice", "bob"].iter().enumerate() {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let (k, h) = contributor_with_dataset(&d, &home, name).await;
        alice.get_or_insert(k);
        datasets.push((h, i as u64 + 2));
    }
    setup_model(&d, MODEL, &datasets, 700_000).await;
    let provider =
        Provider::connect(ProviderConfig::new(d.endpoint(), &d.provider_token)).await.unwrap();
    let w = World { dir, d, alice: alice.unwrap(), provider };

    // A settlement while the node runs: it keeps the notices and the settled state.
    let n = w.start_node();
    w.meter("a", 30).await;
    w.node_reaches(w.daemon_accrued().await).await;
    w.d.running().settlement.settle_now_and_wait().await;
    let settled = w.d.channel_of(w.alice).await.settled_msat;
    assert!(settled > 0, "something was settled");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = NodeStore::open(&w.store_path()).unwrap().status().unwrap();
        if st.settled_msat().0 == settled && st.noticed_succeeded_msat().0 == settled {
            break st;
        }
        assert!(tokio::time::Instant::now() < deadline, "node never saw the settlement: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let latest = st.channels[0].latest.unwrap().message;
    assert_ne!(latest.last_settlement_hash, [0; 32]);
    assert!(st
        .settlements
        .iter()
        .any(|s| s.state == "succeeded" && s.payment_hash == latest.last_settlement_hash.to_vec()));
    assert_eq!(st.claimed.len(), 1);
    assert_eq!(st.claimed[0].settled_increase_msat, settled);
    assert_eq!(st.claimed_without_notice().count(), 0);
    assert!(st.rejections.is_empty(), "{:?}", st.rejections);

    // Stopped during metering and a settlement, started again: it catches up to the latest
    // signed state, settled amount included.
    stop(n).await;
    w.meter("b", 30).await;
    w.d.running().settlement.settle_now_and_wait().await;
    w.meter("c", 5).await;
    let n = w.start_node();
    let accrued = w.daemon_accrued().await;
    let st = w.node_reaches(accrued).await;
    let c = w.d.channel_of(w.alice).await;
    assert!(c.settled_msat > settled, "a second settlement happened");
    assert_eq!(st.settled_msat().0, c.settled_msat);
    assert_eq!(st.outstanding_nsat().0.to_string(), c.outstanding_nsat);
    assert!(st.rejections.is_empty(), "{:?}", st.rejections);
    // Settlement notices are only streamed live: the one sent while the node was down is
    // not in its records; the signed state carries the settled amount, and status names
    // the settlement it claims without a notice.
    assert_eq!(st.noticed_succeeded_msat().0, settled);
    let missed: Vec<_> = st.claimed_without_notice().collect();
    assert_eq!(missed.len(), 1, "{:?}", st.claimed);
    assert_eq!(missed[0].payment_hash, st.channels[0].latest.unwrap().message.last_settlement_hash);
    assert_eq!(missed[0].settled_increase_msat, c.settled_msat - settled);
    assert_eq!(st.notices_without_state().count(), 0);
    assert!(backend.sent_payments().len() >= 2);
    stop(n).await;
}
