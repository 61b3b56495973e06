//! `tribute.v1.Channels`: the signed channel stream and channel lookups.

use super::{blocking, optional_key};
use crate::auth::{authorize, channel_subject, policy, require_own_channel, Role};
use crate::error::ApiError;
use crate::hub::{Hub, HubEvent};
use crate::ledger::{latest_signed_state, read_channels, CurrentChannel};
use crate::store::{self, SharedConn, StoreError};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tribute_channels::channel::{ChannelState, ChannelStatus};
use tribute_channels::codec::Encode;
use tribute_channels::{ChannelId, Network, PublicKey, Signed};
use tribute_proto::v1 as pb;
use tribute_proto::v1::channels_server::Channels;
use tribute_proto::v1::ErrorReason;

/// Events buffered between a subscriber's task and its gRPC stream.
const STREAM_BUFFER: usize = 256;

/// The channels service.
pub struct ChannelsService {
    hub: Arc<Hub>,
    reader: SharedConn,
    network: Network,
    provider_key: PublicKey,
    database: super::Database,
}

impl ChannelsService {
    /// Serves channel lookups from `reader` and streams from `hub`; keeps misbehaviour
    /// reports in `database`.
    pub fn new(
        hub: Arc<Hub>,
        reader: SharedConn,
        network: Network,
        provider_key: PublicKey,
        database: super::Database,
    ) -> Self {
        ChannelsService { hub, reader, network, provider_key, database }
    }
}

/// What two provider-signed states of one channel prove, if anything: `equivocation` (same
/// seq, different content) or `regression` (a higher seq with a lower accrued or settled
/// amount). Both must verify under `provider_key`, on `network`, for one channel.
pub fn misbehaviour_kind(
    a: &Signed<ChannelState>,
    b: &Signed<ChannelState>,
    network: Network,
    provider_key: PublicKey,
) -> Result<&'static str, ApiError> {
    let not = |why: &str| {
        ApiError::new(
            Code::InvalidArgument,
            ErrorReason::NotMisbehaviour,
            format!("these states prove nothing against the provider: {why}"),
        )
    };
    for (field, s) in [("held_state", a), ("received_state", b)] {
        if s.message.provider_key != provider_key {
            return Err(not(&format!("{field} names another provider key")));
        }
        if s.message.network != network {
            return Err(not(&format!("{field} is for another network")));
        }
        if s.verify().is_err() {
            return Err(not(&format!("{field}: the provider's signature does not verify")));
        }
    }
    if a.message.channel_id != b.message.channel_id {
        return Err(not("the states are of different channels"));
    }
    let (lo, hi) = if a.message.seq <= b.message.seq {
        (&a.message, &b.message)
    } else {
        (&b.message, &a.message)
    };
    if lo.seq == hi.seq {
        return if lo == hi { Err(not("the states are the same")) } else { Ok("equivocation") };
    }
    if hi.accrued_nsat < lo.accrued_nsat || hi.settled_msat < lo.settled_msat {
        return Ok("regression");
    }
    Err(not("the later state does not contradict the earlier one"))
}

fn state_event(s: &Signed<ChannelState>) -> pb::ChannelEvent {
    pb::ChannelEvent {
        event: Some(pb::channel_event::Event::State(pb::SignedState {
            signed_state: s.encode(),
            seq: s.message.seq,
        })),
    }
}

fn status_name(s: ChannelStatus) -> &'static str {
    match s {
        ChannelStatus::Active => "active",
        ChannelStatus::Closing => "closing",
        ChannelStatus::Closed => "closed",
    }
}

fn channel_pb(conn: &rusqlite::Connection, c: &CurrentChannel) -> Result<pb::Channel, StoreError> {
    let head = &c.head;
    let latest = latest_signed_state(conn, &head.channel_id)?;
    let outstanding = head.outstanding_nsat().map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(pb::Channel {
        channel_id: head.channel_id.0.to_vec(),
        contributor_key: c.contributor_key.to_bytes().to_vec(),
        nonce: c.nonce.to_vec(),
        status: status_name(head.status).to_owned(),
        accrued_nsat: head.accrued_nsat.0.to_string(),
        settled_msat: head.settled_msat.0,
        outstanding_nsat: outstanding.0.to_string(),
        seq: head.seq,
        latest_state: latest
            .map(|s| pb::SignedState { signed_state: s.encode(), seq: s.message.seq }),
    })
}

