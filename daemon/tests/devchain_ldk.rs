//! The dev chain against real clients: lightning-block-sync's RPC client (the code ldk-node
//! runs) and two real ldk-node nodes that fund, open a private channel, pay by keysend and
//! BOLT11, and close cooperatively.
//!
//! Every wait is bounded by [`WAIT`] and fails with a message saying what did not happen.
//! Set `TRIBUTE_KEEP_TEST_DIRS=1` to keep the nodes' data dirs (and their logs).

mod common_ln;

use common_ln::*;
use std::time::Instant;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use ldk_node::bitcoin::consensus::encode::serialize_hex;
use ldk_node::bitcoin::hashes::Hash;
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::bitcoin::transaction::Version;
use ldk_node::bitcoin::{
    absolute, Address, Amount, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut,
    Txid, Witness,
};
use ldk_node::config::Config;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
use ldk_node::{Builder, Event, Node};
use lightning_block_sync::gossip::UtxoSource;
use lightning_block_sync::http::HttpEndpoint;
use lightning_block_sync::poll::Validate;
use lightning_block_sync::rpc::{RpcClient, RpcError};
use lightning_block_sync::{BlockData, BlockSource};
use tribute_daemon::devchain::DevChain;

const FUNDING_SATS: u64 = 1_000_000;
const CHANNEL_SATS: u64 = 500_000;
const KEYSEND_MSAT: u64 = 12_345_000;
const INVOICE_MSAT: u64 = 23_456_000;

fn rpc_client(chain: &DevChain, user: &str, password: &str) -> RpcClient {
    let credentials = BASE64_STANDARD.encode(format!("{user}:{password}"));
    let endpoint = HttpEndpoint::for_host(chain.rpc_addr().ip().to_string())
        .with_port(chain.rpc_addr().port());
    RpcClient::new(&credentials, endpoint)
}

/// A p2wpkh-shaped script; nothing checks that anyone holds its key.
fn fake_p2wpkh(tag: u8) -> ScriptBuf {
    let mut bytes = vec![0x00, 0x14];
    bytes.extend_from_slice(&[tag; 20]);
    ScriptBuf::from_bytes(bytes)
}

/// The same checks ldk-node's chain poller applies to every block it connects.
#[tokio::test(flavor = "multi_thread")]
async fn lightning_block_sync_accepts_the_dev_chain() {
    let chain = DevChain::start().await.expect("start dev chain");
    let client = rpc_client(&chain, chain.rpc_user(), chain.rpc_password());

    let (best_hash, best_height) = client.get_best_block().await.expect("getblockchaininfo");
    assert_eq!(best_height, Some(101));
    assert_eq!(best_hash, chain.tip_hash());
    assert_eq!(client.get_block_hash_by_height(101).await.expect("getblockhash"), best_hash);

    // A segwit spend makes the next block need a witness commitment.
    let address = Address::from_script(&fake_p2wpkh(1), Network::Regtest).expect("address");
    let funding = chain.faucet(&address, Amount::from_sat(100_000)).expect("faucet");
    chain.mine_blocks(1).expect("mine");
    let funding_out = OutPoint { txid: funding, vout: 0 };
    assert!(client.is_output_unspent(funding_out).await.expect("gettxout"));
    let spend = Transaction {
        version: Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: funding_out,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: Witness::from_slice(&[vec![0x30; 71], vec![0x02; 33]]),
        }],
        output: vec![TxOut { value: Amount::from_sat(99_000), script_pubkey: fake_p2wpkh(2) }],
    };
    let sent: Txid = client
        .call_method("sendrawtransaction", &[serde_json::json!(serialize_hex(&spend))])
        .await
        .expect("sendrawtransaction");
    assert_eq!(sent, spend.compute_txid());
    // Sending it again is fine while it waits in the mempool, as with bitcoind.
    let again: Txid = client
        .call_method("sendrawtransaction", &[serde_json::json!(serialize_hex(&spend))])
        .await
        .expect("resend");
    assert_eq!(again, sent);
    let hash = chain.mine_blocks(1).expect("mine")[0];

    let header = client.get_header(&hash, None).await.expect("getblockheader");
    assert_eq!(header.height, 103);
    let header = header.validate(hash).expect("header validates");
    let block = client.get_block(&hash).await.expect("getblock");
    let BlockData::FullBlock(ref full) = block else { panic!("getblock gave no full block") };
    assert_eq!(full.txdata.len(), 2);
    block.validate(hash).expect("PoW, merkle root and witness commitment validate");
    // Chainwork adds up over the previous header, as the poller checks.
    let prev = client.get_header(&header.header.prev_blockhash, None).await.expect("prev header");
    assert_eq!(header.chainwork, prev.chainwork + header.header.work());

    // gettxout: spent now, the new output unspent, made-up outpoints unknown.
    assert!(!client.is_output_unspent(funding_out).await.expect("gettxout spent"));
    let new_out = OutPoint { txid: sent, vout: 0 };
    assert!(client.is_output_unspent(new_out).await.expect("gettxout new"));
    let unknown = OutPoint { txid: Txid::all_zeros(), vout: 0 };
    assert!(!client.is_output_unspent(unknown).await.expect("gettxout unknown"));

    // "Not found" comes back as RPC error -5, which ldk-node maps to `None`.
    let err = client
        .call_method::<serde_json::Value>("getmempoolentry", &[serde_json::json!(sent.to_string())])
        .await
        .expect_err("confirmed tx is not in the mempool");
    let code = err.get_ref().and_then(|e| e.downcast_ref::<RpcError>()).map(|e| e.code);
    assert_eq!(code, Some(-5));

    // Wrong credentials are refused.
    let intruder = rpc_client(&chain, chain.rpc_user(), "wrong");
    assert!(intruder.get_best_block().await.is_err());

    chain.shutdown().await;
}

