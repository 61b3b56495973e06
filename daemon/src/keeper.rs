//! The channel keeper: keeps a channel open to every peer the operator opened one to.
//!
//! A channel can close without the operator asking: the peer closes it, or the embedded
//! node force-closes it itself — ldk-node persists its channel manager in the background, so
//! after a SIGKILL the manager read at start can be older than the channel monitors, and LDK
//! then force-closes those channels ("A ChannelManager is stale compared to the current
//! ChannelMonitor", no funds lost). Until a new channel is open, payouts to that peer find
//! no route and the amount stays owed.
//!
//! Every channel opened through `Operator.OpenLightningChannel` is recorded as a *target*
//! (peer, address, size, announced or not; one per peer, the latest open wins). Every
//! [`CHECK_INTERVAL`] the keeper compares the targets with the node's channels and opens a
//! channel of the recorded size to each kept peer that has none (in any state: a channel
//! being opened or closed counts), backing off per peer after a failure (no funds yet,
//! peer offline). Closing a channel through `Operator.CloseLightningChannel` stops keeping
//! its peer; the next open to it keeps it again. The check is by state, not by event, so
//! it needs nothing to survive a crash but the targets table: a target is recorded after
//! its channel was opened, and the keeper never opens a second channel to a peer that has
//! one.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::params;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ledger::unix_now;
use crate::lightning::{DynLightningBackend, LightningError, OpenChannelRequest};
use crate::metrics::Metrics;
use crate::store::{self, SharedConn, StoreError};
use std::sync::Arc;

/// How often the keeper compares targets with the node's channels.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// First wait after a failed reopen; doubled on each further failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait between two attempts for one peer.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A channel the daemon keeps open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelTarget {
    /// The peer's node id.
    pub node_id: [u8; 33],
    /// Where to reach it, `host:port`.
    pub address: String,
    /// The channel's size, in sat.
    pub capacity_sat: u64,
    /// Announced (public) rather than private.
    pub announce: bool,
    /// Reopened when it closes.
    pub kept: bool,
    /// Channels the keeper opened for it so far.
    pub reopens: u64,
}

/// The targets, in the daemon's database.
#[derive(Clone)]
pub struct ChannelTargets {
    conn: SharedConn,
}

impl ChannelTargets {
    /// Targets read and written through `conn`.
    pub fn new(conn: SharedConn) -> ChannelTargets {
        ChannelTargets { conn }
    }

    /// Records that the operator opened a channel (kept from now on).
    pub fn opened(&self, request: &OpenChannelRequest) -> Result<(), StoreError> {
        store::lock(&self.conn).execute(
            "INSERT INTO lightning_channel_targets
                 (node_id, address, capacity_sat, announce, kept, reopens, updated_at)
             VALUES (?1, ?2, ?3, ?4, 1, 0, ?5)
             ON CONFLICT (node_id) DO UPDATE SET address = ?2, capacity_sat = ?3,
                 announce = ?4, kept = 1, updated_at = ?5",
            params![
                request.node_id.to_vec(),
                request.addr,
                store::u64_to_column(request.amount_sat, "capacity_sat")?,
                request.announce,
                unix_now() as i64,
            ],
        )?;
        Ok(())
    }

    /// Stops (`false`) or resumes (`true`) keeping `node_id`'s channel; whether that changed
    /// anything (a target that was the other way).
    pub fn set_kept(&self, node_id: &[u8; 33], kept: bool) -> Result<bool, StoreError> {
        let n = store::lock(&self.conn).execute(
            "UPDATE lightning_channel_targets SET kept = ?2, updated_at = ?3
             WHERE node_id = ?1 AND kept != ?2",
            params![node_id.to_vec(), kept, unix_now() as i64],
        )?;
        Ok(n > 0)
    }

