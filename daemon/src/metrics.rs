//! Prometheus metrics, served over HTTP at `/metrics` on `metrics_listen` (with the read-only
//! dashboard, [`crate::dashboard`], at `/`).
//!
//! One registry per daemon (not a process-global recorder), so several daemons in one
//! process — the tests — keep separate figures. Hot-path counters are atomics updated by
//! the metering code; balances are read from the database at scrape time, so they are
//! exact and cost nothing between scrapes.

use crate::lightning::DynLightningBackend;
use crate::store::{self, SharedConn};
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tribute_channels::{Network, PublicKey};

/// Label of a metering outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `accepted`, `replayed`, `rejected`, `overloaded` or `failed`.
    pub outcome: &'static str,
}

/// Label of a per-channel series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// Contributor key, hex.
    pub contributor: String,
}

/// Label of a settlement status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
}

/// Every series the daemon exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// `tribute_meter_requests_total{outcome}`.
    pub meter_requests: Family<OutcomeLabel, Counter>,
    /// `tribute_meter_latency_seconds`: from receipt of a Meter call to its durable answer.
    pub meter_latency: Histogram,
    /// `tribute_meter_batch_size`: requests per committed batch.
    pub batch_size: Histogram,
    /// `tribute_meter_queue_depth`: requests waiting for the writer.
    pub queue_depth: Gauge,
    /// `tribute_meter_in_flight`: metering requests admitted and not yet answered (at most
    /// `meter.max_in_flight`; the ones shed beyond it count as
    /// `tribute_meter_requests_total{outcome="overloaded"}`).
    pub in_flight: Gauge,
    /// `tribute_meter_max_in_flight`: the admission bound (`meter.max_in_flight`).
    pub max_in_flight: Gauge,
    /// `tribute_meter_pool_nsat_total`: Σ contributor pools metered (nsat).
    pub pool_nsat: Counter,
    /// `tribute_signed_states_total`.
    pub signed_states: Counter,
    /// `tribute_channel_accrued_msat{contributor}` (whole msat, at scrape time).
    pub channel_accrued_msat: Family<ChannelLabel, Gauge>,
    /// `tribute_channel_outstanding_msat{contributor}` (whole msat, at scrape time).
    pub channel_outstanding_msat: Family<ChannelLabel, Gauge>,
    /// `tribute_channels`: channel count.
    pub channels: Gauge,
    /// `tribute_settlements{status}`: settlements by status (at scrape time).
    pub settlements: Family<StatusLabel, Gauge>,
    /// `tribute_settled_msat`: Σ succeeded settlements (at scrape time).
    pub settled_msat: Gauge,
    /// `tribute_settlement_fees_msat`: Σ routing fees of succeeded settlements.
    pub settlement_fees_msat: Gauge,
    /// `tribute_settlement_oldest_pending_seconds`: age of the oldest pending settlement (0:
    /// none) — a stuck payment shows here.
    pub oldest_pending_secs: Gauge,
    /// `tribute_payable_msat`: Σ whole msat owed now over channels (what the next round
    /// would pay, before `min_payout_msat`).
    pub payable_msat: Gauge,
    /// `tribute_lightning_outbound_msat`: what the node can send now over usable channels.
    pub ln_outbound_msat: Gauge,
    /// `tribute_lightning_inbound_msat`: what the node can receive now.
    pub ln_inbound_msat: Gauge,
    /// `tribute_lightning_channels{status}`: `total` and `usable` Lightning channels.
    pub ln_channels: Family<StatusLabel, Gauge>,
    /// `tribute_lightning_up`: 1 when the node answered the last scrape, 0 when it did not
    /// or the daemon has none.
    pub ln_up: Gauge,
    /// `tribute_misbehaviour_reports`: verified proofs of provider misbehaviour (any above
    /// zero needs the operator at once).
    pub misbehaviour_reports: Gauge,
    /// `tribute_lightning_channel_reopens_total`: channels the keeper opened because a kept
    /// channel had closed (a force-close after a crash, or the peer's close).
    pub channel_reopens: Counter,
}

