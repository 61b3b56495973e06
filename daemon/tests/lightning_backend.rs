//! The Lightning backend layer against real ldk-node nodes on the dev chain: a payer
//! `LdkBackend` and a payee `LdkBackend` with a private channel between them. The payer runs
//! the conformance suite every backend runs; then keysend with custom TLVs, BOLT12 offers
//! paid twice, operator operations, a payee that is offline, restarts, and a cooperative
//! close.
//!
//! The tests take a shared lock so only one set of nodes runs at a time (2 cores). Every
//! wait is bounded by [`WAIT`] and fails with a message saying what did not happen. Set
//! `TRIBUTE_KEEP_TEST_DIRS=1` to keep the nodes' data dirs (and their logs).

mod common_ln;

use common_ln::*;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ldk_node::bitcoin::{Amount, Network};
use tribute_daemon::devchain::DevChain;
use tribute_daemon::lightning::conformance::{self, ConformanceTarget};
use tribute_daemon::lightning::{
    payment_hash, ChainSourceConfig, EventHandlerError, KeysendRequest, LdkBackend,
    LdkBackendConfig, LightningBackend, LightningError, LightningEvent, LightningEventHandler,
    OfferRequest, OpenChannelRequest, PaymentId, PaymentStatus, SEED_FILE_NAME,
};

const FUNDING_SATS: u64 = 1_000_000;
const CHANNEL_SATS: u64 = 500_000;
const KEYSEND_MSAT: u64 = 21_000;
const OFFER_MSAT: u64 = 34_000;
const MAX_FEE_MSAT: u64 = 1_000;

/// One set of nodes at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the next event of `backend` that `pick` accepts; the events before it are
/// printed (so a failure shows what happened instead) and dropped.
async fn wait_event<T>(
    backend: &LdkBackend,
    what: &str,
    mut pick: impl FnMut(&LightningEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, backend.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
            .unwrap_or_else(|| panic!("event queue closed while waiting for {what}"));
        if let Some(value) = pick(&event) {
            return value;
        }
        eprintln!("(while waiting for {what}) {event:?}");
    }
}

/// Syncs `backend`'s wallets until its spendable on-chain balance reaches `min_sat`.
async fn wait_spendable(backend: &LdkBackend, min_sat: u64, what: &str) -> u64 {
    wait_until(what, || async {
        // A failed sync is retried by the loop; the deadline bounds it.
        let _ = backend.sync_wallets().await;
        let balance = backend.onchain_balance().await.expect("onchain_balance");
        (balance.spendable_sat >= min_sat).then_some(balance.spendable_sat)
    })
    .await
}

/// Waits until `backend`'s only channel has `usable == want`.
async fn wait_channel_usable(backend: &LdkBackend, want: bool, what: &str) {
    wait_until(what, || async {
        let channels = backend.list_channels().await.expect("list_channels");
        (channels.len() == 1 && channels[0].usable == want).then_some(())
    })
    .await;
}

fn backend_config(
    chain: &DevChain,
    dir: &TestDir,
    port: u16,
    alias: &str,
    trusted: Vec<[u8; 33]>,
) -> LdkBackendConfig {
    LdkBackendConfig {
        listening_addresses: vec![format!("127.0.0.1:{port}")],
        node_alias: Some(alias.to_owned()),
        trusted_peers_no_reserve: trusted,
        ..LdkBackendConfig::new(
            dir.path.clone(),
            Network::Regtest,
            ChainSourceConfig::dev_chain(chain),
        )
    }
}

/// Two `LdkBackend`s on a dev chain with a confirmed channel from the payer to the payee.
struct Pair {
    started: Instant,
    chain: DevChain,
    payer: LdkBackend,
    payee: LdkBackend,
    payer_config: LdkBackendConfig,
    payee_config: LdkBackendConfig,
    payee_addr: String,
    _dirs: (TestDir, TestDir),
}

