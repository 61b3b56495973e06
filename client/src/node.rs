//! The contributor's receiving node (without its Lightning part, which comes with
//! settlement): it logs in with a signed challenge, follows its channel with
//! `SubscribeChannel`, verifies every signed state with the `channels` payee side, and keeps
//! its **own** records in its own SQLite file — the latest verified state, every settlement
//! notice, and every state it refused, with the bytes that prove it.
//!
//! A refused state never changes the stored latest state. Validly signed states that break
//! the rules (equivocation, regression) are proof against the provider and are logged at
//! `error`; other refusals (bad signature, replay, wrong channel) are kept and reported too.
//! The node reconnects with capped, jittered backoff; on every (re)subscribe the daemon
//! first sends its latest state, which the node expects and does not count as a replay.

use crate::connect::{error_chain, Bearer, DaemonEndpoint};
use crate::contributor::{login, Contributor};
use crate::error::ClientError;
use crate::keys::ContributorKey;
use crate::payments::PaymentRecord;
use crate::provider::RetryPolicy;
use futures::StreamExt;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use tribute_channels::channel::{
    ChannelParams, ChannelState, ChannelStatus, PayeeChannel, Rejection,
};
use tribute_channels::codec::Encode;
use tribute_channels::{ChannelId, Msat, Network, Nsat, PublicKey, Signed, Timestamp};
use tribute_proto::v1 as pb;
use tribute_proto::v1::channels_client::ChannelsClient;
use tribute_proto::v1::ErrorReason;

/// File name of the node's database inside the contributor's home directory.
pub const NODE_DB_FILE: &str = "node.sqlite";

/// Rejection kinds that are proof of provider misbehaviour: validly signed states that
/// break the payee rules.
pub const PROOF_KINDS: &[&str] = &[
    "EQUIVOCATION",
    "STATE_REGRESSION",
    "SETTLEMENT_HASH_INCONSISTENT",
    "INVARIANT_BROKEN",
    "CHANNEL_CLOSED",
];

/// Why the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node's database.
    #[error("node database {}: {source}", path.display())]
    Store {
        /// The file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// Stored records do not check out (a state that no longer verifies, a bad column).
    #[error("node database {}: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The daemon is not the one this node's records are about. Not retried.
    #[error("the daemon's {what} is {found}, this node's records are for {expected}: use another --home")]
    WrongDaemon {
        /// `provider key` or `network`.
        what: &'static str,
        /// What the records say.
        expected: String,
        /// What the daemon says.
        found: String,
    },
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The node's Lightning node failed to start or to answer.
    #[error("lightning node: {0}")]
    Lightning(String),
}

impl NodeError {
    /// Whether reconnecting may help.
    pub fn is_transient(&self) -> bool {
        match self {
            NodeError::Client(e) => {
                e.is_transient()
                    || matches!(
                        e.reason(),
                        Some(ErrorReason::UnknownChannel) | Some(ErrorReason::TokenExpired)
                    )
                    || matches!(
                        e.code(),
                        Some(tonic::Code::NotFound) | Some(tonic::Code::Unauthenticated)
                    )
            }
            _ => false,
        }
    }
}

/// The node's own records.
pub struct NodeStore {
    conn: Connection,
    path: PathBuf,
}

/// A channel as the node's records have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRecord {
    /// The channel id.
    pub channel_id: ChannelId,
    /// The nonce its id derives from.
    pub nonce: [u8; 32],
    /// The latest verified state, if any.
    pub latest: Option<Signed<ChannelState>>,
}

/// A refused state, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionRecord {
    /// `Rejection::reason()` or `MALFORMED`.
    pub kind: String,
    /// Whether it proves provider misbehaviour ([`PROOF_KINDS`]).
    pub is_proof: bool,
    /// The channel it came in on.
    pub channel_id: ChannelId,
    /// Human-readable detail.
    pub detail: String,
    /// Our latest state when it came (the other half of an equivocation proof).
    pub held: Option<Vec<u8>>,
    /// The refused bytes as received.
    pub received: Vec<u8>,
    /// When (node clock).
    pub at: Timestamp,
}

/// A settlement notice, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRecord {
    /// The settlement id.
    pub settlement_id: Vec<u8>,
    /// `pending`, `succeeded` or `failed`.
    pub state: String,
    /// Amount.
    pub amount_msat: u64,
    /// Payment hash.
    pub payment_hash: Vec<u8>,
}

/// A settlement a signed state claims (its `last_settlement_hash` changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedSettlement {
    /// The channel.
    pub channel_id: ChannelId,
    /// The first stored state that carried this hash.
    pub seq: u64,
    /// The newest settlement's payment hash.
    pub payment_hash: [u8; 32],
    /// Settled increase since the previous stored state.
    pub settled_increase_msat: u64,
}

/// What `tribute contributor status` reports, from the node's records only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Network, provider key and contributor key the records are for.
    pub identity: Option<(Network, PublicKey, PublicKey)>,
    /// Every channel with its latest verified state.
    pub channels: Vec<ChannelRecord>,
    /// Every settlement notice.
    pub settlements: Vec<SettlementRecord>,
    /// Every refused state.
    pub rejections: Vec<RejectionRecord>,
    /// Settlements claimed by accepted states.
    pub claimed: Vec<ClaimedSettlement>,
    /// Every payment the node's Lightning node received.
    pub payments: Vec<PaymentRecord>,
    /// The Lightning node that records payments here, once one ran (without one, nothing
    /// can be matched and no payment is expected to be recorded).
    pub lightning_node_id: Option<[u8; 33]>,
}

