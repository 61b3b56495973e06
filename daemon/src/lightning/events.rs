//! How backend events reach the daemon: an optional caller-supplied handler that runs
//! before the node's event is acknowledged (for durable recording), and a bounded queue that
//! [`next_event`](super::LightningBackend::next_event) reads (for notification).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use super::types::LightningEvent;

/// Default capacity of a backend's event queue.
pub const DEFAULT_EVENT_QUEUE_CAPACITY: usize = 1_024;
/// First wait before handing an event to a failing handler again.
const HANDLER_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between attempts to hand an event to a failing handler.
const HANDLER_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why a handler could not take an event (e.g. its database write failed). The backend keeps
/// the event unacknowledged and offers it again after a backoff.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event handler failed: {0}")]
pub struct EventHandlerError(pub String);

/// Takes every event before the backend acknowledges it to the node.
///
/// Called from the backend's event task, one event at a time, in the node's order. Return
/// `Ok` only once the event is durably recorded; on `Err` the event is offered again (after
/// a backoff, and after a restart if the process stops first). Delivery is at-least-once, so
/// handling must be idempotent (key on the payment id).
#[tonic::async_trait]
pub trait LightningEventHandler: Send + Sync {
    /// Records `event`.
    async fn handle_event(&self, event: &LightningEvent) -> Result<(), EventHandlerError>;
}

/// The bounded queue behind `next_event`. A full queue drops the new event and counts it
/// (a bound that is hit is a metric, not a hang): the queue is a notification channel, and
/// [`payment_status`](super::LightningBackend::payment_status) stays the source of truth.
#[derive(Debug)]
pub(crate) struct EventQueue {
    sender: Mutex<Option<mpsc::Sender<LightningEvent>>>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<LightningEvent>>,
    dropped: AtomicU64,
}

impl EventQueue {
    pub(crate) fn new(capacity: usize) -> EventQueue {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        EventQueue {
            sender: Mutex::new(Some(sender)),
            receiver: tokio::sync::Mutex::new(receiver),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues `event`, or drops and counts it when the queue is full or closed.
    pub(crate) fn push(&self, event: LightningEvent) {
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(sender) = sender else { return };
        if let Err(err) = sender.try_send(event) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(dropped, "lightning event queue full or closed, event dropped: {err}");
        }
    }

    /// The next event; `None` once closed and drained.
    pub(crate) async fn next(&self) -> Option<LightningEvent> {
        self.receiver.lock().await.recv().await
    }

    /// After this, `next` drains what is queued and then returns `None`.
    pub(crate) fn close(&self) {
        self.sender.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    /// Events dropped because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Hands `event` to `handler` until it takes it or `stopping` resolves. Returns `false` if
/// the backend stopped first (the event must then not be acknowledged).
pub(crate) async fn hand_to_handler(
    handler: &Arc<dyn LightningEventHandler>,
    event: &LightningEvent,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut backoff = HANDLER_BACKOFF_MIN;
    loop {
        match handler.handle_event(event).await {
            Ok(()) => return true,
            Err(err) => {
                tracing::warn!(?event, "{err}; offering the event again in {backoff:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(stopping) => return false,
        }
        backoff = (backoff * 2).min(HANDLER_BACKOFF_MAX);
    }
}

/// Resolves once the watched flag is `true` or its sender is gone.
pub(crate) async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stopping.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(n: u64) -> LightningEvent {
        LightningEvent::PaymentReceived {
            payment_hash: [0; 32],
            amount_msat: n,
            custom_tlvs: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_a_closed_one_ends() {
        let queue = EventQueue::new(2);
        for n in 0..3 {
            queue.push(received(n));
        }
        assert_eq!(queue.dropped(), 1);
        queue.close();
        assert_eq!(queue.next().await, Some(received(0)));
        assert_eq!(queue.next().await, Some(received(1)));
        assert_eq!(queue.next().await, None);
    }

    struct FailTwice(Mutex<u32>);

    #[tonic::async_trait]
    impl LightningEventHandler for FailTwice {
        async fn handle_event(&self, _: &LightningEvent) -> Result<(), EventHandlerError> {
            let mut calls = self.0.lock().unwrap();
            *calls += 1;
            if *calls <= 2 {
                Err(EventHandlerError("disk full".into()))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn a_failing_handler_is_offered_the_event_again_until_it_takes_it() {
        let handler = Arc::new(FailTwice(Mutex::new(0)));
        let dyn_handler: Arc<dyn LightningEventHandler> = handler.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        assert!(hand_to_handler(&dyn_handler, &received(1), &mut stop_rx).await);
        assert_eq!(*handler.0.lock().unwrap(), 3);
        // Stopping while the handler keeps failing gives up without acknowledging.
        *handler.0.lock().unwrap() = 0;
        stop_tx.send(true).unwrap();
        assert!(!hand_to_handler(&dyn_handler, &received(1), &mut stop_rx).await);
    }
}
