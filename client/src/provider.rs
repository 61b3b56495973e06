//! The provider SDK: meter inference requests, one call at a time ([`Provider::meter`]) or
//! on a stream ([`Provider::meter_stream`]).
//!
//! Every request carries the provider's request id, the daemon's idempotency key: the same
//! id with the same content is answered with the original receipt and accrues nothing
//! again. That is what makes retrying safe, so the SDK retries transient failures —
//! `UNAVAILABLE`, `RESOURCE_EXHAUSTED`/`OVERLOADED`, a dropped connection, an attempt that
//! timed out — with the **same** request, with capped exponential backoff and jitter,
//! within a deadline per call and a bound on attempts. A verdict (bad input, unknown model,
//! the id reused with other content, auth) is returned at once.
//!
//! Calls are spread round-robin over a small pool of HTTP/2 connections: one connection
//! under 64 concurrent calls showed ~40 ms tail stalls here; four did not.

use crate::connect::{Authed, Bearer, DaemonEndpoint};
use crate::error::{ClientError, RpcError};
use crate::keys::random_bytes;
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tribute_channels::{DatasetHash, ModelId, Nsat, PublicKey, RequestId};
use tribute_proto::v1 as pb;
use tribute_proto::v1::metering_client::MeteringClient;

const METER: &str = "Metering.Meter";
const METER_STREAM: &str = "Metering.MeterStream";

/// How failed attempts are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts per call (the first included).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubled after each, with full jitter.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The pause before retry number `retry` (1-based): uniform in
    /// `[0, min(max, initial * 2^(retry-1))]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .initial_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let r = random_bytes()
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
        // Without randomness, wait the full cap: slower, never a tight loop.
        let micros = cap.as_micros() as u64;
        match r {
            Ok(r) if micros > 0 => Duration::from_micros(r % (micros + 1)),
            _ => cap,
        }
    }
}

/// The SDK's settings.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The daemon.
    pub endpoint: DaemonEndpoint,
    /// The provider's bearer token.
    pub token: String,
    /// HTTP/2 connections in the pool (at least 1).
    pub connections: usize,
    /// Bound on one call, retries included.
    pub call_deadline: Duration,
    /// Bound on one attempt (at most what is left of the call's deadline).
    pub attempt_timeout: Duration,
    /// Retries.
    pub retry: RetryPolicy,
    /// Most requests of one [`Provider::meter_stream`] sent and not yet answered.
    pub stream_window: usize,
}

impl ProviderConfig {
    /// Defaults: 4 connections, 10 s per call, 3 s per attempt, 8 attempts, window 1024.
    pub fn new(endpoint: DaemonEndpoint, token: impl Into<String>) -> Self {
        ProviderConfig {
            endpoint,
            token: token.into(),
            connections: 4,
            call_deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            retry: RetryPolicy::default(),
            stream_window: 1024,
        }
    }
}

/// How a request is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Price {
    /// By the model's tariff.
    Usage {
        /// Input tokens.
        input_tokens: u64,
        /// Output tokens.
        output_tokens: u64,
    },
    /// An explicit price in nanosatoshi, overriding the tariff.
    Nsat(u64),
}

/// One inference request to meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    /// The idempotency key: unique per provider, reused only to retry.
    pub request_id: RequestId,
    /// The model that served it.
    pub model_id: ModelId,
    /// Its price.
    pub price: Price,
    /// Optional per-request attribution (citations, influence scores).
    pub attribution: Vec<(DatasetHash, u64)>,
    /// Return per-contributor shares in the receipt.
    pub include_shares: bool,
}