fn start_node(chain: &DevChain, dir: &TestDir, port: u16, trusted: Vec<PublicKey>) -> Node {
    let mut config = Config {
        network: Network::Regtest,
        storage_dir_path: dir.path.to_string_lossy().into_owned(),
        listening_addresses: Some(vec![listen_addr(port)]),
        ..Config::default()
    };
    if let Some(anchors) = config.anchor_channels_config.as_mut() {
        // The receiver keeps no on-chain reserve for channels from the payer.
        anchors.trusted_peers_no_reserve = trusted;
    }
    let mut builder = Builder::from_config(config);
    builder.set_chain_source_bitcoind_rpc(
        chain.rpc_addr().ip().to_string(),
        chain.rpc_addr().port(),
        chain.rpc_user().to_owned(),
        chain.rpc_password().to_owned(),
    );
    let node = builder.build().expect("build node");
    node.start().expect("start node");
    node
}

fn listen_addr(port: u16) -> SocketAddress {
    SocketAddress::TcpIpV4 { addr: [127, 0, 0, 1], port }
}

/// Waits for the next event on `node` that `pick` accepts, acknowledging the events before
/// it (printed, so a failure shows what happened instead).
async fn wait_event<T>(node: &Node, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, node.next_event_async())
            .await
            .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"));
        let picked = pick(&event);
        node.event_handled().expect("event_handled");
        match picked {
            Some(value) => return value,
            None => {
                assert!(
                    !matches!(event, Event::PaymentFailed { .. } | Event::ChannelClosed { .. }),
                    "{what}: unexpected {event:?}"
                );
                eprintln!("(while waiting for {what}) {event:?}");
            }
        }
    }
}

