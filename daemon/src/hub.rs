//! Fan-out of channel events to subscribers, bounded.
//!
//! Per contributor: a `watch` holding the latest signed state (a subscriber always sees the
//! newest state; intermediate ones coalesce by construction) and a `broadcast` of events
//! (micropayments, settlement notices) with a fixed capacity. A subscriber that falls
//! behind loses the oldest events and is told how many (a gap marker); the writer never
//! waits for a subscriber.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
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
    events: broadcast::Sender<HubEvent>,
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
    /// Events after the moment of subscribing.
    pub events: broadcast::Receiver<HubEvent>,
}

impl Hub {
    /// A hub whose per-subscriber event buffer holds `capacity` events.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Hub { capacity: capacity.max(1), topics: RwLock::new(HashMap::new()) })
    }

    fn with_topic<R>(&self, key: &PublicKey, f: impl FnOnce(&Topic) -> R) -> R {
        if let Some(t) = self.topics.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            return f(t);
        }
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let t = topics.entry(*key).or_insert_with(|| Topic {
            state: watch::channel(None).0,
            events: broadcast::channel(self.capacity).0,
        });
        f(t)
    }

    /// Subscribes to a contributor's channel.
    pub fn subscribe(&self, key: &PublicKey) -> Subscription {
        self.with_topic(key, |t| Subscription {
            state: t.state.subscribe(),
            events: t.events.subscribe(),
        })
    }

    /// Publishes a new signed state (must already be durable).
    pub fn publish_state(&self, key: &PublicKey, state: Signed<ChannelState>) {
        self.with_topic(key, |t| {
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
        });
    }

    /// Whether anyone listens for events of `key` (so the writer can skip building them).
    pub fn has_event_subscribers(&self, key: &PublicKey) -> bool {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|t| t.events.receiver_count() > 0)
    }

    /// Ends every subscription (at shutdown): subscribers see their streams finish.
    pub fn close(&self) {
        self.topics.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Publishes an event; never blocks (slow subscribers lag).
    pub fn publish_event(&self, key: &PublicKey, event: HubEvent) {
        if let Some(t) = self.topics.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            // No receiver is not an error: nobody is listening.
            let _ = t.events.send(event);
        }
    }
}