impl Meter {
    /// A request priced by the model's tariff. Fails on an invalid id.
    pub fn usage(
        request_id: &str,
        model_id: &str,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Result<Self, ClientError> {
        Self::new(request_id, model_id, Price::Usage { input_tokens, output_tokens })
    }

    /// A request with an explicit price.
    pub fn priced(request_id: &str, model_id: &str, price_nsat: u64) -> Result<Self, ClientError> {
        Self::new(request_id, model_id, Price::Nsat(price_nsat))
    }

    fn new(request_id: &str, model_id: &str, price: Price) -> Result<Self, ClientError> {
        Ok(Meter {
            request_id: RequestId::new(request_id)
                .map_err(|e| ClientError::Config(format!("request id {request_id:?}: {e}")))?,
            model_id: ModelId::new(model_id)
                .map_err(|e| ClientError::Config(format!("model id {model_id:?}: {e}")))?,
            price,
            attribution: Vec::new(),
            include_shares: false,
        })
    }

    /// Adds a per-request attribution entry.
    pub fn with_attribution(mut self, dataset: DatasetHash, weight: u64) -> Self {
        self.attribution.push((dataset, weight));
        self
    }

    /// Asks for the per-contributor shares in the receipt.
    pub fn with_shares(mut self) -> Self {
        self.include_shares = true;
        self
    }

    fn to_pb(&self) -> pb::MeterRequest {
        pb::MeterRequest {
            request_id: self.request_id.as_str().to_owned(),
            model_id: self.model_id.as_str().to_owned(),
            price: Some(match self.price {
                Price::Usage { input_tokens, output_tokens } => {
                    pb::meter_request::Price::Usage(pb::Usage { input_tokens, output_tokens })
                }
                Price::Nsat(n) => pb::meter_request::Price::PriceNsat(n),
            }),
            attribution: self
                .attribution
                .iter()
                .map(|(h, w)| pb::DatasetWeight { dataset_hash: h.0.to_vec(), weight: *w })
                .collect(),
            include_shares: self.include_shares,
        }
    }
}

/// The daemon's receipt for a metered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    /// The request id.
    pub request_id: String,
    /// The model.
    pub model_id: String,
    /// Attribution version used (0: per-request attribution).
    pub attribution_version: u64,
    /// The request's price.
    pub price_nsat: Nsat,
    /// The contributors' pool.
    pub pool_nsat: Nsat,
    /// The provider-signed receipt batch it is in.
    pub batch_seq: u64,
    /// Its leaf in that batch.
    pub leaf_index: u32,
    /// Per-contributor shares, when asked for.
    pub shares: Vec<(PublicKey, Nsat)>,
    /// True when this answers an earlier attempt that had already accrued.
    pub replayed: bool,
}

impl Metered {
    fn from_pb(call: &'static str, r: pb::MeterResponse) -> Result<Self, ClientError> {
        let receipt = r.receipt.ok_or_else(|| ClientError::protocol(call, "no receipt"))?;
        let shares = receipt
            .shares
            .iter()
            .map(|s| {
                let key: [u8; 32] = s
                    .contributor_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| ClientError::protocol(call, "share key is not 32 bytes"))?;
                let key = PublicKey::from_bytes(key)
                    .map_err(|e| ClientError::protocol(call, format!("share key: {e}")))?;
                Ok((key, Nsat(s.nsat.into())))
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Metered {
            request_id: receipt.request_id,
            model_id: receipt.model_id,
            attribution_version: receipt.attribution_version,
            price_nsat: Nsat(receipt.price_nsat.into()),
            pool_nsat: Nsat(receipt.pool_nsat.into()),
            batch_seq: receipt.batch_seq,
            leaf_index: receipt.leaf_index,
            shares,
            replayed: r.replayed,
        })
    }
}

/// A failed request of [`Provider::meter_stream`].
#[derive(Debug)]
pub struct StreamError {
    /// The request that failed (empty when the whole stream failed before any request).
    pub request_id: String,
    /// Why.
    pub error: ClientError,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request {:?}: {}", self.request_id, self.error)
    }
}

impl std::error::Error for StreamError {}

/// A metering client with a connection pool and retries.
#[derive(Clone)]
pub struct Provider {
    pool: std::sync::Arc<Vec<MeteringClient<Authed>>>,
    next: std::sync::Arc<AtomicUsize>,
    config: ProviderConfig,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("endpoint", &self.config.endpoint)
            .field("connections", &self.pool.len())
            .finish()
    }
}

impl Provider {
    /// Opens the pool's connections (all of them now, so a wrong URL, certificate or port
    /// fails here rather than on the first request).
    pub async fn connect(config: ProviderConfig) -> Result<Self, ClientError> {
        if config.connections == 0 || config.connections > 64 {
            return Err(ClientError::Config("connections must be 1..=64".into()));
        }
        if config.stream_window == 0 {
            return Err(ClientError::Config("stream_window must be at least 1".into()));
        }
        if config.retry.max_attempts == 0 {
            return Err(ClientError::Config("retry.max_attempts must be at least 1".into()));
        }
        let bearer = Bearer::new(Some(&config.token))?;
        let mut pool = Vec::with_capacity(config.connections);
        for _ in 0..config.connections {
            let channel = config.endpoint.connect().await?;
            pool.push(MeteringClient::with_interceptor(channel, bearer.clone()));
        }
        Ok(Provider {
            pool: std::sync::Arc::new(pool),
            next: std::sync::Arc::new(AtomicUsize::new(0)),
            config,
        })
    }

