//! Fan-out of channel events to subscribers, bounded.
//!
//! Per contributor: a `watch` holding the latest signed state (a subscriber always sees the
//! newest state; intermediate ones coalesce by construction) and a `broadcast` of events
//! (micropayments, settlement notices) with a fixed capacity. A subscriber that falls
//! behind loses the oldest events and is told how many (a gap marker); the writer never
//! waits for a subscriber.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::{broadcast, watch};
use tribute_channels::channel::ChannelState;
use tribute_channels::{PublicKey, Signed};

/// One event for a contributor's subscribers.
#[derive(Clone, Debug)]
pub enum HubEvent {
    /// A request's share, durable.
    Payment {
        /// The request.
        request_id: Arc<str>,
        /// The contributor's share.
        share_nsat: u64,
        /// The receipt batch.
        batch_seq: u64,
        /// Leaf index in the batch.
        leaf_index: u32,
    },
    /// A settlement changed state.
    Settlement {
        /// Settlement id.
        settlement_id: u64,
        /// Amount.
        amount_msat: u64,
        /// Payment hash.
        payment_hash: [u8; 32],
        /// "pending", "succeeded" or "failed".
        state: &'static str,
    },
}

struct Topic {
    state: watch::Sender<Option<Signed<ChannelState>>>,
    /// Created by the first subscriber that wants events and dropped when the last one
    /// leaves: a buffer holds `capacity` events, so only contributors someone listens to
    /// have one (not every contributor the writer ever published a state for).
    events: Option<broadcast::Sender<HubEvent>>,
}

impl Topic {
    /// `key`'s topic, created (with no state and no event buffer) if there is none.
    fn of<'a>(topics: &'a mut HashMap<PublicKey, Topic>, key: &PublicKey) -> &'a mut Topic {
        topics.entry(*key).or_insert_with(|| Topic { state: watch::channel(None).0, events: None })
    }
}

/// The subscription hub.
pub struct Hub {
    capacity: usize,
    topics: RwLock<HashMap<PublicKey, Topic>>,
}

/// A live subscription.
pub struct Subscription {
    /// Latest signed state (initially the current one).
    pub state: watch::Receiver<Option<Signed<ChannelState>>>,
    /// Events after the moment of subscribing (`None` for a states-only subscription).
    pub events: Option<Events>,
}

/// A subscriber's events; the contributor's buffer is released with its last one.
pub struct Events {
    hub: Arc<Hub>,
    key: PublicKey,
    rx: Option<broadcast::Receiver<HubEvent>>,
}

impl Events {
    /// The next event (see [`broadcast::Receiver::recv`]: `Lagged(n)` when `n` were lost).
    pub async fn recv(&mut self) -> Result<HubEvent, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.hub.release_events(&self.key);
    }
}

impl Hub {
    /// A hub whose per-subscriber event buffer holds `capacity` events.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Hub { capacity: capacity.max(1), topics: RwLock::new(HashMap::new()) })
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<PublicKey, Topic>> {
        self.topics.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<PublicKey, Topic>> {
        self.topics.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to a contributor's channel: its states, and its events unless
    /// `states_only`.
    pub fn subscribe(self: &Arc<Self>, key: &PublicKey, states_only: bool) -> Subscription {
        let mut topics = self.write();
        let t = Topic::of(&mut topics, key);
        let events = (!states_only).then(|| {
            let rx =
                t.events.get_or_insert_with(|| broadcast::channel(self.capacity).0).subscribe();
            Events { hub: self.clone(), key: *key, rx: Some(rx) }
        });
        Subscription { state: t.state.subscribe(), events }
    }

    /// Drops `key`'s event buffer if nobody listens any more.
    fn release_events(&self, key: &PublicKey) {
        if let Some(t) = self.write().get_mut(key) {
            if t.events.as_ref().is_some_and(|e| e.receiver_count() == 0) {
                t.events = None;
            }
        }
    }

    /// Publishes a new signed state (must already be durable).
    pub fn publish_state(&self, key: &PublicKey, state: Signed<ChannelState>) {
        let publish = |t: &Topic, state: Signed<ChannelState>| {
            // Never replace a state with an older one of the same channel (a signing round
            // can finish after a settlement signed a newer state).
            t.state.send_if_modified(|cur| match cur {
                Some(c)
                    if c.message.channel_id == state.message.channel_id
                        && c.message.seq >= state.message.seq =>
                {
                    false
                }
                _ => {
                    *cur = Some(state);
                    true
                }
            });
        };
        if let Some(t) = self.read().get(key) {
            return publish(t, state);
        }
        publish(Topic::of(&mut self.write(), key), state);
    }

    /// Which of `keys` anyone listens to for events (so the writer can skip building
    /// them), under one lock.
    pub fn event_listeners<'a>(&self, keys: impl IntoIterator<Item = &'a PublicKey>) -> Vec<bool> {
        let topics = self.read();
        keys.into_iter()
            .map(|k| {
                topics
                    .get(k)
                    .and_then(|t| t.events.as_ref())
                    .is_some_and(|e| e.receiver_count() > 0)
            })
            .collect()
    }

    /// Ends every subscription (at shutdown): subscribers see their streams finish.
    pub fn close(&self) {
        self.write().clear();
    }

    /// Publishes an event; never blocks (slow subscribers lag).
    pub fn publish_event(&self, key: &PublicKey, event: HubEvent) {
        if let Some(events) = self.read().get(key).and_then(|t| t.events.as_ref()) {
            // No receiver is not an error: nobody is listening.
            let _ = events.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        let secp = ldk_node::bitcoin::secp256k1::Secp256k1::new();
        let sk = ldk_node::bitcoin::secp256k1::SecretKey::from_slice(&[n; 32]).unwrap();
        PublicKey::from(sk.x_only_public_key(&secp).0)
    }

    fn buffers(hub: &Hub) -> usize {
        hub.read().values().filter(|t| t.events.is_some()).count()
    }

    #[tokio::test]
    async fn event_buffers_exist_only_while_someone_listens() {
        let hub = Hub::new(8);
        let (a, b) = (key(1), key(2));
        // The writer publishes to contributors nobody listens to: no buffers.
        hub.publish_event(
            &a,
            HubEvent::Settlement {
                settlement_id: 1,
                amount_msat: 1,
                payment_hash: [0; 32],
                state: "pending",
            },
        );
        let states_only = hub.subscribe(&a, true);
        assert!(states_only.events.is_none());
        assert_eq!(buffers(&hub), 0);
        assert_eq!(hub.event_listeners([&a, &b]), [false, false]);

        let mut first = hub.subscribe(&b, false);
        let second = hub.subscribe(&b, false);
        assert_eq!(buffers(&hub), 1);
        assert_eq!(hub.event_listeners([&a, &b]), [false, true]);
        let event = HubEvent::Payment {
            request_id: Arc::from("r1"),
            share_nsat: 5,
            batch_seq: 1,
            leaf_index: 0,
        };
        hub.publish_event(&b, event);
        let got = first.events.as_mut().unwrap().recv().await.unwrap();
        assert!(matches!(got, HubEvent::Payment { share_nsat: 5, .. }));

        // The buffer goes with the last listener, not before.
        drop(first);
        assert_eq!(buffers(&hub), 1);
        drop(second);
        assert_eq!(buffers(&hub), 0);
        assert_eq!(hub.event_listeners([&b]), [false]);
        drop(states_only);
    }
}
