//! Load generators: closed-loop unary calls at a fixed concurrency (Meter, or the empty
//! RPC), and MeterStream. Each phase runs for a fixed time and stops by itself.

use crate::setup::{meter_request, Authed, Bearer};
use crate::{cpu, BenchError};
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;
use tribute_proto::v1::metering_client::MeteringClient;

/// Which unary call a phase makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `tribute.v1.Metering/Meter`, distinct ids, varied usage.
    Meter,
    /// `grpc.health.v1.Health/Check` on the same server: the empty-RPC ceiling.
    Empty,
}

/// What a unary phase measured (measurement window only; warm-up discarded).
pub struct Unary {
    /// Calls completed in the window.
    pub completed: u64,
    /// Length of the window.
    pub window: Duration,
    /// Latency of those calls, in µs.
    pub latency_us: Histogram<u64>,
    /// Calls that failed (any phase); the first error.
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Calls completed including warm-up (all acknowledged → all durable, for Meter).
    pub acknowledged: u64,
    /// CPU used during the measurement window.
    pub cpu: cpu::Usage,
}

impl Unary {
    /// Two measurement windows of the same call as one (rates over the summed windows).
    pub fn merge(mut self, other: Unary) -> Result<Unary, BenchError> {
        self.completed += other.completed;
        self.window += other.window;
        self.latency_us.add(&other.latency_us).map_err(|e| BenchError::msg(e.to_string()))?;
        self.errors += other.errors;
        self.first_error = self.first_error.or(other.first_error);
        self.acknowledged += other.acknowledged;
        self.cpu = self.cpu.merge(other.cpu);
        Ok(self)
    }

    /// Requests per second in the window.
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64()
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: valid bounds, so this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

struct TaskResult {
    completed: u64,
    acknowledged: u64,
    latency_us: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// `concurrency` closed-loop callers spread over `channels` (caller k uses channel
/// k mod n), each calling as soon as its previous call returned. Calls started during
/// `warmup` are not counted; then calls started during `measure` are.
pub async fn unary(
    call: Call,
    channels: &[Channel],
    bearer: &Bearer,
    prefix: &str,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Unary, BenchError> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let prefix: Arc<str> = Arc::from(prefix);
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let channel = channels[task % channels.len()].clone();
        let bearer = bearer.clone();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = TaskResult {
                completed: 0,
                acknowledged: 0,
                latency_us: histogram(),
                errors: 0,
                first_error: None,
            };
            let svc: Authed = tonic::service::interceptor::InterceptedService::new(channel, bearer);
            let mut meter = MeteringClient::new(svc.clone());
            let mut health = tonic_health::pb::health_client::HealthClient::new(svc);
            let mut i: u64 = 0;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let result = match call {
                    Call::Meter => meter.meter(meter_request(&prefix, task, i)).await.map(|_| ()),
                    Call::Empty => health
                        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                        .await
                        .map(|_| ()),
                };
                i += 1;
                let t1 = Instant::now();
                match result {
                    Ok(()) => {
                        r.acknowledged += 1;
                        if t0 >= measure_from {
                            r.completed += 1;
                            r.latency_us.saturating_record((t1 - t0).as_micros() as u64);
                        }
                    }
                    Err(s) => {
                        r.errors += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(s.to_string());
                        }
                    }
                }
            }
            r
        }));
    }
    tokio::time::sleep_until(measure_from).await;
    let cpu_from = cpu::snapshot();
    tokio::time::sleep_until(end).await;
    let cpu = cpu_from.until(&cpu::snapshot());
    let mut out = Unary {
        completed: 0,
        window: measure,
        latency_us: histogram(),
        errors: 0,
        first_error: None,
        acknowledged: 0,
        cpu,
    };
    for t in tasks {
        let r = t.await.map_err(|e| BenchError::msg(format!("caller task: {e}")))?;
        out.completed += r.completed;
        out.acknowledged += r.acknowledged;
        out.errors += r.errors;
        out.latency_us.add(&r.latency_us).map_err(|e| BenchError::msg(e.to_string()))?;
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
    }
    Ok(out)
}

/// What a MeterStream phase measured.
pub struct Stream {
    /// Responses received (each one a durable request).
    pub completed: u64,
    /// From the first request sent to the last response received.
    pub elapsed: Duration,
    /// Responses that were errors (a stream ends at its first error).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// CPU used.
    pub cpu: cpu::Usage,
}

impl Stream {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

/// `streams` concurrent MeterStream calls, one per channel round-robin, each sending
/// requests as fast as flow control lets it for `duration`, then closing its side and
/// reading every remaining response.
pub async fn stream(
    channels: &[Channel],
    bearer: &Bearer,
    prefix: &str,
    streams: usize,
    duration: Duration,
) -> Result<Stream, BenchError> {
    let cpu_from = cpu::snapshot();
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::with_capacity(streams);
    for s in 0..streams {
        let channel = channels[s % channels.len()].clone();
        let mut client = MeteringClient::with_interceptor(channel, bearer.clone());
        let prefix: Arc<str> = Arc::from(prefix);
        tasks.push(tokio::spawn(async move {
            let requests = futures::stream::iter(0u64..)
                .take_while(move |_| futures::future::ready(Instant::now() < end))
                .map(move |i| meter_request(&prefix, s, i));
            let mut completed = 0u64;
            let mut errors = 0u64;
            let mut first_error = None;
            match client.meter_stream(requests).await {
                Ok(resp) => {
                    let mut resp = resp.into_inner();
                    while let Some(r) = resp.next().await {
                        match r {
                            Ok(_) => completed += 1,
                            Err(e) => {
                                errors += 1;
                                first_error.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                }
                Err(e) => {
                    errors += 1;
                    first_error = Some(e.to_string());
                }
            }
            (completed, errors, first_error, Instant::now())
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.map_err(|e| BenchError::msg(format!("stream task: {e}")))?);
    }
    let cpu = cpu_from.until(&cpu::snapshot());
    let mut out =
        Stream { completed: 0, elapsed: Duration::ZERO, errors: 0, first_error: None, cpu };
    for (c, e, f, last) in results {
        out.completed += c;
        out.errors += e;
        if out.first_error.is_none() {
            out.first_error = f;
        }
        out.elapsed = out.elapsed.max(last - start);
    }
    Ok(out)
}