/// What claims a received payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentClaim {
    /// The signed state with this `seq` carries its hash as `last_settlement_hash`.
    State(u64),
    /// Only a `succeeded` settlement notice names it (the state that carried its hash was
    /// coalesced with a later one, or has not come yet).
    Notice,
    /// It names this node's channel or provider (TLVs or payer note) but no state or notice
    /// carries its hash: a later state's `settled_msat` covers it, or it is not claimed yet.
    Named,
}

impl NodeStatus {
    /// `Σ accrued_nsat` over the latest verified states.
    pub fn accrued_nsat(&self) -> Nsat {
        Nsat(
            self.channels
                .iter()
                .filter_map(|c| c.latest.as_ref())
                .map(|s| s.message.accrued_nsat.0)
                .sum(),
        )
    }

    /// `Σ settled_msat` over the latest verified states.
    pub fn settled_msat(&self) -> Msat {
        Msat(
            self.channels
                .iter()
                .filter_map(|c| c.latest.as_ref())
                .map(|s| s.message.settled_msat.0)
                .sum(),
        )
    }

    /// Accrued but not settled.
    pub fn outstanding_nsat(&self) -> Nsat {
        Nsat(self.accrued_nsat().0.saturating_sub(self.settled_msat().to_nsat().0))
    }

    /// `Σ amount_msat` of settlements noticed as succeeded.
    pub fn noticed_succeeded_msat(&self) -> Msat {
        Msat(
            self.settlements.iter().filter(|s| s.state == "succeeded").map(|s| s.amount_msat).sum(),
        )
    }

    /// Settlements a signed state claims with no `succeeded` notice for its payment hash
    /// (the node was offline, or the notice never came).
    pub fn claimed_without_notice(&self) -> impl Iterator<Item = &ClaimedSettlement> {
        self.claimed.iter().filter(|c| {
            !self
                .settlements
                .iter()
                .any(|n| n.state == "succeeded" && n.payment_hash == c.payment_hash)
        })
    }

    /// `succeeded` notices whose payment hash no accepted state carries (yet).
    pub fn notices_without_state(&self) -> impl Iterator<Item = &SettlementRecord> {
        self.settlements.iter().filter(|n| {
            n.state == "succeeded" && !self.claimed.iter().any(|c| n.payment_hash == c.payment_hash)
        })
    }

    /// Proofs of provider misbehaviour.
    pub fn proofs(&self) -> impl Iterator<Item = &RejectionRecord> {
        self.rejections.iter().filter(|r| r.is_proof)
    }

    /// What ties a received payment to this node's settlements, if anything does: a stored
    /// state or a succeeded notice carrying its hash, or TLVs / a payer note naming one of
    /// this node's channels or its provider.
    pub fn claim_of(&self, p: &PaymentRecord) -> Option<PaymentClaim> {
        if let Some(c) = self.claimed.iter().find(|c| c.payment_hash == p.payment_hash) {
            return Some(PaymentClaim::State(c.seq));
        }
        if self
            .settlements
            .iter()
            .any(|n| n.state == "succeeded" && n.payment_hash == p.payment_hash)
        {
            return Some(PaymentClaim::Notice);
        }
        let our_channel =
            p.channel_id.is_some_and(|id| self.channels.iter().any(|c| c.channel_id == id));
        let our_provider = p.note_names().is_some_and(|(_, key)| {
            self.identity.as_ref().is_some_and(|(_, provider, _)| *provider == key)
        });
        (our_channel || our_provider).then_some(PaymentClaim::Named)
    }

    /// The received payments that are this node's payouts ([`claim_of`](Self::claim_of)).
    pub fn payouts(&self) -> impl Iterator<Item = (&PaymentRecord, PaymentClaim)> {
        self.payments.iter().filter_map(|p| Some((p, self.claim_of(p)?)))
    }

    /// `Σ amount_msat` of the payouts received over Lightning.
    pub fn received_msat(&self) -> Msat {
        Msat(self.payouts().map(|(p, _)| p.amount_msat).sum())
    }

    /// Received payments nothing ties to this node's settlements.
    pub fn unmatched_payments(&self) -> impl Iterator<Item = &PaymentRecord> {
        self.payments.iter().filter(|p| self.claim_of(p).is_none())
    }

    fn received(&self, hash: &[u8]) -> Option<&PaymentRecord> {
        self.payments.iter().find(|p| p.payment_hash.as_slice() == hash)
    }

    /// Settlements a signed state claims whose payment this node's Lightning node never
    /// received (empty without a Lightning node).
    pub fn claimed_not_received(&self) -> impl Iterator<Item = &ClaimedSettlement> {
        let has_node = self.lightning_node_id.is_some();
        self.claimed.iter().filter(move |c| has_node && self.received(&c.payment_hash).is_none())
    }

    /// Succeeded notices whose payment never arrived, or arrived with another amount:
    /// (notice, what arrived). Empty without a Lightning node.
    pub fn notices_not_matched(
        &self,
    ) -> impl Iterator<Item = (&SettlementRecord, Option<&PaymentRecord>)> {
        let has_node = self.lightning_node_id.is_some();
        self.settlements
            .iter()
            .filter(move |n| has_node && n.state == "succeeded")
            .map(|n| (n, self.received(&n.payment_hash)))
            .filter(|(n, p)| p.is_none_or(|p| p.amount_msat != n.amount_msat))
    }
}