impl Pair {
    fn log(&self, what: &str) {
        eprintln!("[{:>6.1?}] {what}", self.started.elapsed());
    }

    /// `payer_handler`, if any, takes the payer's events before they are acknowledged.
    async fn start(announce: bool, payer_handler: Option<Arc<dyn LightningEventHandler>>) -> Pair {
        let started = Instant::now();
        let chain = DevChain::start().await.expect("start dev chain");
        let dirs = (TestDir::new("ln-backend-payer-"), TestDir::new("ln-backend-payee-"));
        let (payer_port, payee_port) = (free_port(), free_port());
        let payer_config = backend_config(&chain, &dirs.0, payer_port, "tribute-payer", vec![]);
        let payer = LdkBackend::start_with_handler(payer_config.clone(), payer_handler)
            .await
            .expect("start payer");
        let payee_config =
            backend_config(&chain, &dirs.1, payee_port, "tribute-payee", vec![payer.node_id()]);
        let payee = LdkBackend::start(payee_config.clone()).await.expect("start payee");
        let payee_addr = format!("127.0.0.1:{payee_port}");
        let pair = Pair {
            started,
            chain,
            payer,
            payee,
            payer_config,
            payee_config,
            payee_addr,
            _dirs: dirs,
        };
        pair.log("nodes started");

        // Fund the payer through the faucet.
        let address = pair.payer.onchain_address().await.expect("onchain_address");
        pair.chain.faucet(&address, Amount::from_sat(FUNDING_SATS)).expect("faucet");
        pair.chain.mine_blocks(1).expect("mine");
        let funded = wait_spendable(&pair.payer, FUNDING_SATS, "the payer's funding").await;
        assert_eq!(funded, FUNDING_SATS);
        pair.log("payer funded");

        // Open the channel and confirm it with 6 blocks.
        pair.payer
            .open_channel(OpenChannelRequest {
                node_id: pair.payee.node_id(),
                addr: pair.payee_addr.clone(),
                amount_sat: CHANNEL_SATS,
                push_msat: 0,
                announce,
            })
            .await
            .expect("open_channel");
        let funding_txid = wait_event(&pair.payer, "ChannelPending on the payer", |e| match e {
            LightningEvent::ChannelPending { funding_txid, .. } => Some(*funding_txid),
            _ => None,
        })
        .await;
        wait_in_mempool(&pair.chain, funding_txid, "the funding tx in the mempool").await;
        pair.chain.mine_blocks(6).expect("mine");
        // Nodes poll the chain every few seconds; a sync now saves the wait.
        pair.payer.sync_wallets().await.expect("sync payer");
        pair.payee.sync_wallets().await.expect("sync payee");
        let ready = |e: &LightningEvent| matches!(e, LightningEvent::ChannelReady { .. });
        wait_event(&pair.payer, "ChannelReady on the payer", |e| ready(e).then_some(())).await;
        wait_event(&pair.payee, "ChannelReady on the payee", |e| ready(e).then_some(())).await;
        wait_channel_usable(&pair.payer, true, "the channel to be usable").await;
        pair.log("channel ready");
        pair
    }

    fn keysend(&self, preimage: [u8; 32], custom_tlvs: Vec<(u64, Vec<u8>)>) -> KeysendRequest {
        KeysendRequest {
            dest_node_id: self.payee.node_id(),
            amount_msat: KEYSEND_MSAT,
            preimage,
            custom_tlvs,
            max_fee_msat: MAX_FEE_MSAT,
        }
    }

    async fn shutdown(self) {
        self.payer.stop().await.expect("stop payer");
        self.payee.stop().await.expect("stop payee");
        self.chain.shutdown().await;
    }
}

/// Waits for the payee to receive the payment with `hash`; returns its amount and TLVs.
async fn wait_received(
    payee: &LdkBackend,
    hash: [u8; 32],
    what: &str,
) -> (u64, Vec<(u64, Vec<u8>)>) {
    wait_event(payee, what, |e| match e {
        LightningEvent::PaymentReceived { payment_hash, amount_msat, custom_tlvs }
            if *payment_hash == hash =>
        {
            Some((*amount_msat, custom_tlvs.clone()))
        }
        _ => None,
    })
    .await
}

