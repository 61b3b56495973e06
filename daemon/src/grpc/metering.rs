//! `tribute.v1.Metering`: `Meter` and `MeterStream`.
//!
//! Every request takes an admission slot (`admission`) before anything else is done with
//! it; without one, `Meter` is answered `RESOURCE_EXHAUSTED` + `OVERLOADED` at once, and a
//! `MeterStream` holds its next request until one of its own answers frees a slot (or sheds
//! it the same way when it has nothing in flight to wait for).

use crate::admission::{shed, Admission, Admitted};
use crate::auth::{authorize, policy};
use crate::error::ApiError;
use crate::ledger::{unix_now, LedgerHandle, MeterJob, MeterOutcome};
use crate::meter::{prepare, MeterInput, PriceInput};
use crate::metrics::Metrics;
use crate::registry::Registry;
use futures::stream::{FuturesOrdered, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tribute_channels::pricing::Usage;
use tribute_channels::Timestamp;
use tribute_proto::v1 as pb;
use tribute_proto::v1::metering_server::Metering;

/// Most requests of one `MeterStream` in flight before it stops reading more.
pub const STREAM_WINDOW: usize = 4096;

/// The metering service.
pub struct MeteringService {
    registry: Arc<Registry>,
    ledger: LedgerHandle,
    max_price_nsat: u64,
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
    admission: Admission,
}

impl MeteringService {
    /// Meters into `ledger`, validating against `registry`, with at most `max_in_flight`
    /// requests in flight; counts into `metrics`.
    pub fn new(
        registry: Arc<Registry>,
        ledger: LedgerHandle,
        max_price_nsat: u64,
        max_message_bytes: usize,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.max_in_flight.set(i64::try_from(max_in_flight).unwrap_or(i64::MAX));
        let admission = Admission::new(max_in_flight, metrics.in_flight.clone());
        MeteringService { registry, ledger, max_price_nsat, max_message_bytes, metrics, admission }
    }

    /// Admits, validates, queues and awaits one request, and records its outcome and
    /// latency. Admission comes first: a shed request costs nearly nothing and changes
    /// nothing.
    async fn meter_one(&self, r: pb::MeterRequest) -> Result<pb::MeterResponse, ApiError> {
        let started = Instant::now();
        let answered = match self.admission.admit().and_then(|slot| self.submit(r, slot)) {
            Ok(rx) => answer(rx).await,
            Err(e) => Err(e),
        };
        record(&self.metrics, &answered, started);
        answered
    }

    /// Validates and queues one admitted request; the receiver resolves once it is durable.
    /// The slot goes with the request to the writer (or is released here if it fails
    /// validation).
    fn submit(
        &self,
        r: pb::MeterRequest,
        admitted: Admitted,
    ) -> Result<oneshot::Receiver<Result<MeterOutcome, ApiError>>, ApiError> {
        super::check_size(&r, self.max_message_bytes)?;
        let input = MeterInput {
            request_id: r.request_id,
            model_id: r.model_id,
            price: r.price.map(|p| match p {
                pb::meter_request::Price::Usage(u) => PriceInput::Usage(Usage {
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                }),
                pb::meter_request::Price::PriceNsat(n) => PriceInput::Explicit(n),
            }),
            attribution: r.attribution.into_iter().map(|d| (d.dataset_hash, d.weight)).collect(),
        };
        let prepared =
            prepare(&self.registry.snapshot(), input, Timestamp(unix_now()), self.max_price_nsat)?;
        let (reply, rx) = oneshot::channel();
        self.ledger.submit(MeterJob {
            prepared,
            include_shares: r.include_shares,
            reply,
            admitted,
        })?;
        Ok(rx)
    }
}

impl MeteringService {
    /// A stream's request, admitted (or shed), as the future of its answer: answered in
    /// order, after every earlier request of the stream.
    fn queue(
        &self,
        r: pb::MeterRequest,
        slot: Result<Admitted, ApiError>,
        started: Instant,
    ) -> impl std::future::Future<Output = Result<pb::MeterResponse, ApiError>> {
        let rx = slot.and_then(|slot| self.submit(r, slot)).unwrap_or_else(|e| {
            let (failed, rx) = oneshot::channel();
            let _ = failed.send(Err(e));
            rx
        });
        let metrics = self.metrics.clone();
        async move {
            let answered = answer(rx).await;
            record(&metrics, &answered, started);
            answered
        }
    }
}

/// Counts an answer by outcome, and the latency of the durable ones.
fn record(metrics: &Metrics, answered: &Result<pb::MeterResponse, ApiError>, started: Instant) {
    let outcome = match answered {
        Ok(r) if r.replayed => "replayed",
        Ok(_) => "accepted",
        Err(e) => match e.code {
            tonic::Code::ResourceExhausted => "overloaded",
            tonic::Code::Internal | tonic::Code::Unavailable => "failed",
            _ => "rejected",
        },
    };
    metrics.count(outcome);
    if answered.is_ok() {
        metrics.meter_latency.observe(started.elapsed().as_secs_f64());
    }
}

async fn answer(
    rx: oneshot::Receiver<Result<MeterOutcome, ApiError>>,
) -> Result<pb::MeterResponse, ApiError> {
    let outcome = rx.await.map_err(|_| {
        ApiError::new(
            tonic::Code::Unavailable,
            tribute_proto::v1::ErrorReason::ShuttingDown,
            "writer stopped",
        )
    })??;
    Ok(response(outcome))
}

/// The wire form of an outcome.
pub fn response(o: MeterOutcome) -> pb::MeterResponse {
    pb::MeterResponse {
        receipt: Some(pb::Receipt {
            request_id: o.request_id,
            model_id: o.model_id,
            attribution_version: o.attribution_version,
            price_nsat: o.price_nsat,
            pool_nsat: o.pool_nsat,
            batch_seq: o.batch_seq,
            leaf_index: o.leaf_index,
            shares: o
                .shares
                .unwrap_or_default()
                .into_iter()
                .map(|(k, n)| pb::Share {
                    contributor_key: k.to_bytes().to_vec(),
                    nsat: u64::try_from(n.0).unwrap_or(u64::MAX),
                })
                .collect(),
        }),
        replayed: o.replayed,
    }
}

type MeterStreamOut =
    Pin<Box<dyn futures::Stream<Item = Result<pb::MeterResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Metering for MeteringService {
    async fn meter(
        &self,
        req: Request<pb::MeterRequest>,
    ) -> Result<Response<pb::MeterResponse>, Status> {
        authorize(&req, policy::METER)?;
        Ok(Response::new(self.meter_one(req.into_inner()).await?))
    }

    type MeterStreamStream = MeterStreamOut;

    /// Answers in request order. A request that fails (validation, overload, storage) ends
    /// the stream with its error status — a gRPC stream carries one final status — after
    /// every earlier request was answered; the client resends from the first unanswered
    /// request with the same ids, so nothing accrues twice.
    ///
    /// Admission: each request takes a slot of the shared in-flight bound. A request read
    /// when none is free waits (and the stream reads no more, so HTTP/2 flow control holds
    /// the client back) only while this stream has answers of its own still to come, each
    /// of which frees a slot; with nothing of its own in flight it is shed with
    /// `OVERLOADED` like a unary call. A stream at the bound is slowed, not failed, and it
    /// never holds a slot while it waits for input.
    async fn meter_stream(
        &self,
        req: Request<Streaming<pb::MeterRequest>>,
    ) -> Result<Response<Self::MeterStreamStream>, Status> {
        authorize(&req, policy::METER)?;
        let mut input = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<pb::MeterResponse, Status>>(1024);
        let this = MeteringService {
            registry: self.registry.clone(),
            ledger: self.ledger.clone(),
            max_price_nsat: self.max_price_nsat,
            max_message_bytes: self.max_message_bytes,
            metrics: self.metrics.clone(),
            admission: self.admission.clone(),
        };
        tokio::spawn(async move {
            let mut pending = FuturesOrdered::new();
            // A request read but not yet admitted (no slot was free), with when it was read.
            let mut held: Option<(pb::MeterRequest, Instant)> = None;
            let mut input_open = true;
            // Why the input ended early (e.g. a message that is not protobuf): told to the
            // client after the answers before it, so a cut stream never ends as if complete.
            let mut input_error = None;
            loop {
                // The held request gets a slot if one is free now; if none is and nothing
                // of ours is in flight to free one, it is shed.
                if let Some((r, started)) = held.take() {
                    match this.admission.try_admit() {
                        Some(slot) => pending.push_back(this.queue(r, Ok(slot), started)),
                        None if pending.is_empty() => {
                            pending.push_back(this.queue(r, Err(shed()), started))
                        }
                        None => held = Some((r, started)),
                    }
                }
                let read = input_open && held.is_none() && pending.len() < STREAM_WINDOW;
                tokio::select! {
                    biased;
                    Some(done) = pending.next(), if !pending.is_empty() => {
                        let done: Result<pb::MeterResponse, ApiError> = done;
                        let failed = done.is_err();
                        if tx.send(done.map_err(Status::from)).await.is_err() || failed {
                            return;
                        }
                    }
                    next = input.next(), if read => {
                        match next {
                            Some(Ok(r)) => held = Some((r, Instant::now())),
                            Some(Err(status)) => {
                                tracing::debug!("meter stream input error: {status}");
                                input_open = false;
                                input_error = Some(status);
                            }
                            None => input_open = false,
                        }
                    }
                    else => {
                        if let Some(status) = input_error.take() {
                            let _ = tx.send(Err(status)).await;
                        }
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
