//! `tribute.v1.Metering`: `Meter` and `MeterStream`.

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
}

impl MeteringService {
    /// Meters into `ledger`, validating against `registry`; counts into `metrics`.
    pub fn new(
        registry: Arc<Registry>,
        ledger: LedgerHandle,
        max_price_nsat: u64,
        max_message_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        MeteringService { registry, ledger, max_price_nsat, max_message_bytes, metrics }
    }

    /// Validates, queues and awaits one request, and records its outcome and latency.
    async fn meter_one(&self, r: pb::MeterRequest) -> Result<pb::MeterResponse, ApiError> {
        let started = Instant::now();
        let answered = match self.submit(r) {
            Ok(rx) => answer(rx).await,
            Err(e) => Err(e),
        };
        record(&self.metrics, &answered, started);
        answered
    }

    /// Validates and queues one request; the receiver resolves once it is durable.
    fn submit(
        &self,
        r: pb::MeterRequest,
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
        self.ledger.submit(MeterJob { prepared, include_shares: r.include_shares, reply })?;
        Ok(rx)
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
        };
        tokio::spawn(async move {
            let mut pending = FuturesOrdered::new();
            let mut input_open = true;
            // Why the input ended early (e.g. a message that is not protobuf): told to the
            // client after the answers before it, so a cut stream never ends as if complete.
            let mut input_error = None;
            loop {
                tokio::select! {
                    biased;
                    Some(done) = pending.next(), if !pending.is_empty() => {
                        let done: Result<pb::MeterResponse, ApiError> = done;
                        let failed = done.is_err();
                        if tx.send(done.map_err(Status::from)).await.is_err() || failed {
                            return;
                        }
                    }
                    next = input.next(), if input_open && pending.len() < STREAM_WINDOW => {
                        match next {
                            Some(Ok(r)) => {
                                let started = Instant::now();
                                let rx = this.submit(r).unwrap_or_else(|e| {
                                    // Answered in order, after every earlier request.
                                    let (failed, rx) = oneshot::channel();
                                    let _ = failed.send(Err(e));
                                    rx
                                });
                                let metrics = this.metrics.clone();
                                pending.push_back(async move {
                                    let answered = answer(rx).await;
                                    record(&metrics, &answered, started);
                                    answered
                                });
                            }
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