const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE channels (
    channel_id BLOB PRIMARY KEY,
    nonce BLOB NOT NULL,
    added_at INTEGER NOT NULL,
    seq INTEGER,
    accrued_msat INTEGER,
    accrued_rem_nsat INTEGER,
    settled_msat INTEGER,
    signed_state BLOB,
    updated_at INTEGER
);
CREATE TABLE settlements (
    settlement_id BLOB NOT NULL,
    state TEXT NOT NULL,
    channel_id BLOB NOT NULL,
    amount_msat INTEGER NOT NULL,
    payment_hash BLOB NOT NULL,
    noticed_at INTEGER NOT NULL,
    PRIMARY KEY (settlement_id, state)
);
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    is_proof INTEGER NOT NULL,
    channel_id BLOB NOT NULL,
    detail TEXT NOT NULL,
    held BLOB,
    received BLOB NOT NULL,
    at INTEGER NOT NULL
);
",
    "
-- Every accepted state's settlement fields, to match settlements to the states that claim
-- them (and, later, Lightning payments by payment hash).
CREATE TABLE states (
    channel_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    settled_msat INTEGER NOT NULL,
    last_settlement_hash BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (channel_id, seq)
);
",
    "
-- Every payment the node's Lightning node received (crate::payments), with what names its
-- settlement: keysend TLVs or a BOLT12 payer note.
CREATE TABLE payments (
    payment_hash BLOB PRIMARY KEY,
    amount_msat INTEGER NOT NULL,
    kind TEXT NOT NULL,
    settlement_id INTEGER,
    channel_id BLOB,
    state_seq INTEGER,
    payer_note TEXT,
    received_at INTEGER NOT NULL
);
",
];

fn i64_of(v: u64, what: &str) -> Result<i64, String> {
    i64::try_from(v).map_err(|_| format!("{what} {v} does not fit a SQLite integer"))
}