/// An event handler that records what it takes; while `refuse_payments` is set it refuses
/// payment outcomes (as a handler whose database write fails would).
struct Recorder {
    refuse_payments: AtomicBool,
    refused: AtomicU32,
    handled: Mutex<Vec<LightningEvent>>,
}

impl Recorder {
    fn new(refuse_payments: bool) -> Recorder {
        Recorder {
            refuse_payments: AtomicBool::new(refuse_payments),
            refused: AtomicU32::new(0),
            handled: Mutex::new(Vec::new()),
        }
    }

    fn handled_success(&self, id: &PaymentId) -> bool {
        self.handled.lock().expect("lock").iter().any(|e| {
            matches!(e, LightningEvent::PaymentSucceeded { payment_id, .. } if payment_id == id)
        })
    }
}

#[tonic::async_trait]
impl LightningEventHandler for Recorder {
    async fn handle_event(&self, event: &LightningEvent) -> Result<(), EventHandlerError> {
        let payment = matches!(
            event,
            LightningEvent::PaymentSucceeded { .. } | LightningEvent::PaymentFailed { .. }
        );
        if payment && self.refuse_payments.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(EventHandlerError("disk full".into()));
        }
        self.handled.lock().expect("lock").push(event.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ldk_backend_conformance_keysend_tlvs_bolt12_and_operator_ops() {
    let _serial = SERIAL.lock().await;
    let pair = Pair::start(false, None).await;

    // The seed file is the node's, mode 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let seed = pair.payer_config.data_dir.join(SEED_FILE_NAME);
        let mode = std::fs::metadata(&seed).expect("seed file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "seed file mode");
    }

    // The conformance suite, over the private channel.
    let payer: Arc<dyn LightningBackend> = Arc::new(pair.payer.clone());
    let target = ConformanceTarget::new(payer, pair.payee.node_id());
    conformance::run_all(&target).await;
    pair.log("conformance suite passed");

    // Keysend with custom TLVs: they arrive intact (sorted by type).
    let tlvs = vec![
        (70_001, b"settlement 7f3a".to_vec()),
        (65_537, vec![0xab; 32]),
        (70_003, 42u64.to_be_bytes().to_vec()),
    ];
    let request = pair.keysend(conformance::fresh_preimage(), tlvs.clone());
    let id = request.payment_id();
    pair.payer.pay_keysend(request.clone()).await.expect("keysend with TLVs");
    let (amount, received_tlvs) = wait_received(&pair.payee, id.0, "the TLV keysend").await;
    assert_eq!(amount, KEYSEND_MSAT);
    let mut expected = tlvs;
    expected.sort_by_key(|(t, _)| *t);
    assert_eq!(received_tlvs, expected, "custom TLVs arrive intact");
    let status = conformance::wait_final(&pair.payer, &id, WAIT).await;
    assert!(matches!(status, PaymentStatus::Succeeded { .. }), "{status:?}");
    // The payer's event stream reported the same outcome.
    let preimage = wait_event(&pair.payer, "PaymentSucceeded on the payer", |e| match e {
        LightningEvent::PaymentSucceeded { payment_id, preimage, .. } if *payment_id == id => {
            Some(*preimage)
        }
        _ => None,
    })
    .await;
    assert_eq!(preimage, request.preimage);
    pair.log("keysend with TLVs received");

    // A BOLT12 offer from the payee, paid twice; each payment has its own id and is found
    // again by its payer note.
    let offer = pair
        .payee
        .node()
        .bolt12_payment()
        .receive_variable_amount("tribute payouts", None)
        .expect("create offer")
        .to_string();
    let mut offer_ids = Vec::new();
    for round in 1..=2u64 {
        let note = format!("tribute settlement {round}");
        let paid = pair
            .payer
            .pay_offer(OfferRequest {
                offer: offer.clone(),
                amount_msat: OFFER_MSAT * round,
                payer_note: note.clone(),
                max_fee_msat: MAX_FEE_MSAT,
            })
            .await
            .unwrap_or_else(|e| panic!("pay offer, round {round}: {e}"));
        assert_eq!(paid.payment_hash, None, "BOLT12 hash is unknown at send time");
        let status = conformance::wait_final(&pair.payer, &paid.payment_id, WAIT).await;
        let PaymentStatus::Succeeded { preimage, .. } = status else {
            panic!("offer payment {round} did not succeed: {status:?}")
        };
        let (amount, _) =
            wait_received(&pair.payee, payment_hash(&preimage), "the offer payment").await;
        assert_eq!(amount, OFFER_MSAT * round);
        let found = pair.payer.find_offer_payments(&note).await.expect("find_offer_payments");
        assert_eq!(found, vec![(paid.payment_id, status)], "found by payer note");
        offer_ids.push(paid.payment_id);
        pair.log(&format!("offer paid, round {round}"));
    }
    assert_ne!(offer_ids[0], offer_ids[1], "each offer payment has its own id");
    let bad_offer = OfferRequest {
        offer: "lno1notanoffer".into(),
        amount_msat: OFFER_MSAT,
        payer_note: "bad".into(),
        max_fee_msat: MAX_FEE_MSAT,
    };
    let refused = pair.payer.pay_offer(bad_offer).await;
    assert!(matches!(refused, Err(LightningError::Permanent(_))), "{refused:?}");

    // Operator operations.
    let info = pair.payer.node_info().await.expect("node_info");
    assert_eq!(info.node_id, pair.payer.node_id());
    assert_eq!(info.network, Network::Regtest);
    assert!(info.block_height >= 108, "height {}", info.block_height);
    assert_eq!(info.listening_addresses, pair.payer_config.listening_addresses);
    assert_eq!((info.channels.total, info.channels.usable), (1, 1));
    let channels = pair.payer.list_channels().await.expect("list_channels");
    let [channel] = channels.as_slice() else { panic!("one channel expected: {channels:?}") };
    assert_eq!(channel.counterparty, pair.payee.node_id());
    assert_eq!(channel.capacity_sat, CHANNEL_SATS);
    assert!(channel.ready && channel.usable && channel.outbound && !channel.announced);
    assert!(channel.confirmations.unwrap_or(0) >= 6, "{channel:?}");
    // What was paid left the payer's side. (The payee's side is still below the channel
    // reserve, so neither side's capacity shows it as spendable yet.)
    assert!(channel.outbound_capacity_msat < CHANNEL_SATS * 1_000 - 3 * OFFER_MSAT);
    assert!(channel.outbound_capacity_msat > CHANNEL_SATS * 1_000 / 2, "{channel:?}");
    assert_eq!(info.channels.outbound_capacity_msat, channel.outbound_capacity_msat);
    let balance = pair.payer.onchain_balance().await.expect("onchain_balance");
    assert!(
        balance.total_sat > 0 && balance.total_sat < FUNDING_SATS - CHANNEL_SATS,
        "{balance:?}"
    );
    assert!(balance.spendable_sat <= balance.total_sat, "{balance:?}");
    assert!(balance.lightning_sat > 0 && balance.lightning_sat <= CHANNEL_SATS, "{balance:?}");
    let address = pair.payer.onchain_address().await.expect("onchain_address");
    assert!(address.to_string().starts_with("bcrt1"), "{address}");
    assert_ne!(address.to_string(), pair.payer.onchain_address().await.expect("again").to_string());
    assert_eq!(pair.payer.dropped_events(), 0);
    pair.log("operator ops checked");

    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ldk_backend_payee_offline_restart_and_close() {
    let _serial = SERIAL.lock().await;
    // The first payer's handler cannot record payment outcomes (say its disk is full).
    let first_handler = Arc::new(Recorder::new(true));
    let mut pair = Pair::start(false, Some(first_handler.clone())).await;

    let paid = pair.keysend(conformance::fresh_preimage(), Vec::new());
    pair.payer.pay_keysend(paid.clone()).await.expect("keysend");
    let paid_status = conformance::wait_final(&pair.payer, &paid.payment_id(), WAIT).await;
    assert!(matches!(paid_status, PaymentStatus::Succeeded { .. }), "{paid_status:?}");
    // The outcome is known (from the node's store), but the event stays unacknowledged.
    wait_until("the handler to be offered the success", || async {
        (first_handler.refused.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert!(!first_handler.handled_success(&paid.payment_id()));

    // The payee goes offline: a keysend to it is a definite failure.
    pair.payee.stop().await.expect("stop payee");
    wait_channel_usable(&pair.payer, false, "the channel to become unusable").await;
    let offline = pair.keysend(conformance::fresh_preimage(), Vec::new());
    let offline_id = offline.payment_id();
    let result = pair.payer.pay_keysend(offline.clone()).await;
    let status = match result {
        // The node refuses at once (no usable channel) ...
        Err(LightningError::PaymentFailed(reason)) => {
            eprintln!("payee offline: refused at send time: {reason}");
            pair.payer.payment_status(&offline_id).await.expect("payment_status")
        }
        // ... or fails it in flight.
        Ok(_) => conformance::wait_final(&pair.payer, &offline_id, WAIT).await,
        Err(e) => panic!("payee offline: expected a definite failure, got {e:?}"),
    };
    let PaymentStatus::Failed { reason } = status else {
        panic!("payee offline: expected Failed, got {status:?}")
    };
    eprintln!("payee offline: status Failed ({reason})");
    pair.log("payee offline: definite failure");

    // The payer restarts: its payment records survive, duplicates are still refused.
    pair.payer.stop().await.expect("stop payer");
    wait_until("a stopped backend's event queue to end", || async {
        pair.payer.next_event().await.is_none().then_some(())
    })
    .await;
    assert!(matches!(
        pair.payer.pay_keysend(pair.keysend(conformance::fresh_preimage(), Vec::new())).await,
        Err(LightningError::Unavailable(_))
    ));
    assert!(matches!(pair.payer.list_channels().await, Err(LightningError::Unavailable(_))));
    let second_handler = Arc::new(Recorder::new(false));
    pair.payer =
        LdkBackend::start_with_handler(pair.payer_config.clone(), Some(second_handler.clone()))
            .await
            .expect("restart payer");
    // The unacknowledged success is offered again after the restart, and taken.
    wait_until("the replayed success to be handled", || async {
        second_handler.handled_success(&paid.payment_id()).then_some(())
    })
    .await;
    assert!(!first_handler.handled_success(&paid.payment_id()));
    let after = pair.payer.payment_status(&paid.payment_id()).await.expect("status");
    assert_eq!(after, paid_status, "a succeeded payment survives a restart");
    assert_eq!(
        pair.payer.pay_keysend(paid.clone()).await,
        Err(LightningError::Duplicate(paid.payment_id())),
        "a repeat is refused after a restart"
    );
    let after = pair.payer.payment_status(&offline_id).await.expect("status");
    assert!(matches!(after, PaymentStatus::Failed { .. }), "failure survives: {after:?}");
    pair.log("payer restarted");

    // The payee comes back with the same seed (same node id); the channel is usable again.
    let payee_id = pair.payee.node_id();
    pair.payee = LdkBackend::start(pair.payee_config.clone()).await.expect("restart payee");
    assert_eq!(pair.payee.node_id(), payee_id, "same seed, same node id");
    pair.payer.connect(payee_id, &pair.payee_addr).await.expect("connect");
    wait_channel_usable(&pair.payer, true, "the channel to be usable again").await;
    pair.log("payee back");

    // Retrying the failed keysend with the same preimage: the id was freed by a failure at
    // send time, so this pays (an in-flight failure would be refused for ~7 min by LDK).
    match pair.payer.pay_keysend(offline.clone()).await {
        Ok(_) => {
            let status = conformance::wait_final(&pair.payer, &offline_id, WAIT).await;
            assert!(matches!(status, PaymentStatus::Succeeded { .. }), "retry: {status:?}");
            wait_received(&pair.payee, offline_id.0, "the retried keysend").await;
            eprintln!("retry with the same preimage after a definite failure: paid");
        }
        Err(LightningError::Duplicate(_)) => {
            eprintln!("retry with the same preimage after a definite failure: Duplicate");
        }
        Err(e) => panic!("retry after the payee came back: {e:?}"),
    }

    // Cooperative close: both sides report it and the payer's funds come back on chain.
    let channel = pair.payer.list_channels().await.expect("list_channels").remove(0);
    pair.payer.close_channel(&channel.channel_id, false).await.expect("close_channel");
    let closed = |e: &LightningEvent| matches!(e, LightningEvent::ChannelClosed { .. });
    wait_event(&pair.payer, "ChannelClosed on the payer", |e| closed(e).then_some(())).await;
    wait_event(&pair.payee, "ChannelClosed on the payee", |e| closed(e).then_some(())).await;
    let closing_txid = wait_until("the closing tx in the mempool", || async {
        pair.chain.mempool_txids().first().copied()
    })
    .await;
    pair.chain.mine_blocks(1).expect("mine");
    assert_eq!(pair.chain.tx_confirmations(&closing_txid), Some(1));
    let min_back = FUNDING_SATS - CHANNEL_SATS + CHANNEL_SATS / 2;
    wait_spendable(&pair.payer, min_back, "the payer's funds back after the close").await;
    assert!(pair.payer.list_channels().await.expect("list_channels").is_empty());
    let unknown = pair.payer.close_channel(&channel.channel_id, false).await;
    assert!(matches!(unknown, Err(LightningError::Permanent(_))), "{unknown:?}");
    pair.log("channel closed");

    pair.shutdown().await;
}

/// Opens a channel from `payer` to `payee` and confirms it (one funding transaction at a
/// time: each spends the wallet's change); returns when the payer sees it ready.
async fn open_confirmed(
    chain: &DevChain,
    payer: &LdkBackend,
    payee: &LdkBackend,
    payee_addr: &str,
    announce: bool,
) {
    payer
        .open_channel(OpenChannelRequest {
            node_id: payee.node_id(),
            addr: payee_addr.to_owned(),
            amount_sat: CHANNEL_SATS / 2,
            push_msat: 0,
            announce,
        })
        .await
        .expect("open_channel");
    let funding_txid = wait_event(payer, "ChannelPending on the payer", |e| match e {
        LightningEvent::ChannelPending { funding_txid, .. } => Some(*funding_txid),
        _ => None,
    })
    .await;
    wait_in_mempool(chain, funding_txid, "the funding tx in the mempool").await;
    chain.mine_blocks(6).expect("mine");
    payer.sync_wallets().await.expect("sync payer");
    payee.sync_wallets().await.expect("sync payee");
    wait_event(payer, "ChannelReady on the payer", |e| {
        matches!(e, LightningEvent::ChannelReady { .. }).then_some(())
    })
    .await;
}

/// Issue 4: a payer with private channels to two unannounced peers cannot pay a BOLT12
/// offer (LDK builds the invoice request's reply path only through an announced node or the
/// payer's only peer: `MissingPaths`), and the backend says so and what to do; once the
/// payer has an announced channel it pays the offer of a peer it reaches over a private
/// channel, twice.
#[tokio::test(flavor = "multi_thread")]
async fn ldk_backend_bolt12_with_two_private_peers_needs_an_announced_payer() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let log = |what: &str| eprintln!("[{:>6.1?}] {what}", started.elapsed());
    let chain = DevChain::start().await.expect("start dev chain");
    let dirs = (
        TestDir::new("ln-two-payer-"),
        TestDir::new("ln-two-keysend-"),
        TestDir::new("ln-two-offer-"),
    );
    let ports = (free_port(), free_port(), free_port());
    let payer = LdkBackend::start(backend_config(&chain, &dirs.0, ports.0, "payer", vec![]))
        .await
        .expect("start payer");
    // A peer that accepts an announced channel (it has an alias and an address) ...
    let hub_config = backend_config(&chain, &dirs.1, ports.1, "hub", vec![payer.node_id()]);
    let hub = LdkBackend::start(hub_config).await.expect("start hub");
    // ... and a contributor-like node with only a private channel and an offer.
    let payee_config = LdkBackendConfig {
        node_alias: None,
        ..backend_config(&chain, &dirs.2, ports.2, "unused", vec![payer.node_id()])
    };
    let payee = LdkBackend::start(payee_config).await.expect("start payee");
    let addr = |port: u16| format!("127.0.0.1:{port}");

    let address = payer.onchain_address().await.expect("onchain_address");
    chain.faucet(&address, Amount::from_sat(FUNDING_SATS)).expect("faucet");
    chain.mine_blocks(1).expect("mine");
    wait_spendable(&payer, FUNDING_SATS, "the payer's funding").await;
    open_confirmed(&chain, &payer, &payee, &addr(ports.2), false).await;
    open_confirmed(&chain, &payer, &hub, &addr(ports.1), false).await;
    wait_until("both channels usable", || async {
        let channels = payer.list_channels().await.expect("list_channels");
        (channels.len() == 2 && channels.iter().all(|c| c.usable)).then_some(())
    })
    .await;
    log("two private channels ready");

    let offer = payee
        .node()
        .bolt12_payment()
        .receive_variable_amount("tribute payouts", None)
        .expect("create offer (the payee has one peer)")
        .to_string();
    let pay = |round: u64| {
        payer.pay_offer(OfferRequest {
            offer: offer.clone(),
            amount_msat: OFFER_MSAT * round,
            payer_note: format!("tribute settlement {round}"),
            max_fee_msat: MAX_FEE_MSAT,
        })
    };
    assert!(!payer.is_announced());
    match pay(1).await {
        Err(LightningError::PaymentFailed(reason)) => {
            let why = reason.to_string();
            assert!(why.contains("MissingPaths") && why.contains("announced channel"), "{why}");
            eprintln!("unannounced payer, two peers: {why}");
        }
        other => panic!("an unannounced payer with two peers paid an offer: {other:?}"),
    }
    log("unannounced payer with two peers: refused, with the reason");

    // The fix: one announced channel (here to the hub) puts the payer in its own graph.
    open_confirmed(&chain, &payer, &hub, &addr(ports.1), true).await;
    wait_until("the payer in its own gossip graph", || async {
        payer.is_announced().then_some(())
    })
    .await;
    log("payer announced");
    let mut ids = Vec::new();
    for round in 1..=2u64 {
        let paid = pay(round).await.unwrap_or_else(|e| panic!("pay offer, round {round}: {e}"));
        let status = conformance::wait_final(&payer, &paid.payment_id, WAIT).await;
        let PaymentStatus::Succeeded { preimage, .. } = status else {
            panic!("offer payment {round} did not succeed: {status:?}")
        };
        let (amount, _) = wait_received(&payee, payment_hash(&preimage), "the offer payment").await;
        assert_eq!(amount, OFFER_MSAT * round);
        ids.push(paid.payment_id);
        log(&format!("offer paid over the private channel, round {round}"));
    }
    assert_ne!(ids[0], ids[1]);

    payer.stop().await.expect("stop payer");
    hub.stop().await.expect("stop hub");
    payee.stop().await.expect("stop payee");
    chain.shutdown().await;
}
