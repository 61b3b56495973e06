//! The read-only web dashboard, served with `/metrics` on `metrics_listen`: channel
//! balances, the accrual rate over time (a chart), settlement history and alerts (stuck
//! pending settlements, too little Lightning liquidity for what is owed, the node down, and
//! every verified report of provider misbehaviour — `Channels.ReportMisbehaviour`).
//!
//! `/` is one self-contained page (no external scripts, styles or fonts: it works offline
//! and behind strict networks); it polls `/api/dashboard`, a JSON snapshot read from the
//! database and the Lightning node at request time. Like the metrics it shows balances, so
//! it belongs on loopback or behind the operator's own access control.

use crate::ledger::{decode_accruals, read_channels, unix_now};
use crate::lightning::DynLightningBackend;
use crate::settlement::list_settlements;
use crate::store::{self, SharedConn, StoreError};
use serde::Serialize;
use tribute_channels::{Network, PublicKey};

/// The page.
pub const INDEX_HTML: &str = include_str!("dashboard.html");

/// A pending settlement older than this is reported as stuck.
pub const STUCK_AFTER_SECS: u64 = 300;

/// Seconds of accrual history the chart shows, and its bucket width.
pub const WINDOW_SECS: u64 = 900;
/// Width of a chart bucket.
pub const BUCKET_SECS: u64 = 10;

/// One channel's line.
#[derive(Debug, Serialize)]
pub struct ChannelView {
    /// Contributor key, hex.
    pub contributor: String,
    /// `active`, `closing` or `closed`.
    pub status: String,
    /// Head `seq`.
    pub seq: u64,
    /// Accrued, nsat (decimal string: may exceed 2^53).
    pub accrued_nsat: String,
    /// Settled, msat.
    pub settled_msat: u64,
    /// Outstanding, nsat.
    pub outstanding_nsat: String,
}

/// One settlement's line.
#[derive(Debug, Serialize)]
pub struct SettlementView {
    /// Id.
    pub id: u64,
    /// Contributor key, hex.
    pub contributor: String,
    /// Amount, msat.
    pub amount_msat: u64,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    /// Routing fee, msat.
    pub fee_msat: Option<u64>,
    /// Payment hash, hex.
    pub payment_hash: String,
    /// Failure, if failed.
    pub error: String,
    /// Created (Unix seconds).
    pub created_at: u64,
}

/// The node's liquidity.
#[derive(Debug, Serialize)]
pub struct LightningView {
    /// Node id, hex.
    pub node_id: String,
    /// Usable channels.
    pub usable_channels: u32,
    /// All channels.
    pub channels: u32,
    /// What it can send now, msat.
    pub outbound_msat: u64,
    /// What it can receive now, msat.
    pub inbound_msat: u64,
}

/// An alert.
#[derive(Debug, Serialize)]
pub struct Alert {
    /// `misbehaviour`, `stuck_settlement`, `low_liquidity` or `lightning_down`.
    pub kind: &'static str,
    /// For people.
    pub message: String,
}

/// The snapshot `/api/dashboard` returns.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Unix seconds it was taken.
    pub now: u64,
    /// The provider key, hex.
    pub provider_key: String,
    /// Channels.
    pub channels: Vec<ChannelView>,
    /// Accrued nsat per [`BUCKET_SECS`] over the last [`WINDOW_SECS`], oldest first
    /// (decimal strings), the first bucket starting at `series_start`.
    pub accrual_series: Vec<String>,
    /// Start of the first bucket (Unix seconds).
    pub series_start: u64,
    /// Bucket width, seconds.
    pub bucket_secs: u64,
    /// The 20 newest settlements.
    pub settlements: Vec<SettlementView>,
    /// The Lightning node, if the daemon has one and it answered.
    pub lightning: Option<LightningView>,
    /// Alerts.
    pub alerts: Vec<Alert>,
}