impl NodeStore {
    /// Opens (creating and migrating) the database at `path`: WAL, `synchronous=FULL`.
    pub fn open(path: &Path) -> Result<Self, NodeError> {
        let err = |source| NodeError::Store { path: path.to_owned(), source };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let version: i64 =
            conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(err)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(NodeError::Corrupt {
                path: path.to_owned(),
                detail: format!("schema version {version} is newer than this program ({known})"),
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(m).map_err(err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(NodeStore { conn, path: path.to_owned() })
    }

    pub(crate) fn err(&self) -> impl Fn(rusqlite::Error) -> NodeError + '_ {
        |source| NodeError::Store { path: self.path.clone(), source }
    }

    pub(crate) fn corrupt(&self, detail: impl Into<String>) -> NodeError {
        NodeError::Corrupt { path: self.path.clone(), detail: detail.into() }
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Network, provider key and contributor key, once recorded.
    pub fn identity(&self) -> Result<Option<(Network, PublicKey, PublicKey)>, NodeError> {
        let get = |name: &str| -> Result<Option<Vec<u8>>, NodeError> {
            self.conn
                .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0))
                .optional()
                .map_err(self.err())
        };
        let (Some(n), Some(p), Some(c)) =
            (get("network")?, get("provider_key")?, get("contributor_key")?)
        else {
            return Ok(None);
        };
        let key = |b: Vec<u8>| -> Result<PublicKey, NodeError> {
            let a: [u8; 32] =
                b.as_slice().try_into().map_err(|_| self.corrupt("key is not 32 bytes"))?;
            PublicKey::from_bytes(a).map_err(|e| self.corrupt(e.to_string()))
        };
        let network = match n.as_slice() {
            [b] => Network::from_byte(*b).map_err(|e| self.corrupt(e.to_string()))?,
            _ => return Err(self.corrupt("network is not one byte")),
        };
        Ok(Some((network, key(p)?, key(c)?)))
    }

    /// Records the identity on first contact; afterwards the daemon must match it.
    pub fn check_identity(
        &mut self,
        network: Network,
        provider: PublicKey,
        contributor: PublicKey,
    ) -> Result<(), NodeError> {
        match self.identity()? {
            Some((n, p, c)) => {
                if c != contributor {
                    return Err(NodeError::WrongDaemon {
                        what: "contributor key",
                        expected: c.to_hex(),
                        found: contributor.to_hex(),
                    });
                }
                if n != network {
                    return Err(NodeError::WrongDaemon {
                        what: "network",
                        expected: format!("{n:?}"),
                        found: format!("{network:?}"),
                    });
                }
                if p != provider {
                    return Err(NodeError::WrongDaemon {
                        what: "provider key",
                        expected: p.to_hex(),
                        found: provider.to_hex(),
                    });
                }
                Ok(())
            }
            None => {
                let tx = self
                    .conn
                    .transaction()
                    .map_err(|source| NodeError::Store { path: self.path.clone(), source })?;
                for (name, value) in [
                    ("network", vec![network.to_byte()]),
                    ("provider_key", provider.to_bytes().to_vec()),
                    ("contributor_key", contributor.to_bytes().to_vec()),
                ] {
                    tx.execute(
                        "INSERT INTO meta (name, value) VALUES (?1, ?2)",
                        params![name, value],
                    )
                    .map_err(|source| NodeError::Store { path: self.path.clone(), source })?;
                }
                tx.commit().map_err(|source| NodeError::Store { path: self.path.clone(), source })
            }
        }
    }

    /// The channel with this id, if recorded.
    pub fn channel(&self, id: &ChannelId) -> Result<Option<ChannelRecord>, NodeError> {
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> = self
            .conn
            .query_row(
                "SELECT nonce, signed_state FROM channels WHERE channel_id = ?1",
                [id.0.as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())?;
        row.map(|(nonce, signed)| self.record(*id, nonce, signed)).transpose()
    }

    fn record(
        &self,
        channel_id: ChannelId,
        nonce: Vec<u8>,
        signed: Option<Vec<u8>>,
    ) -> Result<ChannelRecord, NodeError> {
        let nonce: [u8; 32] =
            nonce.as_slice().try_into().map_err(|_| self.corrupt("nonce is not 32 bytes"))?;
        let latest = signed
            .map(|b| {
                // Checked again after reading: a stored state must still verify.
                Signed::<ChannelState>::decode_verified(&b)
                    .map_err(|e| self.corrupt(format!("stored state of channel {channel_id}: {e}")))
            })
            .transpose()?;
        if latest.as_ref().is_some_and(|s| s.message.channel_id != channel_id) {
            return Err(
                self.corrupt(format!("stored state of channel {channel_id} names another channel"))
            );
        }
        Ok(ChannelRecord { channel_id, nonce, latest })
    }

    /// Records a channel (no state yet); nothing if it is already known.
    pub fn add_channel(
        &mut self,
        id: &ChannelId,
        nonce: &[u8; 32],
        now: Timestamp,
    ) -> Result<(), NodeError> {
        let at = i64_of(now.0, "time").map_err(|e| self.corrupt(e))?;
        self.conn
            .execute(
                "INSERT INTO channels (channel_id, nonce, added_at) VALUES (?1, ?2, ?3) ON CONFLICT (channel_id) DO NOTHING",
                params![id.0.as_slice(), nonce.as_slice(), at],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Makes `state` the channel's latest. The caller verified it with [`PayeeChannel`];
    /// this re-checks that it moves forward from what is stored, in the same transaction.
    pub fn save_latest(
        &mut self,
        state: &Signed<ChannelState>,
        now: Timestamp,
    ) -> Result<(), NodeError> {
        let s = &state.message;
        let conv = |v: u64, w: &str| i64_of(v, w);
        let accrued_msat = s.accrued_nsat.floor_msat().map_err(|e| self.corrupt(e.to_string()))?;
        let values = (|| {
            Ok::<_, String>((
                conv(s.seq, "seq")?,
                conv(accrued_msat.0, "accrued_msat")?,
                i64::try_from(s.accrued_nsat.sub_msat_remainder().0)
                    .map_err(|_| "remainder".to_owned())?,
                conv(s.settled_msat.0, "settled_msat")?,
                conv(now.0, "time")?,
            ))
        })()
        .map_err(|e| self.corrupt(e))?;
        let path = self.path.clone();
        let err = |source| NodeError::Store { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let prev: Option<Option<i64>> = tx
            .query_row(
                "SELECT seq FROM channels WHERE channel_id = ?1",
                [s.channel_id.0.as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        match prev {
            None => {
                return Err(NodeError::Corrupt {
                    path,
                    detail: format!("channel {} is not recorded", s.channel_id),
                })
            }
            Some(Some(prev_seq)) if prev_seq >= values.0 => {
                return Err(NodeError::Corrupt {
                    path,
                    detail: format!("refusing to store seq {} over stored seq {prev_seq}", s.seq),
                })
            }
            _ => {}
        }
        tx.execute(
            "UPDATE channels SET seq = ?2, accrued_msat = ?3, accrued_rem_nsat = ?4, settled_msat = ?5, signed_state = ?6, updated_at = ?7 WHERE channel_id = ?1",
            params![s.channel_id.0.as_slice(), values.0, values.1, values.2, values.3, state.encode(), values.4],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO states (channel_id, seq, settled_msat, last_settlement_hash, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![s.channel_id.0.as_slice(), values.0, values.3, s.last_settlement_hash.as_slice(), values.4],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Settlements the accepted states claim: each time a stored state's settlement hash
    /// changed, the hash and the settled increase since the previous stored state (which
    /// covers more than one settlement if states were coalesced in between).
    pub fn claimed_settlements(&self) -> Result<Vec<ClaimedSettlement>, NodeError> {
        let mut stmt = self
            .conn
            .prepare("SELECT channel_id, seq, settled_msat, last_settlement_hash FROM states ORDER BY channel_id, seq")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let mut out = Vec::new();
        let mut prev: Option<(Vec<u8>, i64, Vec<u8>)> = None;
        for (channel, seq, settled, hash) in rows {
            let (prev_settled, prev_hash) = match &prev {
                Some((c, s, h)) if *c == channel => (*s, h.clone()),
                _ => (0, vec![0; 32]),
            };
            if hash != prev_hash {
                let id: [u8; 32] = channel
                    .as_slice()
                    .try_into()
                    .map_err(|_| self.corrupt("channel id is not 32 bytes"))?;
                let payment_hash: [u8; 32] =
                    hash.as_slice().try_into().map_err(|_| self.corrupt("hash is not 32 bytes"))?;
                out.push(ClaimedSettlement {
                    channel_id: ChannelId(id),
                    seq: seq.max(0) as u64,
                    payment_hash,
                    settled_increase_msat: (settled - prev_settled).max(0) as u64,
                });
            }
            prev = Some((channel, settled, hash));
        }
        Ok(out)
    }

    /// Keeps a settlement notice (each (id, state) once).
    pub fn save_settlement(
        &mut self,
        channel_id: &ChannelId,
        n: &pb::SettlementNotice,
        now: Timestamp,
    ) -> Result<(), NodeError> {
        let amount = i64_of(n.amount_msat, "amount_msat").map_err(|e| self.corrupt(e))?;
        let at = i64_of(now.0, "time").map_err(|e| self.corrupt(e))?;
        self.conn
            .execute(
                "INSERT INTO settlements (settlement_id, state, channel_id, amount_msat, payment_hash, noticed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                params![n.settlement_id, n.state, channel_id.0.as_slice(), amount, n.payment_hash, at],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Keeps a refused state.
    pub fn save_rejection(&mut self, r: &RejectionRecord) -> Result<(), NodeError> {
        let at = i64_of(r.at.0, "time").map_err(|e| self.corrupt(e))?;
        self.conn
            .execute(
                "INSERT INTO rejections (kind, is_proof, channel_id, detail, held, received, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![r.kind, r.is_proof, r.channel_id.0.as_slice(), r.detail, r.held, r.received, at],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Everything the records say.
    pub fn status(&self) -> Result<NodeStatus, NodeError> {
        let mut channels = Vec::new();
        let mut stmt = self
            .conn
            .prepare("SELECT channel_id, nonce, signed_state FROM channels ORDER BY added_at, channel_id")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                ))
            })
            .map_err(self.err())?;
        for row in rows {
            let (id, nonce, signed) = row.map_err(self.err())?;
            let id: [u8; 32] =
                id.as_slice().try_into().map_err(|_| self.corrupt("channel id is not 32 bytes"))?;
            channels.push(self.record(ChannelId(id), nonce, signed)?);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT settlement_id, state, amount_msat, payment_hash FROM settlements ORDER BY noticed_at, settlement_id, state")
            .map_err(self.err())?;
        let settlements = stmt
            .query_map([], |r| {
                Ok(SettlementRecord {
                    settlement_id: r.get(0)?,
                    state: r.get(1)?,
                    amount_msat: r.get::<_, i64>(2)? as u64,
                    payment_hash: r.get(3)?,
                })
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let mut stmt = self
            .conn
            .prepare("SELECT kind, is_proof, channel_id, detail, held, received, at FROM rejections ORDER BY id")
            .map_err(self.err())?;
        let raw = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let rejections = raw
            .into_iter()
            .map(|(kind, is_proof, id, detail, held, received, at)| {
                let id: [u8; 32] = id
                    .as_slice()
                    .try_into()
                    .map_err(|_| self.corrupt("channel id is not 32 bytes"))?;
                Ok(RejectionRecord {
                    kind,
                    is_proof,
                    channel_id: ChannelId(id),
                    detail,
                    held,
                    received,
                    at: Timestamp(at.max(0) as u64),
                })
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        Ok(NodeStatus {
            identity: self.identity()?,
            channels,
            settlements,
            rejections,
            claimed: self.claimed_settlements()?,
            payments: self.payments()?,
            lightning_node_id: self.lightning_node_id()?,
        })
    }

    /// The node id of the Lightning node that records payments here, once one ran.
    pub fn lightning_node_id(&self) -> Result<Option<[u8; 33]>, NodeError> {
        self.meta_text("lightning_node_id")?
            .map(|h| {
                tribute_daemon::config::parse_node_id(&h)
                    .ok_or_else(|| self.corrupt("lightning node id is not a node id"))
            })
            .transpose()
    }

    /// Records which Lightning node receives this contributor's payouts.
    pub fn set_lightning_node_id(&mut self, id: &[u8; 33]) -> Result<(), NodeError> {
        self.set_meta_text("lightning_node_id", &hex::encode(id))
    }
}

/// What one channel event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A state was verified and stored.
    Accepted {
        /// Its seq.
        seq: u64,
    },
    /// The latest state again, right after subscribing: expected.
    Resent,
    /// A state was refused and kept.
    Refused {
        /// Its kind.
        kind: String,
    },
    /// A per-request micropayment (covered by the next signed state).
    Payment,
    /// Micropayments were dropped for us (covered by the next state).
    Gap,
    /// A settlement notice was kept.
    Settlement,
}

/// Follows one channel: verifies each event against the latest stored state.
pub struct Follower {
    params: ChannelParams,
    payee: PayeeChannel,
    /// The next state may be the daemon re-sending our latest one on subscribe.
    expect_resend: bool,
}

impl Follower {
    /// Loads (or records) the channel `params` describe from `store`.
    pub fn load(
        store: &mut NodeStore,
        params: ChannelParams,
        now: Timestamp,
    ) -> Result<Self, NodeError> {
        let id = params.channel_id();
        store.add_channel(&id, &params.nonce, now)?;
        let record = store.channel(&id)?.ok_or_else(|| store.corrupt("channel vanished"))?;
        if record.nonce != params.nonce {
            return Err(store.corrupt(format!("channel {id} is recorded with another nonce")));
        }
        let payee = match record.latest {
            Some(latest) => PayeeChannel::restore(&params, latest).map_err(|e| {
                store.corrupt(format!("stored state of {id} refused on reload: {e}"))
            })?,
            None => PayeeChannel::new(&params),
        };
        Ok(Follower { params, payee, expect_resend: true })
    }

    /// The channel id.
    pub fn channel_id(&self) -> ChannelId {
        self.payee.channel_id()
    }

    /// The latest verified state.
    pub fn latest(&self) -> Option<&Signed<ChannelState>> {
        self.payee.latest()
    }

    /// Marks a new subscription: the daemon sends our latest state first.
    pub fn resubscribed(&mut self) {
        self.expect_resend = true;
    }

    /// Verifies and records one event.
    pub fn on_event(
        &mut self,
        store: &mut NodeStore,
        event: pb::ChannelEvent,
        now: Timestamp,
    ) -> Result<Seen, NodeError> {
        use pb::channel_event::Event;
        let Some(event) = event.event else {
            return Ok(Seen::Gap);
        };
        match event {
            Event::State(s) => self.on_state(store, &s.signed_state, now),
            Event::Payment(_) => Ok(Seen::Payment),
            Event::Gap(_) => Ok(Seen::Gap),
            Event::Settlement(n) => {
                store.save_settlement(&self.channel_id(), &n, now)?;
                tracing::info!(
                    settlement = %hex::encode(&n.settlement_id),
                    amount_msat = n.amount_msat,
                    state = %n.state,
                    "settlement notice"
                );
                Ok(Seen::Settlement)
            }
        }
    }

    /// Verifies and records one signed state (canonical bytes as received).
    pub fn on_state(
        &mut self,
        store: &mut NodeStore,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<Seen, NodeError> {
        let expect_resend = std::mem::replace(&mut self.expect_resend, false);
        let signed = match Signed::<ChannelState>::decode(bytes) {
            Ok(s) => s,
            Err(e) => {
                return self.refuse(store, "MALFORMED", format!("does not decode: {e}"), bytes, now)
            }
        };
        match self.payee.accept(signed) {
            Ok(next) => {
                store.save_latest(&signed, now)?;
                self.payee = next;
                tracing::debug!(
                    seq = signed.message.seq,
                    accrued_nsat = signed.message.accrued_nsat.0,
                    "state verified"
                );
                Ok(Seen::Accepted { seq: signed.message.seq })
            }
            Err(Rejection::Replay) if expect_resend => Ok(Seen::Resent),
            Err(r) => {
                let detail = match &r {
                    Rejection::Equivocation(p) => format!(
                        "two states signed for seq {}: held accrued {} / received accrued {}",
                        p.first.message.seq,
                        p.first.message.accrued_nsat.0,
                        p.second.message.accrued_nsat.0
                    ),
                    other => format!("{other} (received seq {})", signed.message.seq),
                };
                self.refuse(store, r.reason(), detail, bytes, now)
            }
        }
    }

    fn refuse(
        &self,
        store: &mut NodeStore,
        kind: &str,
        detail: String,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<Seen, NodeError> {
        let is_proof = PROOF_KINDS.contains(&kind);
        let record = RejectionRecord {
            kind: kind.to_owned(),
            is_proof,
            channel_id: self.channel_id(),
            detail: detail.clone(),
            held: self.payee.latest().map(|s| s.encode()),
            received: bytes.to_vec(),
            at: now,
        };
        store.save_rejection(&record)?;
        if is_proof {
            tracing::error!(
                channel = %self.channel_id(),
                kind,
                "PROVIDER MISBEHAVIOUR: {detail}; both signed states are kept as proof in {}",
                store.path.display()
            );
        } else {
            tracing::warn!(channel = %self.channel_id(), kind, "refused a channel state: {detail}");
        }
        Ok(Seen::Refused { kind: kind.to_owned() })
    }

    /// The channel's parameters.
    pub fn params(&self) -> &ChannelParams {
        &self.params
    }
}

/// Refusals whose two signed states the daemon is told about (`ReportMisbehaviour`): the
/// daemon verifies the proof itself, so a refusal that proves nothing (an old state re-sent
/// looks like a regression to the node) is only logged.
const REPORTED_KINDS: &[&str] = &["EQUIVOCATION", "STATE_REGRESSION"];

/// The proof just kept (the newest proof among the rejections): (held, received).
fn latest_proof(store: &NodeStore) -> Option<(Vec<u8>, Vec<u8>)> {
    match store.status() {
        Ok(st) => st
            .rejections
            .into_iter()
            .rev()
            .find(|r| r.is_proof)
            .and_then(|r| Some((r.held?, r.received))),
        Err(e) => {
            tracing::warn!("cannot read the proof to report it: {e}");
            None
        }
    }
}

/// Reports a proof to the daemon's operator. A failure is logged, never fatal: the proof
/// stays in the node's records either way.
async fn report_proof(
    (held, received): (Vec<u8>, Vec<u8>),
    client: &mut ChannelsClient<crate::connect::Authed>,
) {
    let request = pb::ReportMisbehaviourRequest { held_state: held, received_state: received };
    match client.report_misbehaviour(request).await {
        Ok(r) => {
            let r = r.into_inner();
            tracing::error!(
                kind = r.kind,
                report_id = r.report_id,
                "reported provider misbehaviour to the daemon's operator with its proof"
            );
        }
        Err(s) => {
            tracing::warn!("the daemon did not take the report ({}): {}", s.code(), s.message())
        }
    }
}

/// The node's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The daemon.
    pub endpoint: DaemonEndpoint,
    /// The node's database.
    pub store_path: PathBuf,
    /// Required network, if any.
    pub network: Option<Network>,
    /// Required provider key, if any (otherwise the first one seen is recorded and then
    /// required).
    pub provider_key: Option<PublicKey>,
    /// Reconnect backoff (`max_attempts` is not used: the node keeps trying).
    pub reconnect: RetryPolicy,
    /// Where this node's Lightning node takes payouts, registered with the daemon (signed)
    /// at every login where the daemon has something else. `None`: no Lightning node here.
    pub payout: Option<PayoutDestination>,
}

/// The contributor's payout destination as its own Lightning node offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutDestination {
    /// The node's id (keysend payouts).
    pub node_id: [u8; 33],
    /// Ask to be paid through the node's BOLT12 offer, once the records hold one
    /// ([`crate::payments::node_offer`]); by keysend until then.
    pub offer: bool,
}

/// Runs the node until `shutdown` turns true (or a non-transient error).
pub async fn run(
    config: NodeConfig,
    key: ContributorKey,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let mut store = NodeStore::open(&config.store_path)?;
    if let Some(p) = &config.payout {
        store.set_lightning_node_id(&p.node_id)?;
    }
    let mut failures = 0u32;
    let mut follower: Option<Follower> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let result = tokio::select! {
            r = session(&config, &key, &mut store, &mut follower, &mut failures) => r,
            _ = shutdown.changed() => return Ok(()),
        };
        match result {
            Ok(()) => tracing::info!("channel stream ended; reconnecting"),
            Err(e) if e.is_transient() => tracing::warn!("{}; reconnecting", error_chain(&e)),
            Err(e) => return Err(e),
        }
        failures = failures.saturating_add(1);
        let pause = config.reconnect.backoff(failures);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn session(
    config: &NodeConfig,
    key: &ContributorKey,
    store: &mut NodeStore,
    follower: &mut Option<Follower>,
    failures: &mut u32,
) -> Result<(), NodeError> {
    let channel = config.endpoint.connect().await?;
    let (token, challenge) = login(channel.clone(), key, config.provider_key).await?;
    if let Some(n) = config.network {
        if n != challenge.network {
            return Err(NodeError::WrongDaemon {
                what: "network",
                expected: format!("{n:?}"),
                found: format!("{:?}", challenge.network),
            });
        }
    }
    store.check_identity(challenge.network, challenge.audience, key.public())?;
    if let Some(p) = &config.payout {
        let c = Contributor::from_session(channel.clone(), key.clone(), token.clone(), &challenge);
        // A refusal is loud but does not stop the node: following the channel matters more,
        // and payouts still go to the destination the daemon has.
        let offer = if p.offer { crate::payments::stored_offer(store)? } else { None };
        match c.ensure_payout(p.node_id, offer.clone(), crate::time::unix_now()).await {
            Ok(true) => tracing::info!(
                node_id = %hex::encode(p.node_id),
                offer = offer.is_some(),
                "registered this node's Lightning node as the payout destination"
            ),
            Ok(false) => {}
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => tracing::error!(
                "could not register this node's Lightning node as the payout destination: {}",
                error_chain(&e)
            ),
        }
    }
    let mut client = ChannelsClient::with_interceptor(
        channel,
        Bearer::new(Some(&token)).map_err(NodeError::Client)?,
    );
    let info = client
        .get_channel(pb::GetChannelRequest {
            contributor_key: key.public().to_bytes().to_vec(),
            channel_id: vec![],
        })
        .await
        .map_err(|s| ClientError::rpc("Channels.GetChannel", &s))?
        .into_inner();
    let nonce: [u8; 32] = info
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| ClientError::protocol("Channels.GetChannel", "nonce is not 32 bytes"))?;
    let params = ChannelParams {
        network: challenge.network,
        provider_key: challenge.audience,
        contributor_key: key.public(),
        nonce,
    };
    if params.channel_id().0.as_slice() != info.channel_id.as_slice() {
        return Err(ClientError::protocol(
            "Channels.GetChannel",
            "the channel id does not derive from the keys and nonce",
        )
        .into());
    }
    let now = crate::time::unix_now();
    match follower {
        Some(f) if f.channel_id() == params.channel_id() => f.resubscribed(),
        _ => *follower = Some(Follower::load(store, params, now)?),
    }
    let mut reporter = client.clone();
    let mut events = client
        .subscribe_channel(pb::SubscribeChannelRequest {
            contributor_key: vec![],
            states_only: false,
        })
        .await
        .map_err(|s| ClientError::rpc("Channels.SubscribeChannel", &s))?
        .into_inner();
    tracing::info!(channel = %params.channel_id(), "following the channel");
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|s| ClientError::rpc("Channels.SubscribeChannel", &s))?;
        let Some(f) = follower.as_mut() else { break };
        match f.on_event(store, ev, crate::time::unix_now())? {
            Seen::Accepted { .. } | Seen::Resent => *failures = 0,
            Seen::Refused { kind } if REPORTED_KINDS.contains(&kind.as_str()) => {
                if let Some(proof) = latest_proof(store) {
                    report_proof(proof, &mut reporter).await;
                }
            }
            Seen::Refused { kind } if kind == "WRONG_CHANNEL" => {
                // A re-opened channel has a new id: fetch it again.
                return Ok(());
            }
            _ => {}
        }
        if f.latest().is_some_and(|s| s.message.status == ChannelStatus::Closed) {
            tracing::info!("channel closed; looking for a new one");
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::secp256k1::{Keypair, SecretKey};
    use tribute_channels::channel::PayerChannel;

    fn keypair(n: u8) -> Keypair {
        let mut sk = [0u8; 32];
        sk[31] = n;
        Keypair::from_secret_key(
            tribute_channels::sign::secp(),
            &SecretKey::from_slice(&sk).unwrap(),
        )
    }

    fn params() -> ChannelParams {
        ChannelParams {
            network: Network::Regtest,
            provider_key: PublicKey::from(keypair(1).x_only_public_key().0),
            contributor_key: PublicKey::from(keypair(2).x_only_public_key().0),
            nonce: [7; 32],
        }
    }

    /// Signed states of one channel: accrue 1_500_000 nsat per step, settle 1 msat at step 3.
    fn states(n: usize) -> Vec<Signed<ChannelState>> {
        let mut payer = PayerChannel::open(&params());
        let mut out = Vec::new();
        for i in 0..n {
            payer = payer.accrue(Nsat(1_500_000)).unwrap();
            if i == 3 {
                payer = payer.settle(Msat(1), [0xaa; 32]).unwrap();
            }
            let (next, signed) = payer.sign(&keypair(1), &[0; 32]).unwrap();
            payer = next;
            out.push(signed);
        }
        out
    }

    fn notice(id: u8, state: &str, amount_msat: u64) -> pb::ChannelEvent {
        pb::ChannelEvent {
            event: Some(pb::channel_event::Event::Settlement(pb::SettlementNotice {
                settlement_id: vec![id; 16],
                amount_msat,
                payment_hash: vec![0xaa; 32],
                state: state.into(),
            })),
        }
    }

    #[test]
    fn states_are_verified_stored_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_DB_FILE);
        let s = states(5);
        let now = Timestamp(1_700_000_000);
        {
            let mut store = NodeStore::open(&path).unwrap();
            let mut f = Follower::load(&mut store, params(), now).unwrap();
            for st in &s[..4] {
                assert_eq!(
                    f.on_state(&mut store, &st.encode(), now).unwrap(),
                    Seen::Accepted { seq: st.message.seq }
                );
            }
            // Not right after subscribing: the same state again is a replay, kept.
            assert_eq!(
                f.on_state(&mut store, &s[3].encode(), now).unwrap(),
                Seen::Refused { kind: "REPLAY".into() }
            );
            // Settlement notices: each (id, state) once.
            for ev in [notice(1, "pending", 1), notice(1, "pending", 1), notice(1, "succeeded", 1)]
            {
                assert_eq!(f.on_event(&mut store, ev, now).unwrap(), Seen::Settlement);
            }
        }
        let mut store = NodeStore::open(&path).unwrap();
        let st = store.status().unwrap();
        assert_eq!(st.channels[0].latest, Some(s[3]));
        assert_eq!(st.accrued_nsat(), Nsat(6_000_000));
        assert_eq!(st.settled_msat(), Msat(1));
        assert_eq!(st.outstanding_nsat(), Nsat(5_000_000));
        assert_eq!(st.settlements.len(), 2);
        assert_eq!(st.noticed_succeeded_msat(), Msat(1));
        assert_eq!(st.rejections.len(), 1);
        assert_eq!(st.proofs().count(), 0);

        // Reloaded: the re-sent latest state is expected; the next one is accepted.
        let mut f = Follower::load(&mut store, params(), now).unwrap();
        assert_eq!(f.on_state(&mut store, &s[3].encode(), now).unwrap(), Seen::Resent);
        assert_eq!(
            f.on_state(&mut store, &s[4].encode(), now).unwrap(),
            Seen::Accepted { seq: s[4].message.seq }
        );
        // The store itself refuses to go backwards, whoever asks.
        assert!(matches!(store.save_latest(&s[2], now), Err(NodeError::Corrupt { .. })));
    }

    #[test]
    fn a_stored_state_that_no_longer_verifies_is_refused_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_DB_FILE);
        let s = states(2);
        let now = Timestamp(1);
        let mut store = NodeStore::open(&path).unwrap();
        let mut f = Follower::load(&mut store, params(), now).unwrap();
        f.on_state(&mut store, &s[1].encode(), now).unwrap();
        let mut bytes = s[1].encode();
        bytes[80] ^= 1;
        store.conn.execute("UPDATE channels SET signed_state = ?1", [bytes]).unwrap();
        assert!(matches!(
            Follower::load(&mut store, params(), now),
            Err(NodeError::Corrupt { .. })
        ));
        assert!(matches!(store.status(), Err(NodeError::Corrupt { .. })));
    }

    #[test]
    fn identity_is_recorded_once_and_then_required() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = NodeStore::open(&dir.path().join(NODE_DB_FILE)).unwrap();
        let (p, c) = (params().provider_key, params().contributor_key);
        store.check_identity(Network::Regtest, p, c).unwrap();
        store.check_identity(Network::Regtest, p, c).unwrap();
        let other = PublicKey::from(keypair(3).x_only_public_key().0);
        for (n, pk) in [(Network::Regtest, other), (Network::Signet, p)] {
            let e = store.check_identity(n, pk, c).unwrap_err();
            assert!(matches!(e, NodeError::WrongDaemon { .. }), "{e}");
            assert!(!e.is_transient());
        }
        assert_eq!(store.identity().unwrap(), Some((Network::Regtest, p, c)));
    }
}
