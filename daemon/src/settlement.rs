//! The settlement engine: pays each channel's whole msat over Lightning as a crash-safe saga
//! (DESIGN.md, "Settlement").
//!
//! 1. **Intent**: a `settlements` row (`pending`) with the amount, the channel's `seq` and,
//!    for keysend, the payment id, committed before anything is paid. At most one pending
//!    settlement per channel (a unique index says so too).
//! 2. **Pay** through the [`LightningBackend`]: keysend with the derived preimage
//!    `HMAC-SHA256(settlement_secret, tag ‖ provider key ‖ settlement id)` and TLV records
//!    naming the settlement, the channel and the state `seq`; or the contributor's BOLT12
//!    offer, with a payer note naming the settlement (the node picks that payment's id,
//!    which is stored as soon as it is known).
//! 3. **Finalize**: on success the ledger writer records the preimage and fee, moves the
//!    channel's `settled_msat` and signs a state whose `last_settlement_hash` is the payment
//!    hash, in one transaction (see `ledger`), then streams it with a settlement notice. A
//!    definite failure marks the row `failed`: nothing moved, the amount stays owed, and a
//!    later round pays it under a new settlement after a backoff.
//! 4. An outcome that is not known yet (a timeout, a crash) is only ever resolved by asking
//!    the backend about the **same** payment; a keysend the node has no record of is sent
//!    again with the **same** preimage, which the node refuses as a duplicate if it had it
//!    after all. On start-up every pending settlement is resolved this way before any new
//!    one starts.
//!
//! A round drives its payouts concurrently, at most `max_in_flight` in all and
//! `max_in_flight_per_node` to one destination: payouts to one node share the channel to
//! it, and a channel carries a bounded number of HTLCs (LDK: 50 by default), each of which
//! keeps its place for a while after its payment succeeded. A keysend the node refuses at
//! once while the channel is full of our other payouts is not a definite failure: it is
//! sent again (same preimage) as soon as one of them finishes, within the round. Nor is one
//! the node took and then gave up on for want of a route (the first hop refused the HTLC
//! for the same reason): LDK reports the failure only once nothing of it is in flight, and
//! it is sent again the same way.

use crate::config::SettlementConfig;
use crate::error::ApiError;
use crate::ledger::{read_channels, unix_now, LedgerHandle, SettleJob};
use crate::lightning::{
    payment_hash, DynLightningBackend, FailureReason, KeysendRequest, LightningError, OfferRequest,
    PaymentId, PaymentStatus,
};
use crate::registry::Registry;
use crate::store::{self, StoreError};
use ldk_node::bitcoin::hashes::{hmac, sha256, Hash, HashEngine};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tribute_channels::{ChannelId, Network, PublicKey};

/// Custom TLV type of the settlement id (u64, big-endian) in a keysend.
pub const TLV_SETTLEMENT_ID: u64 = 1_953_655_139;
/// Custom TLV type of the channel id (32 bytes).
pub const TLV_CHANNEL_ID: u64 = 1_953_655_141;
/// Custom TLV type of the channel state `seq` the amount was owed at (u64, big-endian).
pub const TLV_STATE_SEQ: u64 = 1_953_655_143;

/// The tag of the keysend preimage derivation.
const PREIMAGE_TAG: &[u8] = b"tribute/settlement-preimage/v1";

/// The keysend preimage of settlement `id`: `HMAC-SHA256(secret, tag ‖ provider ‖ id)`.
/// Deterministic, so the same settlement can only ever be one payment.
pub fn preimage_of(secret: &[u8; 32], provider_key: &PublicKey, id: u64) -> [u8; 32] {
    let mut engine = hmac::HmacEngine::<sha256::Hash>::new(secret);
    engine.input(PREIMAGE_TAG);
    engine.input(&provider_key.to_bytes());
    engine.input(&id.to_be_bytes());
    hmac::Hmac::<sha256::Hash>::from_engine(engine).to_byte_array()
}

/// The payer note of a BOLT12 settlement: how its payment is found again.
pub fn payer_note_of(provider_key: &PublicKey, id: u64) -> String {
    format!("tribute settlement {id} from {provider_key}")
}

/// Where a settlement stops on purpose, to test crash safety: the engine stops there as if
/// the process had died (nothing after that point happens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// After the intent is durable, before the payment is handed to the backend.
    AfterIntent,
    /// After the backend took the payment, before its outcome is asked for.
    AfterPay,
    /// After the outcome is known, before it is finalized.
    BeforeFinalize,
    /// Inside the finalize transaction, before it commits (it rolls back).
    DuringFinalize,
}

/// Handle to steer the engine (operator commands).
#[derive(Clone, Default)]
pub struct SettlementControl {
    now: Arc<Notify>,
    paused: Arc<AtomicBool>,
    force: Arc<AtomicBool>,
    rounds: Arc<Mutex<Option<watch::Receiver<u64>>>>,
}

impl SettlementControl {
    /// Starts a round now that settles every channel owed at least `min_payout_msat`.
    pub fn settle_now(&self) {
        self.force.store(true, Ordering::SeqCst);
        self.now.notify_one();
    }