/// Syncs `node`'s wallets until its spendable on-chain balance reaches `min_sats`.
async fn wait_onchain_balance(node: &Node, min_sats: u64, what: &str) -> u64 {
    wait_until(what, || async {
        // A failed sync is retried by the loop; the deadline bounds it.
        let _ = node.sync_wallets();
        let spendable = node.list_balances().spendable_onchain_balance_sats;
        (spendable >= min_sats).then_some(spendable)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_ldk_nodes_open_pay_and_close_on_the_dev_chain() {
    let started = Instant::now();
    let chain = DevChain::start().await.expect("start dev chain");

    let (dir_a, dir_b) = (TestDir::new("devchain-ldk-a-"), TestDir::new("devchain-ldk-b-"));
    let (port_a, port_b) = (free_port(), free_port());
    let a = start_node(&chain, &dir_a, port_a, Vec::new());
    let b = start_node(&chain, &dir_b, port_b, vec![a.node_id()]);
    eprintln!("[{:?}] nodes started", started.elapsed());

    // Fund A through the faucet.
    let address = a.onchain_payment().new_address().expect("new address");
    let faucet_txid = chain.faucet(&address, Amount::from_sat(FUNDING_SATS)).expect("faucet");
    chain.mine_blocks(1).expect("mine");
    assert_eq!(chain.tx_confirmations(&faucet_txid), Some(1));
    let funded = wait_onchain_balance(&a, FUNDING_SATS, "A's on-chain balance").await;
    assert_eq!(funded, FUNDING_SATS);
    eprintln!("[{:?}] A funded", started.elapsed());

    // Open a private channel A→B, confirm it with 6 blocks.
    let user_channel_id = a
        .open_channel(b.node_id(), listen_addr(port_b), CHANNEL_SATS, None, None)
        .expect("open channel");
    let funding_txo = wait_event(&a, "ChannelPending on A", |e| match e {
        Event::ChannelPending { funding_txo, .. } => Some(*funding_txo),
        _ => None,
    })
    .await;
    wait_in_mempool(&chain, funding_txo.txid, "the funding tx in the mempool").await;
    chain.mine_blocks(6).expect("mine");
    assert_eq!(chain.tx_confirmations(&funding_txo.txid), Some(6));
    // Nodes poll the chain every 2 s; a sync now saves the wait.
    a.sync_wallets().expect("sync A");
    b.sync_wallets().expect("sync B");
    let funding_outpoint = OutPoint { txid: funding_txo.txid, vout: funding_txo.vout };
    wait_event(&a, "ChannelReady on A", |e| matches!(e, Event::ChannelReady { .. }).then_some(()))
        .await;
    wait_event(&b, "ChannelReady on B", |e| matches!(e, Event::ChannelReady { .. }).then_some(()))
        .await;
    eprintln!("[{:?}] channel ready", started.elapsed());

    // Keysend A→B.
    let keysend_id =
        a.spontaneous_payment().send(KEYSEND_MSAT, b.node_id(), None).expect("keysend");
    wait_event(&a, "keysend PaymentSuccessful on A", |e| match e {
        Event::PaymentSuccessful { payment_id, .. } if *payment_id == Some(keysend_id) => Some(()),
        _ => None,
    })
    .await;
    let received = wait_event(&b, "keysend PaymentReceived on B", |e| match e {
        Event::PaymentReceived { amount_msat, .. } => Some(*amount_msat),
        _ => None,
    })
    .await;
    assert_eq!(received, KEYSEND_MSAT);
    eprintln!("[{:?}] keysend paid", started.elapsed());

    // BOLT11 A→B.
    let description = Bolt11InvoiceDescription::Direct(
        Description::new("devchain test".to_owned()).expect("description"),
    );
    let invoice = b.bolt11_payment().receive(INVOICE_MSAT, &description, 3_600).expect("invoice");
    let invoice_id = a.bolt11_payment().send(&invoice, None).expect("pay invoice");
    wait_event(&a, "BOLT11 PaymentSuccessful on A", |e| match e {
        Event::PaymentSuccessful { payment_id, .. } if *payment_id == Some(invoice_id) => Some(()),
        _ => None,
    })
    .await;
    let (received, hash) = wait_event(&b, "BOLT11 PaymentReceived on B", |e| match e {
        Event::PaymentReceived { amount_msat, payment_hash, .. } => {
            Some((*amount_msat, *payment_hash))
        }
        _ => None,
    })
    .await;
    assert_eq!(received, INVOICE_MSAT);
    assert_eq!(hash.0, *invoice.payment_hash().as_byte_array());
    eprintln!("[{:?}] invoice paid", started.elapsed());

    // Cooperative close; the closing tx spends the funding output and gets mined.
    assert_eq!(chain.mempool_len(), 0);
    a.close_channel(&user_channel_id, b.node_id()).expect("close channel");
    wait_event(&a, "ChannelClosed on A", |e| {
        matches!(e, Event::ChannelClosed { .. }).then_some(())
    })
    .await;
    wait_event(&b, "ChannelClosed on B", |e| {
        matches!(e, Event::ChannelClosed { .. }).then_some(())
    })
    .await;
    let closing_txid = wait_until("the closing tx in the mempool", || async {
        chain.mempool_txids().first().copied()
    })
    .await;
    assert!(chain.utxo(&funding_outpoint).is_some(), "funding output spent before mining");
    chain.mine_blocks(1).expect("mine");
    assert_eq!(chain.tx_confirmations(&closing_txid), Some(1));
    assert!(chain.utxo(&funding_outpoint).is_none(), "closing tx did not spend the funding output");
    // A gets its side back on chain: what it funded, less what it paid and the fees.
    let paid_sats = (KEYSEND_MSAT + INVOICE_MSAT) / 1_000;
    let min_back = FUNDING_SATS - paid_sats - 10_000;
    let back = wait_onchain_balance(&a, min_back, "A's on-chain balance after the close").await;
    assert!(back <= FUNDING_SATS - paid_sats, "A got more back than it kept: {back}");
    eprintln!("[{:?}] closed; A holds {back} sat on chain", started.elapsed());

    a.stop().expect("stop A");
    b.stop().expect("stop B");
    chain.shutdown().await;
    eprintln!("[{:?}] done", started.elapsed());
}