impl Metrics {
    /// A fresh registry with every series registered.
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("tribute");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            meter_requests: Family::default(),
            meter_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            max_in_flight: Gauge::default(),
            pool_nsat: Counter::default(),
            signed_states: Counter::default(),
            channel_accrued_msat: Family::default(),
            channel_outstanding_msat: Family::default(),
            channels: Gauge::default(),
            settlements: Family::default(),
            settled_msat: Gauge::default(),
            settlement_fees_msat: Gauge::default(),
            oldest_pending_secs: Gauge::default(),
            payable_msat: Gauge::default(),
            ln_outbound_msat: Gauge::default(),
            ln_inbound_msat: Gauge::default(),
            ln_channels: Family::default(),
            ln_up: Gauge::default(),
            misbehaviour_reports: Gauge::default(),
            channel_reopens: Counter::default(),
        };
        r.register("meter_requests", "Metering calls by outcome", m.meter_requests.clone());
        r.register(
            "meter_latency_seconds",
            "Meter call latency until durable",
            m.meter_latency.clone(),
        );
        r.register("meter_batch_size", "Requests per committed batch", m.batch_size.clone());
        r.register(
            "meter_queue_depth",
            "Requests waiting for the ledger writer",
            m.queue_depth.clone(),
        );
        r.register(
            "lightning_channel_reopens",
            "Kept channels reopened after they closed",
            m.channel_reopens.clone(),
        );
        r.register(
            "meter_in_flight",
            "Metering requests admitted and not yet answered",
            m.in_flight.clone(),
        );
        r.register(
            "meter_max_in_flight",
            "Admission bound on metering requests in flight (beyond it: OVERLOADED)",
            m.max_in_flight.clone(),
        );
        r.register("meter_pool_nsat", "Contributor pools metered, nsat", m.pool_nsat.clone());
        r.register("signed_states", "Channel states signed and published", m.signed_states.clone());
        r.register(
            "channel_accrued_msat",
            "Accrued per channel, whole msat",
            m.channel_accrued_msat.clone(),
        );
        r.register(
            "channel_outstanding_msat",
            "Accrued but unsettled per channel, whole msat",
            m.channel_outstanding_msat.clone(),
        );
        r.register("channels", "Channels", m.channels.clone());
        r.register("settlements", "Settlements by status", m.settlements.clone());
        r.register("settled_msat", "Paid by succeeded settlements, msat", m.settled_msat.clone());
        r.register(
            "settlement_fees_msat",
            "Routing fees of succeeded settlements, msat",
            m.settlement_fees_msat.clone(),
        );
        r.register(
            "settlement_oldest_pending_seconds",
            "Age of the oldest pending settlement (0: none)",
            m.oldest_pending_secs.clone(),
        );
        r.register("payable_msat", "Whole msat owed now over all channels", m.payable_msat.clone());
        r.register(
            "lightning_outbound_msat",
            "What the Lightning node can send now",
            m.ln_outbound_msat.clone(),
        );
        r.register(
            "lightning_inbound_msat",
            "What the Lightning node can receive now",
            m.ln_inbound_msat.clone(),
        );
        r.register(
            "lightning_channels",
            "Lightning channels (total, usable)",
            m.ln_channels.clone(),
        );
        r.register("lightning_up", "Whether the Lightning node answered", m.ln_up.clone());
        r.register(
            "misbehaviour_reports",
            "Verified proofs of provider misbehaviour reported by contributors",
            m.misbehaviour_reports.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        Arc::new(m)
    }

    /// Counts one metering outcome.
    pub fn count(&self, outcome: &'static str) {
        self.meter_requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Refreshes the balance series from the database (channel rows plus the accruals
    /// they do not show yet: the same figures as `GetChannel`).
    pub fn refresh_balances(
        &self,
        conn: &rusqlite::Connection,
        network: Network,
        provider_key: PublicKey,
    ) -> Result<(), store::StoreError> {
        let channels =
            crate::ledger::read_channels(conn, "WHERE status != 2", [], network, provider_key)?;
        self.channel_accrued_msat.clear();
        self.channel_outstanding_msat.clear();
        self.channels.set(channels.len() as i64);
        let mut payable = 0u128;
        for c in channels {
            let label = ChannelLabel { contributor: hex::encode(c.contributor_key.to_bytes()) };
            let accrued = c.head.accrued_nsat.0 / 1_000_000;
            let outstanding = accrued.saturating_sub(u128::from(c.head.settled_msat.0));
            payable += outstanding;
            self.channel_accrued_msat.get_or_create(&label).set(gauge(accrued));
            self.channel_outstanding_msat.get_or_create(&label).set(gauge(outstanding));
        }
        self.payable_msat.set(gauge(payable));
        self.refresh_settlements(conn)
    }

    /// Refreshes the settlement series from the `settlements` table.
    fn refresh_settlements(&self, conn: &rusqlite::Connection) -> Result<(), store::StoreError> {
        self.settlements.clear();
        for status in ["pending", "succeeded", "failed"] {
            self.settlements.get_or_create(&StatusLabel { status: status.into() }).set(0);
        }
        let mut stmt = conn.prepare_cached(
            "SELECT status, COUNT(*), SUM(CASE WHEN status = 'succeeded' THEN amount_msat END),
                    SUM(fee_msat), MIN(created_at)
             FROM settlements GROUP BY status",
        )?;
        let mut rows = stmt.query([])?;
        let (mut settled, mut fees, mut oldest_pending) = (0i64, 0i64, None);
        while let Some(r) = rows.next()? {
            let status: String = r.get(0)?;
            let count: i64 = r.get(1)?;
            self.settlements.get_or_create(&StatusLabel { status: status.clone() }).set(count);
            if status == "succeeded" {
                settled = r.get::<_, Option<i64>>(2)?.unwrap_or(0);
                fees = r.get::<_, Option<i64>>(3)?.unwrap_or(0);
            }
            if status == "pending" {
                oldest_pending = r.get::<_, Option<i64>>(4)?;
            }
        }
        self.settled_msat.set(settled);
        self.misbehaviour_reports.set(conn.query_row(
            "SELECT COUNT(*) FROM misbehaviour_reports",
            [],
            |r| r.get(0),
        )?);
        self.settlement_fees_msat.set(fees);
        let now = i64::try_from(crate::ledger::unix_now()).unwrap_or(i64::MAX);
        self.oldest_pending_secs.set(oldest_pending.map_or(0, |t| now.saturating_sub(t).max(0)));
        Ok(())
    }

    /// Refreshes the Lightning series from the node (`None`: the daemon has none).
    pub async fn refresh_lightning(&self, node: Option<&DynLightningBackend>) {
        let info = match node {
            Some(n) => n.node_info().await.ok(),
            None => None,
        };
        self.ln_channels.clear();
        match info {
            Some(i) => {
                self.ln_up.set(1);
                self.ln_outbound_msat.set(gauge(u128::from(i.channels.outbound_capacity_msat)));
                self.ln_inbound_msat.set(gauge(u128::from(i.channels.inbound_capacity_msat)));
                for (status, n) in [("total", i.channels.total), ("usable", i.channels.usable)] {
                    self.ln_channels
                        .get_or_create(&StatusLabel { status: status.into() })
                        .set(i64::from(n));
                }
            }
            None => {
                self.ln_up.set(0);
                self.ln_outbound_msat.set(0);
                self.ln_inbound_msat.set(0);
            }
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Serves `/metrics` until `stop` resolves. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    reader: SharedConn,
    network: Network,
    provider_key: PublicKey,
    lightning: Option<DynLightningBackend>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let scrape_lightning = lightning.clone();
    let (dash_reader, dash_lightning) = (reader.clone(), lightning);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, reader, lightning) =
                    (metrics.clone(), reader.clone(), scrape_lightning.clone());
                async move {
                    metrics.refresh_lightning(lightning.as_ref()).await;
                    let m = metrics.clone();
                    let refreshed = tokio::task::spawn_blocking(move || {
                        m.refresh_balances(&store::lock(&reader), network, provider_key)
                    })
                    .await;
                    if let Ok(Err(e)) = refreshed {
                        tracing::warn!("metrics: balances not refreshed: {e}");
                    }
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route(
            "/",
            axum::routing::get(|| async { axum::response::Html(crate::dashboard::INDEX_HTML) }),
        )
        .route(
            "/api/dashboard",
            axum::routing::get(move || {
                let (reader, lightning) = (dash_reader.clone(), dash_lightning.clone());
                async move {
                    match crate::dashboard::snapshot(reader, network, provider_key, lightning).await
                    {
                        Ok(snap) => axum::Json(snap).into_response(),
                        Err(e) => {
                            tracing::warn!("dashboard: {e}");
                            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                                .into_response()
                        }
                    }
                }
            }),
        );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!("metrics server: {e}");
        }
    });
    Ok((bound, task))
}

/// A gauge value (i64) of an msat amount, saturating.
fn gauge(msat: u128) -> i64 {
    i64::try_from(msat).unwrap_or(i64::MAX)
}