    /// Stops starting settlements (pending ones are still resolved).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Starts settling again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.now.notify_one();
    }

    /// Whether paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Settles now and waits until a round that started after this call has ended.
    pub async fn settle_now_and_wait(&self) {
        let Some(mut rx) = self.round_counter() else { return };
        let seen = *rx.borrow_and_update();
        self.settle_now();
        // A round in progress may end first: wait for the one after it.
        wait_for_round(rx, seen + 2).await;
    }

    /// Waits until `n` rounds that started after this call have ended.
    pub async fn wait_rounds(&self, n: u64) {
        let Some(mut rx) = self.round_counter() else { return };
        let seen = *rx.borrow_and_update();
        wait_for_round(rx, seen + 1 + n).await;
    }

    /// Counts the rounds that ended, once the engine runs.
    fn round_counter(&self) -> Option<watch::Receiver<u64>> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Waits until the round counter reaches `target` (or the engine is gone).
async fn wait_for_round(mut rx: watch::Receiver<u64>, target: u64) {
    while rx.changed().await.is_ok() {
        if *rx.borrow() >= target {
            return;
        }
    }
}

/// A settlement's durable record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementRow {
    /// Id (the rowid; sequential).
    pub settlement_id: u64,
    /// Channel.
    pub channel_id: ChannelId,
    /// Contributor.
    pub contributor_key: PublicKey,
    /// Amount, msat.
    pub amount_msat: u64,
    /// The channel's `seq` when the amount was taken.
    pub state_seq: u64,
    /// `keysend` or `bolt12`.
    pub method: String,
    /// Node id (hex) or offer.
    pub destination: String,
    /// Payment id, once known.
    pub payment_id: Option<[u8; 32]>,
    /// Payment hash, once known.
    pub payment_hash: Option<[u8; 32]>,
    /// Preimage, on success.
    pub preimage: Option<[u8; 32]>,
    /// Routing fee, on success.
    pub fee_msat: Option<u64>,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The signed state that carries it, on success.
    pub settled_state_seq: Option<u64>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
}

const SETTLEMENT_COLUMNS: &str =
    "settlement_id, channel_id, contributor_key, amount_msat, state_seq, \
    method, destination, payment_id, payment_hash, preimage, fee_msat, status, error, \
    settled_state_seq, created_at, updated_at";

fn blob32(v: Option<Vec<u8>>, what: &str) -> Result<Option<[u8; 32]>, StoreError> {
    v.map(|b| {
        b.as_slice().try_into().map_err(|_| StoreError::Corrupt(format!("settlement {what}")))
    })
    .transpose()
}

fn u64_col(v: i64, what: &str) -> Result<u64, StoreError> {
    store::u64_from_column(v, what)
}

impl SettlementRow {
    fn from_row(r: &rusqlite::Row<'_>) -> Result<SettlementRow, StoreError> {
        let key: Vec<u8> = r.get(2)?;
        let key: [u8; 32] =
            key.as_slice().try_into().map_err(|_| StoreError::Corrupt("settlement key".into()))?;
        Ok(SettlementRow {
            settlement_id: u64_col(r.get(0)?, "settlement_id")?,
            channel_id: ChannelId(blob32(Some(r.get(1)?), "channel_id")?.unwrap_or_default()),
            contributor_key: PublicKey::from_bytes(key)
                .map_err(|_| StoreError::Corrupt("settlement key".into()))?,
            amount_msat: u64_col(r.get(3)?, "amount_msat")?,
            state_seq: u64_col(r.get(4)?, "state_seq")?,
            method: r.get(5)?,
            destination: r.get(6)?,
            payment_id: blob32(r.get(7)?, "payment_id")?,
            payment_hash: blob32(r.get(8)?, "payment_hash")?,
            preimage: blob32(r.get(9)?, "preimage")?,
            fee_msat: r.get::<_, Option<i64>>(10)?.map(|v| u64_col(v, "fee_msat")).transpose()?,
            status: r.get(11)?,
            error: r.get(12)?,
            settled_state_seq: r
                .get::<_, Option<i64>>(13)?
                .map(|v| u64_col(v, "settled_state_seq"))
                .transpose()?,
            created_at: u64_col(r.get(14)?, "created_at")?,
            updated_at: u64_col(r.get(15)?, "updated_at")?,
        })
    }
}

/// Settlements selected by `filter` (an SQL suffix: `WHERE …`, `ORDER BY …`).
pub fn list_settlements<P: rusqlite::Params>(
    conn: &Connection,
    filter: &str,
    params: P,
) -> Result<Vec<SettlementRow>, StoreError> {
    let mut stmt =
        conn.prepare(&format!("SELECT {SETTLEMENT_COLUMNS} FROM settlements {filter}"))?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(SettlementRow::from_row(r)?);
    }
    Ok(out)
}

/// How a contributor is paid.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Destination {
    Keysend([u8; 33]),
    Offer(String),
}

impl Destination {
    fn method(&self) -> &'static str {
        match self {
            Destination::Keysend(_) => "keysend",
            Destination::Offer(_) => "bolt12",
        }
    }

    fn text(&self) -> String {
        match self {
            Destination::Keysend(id) => hex::encode(id),
            Destination::Offer(o) => o.clone(),
        }
    }

    fn of(row: &SettlementRow) -> Result<Destination, StoreError> {
        let corrupt =
            || StoreError::Corrupt(format!("settlement {} destination", row.settlement_id));
        match row.method.as_str() {
            "keysend" => {
                let bytes = hex::decode(&row.destination).map_err(|_| corrupt())?;
                Ok(Destination::Keysend(bytes.as_slice().try_into().map_err(|_| corrupt())?))
            }
            "bolt12" => Ok(Destination::Offer(row.destination.clone())),
            _ => Err(corrupt()),
        }
    }
}