/// Reads what the database holds (channels, accrual series, settlements).
fn read(
    conn: &rusqlite::Connection,
    network: Network,
    provider_key: PublicKey,
    now: u64,
) -> Result<(Snapshot, u128, Option<u64>), StoreError> {
    let channels = read_channels(conn, "", [], network, provider_key)?;
    let mut payable = 0u128;
    let views = channels
        .iter()
        .map(|c| {
            let accrued = c.head.accrued_nsat.0;
            let settled = c.head.settled_msat.0;
            let outstanding = accrued.saturating_sub(u128::from(settled) * 1_000_000);
            payable += outstanding / 1_000_000;
            ChannelView {
                contributor: hex::encode(c.contributor_key.to_bytes()),
                status: format!("{:?}", c.head.status).to_ascii_lowercase(),
                seq: c.head.seq,
                accrued_nsat: accrued.to_string(),
                settled_msat: settled,
                outstanding_nsat: outstanding.to_string(),
            }
        })
        .collect();
    let buckets = WINDOW_SECS / BUCKET_SECS;
    let series_start = (now / BUCKET_SECS + 1) * BUCKET_SECS - WINDOW_SECS;
    let mut series = vec![0u128; usize::try_from(buckets).unwrap_or(0)];
    let mut stmt = conn.prepare_cached(
        "SELECT created_at, accruals FROM receipt_batches WHERE created_at >= ?1 ORDER BY batch_seq",
    )?;
    let mut rows = stmt.query([store::u64_to_column(series_start, "series_start")?])?;
    while let Some(r) = rows.next()? {
        let at = u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0);
        let total: u128 = decode_accruals(&r.get::<_, Vec<u8>>(1)?)?.iter().map(|(_, n)| n.0).sum();
        if let Some(b) =
            usize::try_from((at - series_start) / BUCKET_SECS).ok().and_then(|i| series.get_mut(i))
        {
            *b += total;
        }
    }
    let settlements = list_settlements(conn, "ORDER BY settlement_id DESC LIMIT 20", [])?
        .into_iter()
        .map(|s| SettlementView {
            id: s.settlement_id,
            contributor: hex::encode(s.contributor_key.to_bytes()),
            amount_msat: s.amount_msat,
            status: s.status,
            fee_msat: s.fee_msat,
            payment_hash: s.payment_hash.map(hex::encode).unwrap_or_default(),
            error: s.error.unwrap_or_default(),
            created_at: s.created_at,
        })
        .collect();
    let oldest_pending: Option<i64> = conn.query_row(
        "SELECT MIN(created_at) FROM settlements WHERE status = 'pending'",
        [],
        |r| r.get(0),
    )?;
    let mut alerts = Vec::new();
    let mut stmt = conn.prepare_cached(
        "SELECT report_id, kind, seq, contributor_key, reported_at FROM misbehaviour_reports
         ORDER BY report_id DESC LIMIT 20",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (id, kind, seq): (i64, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let (who, at): (Vec<u8>, i64) = (r.get(3)?, r.get(4)?);
        alerts.push(Alert {
            kind: "misbehaviour",
            message: format!(
                "PROVIDER MISBEHAVIOUR proven (report {id}): {kind} at seq {seq} on the channel of \
                 {}, reported at {at}; the signed states are in misbehaviour_reports",
                hex::encode(who)
            ),
        });
    }
    let snapshot = Snapshot {
        now,
        provider_key: hex::encode(provider_key.to_bytes()),
        channels: views,
        accrual_series: series.iter().map(u128::to_string).collect(),
        series_start,
        bucket_secs: BUCKET_SECS,
        settlements,
        lightning: None,
        alerts,
    };
    Ok((snapshot, payable, oldest_pending.and_then(|t| u64::try_from(t).ok())))
}

/// Takes a snapshot: the database through `reader` (off the async workers), the node.
pub async fn snapshot(
    reader: SharedConn,
    network: Network,
    provider_key: PublicKey,
    lightning: Option<DynLightningBackend>,
) -> Result<Snapshot, StoreError> {
    let now = unix_now();
    let (mut snap, payable, oldest_pending) = tokio::task::spawn_blocking(move || {
        read(&store::lock(&reader), network, provider_key, now)
    })
    .await
    .map_err(|e| StoreError::Corrupt(format!("dashboard task: {e}")))??;
    if let Some(t) = oldest_pending.filter(|t| now.saturating_sub(*t) > STUCK_AFTER_SECS) {
        snap.alerts.push(Alert {
            kind: "stuck_settlement",
            message: format!(
                "a settlement has been pending for {} s (since {t}); `tribute admin settlements --status pending`",
                now - t
            ),
        });
    }
    if let Some(node) = lightning {
        match node.node_info().await {
            Ok(i) => {
                if u128::from(i.channels.outbound_capacity_msat) < payable {
                    snap.alerts.push(Alert {
                        kind: "low_liquidity",
                        message: format!(
                            "{payable} msat is owed but the node can send only {} msat now: open or refill channels",
                            i.channels.outbound_capacity_msat
                        ),
                    });
                }
                snap.lightning = Some(LightningView {
                    node_id: hex::encode(i.node_id),
                    usable_channels: i.channels.usable,
                    channels: i.channels.total,
                    outbound_msat: i.channels.outbound_capacity_msat,
                    inbound_msat: i.channels.inbound_capacity_msat,
                });
            }
            Err(e) => snap.alerts.push(Alert {
                kind: "lightning_down",
                message: format!("the Lightning node does not answer: {e}"),
            }),
        }
    }
    Ok(snap)
}