    fn client(&self) -> MeteringClient<Authed> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        self.pool[i].clone()
    }

    /// Meters one request: retried on transient failures with the same request id until it
    /// is answered, a verdict comes back, or the call's deadline or attempt bound is hit.
    /// After [`ClientError::GaveUp`] the request may or may not have accrued: meter it again
    /// later with the same id to find out (it will not accrue twice).
    pub async fn meter(&self, request: &Meter) -> Result<Metered, ClientError> {
        let req = request.to_pb();
        let deadline = Instant::now() + self.config.call_deadline;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let budget = left.min(self.config.attempt_timeout);
            let mut call = tonic::Request::new(req.clone());
            call.set_timeout(budget);
            let mut client = self.client();
            let failure = match tokio::time::timeout(budget, client.meter(call)).await {
                Ok(Ok(resp)) => return Metered::from_pb(METER, resp.into_inner()),
                Ok(Err(status)) => RpcError::from_status(METER, &status),
                Err(_) => RpcError::from_status(
                    METER,
                    &tonic::Status::deadline_exceeded(format!("no answer within {budget:?}")),
                ),
            };
            if !failure.is_transient() {
                return Err(ClientError::Rpc(Box::new(failure)));
            }
            tracing::debug!(request_id = %request.request_id, attempt, "meter retry: {failure}");
            if attempt >= self.config.retry.max_attempts {
                return Err(ClientError::GaveUp {
                    call: METER,
                    attempts: attempt,
                    why: "retry limit",
                    last: Box::new(failure),
                });
            }
            let pause = self.config.retry.backoff(attempt);
            if Instant::now() + pause >= deadline {
                return Err(ClientError::GaveUp {
                    call: METER,
                    attempts: attempt,
                    why: "deadline",
                    last: Box::new(failure),
                });
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Meters a stream of requests over `MeterStream`, answering each in input order.
    ///
    /// At most `stream_window` requests are in flight. When the stream breaks (connection
    /// dropped, overload, no answer within `attempt_timeout`), it is reopened after a
    /// backoff and every unanswered request is sent again with its id, so nothing accrues
    /// twice. A request the daemon refuses is answered with its error and the stream goes
    /// on with the next. After `max_attempts` failures in a row without progress, every
    /// unanswered request is answered with [`ClientError::GaveUp`] and the output ends
    /// without reading more input.
    pub fn meter_stream<S>(&self, requests: S) -> ReceiverStream<Result<Metered, StreamError>>
    where
        S: Stream<Item = Meter> + Send + Unpin + 'static,
    {
        let (out, rx) = mpsc::channel(self.config.stream_window);
        let this = self.clone();
        tokio::spawn(async move { this.run_stream(requests, out).await });
        ReceiverStream::new(rx)
    }

    async fn run_stream<S>(self, mut input: S, out: mpsc::Sender<Result<Metered, StreamError>>)
    where
        S: Stream<Item = Meter> + Send + Unpin + 'static,
    {
        let window = self.config.stream_window;
        let mut pending: VecDeque<pb::MeterRequest> = VecDeque::new();
        let mut input_done = false;
        let mut failures = 0u32;
        let fail =
            |id: &str, error: ClientError| Err(StreamError { request_id: id.to_owned(), error });
        loop {
            if pending.is_empty() && input_done {
                return;
            }
            // (Re)open the stream and resend what is unanswered.
            let (tx, req_rx) = mpsc::channel::<pb::MeterRequest>(window);
            for r in &pending {
                // Capacity is `window` and `pending.len() <= window`: never blocks.
                if tx.send(r.clone()).await.is_err() {
                    return;
                }
            }
            let mut tx = (!input_done).then_some(tx);
            let mut client = self.client();
            let opened = tokio::time::timeout(
                self.config.attempt_timeout,
                client.meter_stream(ReceiverStream::new(req_rx)),
            )
            .await;
            let broke: RpcError = match opened {
                Err(_) => RpcError::from_status(
                    METER_STREAM,
                    &tonic::Status::deadline_exceeded("stream did not open in time"),
                ),
                Ok(Err(status)) => RpcError::from_status(METER_STREAM, &status),
                Ok(Ok(resp)) => {
                    let mut answers = resp.into_inner();
                    loop {
                        // Only wait for answers with a bound while something is unanswered.
                        let wait = if pending.is_empty() {
                            Duration::from_secs(365 * 24 * 3600)
                        } else {
                            self.config.attempt_timeout
                        };
                        tokio::select! {
                            biased;
                            answer = tokio::time::timeout(wait, answers.next()) => match answer {
                                Err(_) => break RpcError::from_status(METER_STREAM,
                                    &tonic::Status::deadline_exceeded(format!("no answer within {wait:?}"))),
                                Ok(Some(Ok(r))) => {
                                    let Some(front) = pending.pop_front() else {
                                        let _ = out.send(fail("", ClientError::protocol(METER_STREAM, "an answer nobody asked for"))).await;
                                        return;
                                    };
                                    let item = Metered::from_pb(METER_STREAM, r)
                                        .and_then(|m| if m.request_id == front.request_id { Ok(m) } else {
                                            Err(ClientError::protocol(METER_STREAM, format!("answer for {:?} where {:?} was next", m.request_id, front.request_id)))
                                        })
                                        .map_err(|error| StreamError { request_id: front.request_id.clone(), error });
                                    failures = 0;
                                    if out.send(item).await.is_err() {
                                        return;
                                    }
                                    if pending.is_empty() && input_done {
                                        return;
                                    }
                                }
                                Ok(Some(Err(status))) => break RpcError::from_status(METER_STREAM, &status),
                                Ok(None) => break RpcError::from_status(METER_STREAM,
                                    &tonic::Status::unavailable("the stream ended with requests unanswered")),
                            },
                            next = input.next(), if tx.is_some() && pending.len() < window => match next {
                                Some(m) => {
                                    let r = m.to_pb();
                                    pending.push_back(r.clone());
                                    if let Some(t) = &tx {
                                        // Room is guaranteed by the window check above.
                                        let _ = t.send(r).await;
                                    }
                                }
                                None => {
                                    input_done = true;
                                    tx = None;
                                    if pending.is_empty() {
                                        return;
                                    }
                                }
                            },
                        }
                    }
                }
            };
            drop(tx);
            if !broke.is_transient() {
                // The daemon's verdict is about the first unanswered request.
                match pending.pop_front() {
                    Some(front) => {
                        if out
                            .send(fail(&front.request_id, ClientError::Rpc(Box::new(broke))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        failures = 0;
                        continue;
                    }
                    None => {
                        let _ = out.send(fail("", ClientError::Rpc(Box::new(broke)))).await;
                        return;
                    }
                }
            }
            failures += 1;
            tracing::debug!(failures, unanswered = pending.len(), "meter stream broke: {broke}");
            if failures >= self.config.retry.max_attempts {
                for r in pending.drain(..) {
                    let e = ClientError::GaveUp {
                        call: METER_STREAM,
                        attempts: failures,
                        why: "retry limit",
                        last: Box::new(broke.clone()),
                    };
                    if out.send(fail(&r.request_id, e)).await.is_err() {
                        return;
                    }
                }
                if !input_done {
                    let e = ClientError::GaveUp {
                        call: METER_STREAM,
                        attempts: failures,
                        why: "retry limit",
                        last: Box::new(broke),
                    };
                    let _ = out.send(fail("", e)).await;
                }
                return;
            }
            tokio::time::sleep(self.config.retry.backoff(failures)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_grows() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        };
        for retry in 1..40 {
            let b = p.backoff(retry);
            let cap = Duration::from_millis(10 * (1u64 << (retry - 1).min(20)))
                .min(Duration::from_millis(100));
            assert!(b <= cap, "retry {retry}: {b:?} > {cap:?}");
        }
    }

    #[test]
    fn bad_ids_are_refused_before_sending() {
        assert!(Meter::usage("", "m", 1, 1).is_err());
        assert!(Meter::usage("a b", "m", 1, 1).is_err());
        assert!(Meter::priced("ok", &"m".repeat(65), 1).is_err());
        assert!(Meter::usage("ok", "m", 1, 1).is_ok());
    }
}
