//! Prometheus metrics, served over HTTP at `/metrics` on `metrics_listen`.
//!
//! One registry per daemon (not a process-global recorder), so several daemons in one
//! process — the tests — keep separate figures. Hot-path counters are atomics updated by
//! the metering code; balances are read from the database at scrape time, so they are
//! exact and cost nothing between scrapes.

use crate::store::{self, SharedConn};
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
            pool_nsat: Counter::default(),
            signed_states: Counter::default(),
            channel_accrued_msat: Family::default(),
            channel_outstanding_msat: Family::default(),
            channels: Gauge::default(),
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
        for c in channels {
            let label = ChannelLabel { contributor: hex::encode(c.contributor_key.to_bytes()) };
            let accrued = c.head.accrued_nsat.0 / 1_000_000;
            let outstanding = accrued.saturating_sub(u128::from(c.head.settled_msat.0));
            self.channel_accrued_msat.get_or_create(&label).set(gauge(accrued));
            self.channel_outstanding_msat.get_or_create(&label).set(gauge(outstanding));
        }
        Ok(())
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
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, reader) = (metrics.clone(), reader.clone());
            async move {
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