/// How long after a payout to a destination finished a refusal at send to it is still put
/// down to the channel being full: its HTLC leaves the channel only after the commitment
/// dance that follows the payment's success.
const BUSY_GRACE: Duration = Duration::from_secs(2);
/// Wait before a payout the node refused because the channel was full is sent again,
/// unless another payout finishes first: it doubles per refusal, from the first to the
/// second (each refused send costs the node a store write).
const BUSY_RETRY_WAIT: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_millis(500));

/// The payouts of one round in flight per destination, bounded: a slot is held from before
/// a payout is handed to the node until its outcome is final or the round stops following
/// it.
struct Slots {
    max_per_destination: usize,
    held: Mutex<HashMap<String, SlotCount>>,
    released: Notify,
}

#[derive(Default)]
struct SlotCount {
    in_flight: usize,
    last_released: Option<Instant>,
}

/// A held slot; released on drop.
struct Slot<'a> {
    slots: &'a Slots,
    key: String,
}

impl Slots {
    fn new(max_per_destination: usize) -> Self {
        Slots {
            max_per_destination: max_per_destination.max(1),
            held: Mutex::new(HashMap::new()),
            released: Notify::new(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, SlotCount>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot for `key` until `deadline`; `None` if none was free by then.
    async fn acquire(&self, key: &str, deadline: Instant) -> Option<Slot<'_>> {
        loop {
            // Registered before the check, so a release in between is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held();
                let count = held.entry(key.to_owned()).or_default();
                if count.in_flight < self.max_per_destination {
                    count.in_flight += 1;
                    return Some(Slot { slots: self, key: key.to_owned() });
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return None;
            }
        }
    }

    /// Whether the channel to `key` may be full of our own payouts: others besides the
    /// caller's are in flight, or one finished moments ago.
    fn busy(&self, key: &str) -> bool {
        self.held().get(key).is_some_and(|c| {
            c.in_flight > 1 || c.last_released.is_some_and(|at| at.elapsed() < BUSY_GRACE)
        })
    }

    /// Returns once a slot is released, or after `wait`.
    async fn released_within(&self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.released.notified()).await;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut held = self.slots.held();
        if let Some(count) = held.get_mut(&self.key) {
            count.in_flight = count.in_flight.saturating_sub(1);
            count.last_released = Some(Instant::now());
        }
        drop(held);
        self.slots.released.notify_waiters();
    }
}

/// `rows` reordered so that destinations take turns (each keeps its own order): with a
/// bound per destination, a run of one destination's payouts would otherwise hold the
/// round's slots while they wait for that destination's.
fn interleave_by_destination(rows: Vec<SettlementRow>) -> Vec<SettlementRow> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, VecDeque<SettlementRow>> = HashMap::new();
    for row in rows {
        if !groups.contains_key(&row.destination) {
            order.push(row.destination.clone());
        }
        groups.entry(row.destination.clone()).or_default().push_back(row);
    }
    let mut out = Vec::new();
    loop {
        let before = out.len();
        for key in &order {
            if let Some(row) = groups.get_mut(key).and_then(VecDeque::pop_front) {
                out.push(row);
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// What handing a payout to the backend did.
enum Sent {
    /// In flight (or possibly so) under this id.
    InFlight(PaymentId),
    /// Definitely not sent; `at_send` when the node refused it at once for want of a usable
    /// route (which a full channel also causes).
    Refused { reason: String, at_send: bool },
}

/// Tunables of the engine that are not operator configuration.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// How often triggers are checked.
    pub tick: Duration,
    /// How often an unresolved payment is asked about.
    pub poll_interval: Duration,
    /// How long one round waits for payments to resolve before leaving them pending.
    pub round_patience: Duration,
    /// Backoff after the first definite failure of a channel's settlement; doubles per
    /// further failure, up to `settle_every_secs`.
    pub failure_backoff: Duration,
    /// Most payments in flight at once.
    pub max_in_flight: usize,
    /// Stop at this point, as if crashed (tests).
    pub fault: Option<FaultPoint>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            tick: Duration::from_secs(1),
            poll_interval: Duration::from_millis(200),
            round_patience: Duration::from_secs(60),
            failure_backoff: Duration::from_secs(5),
            max_in_flight: 32,
            fault: None,
        }
    }
}

/// Why a settlement step stopped early.
#[derive(Debug)]
enum Halt {
    /// The configured fault point was reached: stop everything.
    Fault,
    /// The backend is unreachable; try again later (the settlement stays pending).
    Backend(LightningError),
    /// Storage or the ledger failed; try again later.
    Ledger(String),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Halt::Ledger(e.to_string())
    }
}

impl From<ApiError> for Halt {
    fn from(e: ApiError) -> Self {
        Halt::Ledger(e.message)
    }
}

/// What became of a settlement in one pass.
enum Outcome {
    Succeeded,
    Failed,
    StillPending,
}

