//! Lightning on the dev chain, for the demo and the end-to-end tests: real ldk-node nodes,
//! the daemon's node funded from the dev chain's faucet and channels opened through the
//! operator RPCs (so the same code drives an in-process daemon or a `tributed` process).

use crate::connect::Authed;
use ldk_node::bitcoin::address::NetworkUnchecked;
use ldk_node::bitcoin::{Address, Amount, Network as BtcNetwork};
use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};
use tribute_daemon::devchain::DevChain;
use tribute_daemon::lightning::{ChainSourceConfig, LdkBackend, LdkBackendConfig};
use tribute_proto::v1 as pb;
use tribute_proto::v1::operator_client::OperatorClient;

/// Longest wait for anything on the dev chain or the Lightning nodes.
pub const WAIT: Duration = Duration::from_secs(120);

/// A port free on 127.0.0.1 now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// Polls `check` every 100 ms until it returns `Some`, for at most [`WAIT`].
pub async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {WAIT:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A regtest node in `dir` on the dev chain, listening on 127.0.0.1:`port`, keeping no
/// anchor reserve for channels from `trusted`.
pub fn node_config(
    chain: &DevChain,
    dir: &Path,
    port: u16,
    trusted: Vec<[u8; 33]>,
) -> LdkBackendConfig {
    LdkBackendConfig {
        listening_addresses: vec![format!("127.0.0.1:{port}")],
        trusted_peers_no_reserve: trusted,
        node_alias: Some(format!("tribute-{port}")),
        ..LdkBackendConfig::new(
            dir.to_path_buf(),
            BtcNetwork::Regtest,
            ChainSourceConfig::dev_chain(chain),
        )
    }
}

/// A peer the daemon's node opens a channel to.
pub struct Peer<'a> {
    /// Its node (nudged to sync while the channel confirms).
    pub node: &'a LdkBackend,
    /// `host:port` it listens on.
    pub address: String,
    /// Announce the channel (BOLT12 payers with several peers need one announced channel).
    pub announce: bool,
}

/// Funds the daemon's node with `funding_sat` from the faucet (through
/// `Operator.NewOnchainAddress`), opens a channel of `channel_sat` to each peer
/// (`Operator.OpenLightningChannel`, one funding transaction at a time), confirms them and
/// waits until the daemon lists every channel as usable.
pub async fn fund_and_open(
    op: &OperatorClient<Authed>,
    chain: &DevChain,
    daemon_node: Option<&LdkBackend>,
    funding_sat: u64,
    channel_sat: u64,
    peers: &[Peer<'_>],
) -> Result<(), String> {
    let sync = || async {
        if let Some(n) = daemon_node {
            let _ = n.sync_wallets().await;
        }
        for p in peers {
            let _ = p.node.sync_wallets().await;
        }
    };
    let rpc = |call: &str, s: tonic::Status| format!("Operator.{call}: {}", s.message());
    let address = op
        .clone()
        .new_onchain_address(pb::NewOnchainAddressRequest {})
        .await
        .map_err(|s| rpc("NewOnchainAddress", s))?
        .into_inner()
        .address;
    let address = address
        .parse::<Address<NetworkUnchecked>>()
        .map_err(|e| format!("the daemon's address {address:?}: {e}"))?
        .require_network(BtcNetwork::Regtest)
        .map_err(|e| format!("the daemon's address: {e}"))?;
    chain.faucet(&address, Amount::from_sat(funding_sat)).map_err(|e| format!("faucet: {e}"))?;
    chain.mine_blocks(1).map_err(|e| format!("mining: {e}"))?;
    let spendable = || async {
        sync().await;
        let b = op.clone().get_onchain_balance(pb::GetOnchainBalanceRequest {}).await.ok()?;
        Some(b.into_inner().spendable_sat)
    };
    let start = wait_until("the daemon's node to see its funds", || async {
        spendable().await.filter(|&sat| sat >= funding_sat)
    })
    .await?;
    let before = op
        .clone()
        .list_lightning_channels(pb::ListLightningChannelsRequest {})
        .await
        .map_err(|s| rpc("ListLightningChannels", s))?
        .into_inner()
        .channels
        .len();
    for (k, p) in peers.iter().enumerate() {
        op.clone()
            .open_lightning_channel(pb::OpenLightningChannelRequest {
                node_id: p.node.node_id().to_vec(),
                address: p.address.clone(),
                amount_sat: channel_sat,
                push_msat: 0,
                announce: p.announce,
            })
            .await
            .map_err(|s| rpc("OpenLightningChannel", s))?;
        // One funding transaction at a time: each spends the previous one's change.
        wait_until("the funding transaction", || async { (chain.mempool_len() > 0).then_some(()) })
            .await?;
        chain.mine_blocks(1).map_err(|e| format!("mining: {e}"))?;
        // The next open must not pick the output this one spent: wait until the daemon's
        // wallet counts this funding transaction (its balance is then below what k + 1
        // opens leave before fees). A daemon in another process syncs on its own schedule.
        let left = start.saturating_sub(channel_sat * (k as u64 + 1));
        wait_until("the daemon's wallet to see the funding transaction", || async {
            spendable().await.filter(|&sat| sat > 0 && sat < left)
        })
        .await?;
    }
    chain.mine_blocks(6).map_err(|e| format!("mining: {e}"))?;
    let want = before + peers.len();
    wait_until("the channels to become usable", || async {
        sync().await;
        let list = op
            .clone()
            .list_lightning_channels(pb::ListLightningChannelsRequest {})
            .await
            .ok()?
            .into_inner();
        (list.channels.iter().filter(|c| c.usable).count() >= want).then_some(())
    })
    .await
}