    /// Every target, by node id.
    pub fn list(&self) -> Result<Vec<ChannelTarget>, StoreError> {
        let conn = store::lock(&self.conn);
        let mut st = conn.prepare(
            "SELECT node_id, address, capacity_sat, announce, kept, reopens
             FROM lightning_channel_targets ORDER BY node_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (node_id, address, capacity, announce, kept, reopens) = row?;
            out.push(ChannelTarget {
                node_id: node_id.try_into().map_err(|_| {
                    StoreError::Corrupt("lightning_channel_targets.node_id is not 33 bytes".into())
                })?,
                address,
                capacity_sat: store::u64_from_column(capacity, "capacity_sat")?,
                announce,
                kept,
                reopens: store::u64_from_column(reopens, "reopens")?,
            });
        }
        Ok(out)
    }

    fn reopened(&self, node_id: &[u8; 33]) -> Result<(), StoreError> {
        store::lock(&self.conn).execute(
            "UPDATE lightning_channel_targets SET reopens = reopens + 1, updated_at = ?2
             WHERE node_id = ?1",
            params![node_id.to_vec(), unix_now() as i64],
        )?;
        Ok(())
    }
}

/// Per-peer backoff after failed attempts.
#[derive(Default)]
struct Backoff {
    until: HashMap<[u8; 33], (Instant, Duration)>,
}

impl Backoff {
    fn ready(&self, peer: &[u8; 33], now: Instant) -> bool {
        self.until.get(peer).is_none_or(|(at, _)| now >= *at)
    }

    fn failed(&mut self, peer: [u8; 33], now: Instant) -> Duration {
        let delay =
            self.until.get(&peer).map_or(FIRST_BACKOFF, |(_, last)| (*last * 2).min(MAX_BACKOFF));
        self.until.insert(peer, (now + delay, delay));
        delay
    }

    fn succeeded(&mut self, peer: &[u8; 33]) {
        self.until.remove(peer);
    }
}

/// One pass: opens a channel to each kept target without one. Returns how many it opened.
async fn check(
    targets: &ChannelTargets,
    node: &DynLightningBackend,
    metrics: &Arc<Metrics>,
    backoff: &mut Backoff,
) -> Result<usize, String> {
    let t = targets.clone();
    let wanted = tokio::task::spawn_blocking(move || t.list())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if !wanted.iter().any(|t| t.kept) {
        return Ok(0);
    }
    let channels = node.list_channels().await.map_err(|e| e.to_string())?;
    let mut opened = 0;
    let now = Instant::now();
    for target in wanted.into_iter().filter(|t| t.kept) {
        if channels.iter().any(|c| c.counterparty == target.node_id)
            || !backoff.ready(&target.node_id, now)
        {
            continue;
        }
        let peer = hex::encode(target.node_id);
        match reopen(node, &target).await {
            Ok(()) => {
                backoff.succeeded(&target.node_id);
                metrics.channel_reopens.inc();
                opened += 1;
                tracing::warn!(
                    %peer,
                    capacity_sat = target.capacity_sat,
                    "the channel to this peer had closed; opened a new one"
                );
                let (t, id) = (targets.clone(), target.node_id);
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || t.reopened(&id)).await {
                    tracing::warn!(%peer, "recording a reopened channel: {e}");
                }
            }
            Err(e) => {
                let retry_in = backoff.failed(target.node_id, now);
                tracing::warn!(
                    %peer,
                    ?retry_in,
                    "the channel to this peer is closed and could not be reopened: {e}"
                );
            }
        }
    }
    Ok(opened)
}

async fn reopen(node: &DynLightningBackend, target: &ChannelTarget) -> Result<(), LightningError> {
    node.connect(target.node_id, &target.address).await?;
    node.open_channel(OpenChannelRequest {
        node_id: target.node_id,
        addr: target.address.clone(),
        amount_sat: target.capacity_sat,
        push_msat: 0,
        announce: target.announce,
    })
    .await?;
    Ok(())
}

/// Runs the keeper until `stop` turns true.
pub async fn run(
    targets: ChannelTargets,
    node: DynLightningBackend,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        if let Err(e) = check(&targets, &node, &metrics, &mut backoff).await {
            // The node down (the settlement engine says so) or the database busy: next tick.
            tracing::debug!("channel keeper: {e}");
        }
    }
}
