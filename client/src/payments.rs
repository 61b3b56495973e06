//! The receiving node's Lightning side: an embedded ldk-node that takes the provider's
//! keysend and BOLT12 payouts, and a record of every payment it received in the node's own
//! SQLite, matched to the signed states and settlement notices that claim it.
//!
//! Each received payment is recorded **before** the Lightning node's event is acknowledged
//! (an [`LightningEventHandler`]), so a crash between the two only repeats the record, which
//! is idempotent (keyed by payment hash). At start the node's own payment store is read
//! again ([`sync_payments`]) for anything received while no record was kept, and for the
//! payer note of BOLT12 payments.
//!
//! How a payment is tied to a settlement: a keysend from the provider carries TLV records
//! with the settlement id, the channel id and the state `seq` (DESIGN.md, "Settlement"); a
//! BOLT12 payment carries the payer note `tribute settlement {id} from {provider key}`; and
//! either way the signed state that finalizes a settlement carries its payment hash as
//! `last_settlement_hash`, as does the settlement notice.

use crate::node::{NodeError, NodeStore};
use rusqlite::OptionalExtension;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use tribute_channels::{ChannelId, PublicKey, Timestamp};
use tribute_daemon::lightning::{
    EventHandlerError, LdkBackend, LdkBackendConfig, LightningEvent, LightningEventHandler,
};
use tribute_daemon::settlement::{TLV_CHANNEL_ID, TLV_SETTLEMENT_ID, TLV_STATE_SEQ};

/// How a payment arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentKind {
    /// A keysend (spontaneous payment).
    Keysend,
    /// A payment for one of this node's BOLT12 offers.
    Bolt12,
    /// Anything else (a BOLT11 invoice, …); kept, not expected from the provider.
    Other,
}

impl PaymentKind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentKind::Keysend => "keysend",
            PaymentKind::Bolt12 => "bolt12",
            PaymentKind::Other => "other",
        }
    }

    fn parse(s: &str) -> PaymentKind {
        match s {
            "keysend" => PaymentKind::Keysend,
            "bolt12" => PaymentKind::Bolt12,
            _ => PaymentKind::Other,
        }
    }
}

/// A payment this node's Lightning node received, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    /// Its payment hash.
    pub payment_hash: [u8; 32],
    /// What arrived, in msat.
    pub amount_msat: u64,
    /// How it arrived (unknown until the node's payment store is read: [`PaymentKind::Other`]
    /// for an event that carried no TLVs).
    pub kind: PaymentKind,
    /// The settlement it names (keysend TLV or BOLT12 payer note).
    pub settlement_id: Option<u64>,
    /// The channel it names (keysend TLV).
    pub channel_id: Option<ChannelId>,
    /// The state `seq` the amount was owed at (keysend TLV).
    pub state_seq: Option<u64>,
    /// The BOLT12 payer note.
    pub payer_note: Option<String>,
    /// When it was recorded (node clock).
    pub received_at: Timestamp,
}

impl PaymentRecord {
    /// The provider key a BOLT12 payer note names, with the settlement id.
    pub fn note_names(&self) -> Option<(u64, PublicKey)> {
        parse_payer_note(self.payer_note.as_deref()?)
    }
}

/// `tribute settlement {id} from {provider key}` → (id, key).
pub fn parse_payer_note(note: &str) -> Option<(u64, PublicKey)> {
    let rest = note.strip_prefix("tribute settlement ")?;
    let (id, provider) = rest.split_once(" from ")?;
    Some((id.parse().ok()?, PublicKey::from_hex(provider).ok()?))
}

fn tlv_u64(tlvs: &[(u64, Vec<u8>)], ty: u64) -> Option<u64> {
    let v = tlvs.iter().find(|(t, _)| *t == ty)?;
    Some(u64::from_be_bytes(v.1.as_slice().try_into().ok()?))
}

/// The record of a `PaymentReceived` event.
pub fn record_of_event(
    payment_hash: [u8; 32],
    amount_msat: u64,
    tlvs: &[(u64, Vec<u8>)],
    now: Timestamp,
) -> PaymentRecord {
    let channel_id = tlvs
        .iter()
        .find(|(t, _)| *t == TLV_CHANNEL_ID)
        .and_then(|(_, v)| <[u8; 32]>::try_from(v.as_slice()).ok())
        .map(ChannelId);
    let settlement_id = tlv_u64(tlvs, TLV_SETTLEMENT_ID);
    PaymentRecord {
        payment_hash,
        amount_msat,
        kind: if settlement_id.is_some() { PaymentKind::Keysend } else { PaymentKind::Other },
        settlement_id,
        channel_id,
        state_seq: tlv_u64(tlvs, TLV_STATE_SEQ),
        payer_note: None,
        received_at: now,
    }
}