fn unknown_channel() -> ApiError {
    ApiError::new(Code::NotFound, ErrorReason::UnknownChannel, "no such channel")
}

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<pb::ChannelEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Channels for ChannelsService {
    type SubscribeChannelStream = EventStream;

    async fn subscribe_channel(
        &self,
        req: Request<pb::SubscribeChannelRequest>,
    ) -> Result<Response<Self::SubscribeChannelStream>, Status> {
        let caller = authorize(&req, policy::READ_CHANNEL)?;
        let r = req.get_ref();
        let key = channel_subject(&caller, optional_key(&r.contributor_key, "contributor_key")?)?;
        let sub = self.hub.subscribe(&key, r.states_only);
        let mut state = sub.state;
        let mut events = sub.events;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            // The latest state first.
            let first = state.borrow_and_update().as_ref().map(state_event);
            if let Some(ev) = first {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            let mut last_batch = 0u64;
            let mut dropped = 0u64;
            loop {
                // Biased towards events: every payment is published before the state that
                // covers it, so a subscriber sees a request's micropayment before (never after)
                // the signed state that includes it.
                let ev = tokio::select! {
                    biased;
                    got = async { match events.as_mut() { Some(e) => e.recv().await, None => std::future::pending().await } } => {
                        match got {
                            Ok(HubEvent::Payment { request_id, share_nsat, batch_seq, leaf_index }) => {
                                if dropped > 0 {
                                    let gap = pb::Gap { first_batch_seq: last_batch, last_batch_seq: batch_seq, dropped };
                                    dropped = 0;
                                    if tx.send(Ok(pb::ChannelEvent { event: Some(pb::channel_event::Event::Gap(gap)) })).await.is_err() {
                                        return;
                                    }
                                }
                                last_batch = batch_seq;
                                pb::ChannelEvent { event: Some(pb::channel_event::Event::Payment(pb::Micropayment {
                                    request_id: request_id.to_string(), share_nsat, batch_seq, leaf_index,
                                })) }
                            }
                            Ok(HubEvent::Settlement { settlement_id, amount_msat, payment_hash, state }) => {
                                pb::ChannelEvent { event: Some(pb::channel_event::Event::Settlement(pb::SettlementNotice {
                                    settlement_id: settlement_id.to_be_bytes().to_vec(), amount_msat, payment_hash: payment_hash.to_vec(),
                                    state: state.to_owned(),
                                })) }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => { dropped += n; continue }
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                    changed = state.changed() => {
                        if changed.is_err() { return; }
                        let ev = state.borrow_and_update().as_ref().map(state_event);
                        match ev { Some(ev) => ev, None => continue }
                    }
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_channel(
        &self,
        req: Request<pb::GetChannelRequest>,
    ) -> Result<Response<pb::Channel>, Status> {
        let caller = authorize(&req, policy::READ_CHANNEL)?;
        let r = req.into_inner();
        let (network, provider, reader) = (self.network, self.provider_key, self.reader.clone());
        let by_id = if r.channel_id.is_empty() {
            None
        } else {
            Some(ChannelId(
                r.channel_id
                    .as_slice()
                    .try_into()
                    .map_err(|_| ApiError::malformed("channel_id", "must be 32 bytes"))?,
            ))
        };
        let key = if by_id.is_some() {
            None
        } else {
            Some(channel_subject(&caller, optional_key(&r.contributor_key, "contributor_key")?)?)
        };
        let channel = blocking(move || {
            let lock = store::lock(&reader);
            // The head and its latest signed state from one snapshot.
            let conn = lock.unchecked_transaction().map_err(StoreError::from)?;
            let found = match (by_id, key) {
                (Some(id), _) => read_channels(&conn, "WHERE channel_id = ?1", [&id.0[..]], network, provider),
                (None, Some(k)) => read_channels(
                    &conn,
                    "WHERE contributor_key = ?1 ORDER BY status = 0 DESC, opened_batch_seq DESC LIMIT 1",
                    [&k.to_bytes()[..]],
                    network,
                    provider,
                ),
                (None, None) => return Err(ApiError::malformed("contributor_key", "required")),
            }?;
            match found.first() {
                Some(c) => Ok(channel_pb(&conn, c)?),
                None => Err(unknown_channel()),
            }
        })
        .await?;
        // A contributor may look a channel up by id only if it is its own.
        let owner = super::key(&channel.contributor_key, "contributor_key")?;
        require_own_channel(&caller, &owner).map_err(|_| unknown_channel())?;
        Ok(Response::new(channel))
    }

    async fn report_misbehaviour(
        &self,
        req: Request<pb::ReportMisbehaviourRequest>,
    ) -> Result<Response<pb::ReportMisbehaviourResponse>, Status> {
        let caller = authorize(&req, &[Role::Contributor, Role::Operator])?;
        let r = req.into_inner();
        let decode = |bytes: &[u8], field: &str| {
            Signed::<ChannelState>::decode(bytes)
                .map_err(|e| ApiError::malformed(field, format!("not a signed channel state: {e}")))
        };
        let held = decode(&r.held_state, "held_state")?;
        let received = decode(&r.received_state, "received_state")?;
        let kind = misbehaviour_kind(&held, &received, self.network, self.provider_key)?;
        let channel_id = held.message.channel_id;
        let (reader, database) = (self.reader.clone(), self.database.clone());
        let (network, provider) = (self.network, self.provider_key);
        let seq = held.message.seq.min(received.message.seq);
        let (report_id, new_report) = blocking(move || {
            let owner = {
                let conn = store::lock(&reader);
                read_channels(
                    &conn,
                    "WHERE channel_id = ?1",
                    [&channel_id.0[..]],
                    network,
                    provider,
                )?
                .into_iter()
                .next()
                .map(|c| c.contributor_key)
            };
            let owner = owner.ok_or_else(|| {
                ApiError::new(Code::NotFound, ErrorReason::UnknownChannel, "no such channel")
                    .with("channel_id", channel_id.to_hex())
            })?;
            require_own_channel(&caller, &owner)?;
            let conn = store::connect(&database.path, database.durability)?;
            let inserted = conn
                .execute(
                    "INSERT OR IGNORE INTO misbehaviour_reports
                       (channel_id, contributor_key, kind, seq, held, received, reported_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    rusqlite::params![
                        &channel_id.0[..],
                        owner.to_bytes().to_vec(),
                        kind,
                        store::u64_to_column(seq, "seq")?,
                        r.held_state,
                        r.received_state,
                        store::u64_to_column(crate::ledger::unix_now(), "reported_at")?,
                    ],
                )
                .map_err(ApiError::storage)?;
            let id: i64 = conn
                .query_row(
                    "SELECT report_id FROM misbehaviour_reports WHERE held = ?1 AND received = ?2",
                    rusqlite::params![r.held_state, r.received_state],
                    |row| row.get(0),
                )
                .map_err(ApiError::storage)?;
            Ok((u64::try_from(id).unwrap_or_default(), inserted == 1))
        })
        .await?;
        if new_report {
            tracing::error!(channel = %channel_id, kind, report_id, "PROVIDER MISBEHAVIOUR reported with a verified proof");
        }
        Ok(Response::new(pb::ReportMisbehaviourResponse {
            kind: kind.to_owned(),
            report_id,
            new_report,
        }))
    }

    async fn list_channels(
        &self,
        req: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        authorize(&req, policy::LIST_CHANNELS)?;
        let (network, provider, reader) = (self.network, self.provider_key, self.reader.clone());
        let channels = blocking(move || {
            let lock = store::lock(&reader);
            // Every head and its latest signed state from one snapshot.
            let conn = lock.unchecked_transaction().map_err(StoreError::from)?;
            let channels = read_channels(
                &conn,
                "ORDER BY contributor_key, opened_batch_seq",
                [],
                network,
                provider,
            )?;
            channels
                .iter()
                .map(|c| channel_pb(&conn, c).map_err(ApiError::from))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        Ok(Response::new(pb::ListChannelsResponse { channels }))
    }
}
