//! Admission control of metering: a bound on the requests in flight between admission and
//! their durable answer (`meter.max_in_flight`), decided before anything else happens to a
//! request.
//!
//! Why: the writer's queue (`meter.queue_capacity`) is a backstop sized for bursts, and a
//! deep queue under sustained overload turns into latency — every admitted request waits
//! behind all the others. Bounding what is in flight near what the writer sustains keeps
//! the wait of an admitted request to a few batches, and answers the excess at once with
//! `RESOURCE_EXHAUSTED` + `OVERLOADED` (never by waiting): a shed request has reserved no id
//! and written nothing, so the client's retry with the same request id is safe.
//!
//! A permit travels with its request into the writer ([`crate::ledger::MeterJob`]) and is
//! released when the writer is done with it (answered, or dropped at shutdown), so a client
//! that gives up early does not free a slot the writer is still working on.

use crate::error::ApiError;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tribute_proto::v1::ErrorReason;

/// The bound on metering requests in flight, shared by `Meter` and `MeterStream`.
#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    in_flight: Gauge,
}

/// One admitted request's slot; released (and the in-flight gauge lowered) on drop.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl Admission {
    /// At most `max_in_flight` (at least 1) requests admitted at once; `in_flight` follows
    /// how many are.
    pub fn new(max_in_flight: usize, in_flight: Gauge) -> Self {
        let max = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Admission { slots: Arc::new(Semaphore::new(max)), in_flight }
    }

    /// A slot if one is free now, else `None` (never waits).
    pub fn try_admit(&self) -> Option<Admitted> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        self.in_flight.inc();
        Some(Admitted { _permit: permit, in_flight: self.in_flight.clone() })
    }

    /// A slot if one is free now, else the shedding answer.
    pub fn admit(&self) -> Result<Admitted, ApiError> {
        self.try_admit().ok_or_else(shed)
    }
}

/// The answer to a request shed at admission: nothing was reserved or written.
pub fn shed() -> ApiError {
    ApiError::new(
        Code::ResourceExhausted,
        ErrorReason::Overloaded,
        "metering is at its in-flight bound (meter.max_in_flight); nothing was recorded — \
         retry with the same request id after a backoff",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_then_sheds_until_a_slot_is_released() {
        let gauge = Gauge::default();
        let a = Admission::new(2, gauge.clone());
        let first = a.admit().expect("first");
        let second = a.admit().expect("second");
        assert_eq!(gauge.get(), 2);
        let err = a.admit().err().expect("third is shed");
        assert_eq!(err.code, Code::ResourceExhausted);
        assert_eq!(gauge.get(), 2, "a shed request is not in flight");
        drop(first);
        assert_eq!(gauge.get(), 1);
        let third = a.admit().expect("a released slot is reusable");
        drop((second, third));
        assert_eq!(gauge.get(), 0);
    }
}