/// Records every `PaymentReceived` in the node's database before the event is acknowledged.
pub struct PaymentRecorder {
    store: Mutex<NodeStore>,
    node: OnceLock<LdkBackend>,
}

impl PaymentRecorder {
    /// A recorder writing to the node database at `path` (its own connection).
    pub fn open(path: &Path) -> Result<PaymentRecorder, NodeError> {
        Ok(PaymentRecorder { store: Mutex::new(NodeStore::open(path)?), node: OnceLock::new() })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, NodeStore> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[tonic::async_trait]
impl LightningEventHandler for PaymentRecorder {
    async fn handle_event(&self, event: &LightningEvent) -> Result<(), EventHandlerError> {
        let LightningEvent::PaymentReceived { payment_hash, amount_msat, custom_tlvs } = event
        else {
            return Ok(());
        };
        let mut record =
            record_of_event(*payment_hash, *amount_msat, custom_tlvs, crate::time::unix_now());
        // A BOLT12 payment's payer note is in the node's payment store, not in the event.
        if let Some(node) = self.node.get() {
            if let Some(found) = inbound_payments(node).into_iter().find(|p| p.0 == *payment_hash) {
                record.kind = found.2;
                record.payer_note = found.3;
                if record.settlement_id.is_none() {
                    record.settlement_id = record.note_names().map(|(id, _)| id);
                }
            }
        }
        self.store().save_payment(&record).map_err(|e| EventHandlerError(e.to_string()))?;
        tracing::info!(
            payment_hash = %hex::encode(payment_hash),
            amount_msat,
            settlement_id = record.settlement_id,
            "payout received over Lightning"
        );
        Ok(())
    }
}

/// Succeeded inbound payments in the Lightning node's own store: (hash, amount, kind, payer
/// note).
fn inbound_payments(node: &LdkBackend) -> Vec<([u8; 32], u64, PaymentKind, Option<String>)> {
    use ldk_node::payment::{PaymentDirection, PaymentKind as K, PaymentStatus};
    node.node()
        .list_payments_with_filter(|p| {
            p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded
        })
        .into_iter()
        .filter_map(|p| {
            let amount = p.amount_msat?;
            match p.kind {
                K::Spontaneous { hash, .. } => Some((hash.0, amount, PaymentKind::Keysend, None)),
                K::Bolt12Offer { hash: Some(hash), payer_note, .. } => {
                    Some((hash.0, amount, PaymentKind::Bolt12, payer_note.map(|n| n.0)))
                }
                K::Bolt11 { hash, .. } | K::Bolt11Jit { hash, .. } => {
                    Some((hash.0, amount, PaymentKind::Other, None))
                }
                K::Bolt12Refund { hash: Some(hash), .. } => {
                    Some((hash.0, amount, PaymentKind::Other, None))
                }
                _ => None,
            }
        })
        .collect()
}

/// What `node`'s own payment store holds as received keysend and BOLT12 payments:
/// (Σ msat, count).
pub fn received_by_node(node: &LdkBackend) -> (u64, usize) {
    let paid: Vec<_> = inbound_payments(node)
        .into_iter()
        .filter(|p| matches!(p.2, PaymentKind::Keysend | PaymentKind::Bolt12))
        .collect();
    (paid.iter().map(|p| p.1).sum(), paid.len())
}

/// Records what the Lightning node's payment store holds that the records lack (payments
/// received while nothing recorded them, BOLT12 payer notes). Idempotent.
pub fn sync_payments(store: &mut NodeStore, node: &LdkBackend) -> Result<usize, NodeError> {
    let now = crate::time::unix_now();
    let mut n = 0;
    for (hash, amount, kind, note) in inbound_payments(node) {
        let mut record = record_of_event(hash, amount, &[], now);
        record.kind = kind;
        record.payer_note = note;
        record.settlement_id = record.note_names().map(|(id, _)| id);
        if store.save_payment(&record)? {
            n += 1;
        }
    }
    Ok(n)
}

/// The contributor's Lightning node: started with a [`PaymentRecorder`] on the node database
/// at `store_path`, then synced with its own payment store.
pub async fn start_lightning(
    store_path: &Path,
    config: LdkBackendConfig,
) -> Result<LdkBackend, NodeError> {
    let recorder = Arc::new(PaymentRecorder::open(store_path)?);
    let node = LdkBackend::start_with_handler(config, Some(recorder.clone()))
        .await
        .map_err(|e| NodeError::Lightning(e.to_string()))?;
    // Set once, right after start: events handled before this lack only the payer note,
    // which the sync below fills in.
    let _ = recorder.node.set(node.clone());
    let mut store = NodeStore::open(store_path)?;
    let added = sync_payments(&mut store, &node)?;
    tracing::info!(
        node_id = %hex::encode(node.node_id()),
        added,
        "lightning node started; payment records synced"
    );
    Ok(node)
}

/// The BOLT12 offer kept in the node's records, if one was made.
pub fn stored_offer(store: &NodeStore) -> Result<Option<String>, NodeError> {
    store.meta_text(OFFER_META)
}

const OFFER_META: &str = "bolt12_offer";

/// The BOLT12 offer payouts are asked through: the one kept in the node's records, or a new
/// one of `node` (kept from then on, so the registration does not change at each start).
///
/// A node with only private channels can make an offer only once it has a channel to a
/// peer that is in its gossip graph (the offer's blinded path starts there): before that
/// this fails, and [`register_offer_when_ready`] tries again.
pub fn node_offer(store: &mut NodeStore, node: &LdkBackend) -> Result<String, NodeError> {
    if let Some(offer) = stored_offer(store)? {
        return Ok(offer);
    }
    let offer = node
        .node()
        .bolt12_payment()
        .receive_variable_amount("tribute payouts", None)
        .map_err(|e| NodeError::Lightning(format!("creating an offer: {e}")))?
        .to_string();
    store.set_meta_text(OFFER_META, &offer)?;
    Ok(offer)
}

/// Makes the node's offer as soon as the node can (every `retry` until `stop`), then
/// registers it with the node id as the payout destination (logging in as `key`). For a
/// node asked to be paid through an offer that it could not make yet at start: until this
/// is done, it is paid by keysend.
pub async fn register_offer_when_ready(
    store_path: PathBuf,
    node: LdkBackend,
    endpoint: crate::DaemonEndpoint,
    key: crate::keys::ContributorKey,
    provider_key: Option<PublicKey>,
    retry: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<String>, NodeError> {
    let offer = loop {
        let made = NodeStore::open(&store_path).and_then(|mut s| node_offer(&mut s, &node));
        match made {
            Ok(offer) => break offer,
            Err(e) => tracing::debug!("no offer yet: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.changed() => return Ok(None),
        }
    };
    loop {
        let registered = async {
            let c =
                crate::contributor::Contributor::login(&endpoint, key.clone(), None, provider_key)
                    .await?;
            c.ensure_payout(node.node_id(), Some(offer.clone()), crate::time::unix_now()).await
        }
        .await;
        match registered {
            Ok(_) => {
                tracing::info!("registered the node's BOLT12 offer as the payout destination");
                return Ok(Some(offer));
            }
            Err(e) if e.is_transient() => tracing::warn!("registering the offer: {e}"),
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.changed() => return Ok(None),
        }
    }
}

/// Where the node's Lightning node keeps its data inside the contributor's home.
pub fn lightning_dir(home: &Path) -> PathBuf {
    home.join("ldk")
}

impl NodeStore {
    /// Keeps a received payment; a repeat fills in only what the first record lacked.
    /// `true` if the payment was new.
    pub fn save_payment(&mut self, p: &PaymentRecord) -> Result<bool, NodeError> {
        let i64_of = |v: u64, what: &str| {
            i64::try_from(v).map_err(|_| self.corrupt(format!("{what} {v} too large")))
        };
        let amount = i64_of(p.amount_msat, "amount_msat")?;
        let at = i64_of(p.received_at.0, "time")?;
        let sid = p.settlement_id.map(|v| i64_of(v, "settlement id")).transpose()?;
        let seq = p.state_seq.map(|v| i64_of(v, "seq")).transpose()?;
        let existed: bool = self
            .conn()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM payments WHERE payment_hash = ?1)",
                [p.payment_hash.as_slice()],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        self.conn()
            .execute(
                "INSERT INTO payments (payment_hash, amount_msat, kind, settlement_id, channel_id, state_seq, payer_note, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (payment_hash) DO UPDATE SET
                   kind = CASE WHEN kind = 'other' THEN excluded.kind ELSE kind END,
                   settlement_id = COALESCE(settlement_id, excluded.settlement_id),
                   channel_id = COALESCE(channel_id, excluded.channel_id),
                   state_seq = COALESCE(state_seq, excluded.state_seq),
                   payer_note = COALESCE(payer_note, excluded.payer_note)",
                rusqlite::params![
                    p.payment_hash.as_slice(),
                    amount,
                    p.kind.as_str(),
                    sid,
                    p.channel_id.map(|c| c.0.to_vec()),
                    seq,
                    p.payer_note,
                    at
                ],
            )
            .map_err(self.err())?;
        Ok(!existed)
    }

    /// A text value kept in the records' `meta` table.
    pub fn meta_text(&self, name: &str) -> Result<Option<String>, NodeError> {
        let v: Option<Vec<u8>> = self
            .conn()
            .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(self.err())?;
        v.map(|b| String::from_utf8(b).map_err(|_| self.corrupt(format!("{name} is not UTF-8"))))
            .transpose()
    }

    /// Keeps a text value in the `meta` table (replacing it).
    pub fn set_meta_text(&mut self, name: &str, value: &str) -> Result<(), NodeError> {
        self.conn()
            .execute(
                "INSERT INTO meta (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                rusqlite::params![name, value.as_bytes()],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Every received payment, oldest first.
    pub fn payments(&self) -> Result<Vec<PaymentRecord>, NodeError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT payment_hash, amount_msat, kind, settlement_id, channel_id, state_seq, payer_note, received_at
                 FROM payments ORDER BY received_at, payment_hash",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(hash, amount, kind, sid, channel, seq, note, at)| {
                let payment_hash: [u8; 32] =
                    hash.try_into().map_err(|_| self.corrupt("payment hash is not 32 bytes"))?;
                let channel_id = channel
                    .map(|c| {
                        <[u8; 32]>::try_from(c.as_slice())
                            .map(ChannelId)
                            .map_err(|_| self.corrupt("channel id is not 32 bytes"))
                    })
                    .transpose()?;
                Ok(PaymentRecord {
                    payment_hash,
                    amount_msat: amount.max(0) as u64,
                    kind: PaymentKind::parse(&kind),
                    settlement_id: sid.map(|v| v.max(0) as u64),
                    channel_id,
                    state_seq: seq.map(|v| v.max(0) as u64),
                    payer_note: note,
                    received_at: Timestamp(at.max(0) as u64),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payer_notes_parse_as_the_daemon_writes_them() {
        let kp = ldk_node::bitcoin::secp256k1::Keypair::from_seckey_slice(
            tribute_channels::sign::secp(),
            &[7; 32],
        )
        .expect("key");
        let key = PublicKey::from(kp.x_only_public_key().0);
        let note = tribute_daemon::settlement::payer_note_of(&key, 42);
        assert_eq!(parse_payer_note(&note), Some((42, key)));
        assert_eq!(parse_payer_note("tribute settlement x from y"), None);
        assert_eq!(parse_payer_note("hello"), None);
    }

    #[test]
    fn keysend_tlvs_name_the_settlement_channel_and_state() {
        let tlvs = vec![
            (TLV_SETTLEMENT_ID, 7u64.to_be_bytes().to_vec()),
            (TLV_CHANNEL_ID, vec![9; 32]),
            (TLV_STATE_SEQ, 12u64.to_be_bytes().to_vec()),
        ];
        let r = record_of_event([1; 32], 5_000, &tlvs, Timestamp(3));
        assert_eq!(r.kind, PaymentKind::Keysend);
        assert_eq!(r.settlement_id, Some(7));
        assert_eq!(r.channel_id, Some(ChannelId([9; 32])));
        assert_eq!(r.state_seq, Some(12));
        // Malformed values are not trusted.
        let r = record_of_event([1; 32], 5_000, &[(TLV_SETTLEMENT_ID, vec![1, 2])], Timestamp(3));
        assert_eq!((r.kind, r.settlement_id), (PaymentKind::Other, None));
    }

    #[test]
    fn a_repeat_fills_in_what_the_first_record_lacked() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = NodeStore::open(&dir.path().join("node.sqlite")).expect("open");
        let bare = record_of_event([2; 32], 1_000, &[], Timestamp(5));
        assert!(store.save_payment(&bare).expect("save"));
        let mut full = record_of_event(
            [2; 32],
            1_000,
            &[(TLV_SETTLEMENT_ID, 3u64.to_be_bytes().to_vec())],
            Timestamp(6),
        );
        full.payer_note = Some("n".into());
        assert!(!store.save_payment(&full).expect("again"));
        assert!(!store.save_payment(&bare).expect("and again"));
        let all = store.payments().expect("payments");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].settlement_id, Some(3));
        assert_eq!(all[0].kind, PaymentKind::Keysend);
        assert_eq!(all[0].payer_note.as_deref(), Some("n"));
        assert_eq!(all[0].received_at, Timestamp(5));
    }
}