/// The engine; [`SettlementEngine::run`] is its task.
pub struct SettlementEngine {
    conn: Mutex<Connection>,
    backend: DynLightningBackend,
    ledger: LedgerHandle,
    registry: Arc<Registry>,
    config: SettlementConfig,
    options: EngineOptions,
    secret: [u8; 32],
    network: Network,
    provider_key: PublicKey,
    control: SettlementControl,
    /// When this engine first saw each never-settled channel owing: what
    /// `settle_every_secs` counts from for it.
    first_seen: Mutex<HashMap<ChannelId, u64>>,
}

impl SettlementEngine {
    /// An engine over its own connection `conn`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conn: Connection,
        backend: DynLightningBackend,
        ledger: LedgerHandle,
        registry: Arc<Registry>,
        config: SettlementConfig,
        options: EngineOptions,
        secret: [u8; 32],
        network: Network,
        provider_key: PublicKey,
        control: SettlementControl,
    ) -> Self {
        SettlementEngine {
            conn: Mutex::new(conn),
            backend,
            ledger,
            registry,
            config,
            options,
            secret,
            network,
            provider_key,
            control,
            first_seen: Mutex::new(HashMap::new()),
        }
    }

    fn db<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Runs until `stop` fires (or a fault point is reached). First resolves every pending
    /// settlement; then, every tick or when asked, starts the settlements that are due.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let (rounds_tx, rounds_rx) = watch::channel(0u64);
        *self.control.rounds.lock().unwrap_or_else(|p| p.into_inner()) = Some(rounds_rx);
        let mut recovered = false;
        let mut round = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.round(recovered).await {
                Ok(()) => recovered = true,
                Err(Halt::Fault) => {
                    tracing::warn!("settlement engine stopped at its fault point");
                    return;
                }
                Err(Halt::Backend(e)) => tracing::warn!("settlement round: Lightning backend: {e}"),
                Err(Halt::Ledger(e)) => tracing::error!("settlement round: {e}"),
            }
            round += 1;
            rounds_tx.send_replace(round);
            tokio::select! {
                _ = tokio::time::sleep(self.options.tick) => {}
                _ = self.control.now.notified() => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One round: resolve every pending settlement; then, once start-up recovery is done
    /// and unless paused, start the settlements that are due and drive them.
    async fn round(&self, recovered: bool) -> Result<(), Halt> {
        let pending = self
            .db(|c| list_settlements(c, "WHERE status = 'pending' ORDER BY settlement_id", []))?;
        let waiting: HashSet<ChannelId> = pending.iter().map(|s| s.channel_id).collect();
        let mut batch = pending;
        // New settlements start only once every pending one found at start-up is resolved.
        if (recovered || batch.is_empty()) && !self.control.is_paused() {
            // An operator's SettleNow is taken only by a round that starts settlements: not
            // lost while recovery or a pause holds them back, nor to a failed start.
            let force = self.control.force.swap(false, Ordering::SeqCst);
            match self.start_due(&waiting, force) {
                Ok(started) => batch.extend(started),
                Err(e) => {
                    if force {
                        self.control.force.store(true, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        // Drive them concurrently, a bounded number at a time, and per destination.
        use futures::stream::{self, StreamExt};
        let per_node = usize::try_from(self.config.max_in_flight_per_node).unwrap_or(usize::MAX);
        let slots = Slots::new(per_node);
        let slots = &slots;
        let results: Vec<Result<Outcome, Halt>> = stream::iter(interleave_by_destination(batch))
            .map(|row| self.drive(row, slots))
            .buffer_unordered(self.options.max_in_flight.max(1))
            .collect()
            .await;
        let mut first_halt = None;
        let mut unresolved = false;
        for r in results {
            match r {
                Ok(Outcome::StillPending) => unresolved = true,
                Ok(_) => {}
                Err(Halt::Fault) => return Err(Halt::Fault),
                Err(h) => {
                    if first_halt.is_none() {
                        first_halt = Some(h);
                    }
                }
            }
        }
        match first_halt {
            Some(h) => Err(h),
            // Start-up recovery is done only when nothing is left pending.
            None if unresolved && !recovered => {
                Err(Halt::Ledger("pending settlements unresolved".into()))
            }
            None => Ok(()),
        }
    }

    /// Records the intents of every channel that is due, and returns them.
    fn start_due(
        &self,
        waiting: &HashSet<ChannelId>,
        force: bool,
    ) -> Result<Vec<SettlementRow>, Halt> {
        let now = unix_now();
        let snapshot = self.registry.snapshot();
        let (network, provider) = (self.network, self.provider_key);
        let channels = self.db(|c| read_channels(c, "WHERE status != 2", [], network, provider))?;
        let mut started = Vec::new();
        for ch in channels {
            let head = &ch.head;
            if waiting.contains(&head.channel_id) {
                continue;
            }
            let payable = match head.payable_msat() {
                Ok(p) => p.0,
                Err(e) => {
                    tracing::error!(channel = %head.channel_id, "payable: {e}");
                    continue;
                }
            };
            if payable < self.config.min_payout_msat || payable == 0 {
                continue;
            }
            let mut history = self.db(|c| channel_history(c, &head.channel_id))?;
            if history.first_seen_at.is_none() {
                let mut seen = self.first_seen.lock().unwrap_or_else(|p| p.into_inner());
                history.first_seen_at = Some(*seen.entry(head.channel_id).or_insert(now));
            }
            if let Some(until) = history.backoff_until(&self.options, &self.config) {
                if now < until {
                    continue;
                }
            }
            // A definite failure keeps its trigger: the amount is retried once the backoff
            // has passed.
            let due = force
                || history.failures > 0
                || payable >= self.config.settle_threshold_msat
                || payable >= self.config.max_outstanding_msat
                || now.saturating_sub(
                    history.last_success_at.or(history.first_seen_at).unwrap_or(now),
                ) >= self.config.settle_every_secs;
            if !due {
                continue;
            }
            let Some(reg) = snapshot.contributors.get(&ch.contributor_key) else { continue };
            let dest = match (&reg.message.bolt12_offer, reg.message.node_id) {
                (Some(offer), _) => Destination::Offer(offer.clone()),
                (None, Some(node)) => Destination::Keysend(node),
                (None, None) => {
                    tracing::warn!(contributor = %ch.contributor_key, "no node id or offer to pay");
                    continue;
                }
            };
            let row = self.db(|c| {
                intend(
                    c,
                    &self.secret,
                    &self.provider_key,
                    &ch.contributor_key,
                    head.channel_id,
                    payable,
                    head.seq,
                    &dest,
                    now,
                )
            })?;
            tracing::info!(settlement = row.settlement_id, contributor = %ch.contributor_key, amount_msat = payable, method = dest.method(), "settlement intent");
            started.push(row);
        }
        Ok(started)
    }

    fn fault(&self, at: FaultPoint) -> Result<(), Halt> {
        if self.options.fault == Some(at) {
            return Err(Halt::Fault);
        }
        Ok(())
    }

    /// Drives one pending settlement as far as it goes in this round.
    async fn drive(&self, row: SettlementRow, slots: &Slots) -> Result<Outcome, Halt> {
        self.fault(FaultPoint::AfterIntent)?;
        let dest = Destination::of(&row)?;
        let deadline = Instant::now() + self.options.round_patience;
        // Held while the payout is sent and followed, i.e. until this returns.
        let Some(_slot) = slots.acquire(&row.destination, deadline).await else {
            return Ok(Outcome::StillPending);
        };
        let mut sent = false;
        let mut refusals = 0u32;
        let mut payment_id = row.payment_id.map(PaymentId);
        loop {
            let status = match (&dest, payment_id) {
                (_, Some(id)) => self.backend.payment_status(&id).await,
                (Destination::Offer(_), None) => {
                    // The id of a BOLT12 payment whose pay call did not return is found by
                    // its payer note.
                    let note = payer_note_of(&self.provider_key, row.settlement_id);
                    match self.backend.find_offer_payments(&note).await {
                        Ok(found) => match found
                            .into_iter()
                            .find(|(_, s)| !matches!(s, PaymentStatus::Failed { .. }))
                        {
                            Some((id, s)) => {
                                self.db(|c| set_payment_id(c, row.settlement_id, &id.0, None))?;
                                payment_id = Some(id);
                                Ok(s)
                            }
                            None => Ok(PaymentStatus::Unknown),
                        },
                        Err(e) => Err(e),
                    }
                }
                (Destination::Keysend(_), None) => Ok(PaymentStatus::Unknown),
            };
            let status = status.map_err(Halt::Backend)?;
            match status {
                PaymentStatus::Succeeded { preimage, fee_paid_msat } => {
                    self.fault(FaultPoint::BeforeFinalize)?;
                    return self
                        .succeed(&row, preimage, fee_paid_msat)
                        .await
                        .map(|_| Outcome::Succeeded);
                }
                PaymentStatus::Failed { reason } => {
                    // The node took the payment, then found the channel full of our other
                    // payouts to the same node (the first hop refused the HTLC and no other
                    // route exists): LDK reports a failure only once nothing of it is in
                    // flight, so it is sent again under the same id and preimage.
                    if matches!(
                        reason,
                        FailureReason::RouteNotFound
                            | FailureReason::RetriesExhausted
                            | FailureReason::NotRecorded
                    ) && self.wait_for_room(&row, &dest, slots, deadline, &mut refusals).await
                    {
                        match self.send(&row, &dest, slots, deadline).await? {
                            Some(id) => payment_id = Some(id),
                            None => return Ok(Outcome::Failed),
                        }
                        continue;
                    }
                    self.fault(FaultPoint::BeforeFinalize)?;
                    self.db(|c| mark_failed(c, row.settlement_id, &reason.to_string()))?;
                    tracing::warn!(
                        settlement = row.settlement_id,
                        "settlement failed: {reason}; the amount stays owed"
                    );
                    return Ok(Outcome::Failed);
                }
                PaymentStatus::Unknown if !sent => {
                    sent = true;
                    match self.send(&row, &dest, slots, deadline).await? {
                        Some(id) => payment_id = Some(id),
                        None => {
                            // Refused before anything was sent: definitely not paid.
                            return Ok(Outcome::Failed);
                        }
                    }
                    self.fault(FaultPoint::AfterPay)?;
                    continue;
                }
                PaymentStatus::Pending | PaymentStatus::Unknown => {}
            }
            if Instant::now() >= deadline {
                return Ok(Outcome::StillPending);
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
    }

    /// Hands the payment to the backend. `Some(id)`: in flight (or possibly so) under `id`;
    /// `None`: definitely not sent (the row is marked failed). A keysend the node refuses at
    /// once while the channel may be full of our other payouts to the same node is sent
    /// again (same preimage: the refused attempt left nothing in flight) each time one of
    /// them finishes, until `deadline`.
    async fn send(
        &self,
        row: &SettlementRow,
        dest: &Destination,
        slots: &Slots,
        deadline: Instant,
    ) -> Result<Option<PaymentId>, Halt> {
        let mut refusals = 0u32;
        loop {
            let (reason, at_send) = match self.pay(row, dest).await? {
                Sent::InFlight(id) => {
                    if refusals > 0 {
                        tracing::debug!(
                            settlement = row.settlement_id,
                            refusals,
                            "sent once the channel had room"
                        );
                    }
                    return Ok(Some(id));
                }
                Sent::Refused { reason, at_send } => (reason, at_send),
            };
            if at_send && self.wait_for_room(row, dest, slots, deadline, &mut refusals).await {
                continue;
            }
            self.db(|c| mark_failed(c, row.settlement_id, &reason))?;
            tracing::warn!(
                settlement = row.settlement_id,
                refusals,
                "settlement not sent: {reason}; the amount stays owed"
            );
            return Ok(None);
        }
    }

    /// Whether a keysend the node gave up on may have lacked only room in the channel that
    /// our other payouts to the same node fill: if so, waits until one of them finishes (or
    /// a wait that doubles per call, `refusals`) and says to send it again. A BOLT12 payment
    /// is routed only once the invoice is back, so its failures are never about the
    /// channel's room; nor are they when the node is offline.
    async fn wait_for_room(
        &self,
        row: &SettlementRow,
        dest: &Destination,
        slots: &Slots,
        deadline: Instant,
        refusals: &mut u32,
    ) -> bool {
        let busy = match dest {
            Destination::Keysend(node) => {
                Instant::now() < deadline
                    && slots.busy(&row.destination)
                    && !self.peer_offline(node).await
            }
            Destination::Offer(_) => false,
        };
        if busy {
            let wait = BUSY_RETRY_WAIT.0.saturating_mul(1 << (*refusals).min(16));
            *refusals += 1;
            slots.released_within(wait.min(BUSY_RETRY_WAIT.1)).await;
        }
        busy
    }

    /// Whether `node` is our peer and none of our channels with it is usable (it is offline,
    /// or the channels are not ready).
    async fn peer_offline(&self, node: &[u8; 33]) -> bool {
        match self.backend.list_channels().await {
            Ok(channels) => {
                let mut with_node = channels.iter().filter(|c| c.counterparty == *node).peekable();
                with_node.peek().is_some() && with_node.all(|c| !c.usable)
            }
            Err(_) => false,
        }
    }

    /// Hands the payment to the backend once.
    async fn pay(&self, row: &SettlementRow, dest: &Destination) -> Result<Sent, Halt> {
        let max_fee_msat = (row.amount_msat.saturating_mul(u64::from(self.config.max_fee_ppm))
            / 1_000_000)
            .max(self.config.min_fee_budget_msat);
        let sent = match dest {
            Destination::Keysend(node) => {
                let preimage = preimage_of(&self.secret, &self.provider_key, row.settlement_id);
                let request = KeysendRequest {
                    dest_node_id: *node,
                    amount_msat: row.amount_msat,
                    preimage,
                    custom_tlvs: vec![
                        (TLV_SETTLEMENT_ID, row.settlement_id.to_be_bytes().to_vec()),
                        (TLV_CHANNEL_ID, row.channel_id.0.to_vec()),
                        (TLV_STATE_SEQ, row.state_seq.to_be_bytes().to_vec()),
                    ],
                    max_fee_msat,
                };
                let id = request.payment_id();
                match self.backend.pay_keysend(request).await {
                    Ok(_) | Err(LightningError::Duplicate(_)) => Ok(id),
                    Err(e) => Err((e, Some(id))),
                }
            }
            Destination::Offer(offer) => {
                let request = OfferRequest {
                    offer: offer.clone(),
                    amount_msat: row.amount_msat,
                    payer_note: payer_note_of(&self.provider_key, row.settlement_id),
                    max_fee_msat,
                };
                match self.backend.pay_offer(request).await {
                    Ok(r) => {
                        self.db(|c| {
                            set_payment_id(c, row.settlement_id, &r.payment_id.0, r.payment_hash)
                        })?;
                        Ok(r.payment_id)
                    }
                    Err(e) => Err((e, None)),
                }
            }
        };
        match sent {
            Ok(id) => Ok(Sent::InFlight(id)),
            Err((e @ (LightningError::PaymentFailed(_) | LightningError::Permanent(_)), _)) => {
                let at_send =
                    matches!(e, LightningError::PaymentFailed(FailureReason::SendFailed(_)));
                Ok(Sent::Refused { reason: e.to_string(), at_send })
            }
            // The outcome is unknown (a timeout) or the node is unreachable: the status of
            // the same payment is asked next; nothing is paid under another id.
            Err((e, Some(id))) if e.is_retryable() => {
                tracing::warn!(settlement = row.settlement_id, "keysend outcome unknown: {e}");
                Ok(Sent::InFlight(id))
            }
            Err((e, _)) => Err(Halt::Backend(e)),
        }
    }

    /// Finalizes a succeeded payment through the ledger writer.
    async fn succeed(
        &self,
        row: &SettlementRow,
        preimage: [u8; 32],
        fee: Option<u64>,
    ) -> Result<(), Halt> {
        let hash = payment_hash(&preimage);
        if let Some(expected) = row.payment_hash {
            if expected != hash {
                return Err(Halt::Ledger(format!(
                    "settlement {}: the preimage does not hash to the payment hash",
                    row.settlement_id
                )));
            }
        }
        self.ledger
            .settle(SettleJob {
                settlement_id: row.settlement_id,
                contributor_key: row.contributor_key,
                channel_id: row.channel_id,
                amount_msat: row.amount_msat,
                payment_hash: hash,
                preimage,
                fee_msat: fee,
                fail_before_commit: self.options.fault == Some(FaultPoint::DuringFinalize),
            })
            .await
            .map_err(|e| {
                if self.options.fault == Some(FaultPoint::DuringFinalize) {
                    Halt::Fault
                } else {
                    Halt::from(e)
                }
            })?;
        tracing::info!(
            settlement = row.settlement_id,
            amount_msat = row.amount_msat,
            "settlement succeeded"
        );
        Ok(())
    }
}

/// A channel's settlement history, for triggers and backoff.
struct History {
    last_success_at: Option<u64>,
    /// Its oldest settlement among the recent ones (or, set by the engine, when it first
    /// saw the channel owing).
    first_seen_at: Option<u64>,
    /// Definite failures since the last success, and when the newest was recorded.
    failures: u32,
    last_failure_at: Option<u64>,
}

impl History {
    fn backoff_until(&self, options: &EngineOptions, config: &SettlementConfig) -> Option<u64> {
        let at = self.last_failure_at?;
        let doublings = self.failures.saturating_sub(1).min(30);
        let wait = options
            .failure_backoff
            .as_secs()
            .max(1)
            .saturating_mul(1u64 << doublings)
            .min(config.settle_every_secs.max(1));
        Some(at.saturating_add(wait))
    }
}

fn channel_history(conn: &Connection, channel_id: &ChannelId) -> Result<History, StoreError> {
    let rows: Vec<(String, i64, i64)> = conn
        .prepare_cached(
            "SELECT status, created_at, updated_at FROM settlements WHERE channel_id = ?1
             ORDER BY settlement_id DESC LIMIT 64",
        )?
        .query_map(params![&channel_id.0[..]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut h =
        History { last_success_at: None, first_seen_at: None, failures: 0, last_failure_at: None };
    for (status, created, updated) in &rows {
        h.first_seen_at = Some(u64_col(*created, "created_at")?);
        match status.as_str() {
            "succeeded" => {
                h.last_success_at = Some(u64_col(*updated, "updated_at")?);
                break;
            }
            "failed" => {
                h.failures += 1;
                if h.last_failure_at.is_none() {
                    h.last_failure_at = Some(u64_col(*updated, "updated_at")?);
                }
            }
            _ => {}
        }
    }
    Ok(h)
}

/// Records an intent; returns its row. Keysend intents carry their payment id and hash.
#[allow(clippy::too_many_arguments)]
fn intend(
    conn: &mut Connection,
    secret: &[u8; 32],
    provider_key: &PublicKey,
    contributor_key: &PublicKey,
    channel_id: ChannelId,
    amount_msat: u64,
    state_seq: u64,
    dest: &Destination,
    now: u64,
) -> Result<SettlementRow, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let id: i64 =
        tx.query_row("SELECT COALESCE(MAX(settlement_id), 0) + 1 FROM settlements", [], |r| {
            r.get(0)
        })?;
    let id = u64_col(id, "settlement_id")?;
    let (payment_id, hash) = match dest {
        Destination::Keysend(_) => {
            let preimage = preimage_of(secret, provider_key, id);
            let hash = payment_hash(&preimage);
            (Some(PaymentId::for_preimage(&preimage).0), Some(hash))
        }
        Destination::Offer(_) => (None, None),
    };
    let now_col = store::u64_to_column(now, "now")?;
    tx.execute(
        "INSERT INTO settlements (settlement_id, channel_id, contributor_key, amount_msat, state_seq,
            method, destination, payment_id, payment_hash, status, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?10)",
        params![
            store::u64_to_column(id, "settlement_id")?,
            &channel_id.0[..],
            contributor_key.to_bytes(),
            store::u64_to_column(amount_msat, "amount_msat")?,
            store::u64_to_column(state_seq, "state_seq")?,
            dest.method(),
            dest.text(),
            payment_id.as_ref().map(|p| &p[..]),
            hash.as_ref().map(|h| &h[..]),
            now_col,
        ],
    )?;
    tx.commit()?;
    let rows = list_settlements(
        conn,
        "WHERE settlement_id = ?1",
        params![store::u64_to_column(id, "id")?],
    )?;
    rows.into_iter().next().ok_or_else(|| StoreError::Corrupt("settlement vanished".into()))
}

fn set_payment_id(
    conn: &mut Connection,
    id: u64,
    payment_id: &[u8; 32],
    hash: Option<[u8; 32]>,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE settlements SET payment_id = ?2, payment_hash = COALESCE(?3, payment_hash), updated_at = ?4
         WHERE settlement_id = ?1 AND status = 'pending'",
        params![
            store::u64_to_column(id, "settlement_id")?,
            &payment_id[..],
            hash.as_ref().map(|h| &h[..]),
            store::u64_to_column(unix_now(), "now")?,
        ],
    )?;
    Ok(())
}

fn mark_failed(conn: &mut Connection, id: u64, error: &str) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE settlements SET status = 'failed', error = ?2, updated_at = ?3
         WHERE settlement_id = ?1 AND status = 'pending'",
        params![
            store::u64_to_column(id, "settlement_id")?,
            error,
            store::u64_to_column(unix_now(), "now")?
        ],
    )?;
    Ok(())
}

/// The pending settlement of a channel, if any (read by the ledger writer in its finalize
/// transaction).
pub fn pending_of(conn: &Connection, id: u64) -> Result<Option<(String, Option<i64>)>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT status, settled_state_seq FROM settlements WHERE settlement_id = ?1",
            params![store::u64_to_column(id, "settlement_id")?],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preimages_differ_per_settlement_and_secret() {
        let key = PublicKey::from_bytes([
            0x79, 0xbe, 0x66, 0x7e, 0xf9, 0xdc, 0xbb, 0xac, 0x55, 0xa0, 0x62, 0x95, 0xce, 0x87,
            0x0b, 0x07, 0x02, 0x9b, 0xfc, 0xdb, 0x2d, 0xce, 0x28, 0xd9, 0x59, 0xf2, 0x81, 0x5b,
            0x16, 0xf8, 0x17, 0x98,
        ])
        .unwrap();
        let a = preimage_of(&[1; 32], &key, 1);
        assert_eq!(a, preimage_of(&[1; 32], &key, 1));
        assert_ne!(a, preimage_of(&[1; 32], &key, 2));
        assert_ne!(a, preimage_of(&[2; 32], &key, 1));
    }

    #[test]
    fn tlv_types_are_valid_custom_records() {
        crate::lightning::validate_custom_tlvs(&[
            (TLV_SETTLEMENT_ID, vec![0; 8]),
            (TLV_CHANNEL_ID, vec![0; 32]),
            (TLV_STATE_SEQ, vec![0; 8]),
        ])
        .unwrap();
    }

    fn row(id: u64, destination: &str) -> SettlementRow {
        SettlementRow {
            settlement_id: id,
            channel_id: ChannelId([0; 32]),
            contributor_key: PublicKey::from_bytes([
                0x79, 0xbe, 0x66, 0x7e, 0xf9, 0xdc, 0xbb, 0xac, 0x55, 0xa0, 0x62, 0x95, 0xce, 0x87,
                0x0b, 0x07, 0x02, 0x9b, 0xfc, 0xdb, 0x2d, 0xce, 0x28, 0xd9, 0x59, 0xf2, 0x81, 0x5b,
                0x16, 0xf8, 0x17, 0x98,
            ])
            .unwrap(),
            amount_msat: 1,
            state_seq: 1,
            method: "keysend".into(),
            destination: destination.into(),
            payment_id: None,
            payment_hash: None,
            preimage: None,
            fee_msat: None,
            status: "pending".into(),
            error: None,
            settled_state_seq: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn destinations_take_turns() {
        let rows = [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "c"), (6, "b")]
            .map(|(id, d)| row(id, d))
            .to_vec();
        let ids: Vec<u64> =
            interleave_by_destination(rows).iter().map(|r| r.settlement_id).collect();
        assert_eq!(ids, vec![1, 4, 5, 2, 6, 3]);
    }

    #[tokio::test]
    async fn slots_are_bounded_per_destination_and_freed_on_drop() {
        let slots = Slots::new(2);
        let soon = || Instant::now() + Duration::from_millis(50);
        let a1 = slots.acquire("a", soon()).await.unwrap();
        assert!(!slots.busy("a"), "only the caller's own payout is in flight");
        let a2 = slots.acquire("a", soon()).await.unwrap();
        assert!(slots.busy("a"));
        let _b = slots.acquire("b", soon()).await.unwrap();
        // Full: the third waits until the deadline ...
        assert!(slots.acquire("a", soon()).await.is_none());
        // ... or until one is released.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (third, ()) = tokio::join!(slots.acquire("a", deadline), async { drop(a1) });
        assert!(third.is_some());
        drop(third);
        drop(a2);
        // Just released: a refusal now is still put down to the channel being full ...
        assert!(slots.busy("a"));
        // ... but not once the grace has passed.
        let past = Instant::now().checked_sub(BUSY_GRACE).unwrap();
        slots.held().get_mut("a").unwrap().last_released = Some(past);
        assert!(!slots.busy("a"));
    }

    #[test]
    fn backoff_doubles_up_to_the_settle_interval() {
        let options =
            EngineOptions { failure_backoff: Duration::from_secs(5), ..Default::default() };
        let config = SettlementConfig { settle_every_secs: 60, ..Default::default() };
        let h = |failures| History {
            last_success_at: None,
            first_seen_at: Some(0),
            failures,
            last_failure_at: Some(1000),
        };
        assert_eq!(h(1).backoff_until(&options, &config), Some(1005));
        assert_eq!(h(2).backoff_until(&options, &config), Some(1010));
        assert_eq!(h(4).backoff_until(&options, &config), Some(1040));
        assert_eq!(h(9).backoff_until(&options, &config), Some(1060));
    }
}
