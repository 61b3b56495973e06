//! Hostile input against a running daemon (issue 7, item 3): every RPC of every service in
//! `proto/tribute/v1/*.proto` gets bad input — empty, oversized, negative/overflowing,
//! malformed and duplicate fields; truncated, over-long, high-S and otherwise
//! non-canonical signatures, signatures under another message's tag or by another key,
//! records for another network; states, licences, registrations and login answers replayed
//! from another channel or contributor.
//!
//! Each case states the exact gRPC code and `ErrorReason` it must get. After every case the
//! daemon must still answer, and the database's content (`db_fingerprint`) must be what it
//! was before the sweep. The list of RPCs comes from the compiled proto descriptors, so an
//! RPC added without cases here fails the test.
//!
//! Two classes are refused by the gRPC framing before any handler runs and carry no
//! `ErrorReason`: bytes that are not protobuf (INTERNAL, as gRPC specifies for parse errors)
//! and messages above the decoder's hard size limit (OUT_OF_RANGE).

mod common;

use common::*;
use ldk_node::bitcoin::secp256k1::{self, constants::CURVE_ORDER, Keypair, SecretKey};
use ldk_node::bitcoin::Network as BtcNetwork;
use ldk_node::lightning::offers::offer::OfferBuilder;
use prost::bytes::{Buf, BufMut};
use std::collections::{BTreeMap, BTreeSet};
use tonic::codec::{DecodeBuf, EncodeBuf};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};
use tribute_channels::auth::AuthChallenge;
use tribute_channels::channel::ChannelState;
use tribute_channels::codec::Encode;
use tribute_channels::licence::Revocation;
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::sign::{secp, tagged_hash, ALL_TAGS};
use tribute_channels::{Message, Network, Signed, Timestamp};
use tribute_daemon::auth::Role;
use tribute_proto::error_reason;
use tribute_proto::v1 as pb;
use tribute_proto::v1::operator_client::OperatorClient;
use tribute_proto::v1::ErrorReason as R;

const MODEL: &str = "llm-a";
const OWNERS: [(u64, u64); 3] = [(11, 1), (12, 2), (13, 3)];

// ---------------------------------------------------------------------------------------
// The RPCs, from the descriptors the daemon serves.

#[derive(Clone, PartialEq, prost::Message)]
struct FileSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<File>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct File {
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<Service>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Service {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "2")]
    method: Vec<Method>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Method {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(bool, optional, tag = "5")]
    client_streaming: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    server_streaming: Option<bool>,
}

/// An RPC: `Service.Method`, its path, and whether each side streams.
#[derive(Clone, Debug)]
struct Rpc {
    name: String,
    path: String,
    client_streaming: bool,
    server_streaming: bool,
}

fn rpcs() -> Vec<Rpc> {
    let set = <FileSet as prost::Message>::decode(tribute_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut out = Vec::new();
    for f in set.file {
        let package = f.package.unwrap_or_default();
        for s in f.service {
            let service = s.name.unwrap_or_default();
            for m in s.method {
                let method = m.name.unwrap_or_default();
                out.push(Rpc {
                    name: format!("{service}.{method}"),
                    path: format!("/{package}.{service}/{method}"),
                    client_streaming: m.client_streaming.unwrap_or(false),
                    server_streaming: m.server_streaming.unwrap_or(false),
                });
            }
        }
    }
    assert!(out.len() >= 30, "the descriptors list every RPC: {out:?}");
    out
}

// ---------------------------------------------------------------------------------------
// Raw calls: any bytes as the request message of any RPC.

#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// Sends `body` as the (only) request message of `rpc` with `token`; the first answer.
async fn raw_call(d: &TestDaemon, token: &str, rpc: &Rpc, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(d.channel().await);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(rpc.path.clone()).expect("path");
    if rpc.client_streaming {
        let req = with_token(tonic::Request::new(futures::stream::iter(vec![body])), token);
        let mut out = grpc.streaming(req, path, Raw).await?.into_inner();
        return out.message().await.map(drop);
    }
    let req = with_token(tonic::Request::new(body), token);
    if rpc.server_streaming {
        let mut out = grpc.server_streaming(req, path, Raw).await?.into_inner();
        out.message().await.map(drop)
    } else {
        grpc.unary(req, path, Raw).await.map(drop)
    }
}

fn with_token<T>(mut req: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    req
}

// ---------------------------------------------------------------------------------------
// Signatures taken apart.

/// The bytes of a `Signed<M>` with the 64-byte signature replaced by `f(signature)`.
fn resigned(bytes: &[u8], f: impl FnOnce([u8; 64]) -> Vec<u8>) -> Vec<u8> {
    let (message, sig) = bytes.split_at(bytes.len() - 64);
    let mut out = message.to_vec();
    out.extend(f(sig.try_into().expect("64 bytes")));
    out
}

/// `n - s`: the "high-S" twin of a signature. BIP340 has no such malleability (the
/// verifier fixes the nonce's parity), so the twin must not verify.
fn negate_s(sig: [u8; 64]) -> Vec<u8> {
    let s = SecretKey::from_slice(&sig[32..]).expect("0 < s < n");
    let mut out = sig[..32].to_vec();
    out.extend(s.negate().secret_bytes());
    out
}

/// `message || sig` where `sig` signs `tagged_hash(tag, message)` with `key`.
fn signed_under<M: Message>(message: &M, tag: &str, key: &Keypair) -> Vec<u8> {
    let bytes = message.encode();
    let digest = secp256k1::Message::from_digest(tagged_hash(tag, &bytes));
    let sig = secp().sign_schnorr_with_aux_rand(&digest, key, &[5; 32]);
    let mut out = bytes;
    out.extend_from_slice(sig.as_ref());
    out
}

/// Every way to break the signature of a valid `signed` (by `key`): each with the bytes and
/// whether the result is malformed (`true`) or only fails to verify (`false`).
fn broken_signatures<M: Message + Clone>(
    signed: &Signed<M>,
    key: &Keypair,
) -> Vec<(String, Vec<u8>, bool)> {
    let good = signed.encode();
    let mut out = vec![
        ("signature missing".to_owned(), signed.message.encode(), true),
        ("signature truncated to 63 bytes".to_owned(), good[..good.len() - 1].to_vec(), true),
        ("signature over-long (65 bytes)".to_owned(), [&good[..], &[0u8][..]].concat(), true),
        ("signature with high S (n - s)".to_owned(), resigned(&good, negate_s), false),
        (
            "signature with s = n (not reduced)".to_owned(),
            resigned(&good, |s| [&s[..32], &CURVE_ORDER[..]].concat()),
            false,
        ),
        (
            "signature with s = 2^256 - 1".to_owned(),
            resigned(&good, |s| [&s[..32], &[0xff; 32][..]].concat()),
            false,
        ),
        (
            "signature with R off the curve".to_owned(),
            resigned(&good, |s| [&[0xff; 32][..], &s[32..]].concat()),
            false,
        ),
        ("signature all zeros".to_owned(), resigned(&good, |_| vec![0; 64]), false),
        ("one bit of the message flipped".to_owned(), flip_message_bit(&good), false),
        (
            "signed by another key".to_owned(),
            signed_under(&signed.message, M::TAG, &keypair(99)),
            false,
        ),
    ];
    for tag in ALL_TAGS.iter().filter(|t| **t != M::TAG) {
        out.push((format!("signed under {tag}"), signed_under(&signed.message, tag, key), false));
    }
    out
}

/// Flips the lowest bit of the message's last byte (a timestamp or a hash in every signed
/// kind): the bytes still decode, the signature no longer matches.
fn flip_message_bit(good: &[u8]) -> Vec<u8> {
    let mut b = good.to_vec();
    let i = b.len() - 65;
    b[i] ^= 1;
    b
}

// ---------------------------------------------------------------------------------------
// The sweep.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Ok,
    /// A refusal by a handler: the code and the reason.
    Err(Code, R),
    /// A refusal by the gRPC framing, before any handler: the code, no reason.
    Framing(Code),
}

fn err(code: Code, reason: R) -> Want {
    Want::Err(code, reason)
}
const MALFORMED: Want = Want::Err(Code::InvalidArgument, R::MalformedField);
const BAD_SIGNATURE: Want = Want::Err(Code::InvalidArgument, R::BadSignature);

struct Sweep<'a> {
    d: &'a TestDaemon,
    fingerprint: String,
    cases: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Sweep<'_> {
    async fn check<T>(&mut self, rpc: &str, case: &str, got: Result<T, Status>, want: Want) {
        *self.cases.entry(rpc.to_owned()).or_default() += 1;
        let name = format!("{rpc} / {case}");
        let verdict = match (&got, want) {
            (Ok(_), Want::Ok) => None,
            (Err(s), Want::Err(code, reason))
                if s.code() == code && error_reason(s) == Some(reason) =>
            {
                None
            }
            (Err(s), Want::Framing(code)) if s.code() == code && error_reason(s).is_none() => None,
            (Ok(_), _) => Some(format!("{name}: accepted, wanted {want:?}")),
            (Err(s), _) => Some(format!(
                "{name}: got {:?} {:?} ({}), wanted {want:?}",
                s.code(),
                error_reason(s),
                s.message()
            )),
        };
        if let Some(v) = verdict {
            self.failures.push(v);
        }
        // Still serving.
        let mut auth = self.d.auth(Some(&self.d.operator_token)).await;
        if let Err(e) = auth.who_am_i(pb::WhoAmIRequest {}).await {
            self.failures.push(format!("{name}: daemon stopped answering: {e}"));
        }
        // Nothing written.
        if db_fingerprint(&self.d.db_path()) != self.fingerprint {
            self.failures.push(format!("{name}: the database changed"));
            self.fingerprint = db_fingerprint(&self.d.db_path());
        }
    }
}

/// What an empty request (all fields default) gets from each RPC, as an operator (as the
/// provider for `Metering`). Every RPC must be listed: this is the table a new RPC joins.
fn empty_request_outcomes() -> BTreeMap<&'static str, Want> {
    let disabled = err(Code::FailedPrecondition, R::LightningDisabled);
    BTreeMap::from([
        ("Auth.GetChallenge", MALFORMED),
        ("Auth.Login", MALFORMED),
        ("Auth.WhoAmI", Want::Ok),
        ("Registry.RegisterContributor", MALFORMED),
        ("Registry.GetContributor", MALFORMED),
        ("Registry.RegisterLicence", MALFORMED),
        ("Registry.RevokeLicence", MALFORMED),
        ("Registry.ListLicences", Want::Ok),
        ("Registry.RegisterModel", MALFORMED),
        ("Registry.GetModel", MALFORMED),
        ("Registry.ListModels", Want::Ok),
        ("Registry.RegisterTrainingRun", MALFORMED),
        ("Registry.GetAttribution", MALFORMED),
        ("Metering.Meter", err(Code::InvalidArgument, R::InvalidRequestId)),
        ("Metering.MeterStream", err(Code::InvalidArgument, R::InvalidRequestId)),
        ("Channels.SubscribeChannel", MALFORMED),
        ("Channels.GetChannel", MALFORMED),
        ("Channels.ListChannels", Want::Ok),
        ("Channels.ReportMisbehaviour", MALFORMED),
        ("Receipts.GetReceipt", err(Code::InvalidArgument, R::InvalidRequestId)),
        ("Operator.GetNodeInfo", disabled),
        ("Operator.NewOnchainAddress", disabled),
        ("Operator.GetOnchainBalance", disabled),
        ("Operator.OpenLightningChannel", MALFORMED),
        ("Operator.CloseLightningChannel", MALFORMED),
        ("Operator.ListLightningChannels", disabled),
        ("Operator.SettleNow", disabled),
        ("Operator.SetSettlementPaused", Want::Ok),
        ("Operator.ListSettlements", Want::Ok),
        ("Operator.CreateToken", MALFORMED),
        ("Operator.ListTokens", Want::Ok),
        ("Operator.RevokeToken", MALFORMED),
        ("Operator.Backup", Want::Ok),
        // Authorization comes first: the operator is no evaluator.
        ("Reputation.SubmitEvaluation", err(Code::PermissionDenied, R::WrongRole)),
        ("Reputation.GetReputation", MALFORMED),
        ("Reputation.ListReputation", Want::Ok),
        ("Reputation.ApplyQualityPolicy", MALFORMED),
    ])
}

fn contributor(
    n: u64,
    f: impl FnOnce(&mut ContributorRegistration),
) -> Signed<ContributorRegistration> {
    let mut node_id = [0x02; 33];
    node_id[1..].copy_from_slice(&pubkey(n).to_bytes());
    let mut reg = ContributorRegistration {
        network: Network::Regtest,
        contributor_key: pubkey(n),
        node_id: Some(node_id),
        bolt12_offer: None,
        registered_at: Timestamp(1_700_000_000),
    };
    f(&mut reg);
    Signed::sign(reg, &keypair(n), &[1; 32]).expect("sign")
}

/// A BOLT12 offer (`lno1…`) for `chain` (`None`: no chains field, i.e. mainnet).
fn offer(chain: Option<BtcNetwork>) -> String {
    let node = ldk_node::bitcoin::secp256k1::PublicKey::from_keypair(&keypair(50));
    let builder = OfferBuilder::new(node);
    let builder = match chain {
        Some(c) => builder.chain(c),
        None => builder,
    };
    builder.build().expect("offer").to_string()
}

fn revocation(n: u64, ds: u64, f: impl FnOnce(&mut Revocation)) -> Revocation {
    let mut r = Revocation {
        network: Network::Regtest,
        dataset_hash: dataset(ds),
        contributor_key: pubkey(n),
        licence_id: licence(n, ds).id(),
        revoked_at: Timestamp(1_900_000_000),
    };
    f(&mut r);
    r
}

fn weight(ds: u64, w: u64) -> pb::DatasetWeight {
    pb::DatasetWeight { dataset_hash: dataset(ds).0.to_vec(), weight: w }
}

async fn first_of_stream(
    m: &mut MeteringClient<Authed>,
    reqs: Vec<pb::MeterRequest>,
) -> Result<(), Status> {
    let mut out = m.meter_stream(futures::stream::iter(reqs)).await?.into_inner();
    out.message().await.map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_refuses_hostile_input_with_code_and_reason_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    setup_model(&d, MODEL, &OWNERS, 500_000).await;
    // Contributor 14's licence is revoked; 11 has a licence for dataset 15 signed late.
    let mut op = d.registry(Some(&d.operator_token)).await;
    op.register_contributor(pb::RegisterContributorRequest {
        signed_registration: signed_registration(14),
    })
    .await
    .expect("contributor 14");
    op.register_licence(pb::RegisterLicenceRequest { signed_licence: signed_licence(14, 14) })
        .await
        .expect("licence 14");
    let rev = Signed::sign(
        revocation(14, 14, |r| r.revoked_at = Timestamp(1_650_000_000)),
        &keypair(14),
        &[3; 32],
    );
    op.revoke_licence(pb::RevokeLicenceRequest { signed_revocation: rev.expect("sign").encode() })
        .await
        .expect("revoke");
    let mut late = licence(11, 15);
    late.signed_at = Timestamp(1_800_000_000);
    op.register_licence(pb::RegisterLicenceRequest {
        signed_licence: Signed::sign(late, &keypair(11), &[4; 32]).expect("sign").encode(),
    })
    .await
    .expect("late licence registers");
    let mut meter = d.metering(Some(&d.provider_token)).await;
    meter.meter(usage_request("ok-1", MODEL, 1, 1)).await.expect("a good one first");
    let contributor_token = d.token_for(Role::Contributor, Some(pubkey(11))).await;
    // Nothing left for the writer to do on its own: the next write would be a call's.
    d.running().flush().await;

    let mut channels = d.channels(Some(&d.operator_token)).await;
    let channel = |n: u64| {
        let mut c = channels.clone();
        async move {
            c.get_channel(pb::GetChannelRequest {
                contributor_key: pubkey(n).to_bytes().to_vec(),
                channel_id: vec![],
            })
            .await
            .expect("channel")
            .into_inner()
        }
    };
    let (ch11, ch12) = (channel(11).await, channel(12).await);
    let state11 = ch11.latest_state.clone().expect("signed state").signed_state;
    let state12 = ch12.latest_state.clone().expect("signed state").signed_state;
    let provider = tribute_daemon::keys::load_or_create_keypair(
        &d.dir.join(tribute_daemon::server::files::PROVIDER_KEY),
    )
    .expect("provider key");

    let mut sw = Sweep {
        d: &d,
        fingerprint: db_fingerprint(&d.db_path()),
        cases: BTreeMap::new(),
        failures: Vec::new(),
    };
    let all = rpcs();

    // 1. Bytes that are not protobuf, to every RPC: refused by the framing (INTERNAL, as
    // gRPC specifies for unparsable messages), before any handler.
    for rpc in &all {
        let token =
            if rpc.name.starts_with("Metering.") { &d.provider_token } else { &d.operator_token };
        for (what, body) in [
            ("length-delimited field longer than the message", vec![0x0a, 0x05, 0x01]),
            ("invalid wire type", vec![0x0f]),
            (
                "varint that never ends",
                vec![0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
        ] {
            let got = raw_call(&d, token, rpc, body).await;
            sw.check(
                &rpc.name,
                &format!("not protobuf: {what}"),
                got,
                Want::Framing(Code::Internal),
            )
            .await;
        }
    }
    let garbage_only = sw.cases.clone();
    sw.cases.clear();

    // 2. The empty request, and the empty request with an unknown field (ignored, as
    // protobuf requires): the same answer.
    let empty = empty_request_outcomes();
    for rpc in &all {
        let Some(want) = empty.get(rpc.name.as_str()) else {
            sw.failures.push(format!("{}: no entry in empty_request_outcomes()", rpc.name));
            continue;
        };
        let token =
            if rpc.name.starts_with("Metering.") { &d.provider_token } else { &d.operator_token };
        let got = raw_call(&d, token, rpc, vec![]).await;
        sw.check(&rpc.name, "empty request", got, *want).await;
        let got = raw_call(&d, token, rpc, vec![0xf8, 0x07, 0x01]).await;
        sw.check(&rpc.name, "empty request with unknown field 127", got, *want).await;
    }
    assert_eq!(
        empty.len(),
        all.len(),
        "empty_request_outcomes() names an RPC the descriptors do not have"
    );

    // 3. Field by field.
    let mut prov = d.registry(Some(&d.provider_token)).await;
    let mut auth = d.auth(None).await;
    let mut operator =
        OperatorClient::with_interceptor(d.channel().await, Bearer(Some(d.operator_token.clone())));
    let key = |n: u64| pubkey(n).to_bytes().to_vec();
    let not_a_point = vec![0xff; 32];
    let too_big = vec![7u8; 70 * 1024]; // above the 64 KiB message limit
    let beyond_hard = vec![7u8; 300 * 1024]; // above the decoder's hard limit (4 × 64 KiB)

    // Auth.GetChallenge
    for (what, k, want) in [
        ("31-byte key", vec![3; 31], MALFORMED),
        ("33-byte key", vec![3; 33], MALFORMED),
        ("key not on the curve", not_a_point.clone(), MALFORMED),
        ("70 KiB key", too_big.clone(), Want::Framing(Code::OutOfRange)),
    ] {
        let got = auth.get_challenge(pb::GetChallengeRequest { contributor_key: k }).await;
        sw.check("Auth.GetChallenge", what, got, want).await;
    }

    // Auth.Login: every answer gets a fresh challenge (a failed answer uses it up).
    let challenger = auth.clone();
    let challenge = |n: u64| {
        let mut a = challenger.clone();
        async move {
            let ch = a
                .get_challenge(pb::GetChallengeRequest { contributor_key: key(n) })
                .await
                .expect("challenge")
                .into_inner();
            AuthChallenge::decode(&ch.challenge).expect("challenge decodes")
        }
    };
    let count = broken_signatures(
        &Signed::sign(challenge(11).await, &keypair(11), &[7; 32]).expect("sign"),
        &keypair(11),
    )
    .len();
    for i in 0..count {
        let good = Signed::sign(challenge(11).await, &keypair(11), &[7; 32]).expect("sign");
        let (what, bytes, malformed) = broken_signatures(&good, &keypair(11)).swap_remove(i);
        let want = if malformed {
            MALFORMED
        } else if what.starts_with("one bit") {
            // The altered answer no longer matches the challenge issued (checked first).
            err(Code::Unauthenticated, R::ChallengeFailed)
        } else {
            err(Code::Unauthenticated, R::BadSignature)
        };
        let got = auth.login(pb::LoginRequest { signed_challenge: bytes }).await;
        sw.check("Auth.Login", &what, got, want).await;
    }
    let used = {
        let c = challenge(11).await;
        let s = Signed::sign(c, &keypair(11), &[7; 32]).expect("sign").encode();
        auth.login(pb::LoginRequest { signed_challenge: s.clone() }).await.expect("login");
        s
    };
    let got = auth.login(pb::LoginRequest { signed_challenge: used }).await;
    sw.check("Auth.Login", "answer replayed", got, err(Code::Unauthenticated, R::ChallengeFailed))
        .await;
    // Contributor 12 answers contributor 11's challenge (its own key in it, its signature).
    let mut stolen = challenge(11).await;
    stolen.contributor_key = pubkey(12);
    let s = Signed::sign(stolen, &keypair(12), &[7; 32]).expect("sign").encode();
    let got = auth.login(pb::LoginRequest { signed_challenge: s }).await;
    sw.check(
        "Auth.Login",
        "another contributor's challenge",
        got,
        err(Code::Unauthenticated, R::ChallengeFailed),
    )
    .await;
    let mut other_net = challenge(11).await;
    other_net.network = Network::Bitcoin;
    let s = Signed::sign(other_net, &keypair(11), &[7; 32]).expect("sign").encode();
    let got = auth.login(pb::LoginRequest { signed_challenge: s }).await;
    sw.check("Auth.Login", "wrong network", got, err(Code::Unauthenticated, R::ChallengeFailed))
        .await;
    let got = auth.login(pb::LoginRequest { signed_challenge: vec![1; 600] }).await;
    sw.check("Auth.Login", "600-byte answer", got, MALFORMED).await;

    // Auth.WhoAmI: credentials that are not credentials.
    for (what, token) in [
        ("unknown token", "trb_nope_0000".to_owned()),
        ("empty token", String::new()),
        ("4 KiB token", "a".repeat(4096)),
        ("revoked-looking garbage", "trb_".repeat(40)),
    ] {
        let mut a = d.auth(Some(&token)).await;
        let got = a.who_am_i(pb::WhoAmIRequest {}).await;
        sw.check("Auth.WhoAmI", what, got, err(Code::Unauthenticated, R::Unauthenticated)).await;
    }

    // Registry.RegisterContributor
    let reg = contributor(20, |_| {});
    for (what, bytes, malformed) in broken_signatures(&reg, &keypair(20)) {
        let want = if malformed { MALFORMED } else { BAD_SIGNATURE };
        let got = op
            .register_contributor(pb::RegisterContributorRequest { signed_registration: bytes })
            .await;
        sw.check("Registry.RegisterContributor", &what, got, want).await;
    }
    let regs: Vec<(&str, Vec<u8>, Want)> = vec![
        (
            "wrong network",
            contributor(20, |r| r.network = Network::Bitcoin).encode(),
            err(Code::InvalidArgument, R::WrongNetwork),
        ),
        (
            "registered at u64::MAX",
            contributor(20, |r| r.registered_at = Timestamp(u64::MAX)).encode(),
            MALFORMED,
        ),
        (
            "older registration replayed over a newer one",
            contributor(11, |r| r.registered_at = Timestamp(1_600_000_000)).encode(),
            err(Code::AlreadyExists, R::Conflict),
        ),
        (
            "node id with prefix 0x05",
            contributor(20, |r| r.node_id = Some([0x05; 33])).encode(),
            MALFORMED,
        ),
        ("no payout destination", contributor(20, |r| r.node_id = None).encode(), MALFORMED),
        (
            "BOLT12 offer for mainnet",
            contributor(20, |r| r.bolt12_offer = Some(offer(Some(BtcNetwork::Bitcoin)))).encode(),
            err(Code::InvalidArgument, R::WrongNetwork),
        ),
        (
            "BOLT12 offer without chains (mainnet)",
            contributor(20, |r| r.bolt12_offer = Some(offer(None))).encode(),
            err(Code::InvalidArgument, R::WrongNetwork),
        ),
        (
            "BOLT12 offer of the right form that does not parse",
            contributor(20, |r| r.bolt12_offer = Some("lno1qqqqqqqq".into())).encode(),
            MALFORMED,
        ),
        ("70 KiB", too_big.clone(), err(Code::OutOfRange, R::MessageTooLarge)),
        ("300 KiB", beyond_hard.clone(), Want::Framing(Code::OutOfRange)),
    ];
    for (what, bytes, want) in regs {
        let got = op
            .register_contributor(pb::RegisterContributorRequest { signed_registration: bytes })
            .await;
        sw.check("Registry.RegisterContributor", what, got, want).await;
    }
    let mut as_11 = d.registry(Some(&contributor_token)).await;
    let got = as_11
        .register_contributor(pb::RegisterContributorRequest {
            signed_registration: contributor(12, |r| r.registered_at = Timestamp(1_800_000_000))
                .encode(),
        })
        .await;
    sw.check(
        "Registry.RegisterContributor",
        "contributor 11 submits 12's registration",
        got,
        err(Code::PermissionDenied, R::NotYourChannel),
    )
    .await;

    // Registry.GetContributor
    for (what, k, want) in [
        ("31-byte key", vec![1; 31], MALFORMED),
        ("key not on the curve", not_a_point.clone(), MALFORMED),
        ("unknown contributor", key(77), err(Code::NotFound, R::UnknownContributor)),
        ("70 KiB key", too_big.clone(), MALFORMED),
    ] {
        let got = op.get_contributor(pb::GetContributorRequest { contributor_key: k }).await;
        sw.check("Registry.GetContributor", what, got, want).await;
    }

    // Registry.RegisterLicence
    let lic = Signed::sign(licence(20, 20), &keypair(20), &[2; 32]).expect("sign");
    for (what, bytes, malformed) in broken_signatures(&lic, &keypair(20)) {
        let want = if malformed { MALFORMED } else { BAD_SIGNATURE };
        let got = op.register_licence(pb::RegisterLicenceRequest { signed_licence: bytes }).await;
        sw.check("Registry.RegisterLicence", &what, got, want).await;
    }
    let mut wrong_net = licence(20, 20);
    wrong_net.network = Network::Testnet;
    let mut empty_window = licence(20, 20);
    empty_window.not_before = Timestamp(2_000_000_000);
    empty_window.not_after = Timestamp(1_000_000_000);
    let mut bad_spdx = licence(20, 20);
    bad_spdx.spdx_license_id = "MIT\n".into();
    let sign20 = |l| Signed::sign(l, &keypair(20), &[2; 32]).expect("sign").encode();
    for (what, bytes, want) in [
        ("wrong network", sign20(wrong_net), err(Code::InvalidArgument, R::WrongNetwork)),
        ("not_before after not_after", sign20(empty_window), MALFORMED),
        ("SPDX id with a newline", sign20(bad_spdx), MALFORMED),
        (
            "dataset already licensed by another contributor",
            signed_licence(20, 11),
            err(Code::AlreadyExists, R::Conflict),
        ),
        ("70 KiB", too_big.clone(), err(Code::OutOfRange, R::MessageTooLarge)),
    ] {
        let got = op.register_licence(pb::RegisterLicenceRequest { signed_licence: bytes }).await;
        sw.check("Registry.RegisterLicence", what, got, want).await;
    }
    let got = as_11
        .register_licence(pb::RegisterLicenceRequest { signed_licence: signed_licence(12, 40) })
        .await;
    sw.check(
        "Registry.RegisterLicence",
        "contributor 11 submits 12's licence",
        got,
        err(Code::PermissionDenied, R::NotYourChannel),
    )
    .await;

    // Registry.RevokeLicence
    let r11 = Signed::sign(revocation(11, 11, |_| {}), &keypair(11), &[3; 32]).expect("sign");
    for (what, bytes, malformed) in broken_signatures(&r11, &keypair(11)) {
        let want = if malformed { MALFORMED } else { BAD_SIGNATURE };
        let got = op.revoke_licence(pb::RevokeLicenceRequest { signed_revocation: bytes }).await;
        sw.check("Registry.RevokeLicence", &what, got, want).await;
    }
    let sign_rev =
        |n: u64, r: Revocation| Signed::sign(r, &keypair(n), &[3; 32]).expect("sign").encode();
    for (what, bytes, want) in [
        (
            "wrong network",
            sign_rev(11, revocation(11, 11, |r| r.network = Network::Signet)),
            err(Code::InvalidArgument, R::WrongNetwork),
        ),
        (
            "revoked at u64::MAX",
            sign_rev(11, revocation(11, 11, |r| r.revoked_at = Timestamp(u64::MAX))),
            MALFORMED,
        ),
        (
            // 12 names 11's licence and dataset, signs with its own key.
            "another contributor's licence",
            sign_rev(12, revocation(12, 11, |r| r.licence_id = licence(11, 11).id())),
            err(Code::NotFound, R::UnknownDataset),
        ),
        (
            "licence that does not exist",
            sign_rev(11, revocation(11, 66, |_| {})),
            err(Code::NotFound, R::UnknownDataset),
        ),
        ("70 KiB", too_big.clone(), err(Code::OutOfRange, R::MessageTooLarge)),
    ] {
        let got = op.revoke_licence(pb::RevokeLicenceRequest { signed_revocation: bytes }).await;
        sw.check("Registry.RevokeLicence", what, got, want).await;
    }
    let got = as_11
        .revoke_licence(pb::RevokeLicenceRequest {
            signed_revocation: sign_rev(12, revocation(12, 12, |_| {})),
        })
        .await;
    sw.check(
        "Registry.RevokeLicence",
        "contributor 11 submits 12's revocation",
        got,
        err(Code::PermissionDenied, R::NotYourChannel),
    )
    .await;

    // Registry.ListLicences
    for (what, k, h) in [
        ("31-byte key", vec![1; 31], vec![]),
        ("key not on the curve", not_a_point.clone(), vec![]),
        ("31-byte dataset hash", vec![], vec![1; 31]),
        ("33-byte dataset hash", vec![], vec![1; 33]),
    ] {
        let got =
            op.list_licences(pb::ListLicencesRequest { contributor_key: k, dataset_hash: h }).await;
        sw.check("Registry.ListLicences", what, got, MALFORMED).await;
    }

    // Registry.RegisterModel
    let tariff = |r, i, o| {
        Some(pb::Tariff { per_request_nsat: r, per_input_token_nsat: i, per_output_token_nsat: o })
    };
    let model = |id: &str, share, t| pb::RegisterModelRequest {
        model_id: id.into(),
        contributor_share_ppm: share,
        tariff: t,
    };
    for (what, req, want) in [
        ("65-byte model id", model(&"m".repeat(65), 1, tariff(1, 1, 1)), MALFORMED),
        ("model id with a control character", model("m\u{7}", 1, tariff(1, 1, 1)), MALFORMED),
        ("model id not ASCII", model("modèle", 1, tariff(1, 1, 1)), MALFORMED),
        ("no tariff", model("m2", 1, None), MALFORMED),
        ("share above 10^6 ppm", model("m2", 1_000_001, tariff(1, 1, 1)), MALFORMED),
        ("share u32::MAX", model("m2", u32::MAX, tariff(1, 1, 1)), MALFORMED),
        (
            "all-zero tariff",
            model("m2", 1, tariff(0, 0, 0)),
            err(Code::InvalidArgument, R::PriceOutOfRange),
        ),
        ("price u64::MAX (beyond i64)", model("m2", 1, tariff(u64::MAX, 0, 0)), MALFORMED),
        (
            "existing model, other terms",
            model(MODEL, 1, tariff(1, 1, 1)),
            err(Code::AlreadyExists, R::Conflict),
        ),
        (
            "70 KiB model id",
            model(&"m".repeat(70 * 1024), 1, tariff(1, 1, 1)),
            err(Code::OutOfRange, R::MessageTooLarge),
        ),
    ] {
        let got = prov.register_model(req).await;
        sw.check("Registry.RegisterModel", what, got, want).await;
    }

    // Registry.GetModel
    for (what, id, want) in [
        ("65-byte id", "m".repeat(65), MALFORMED),
        ("id with NUL", "m\0".to_owned(), MALFORMED),
        ("unknown model", "nope".to_owned(), err(Code::NotFound, R::UnknownModel)),
    ] {
        let got = prov.get_model(pb::GetModelRequest { model_id: id }).await;
        sw.check("Registry.GetModel", what, got, want).await;
    }

    // Registry.ListModels: no fields; only the framing cases above and unknown fields.

    // Registry.RegisterTrainingRun
    let run = |id: &str, model: &str, started: u64, finished: u64, ds: Vec<pb::DatasetWeight>| {
        pb::RegisterTrainingRunRequest {
            run_id: id.into(),
            model_id: model.into(),
            started_at: started,
            finished_at: finished,
            datasets: ds,
        }
    };
    let t0 = 1_700_000_000;
    for (what, req, want) in [
        ("no datasets", run("r2", MODEL, t0, t0 + 10, vec![]), MALFORMED),
        (
            "65-byte run id",
            run(&"r".repeat(65), MODEL, t0, t0 + 10, vec![weight(11, 1)]),
            MALFORMED,
        ),
        (
            "dataset twice",
            run("r2", MODEL, t0, t0 + 10, vec![weight(11, 1), weight(11, 2)]),
            MALFORMED,
        ),
        ("zero weight", run("r2", MODEL, t0, t0 + 10, vec![weight(11, 0)]), MALFORMED),
        ("finished before started", run("r2", MODEL, t0, t0 - 1, vec![weight(11, 1)]), MALFORMED),
        (
            "31-byte dataset hash",
            run(
                "r2",
                MODEL,
                t0,
                t0 + 10,
                vec![pb::DatasetWeight { dataset_hash: vec![1; 31], weight: 1 }],
            ),
            MALFORMED,
        ),
        (
            "unknown model",
            run("r2", "nope", t0, t0 + 10, vec![weight(11, 1)]),
            err(Code::NotFound, R::UnknownModel),
        ),
        (
            "run id reused with other content",
            run(&format!("{MODEL}-run-1"), MODEL, t0, t0 + 11, vec![weight(11, 1)]),
            err(Code::AlreadyExists, R::Conflict),
        ),
        (
            "unlicensed dataset",
            run("bad-1", MODEL, t0, t0 + 10, vec![weight(77, 1)]),
            err(Code::FailedPrecondition, R::UnlicensedDataset),
        ),
        (
            "revoked dataset",
            run("bad-2", MODEL, t0, t0 + 10, vec![weight(14, 1)]),
            err(Code::FailedPrecondition, R::UnlicensedDataset),
        ),
        (
            "licence signed after the run started",
            run("bad-3", MODEL, t0, t0 + 10, vec![weight(15, 1)]),
            err(Code::FailedPrecondition, R::UnlicensedDataset),
        ),
        (
            "licence not yet valid (run before 2020)",
            run("bad-4", MODEL, 1_000_000_000, 1_000_000_010, vec![weight(11, 1)]),
            err(Code::FailedPrecondition, R::UnlicensedDataset),
        ),
        (
            "3,000 datasets (too large)",
            run("r3", MODEL, t0, t0 + 10, (0..3000).map(|i| weight(1000 + i, 1)).collect()),
            err(Code::OutOfRange, R::MessageTooLarge),
        ),
    ] {
        let got = prov.register_training_run(req).await;
        sw.check("Registry.RegisterTrainingRun", what, got, want).await;
    }

    // Registry.GetAttribution
    for (what, id, version, want) in [
        ("unknown model", "nope", 0, err(Code::NotFound, R::UnknownModel)),
        ("version that does not exist", MODEL, 2, MALFORMED),
        ("version u64::MAX", MODEL, u64::MAX, MALFORMED),
        ("empty model id", "", 1, MALFORMED),
    ] {
        let got =
            prov.get_attribution(pb::GetAttributionRequest { model_id: id.into(), version }).await;
        sw.check("Registry.GetAttribution", what, got, want).await;
    }

    // Metering.Meter and Metering.MeterStream (each bad request also alone on a stream).
    let with_price = |id: &str, p| {
        let mut r = usage_request(id, MODEL, 0, 0);
        r.price = p;
        r
    };
    let with_attribution = |id: &str, a: Vec<pb::DatasetWeight>| {
        let mut r = usage_request(id, MODEL, 1, 1);
        r.attribution = a;
        r
    };
    let meter_cases: Vec<(&str, pb::MeterRequest, Want)> = vec![
        ("unknown model", usage_request("x1", "nope", 1, 1), err(Code::NotFound, R::UnknownModel)),
        ("empty model id", usage_request("x1", "", 1, 1), MALFORMED),
        (
            "zero price",
            with_price("x2", Some(pb::meter_request::Price::PriceNsat(0))),
            err(Code::InvalidArgument, R::PriceOutOfRange),
        ),
        (
            "price above the cap",
            with_price("x3", Some(pb::meter_request::Price::PriceNsat(u64::MAX))),
            err(Code::InvalidArgument, R::PriceOutOfRange),
        ),
        (
            "usage that overflows",
            usage_request("x4", MODEL, u64::MAX, u64::MAX),
            err(Code::InvalidArgument, R::PriceOutOfRange),
        ),
        (
            "input tokens u64::MAX",
            usage_request("x4b", MODEL, u64::MAX, 0),
            err(Code::InvalidArgument, R::PriceOutOfRange),
        ),
        ("no price", with_price("x5", None), MALFORMED),
        (
            "empty request id",
            usage_request("", MODEL, 1, 1),
            err(Code::InvalidArgument, R::InvalidRequestId),
        ),
        (
            "65-byte request id",
            usage_request(&"x".repeat(65), MODEL, 1, 1),
            err(Code::InvalidArgument, R::InvalidRequestId),
        ),
        (
            "request id with a newline",
            usage_request("x\n", MODEL, 1, 1),
            err(Code::InvalidArgument, R::InvalidRequestId),
        ),
        (
            "request id not ASCII",
            usage_request("réquête", MODEL, 1, 1),
            err(Code::InvalidArgument, R::InvalidRequestId),
        ),
        (
            "request id replayed with other content",
            usage_request("ok-1", MODEL, 2, 1),
            err(Code::AlreadyExists, R::ExistsWithDifferentContent),
        ),
        (
            "attribution over an unknown dataset",
            with_attribution("x6", vec![weight(99, 1)]),
            err(Code::NotFound, R::UnknownDataset),
        ),
        (
            "attribution over a revoked dataset",
            with_attribution("x7", vec![weight(14, 1)]),
            err(Code::FailedPrecondition, R::UnlicensedDataset),
        ),
        (
            "attribution naming a dataset twice",
            with_attribution("x8", vec![weight(11, 1), weight(11, 1)]),
            err(Code::InvalidArgument, R::BadAttribution),
        ),
        (
            "attribution of zero weights",
            with_attribution("x9", vec![weight(11, 0), weight(12, 0)]),
            err(Code::InvalidArgument, R::BadAttribution),
        ),
        (
            "attribution with a 31-byte hash",
            with_attribution(
                "x10",
                vec![pb::DatasetWeight { dataset_hash: vec![1; 31], weight: 1 }],
            ),
            MALFORMED,
        ),
        (
            "1,025 attribution entries",
            with_attribution("x11", (0..1025).map(|i| weight(1000 + i, 1)).collect()),
            err(Code::InvalidArgument, R::BadAttribution),
        ),
        (
            "3,000 attribution entries (too large)",
            with_attribution("x12", (0..3000).map(|i| weight(1000 + i, 1)).collect()),
            err(Code::OutOfRange, R::MessageTooLarge),
        ),
    ];
    for (what, req, want) in meter_cases {
        let got = meter.meter(req.clone()).await;
        sw.check("Metering.Meter", what, got, want).await;
        let got = first_of_stream(&mut meter, vec![req]).await;
        sw.check("Metering.MeterStream", what, got, want).await;
    }
    for (what, token) in [("no token", None), ("unknown token", Some("trb_nope_0000"))] {
        let mut m = d.metering(token).await;
        let got = m.meter(usage_request("x13", MODEL, 1, 1)).await;
        sw.check("Metering.Meter", what, got, err(Code::Unauthenticated, R::Unauthenticated)).await;
    }
    let mut as_acct = d.metering(Some(&d.accountant_token)).await;
    let got = as_acct.meter(usage_request("x14", MODEL, 1, 1)).await;
    sw.check("Metering.Meter", "wrong role", got, err(Code::PermissionDenied, R::WrongRole)).await;

    // Channels.SubscribeChannel
    let mut as_11_ch = d.channels(Some(&contributor_token)).await;
    for (what, k, want) in [
        ("31-byte key", vec![1; 31], MALFORMED),
        ("key not on the curve", not_a_point.clone(), MALFORMED),
        // Allowed: an operator may follow a channel before its first accrual opens it.
        ("contributor with no channel yet", key(77), Want::Ok),
    ] {
        let got = channels
            .subscribe_channel(pb::SubscribeChannelRequest {
                contributor_key: k,
                states_only: true,
            })
            .await;
        sw.check("Channels.SubscribeChannel", what, got, want).await;
    }
    let got = as_11_ch
        .subscribe_channel(pb::SubscribeChannelRequest {
            contributor_key: key(12),
            states_only: true,
        })
        .await;
    sw.check(
        "Channels.SubscribeChannel",
        "another contributor's channel",
        got,
        err(Code::PermissionDenied, R::NotYourChannel),
    )
    .await;

    // Channels.GetChannel
    for (what, k, id, want) in [
        ("31-byte key", vec![1; 31], vec![], MALFORMED),
        ("31-byte channel id", vec![], vec![1; 31], MALFORMED),
        ("unknown channel id", vec![], vec![1; 32], err(Code::NotFound, R::UnknownChannel)),
        ("contributor with no channel", key(77), vec![], err(Code::NotFound, R::UnknownChannel)),
        ("70 KiB channel id", vec![], too_big.clone(), Want::Framing(Code::OutOfRange)),
    ] {
        let got = channels
            .get_channel(pb::GetChannelRequest { contributor_key: k, channel_id: id })
            .await;
        sw.check("Channels.GetChannel", what, got, want).await;
    }
    let got = as_11_ch
        .get_channel(pb::GetChannelRequest { contributor_key: key(12), channel_id: vec![] })
        .await;
    sw.check(
        "Channels.GetChannel",
        "another contributor's channel",
        got,
        err(Code::PermissionDenied, R::NotYourChannel),
    )
    .await;

    // Channels.ListChannels: no fields.

    // Channels.ReportMisbehaviour: nothing here proves anything.
    let not_misbehaviour = err(Code::InvalidArgument, R::NotMisbehaviour);
    let held = Signed::<ChannelState>::decode(&state11).expect("state");
    let forge = |f: &dyn Fn(&mut ChannelState)| {
        let mut s = held.message;
        s.accrued_nsat.0 += 1;
        f(&mut s);
        s
    };
    let fork = Signed::sign(forge(&|_| {}), &provider, &[9; 32]).expect("sign");
    for (what, bytes, malformed) in broken_signatures(&fork, &provider) {
        let want = if malformed { MALFORMED } else { not_misbehaviour };
        let got = channels
            .report_misbehaviour(pb::ReportMisbehaviourRequest {
                held_state: state11.clone(),
                received_state: bytes,
            })
            .await;
        sw.check("Channels.ReportMisbehaviour", &what, got, want).await;
    }
    let other_key = |s: &mut ChannelState| s.provider_key = pubkey(12);
    let other_net = |s: &mut ChannelState| s.network = Network::Bitcoin;
    for (what, a, b, want) in [
        ("states of two channels", state11.clone(), state12.clone(), not_misbehaviour),
        ("the same state twice", state11.clone(), state11.clone(), not_misbehaviour),
        (
            "a state signed by another key as the provider",
            state11.clone(),
            Signed::sign(forge(&other_key), &keypair(12), &[9; 32]).expect("sign").encode(),
            not_misbehaviour,
        ),
        (
            "a state for another network",
            state11.clone(),
            Signed::sign(forge(&other_net), &provider, &[9; 32]).expect("sign").encode(),
            not_misbehaviour,
        ),
        ("held state empty", vec![], state11.clone(), MALFORMED),
        ("70 KiB state", state11.clone(), too_big.clone(), Want::Framing(Code::OutOfRange)),
    ] {
        let got = channels
            .report_misbehaviour(pb::ReportMisbehaviourRequest { held_state: a, received_state: b })
            .await;
        sw.check("Channels.ReportMisbehaviour", what, got, want).await;
    }

    // Receipts.GetReceipt
    let mut receipts = d.receipts(Some(&d.operator_token)).await;
    for (what, id, want) in [
        ("65-byte id", "r".repeat(65), err(Code::InvalidArgument, R::InvalidRequestId)),
        ("id with a tab", "r\t".to_owned(), err(Code::InvalidArgument, R::InvalidRequestId)),
        ("unknown id", "never-metered".to_owned(), err(Code::NotFound, R::UnknownReceipt)),
    ] {
        let got = receipts.get_receipt(pb::GetReceiptRequest { request_id: id }).await;
        sw.check("Receipts.GetReceipt", what, got, want).await;
    }

    // Operator.*: the fields are checked before the (absent) Lightning node is asked.
    let node = |b: Vec<u8>| pb::OpenLightningChannelRequest {
        node_id: b,
        address: "127.0.0.1:9735".into(),
        amount_sat: 100_000,
        push_msat: 0,
        announce: false,
    };
    let mut valid_node = vec![0x02];
    valid_node.extend(pubkey(11).to_bytes());
    for (what, req, want) in [
        ("32-byte node id", node(vec![2; 32]), MALFORMED),
        ("node id not on the curve", node([vec![0x02], vec![0xff; 32]].concat()), MALFORMED),
        (
            "node id with prefix 0x04",
            node([vec![0x04], pubkey(11).to_bytes().to_vec()].concat()),
            MALFORMED,
        ),
        (
            "no address",
            pb::OpenLightningChannelRequest { address: " ".into(), ..node(valid_node.clone()) },
            MALFORMED,
        ),
        (
            "zero amount",
            pb::OpenLightningChannelRequest { amount_sat: 0, ..node(valid_node.clone()) },
            MALFORMED,
        ),
        (
            "push above the capacity",
            pb::OpenLightningChannelRequest { push_msat: 100_000_001, ..node(valid_node.clone()) },
            MALFORMED,
        ),
        (
            "push u64::MAX on u64::MAX sat",
            pb::OpenLightningChannelRequest {
                amount_sat: u64::MAX,
                push_msat: u64::MAX,
                ..node(valid_node.clone())
            },
            err(Code::FailedPrecondition, R::LightningDisabled),
        ),
    ] {
        let got = operator.open_lightning_channel(req).await;
        sw.check("Operator.OpenLightningChannel", what, got, want).await;
    }
    for (what, id, want) in [
        ("31-byte channel id", vec![1; 31], MALFORMED),
        ("33-byte channel id", vec![1; 33], MALFORMED),
        ("valid id, no node", vec![1; 32], err(Code::FailedPrecondition, R::LightningDisabled)),
    ] {
        let got = operator
            .close_lightning_channel(pb::CloseLightningChannelRequest {
                channel_id: id,
                force: true,
            })
            .await;
        sw.check("Operator.CloseLightningChannel", what, got, want).await;
    }
    let list =
        |status: &str, k: Vec<u8>, from: u64, until: u64, limit: u32| pb::ListSettlementsRequest {
            status: status.into(),
            contributor_key: k,
            created_from: from,
            created_until: until,
            limit,
        };
    for (what, req, want) in [
        ("unknown status", list("paid", vec![], 0, 0, 0), MALFORMED),
        ("status with different case", list("PENDING", vec![], 0, 0, 0), MALFORMED),
        ("31-byte key", list("", vec![1; 31], 0, 0, 0), MALFORMED),
        ("created_from u64::MAX (beyond i64)", list("", vec![], u64::MAX, 0, 0), Want::Ok),
        ("created_until u64::MAX (beyond i64)", list("", vec![], 0, u64::MAX, 0), Want::Ok),
        ("limit u32::MAX", list("", vec![], 0, 0, u32::MAX), Want::Ok),
    ] {
        let got = operator.list_settlements(req).await;
        sw.check("Operator.ListSettlements", what, got, want).await;
    }
    let token_req = |role: &str, k: Vec<u8>, label: &str, secs: u64| pb::CreateTokenRequest {
        role: role.into(),
        contributor_key: k,
        label: label.into(),
        expires_in_secs: secs,
    };
    for (what, req) in [
        ("unknown role", token_req("admin", vec![], "", 0)),
        ("role with different case", token_req("Operator", vec![], "", 0)),
        ("contributor token without key", token_req("contributor", vec![], "", 0)),
        ("provider token bound to a key", token_req("provider", key(11), "", 0)),
        ("contributor key not on the curve", token_req("contributor", not_a_point.clone(), "", 0)),
        ("129-byte label", token_req("operator", vec![], &"l".repeat(129), 0)),
        ("label with a control character", token_req("operator", vec![], "a\u{1b}[31m", 0)),
        ("expires in u64::MAX seconds", token_req("operator", vec![], "", u64::MAX)),
        ("expires in i64::MAX seconds", token_req("operator", vec![], "", i64::MAX as u64)),
    ] {
        let got = operator.create_token(req).await;
        sw.check("Operator.CreateToken", what, got, MALFORMED).await;
    }
    for (what, id, want) in [
        ("unknown token id", "tok_nope".to_owned(), err(Code::NotFound, R::MalformedField)),
        ("70 KiB token id", "t".repeat(70 * 1024), Want::Framing(Code::OutOfRange)),
    ] {
        let got = operator.revoke_token(pb::RevokeTokenRequest { token_id: id }).await;
        sw.check("Operator.RevokeToken", what, got, want).await;
    }
    // GetNodeInfo, NewOnchainAddress, GetOnchainBalance, ListLightningChannels, SettleNow,
    // SetSettlementPaused, ListTokens and Backup take no fields: their cases are the
    // framing and empty-request ones above, and the wrong callers below.
    let mut as_provider =
        OperatorClient::with_interceptor(d.channel().await, Bearer(Some(d.provider_token.clone())));
    let got = as_provider.backup(pb::BackupRequest {}).await;
    sw.check(
        "Operator.Backup",
        "provider asks for a backup",
        got,
        err(Code::PermissionDenied, R::WrongRole),
    )
    .await;

    // Reputation (issue 8): records, queries and the quality policy.
    let rep_client = |token: String| {
        let d = &d;
        async move {
            tribute_proto::v1::reputation_client::ReputationClient::with_interceptor(
                d.channel().await,
                Bearer(Some(token)),
            )
        }
    };
    let mut rep = rep_client(d.operator_token.clone()).await;
    let mut evaluator = rep_client(d.token_for(Role::Evaluator, Some(pubkey(60))).await).await;
    // The token is stored: what follows must change nothing from here on.
    sw.fingerprint = db_fingerprint(&d.db_path());
    for (what, bytes, want) in [
        ("3 bytes that are no record", vec![1, 2, 3], MALFORMED),
        ("a licence instead of a record", signed_licence(11, 1), MALFORMED),
        ("70 KiB record", too_big.clone(), err(Code::OutOfRange, R::MessageTooLarge)),
    ] {
        let got = evaluator
            .submit_evaluation(pb::SubmitEvaluationRequest { signed_evaluation: bytes })
            .await;
        sw.check("Reputation.SubmitEvaluation", what, got, want).await;
    }
    for (what, hash, as_of, want) in [
        ("31-byte dataset hash", vec![7; 31], 0, MALFORMED),
        ("33-byte dataset hash", vec![7; 33], 0, MALFORMED),
        ("unknown dataset", vec![7; 32], 0, err(Code::NotFound, R::UnknownDataset)),
    ] {
        let got = rep.get_reputation(pb::GetReputationRequest { dataset_hash: hash, as_of }).await;
        sw.check("Reputation.GetReputation", what, got, want).await;
    }
    for (what, k, as_of, want) in [
        ("31-byte contributor key", vec![3; 31], 0, MALFORMED),
        ("contributor key not on the curve", not_a_point.clone(), 0, MALFORMED),
        // Far in the future: every measurement has decayed away; nothing breaks.
        ("as_of u64::MAX", vec![], u64::MAX, Want::Ok),
    ] {
        let got =
            rep.list_reputation(pb::ListReputationRequest { contributor_key: k, as_of }).await;
        sw.check("Reputation.ListReputation", what, got, want).await;
    }
    let policy = |model: &str, floor: u32, cap: u32| pb::ApplyQualityPolicyRequest {
        model_id: model.into(),
        policy_id: "q".into(),
        policy_version: 1,
        gain_ppm: 1_000_000,
        floor_ppm: floor,
        cap_ppm: cap,
        as_of: 0,
    };
    for (what, req, want) in [
        ("65-byte model id", policy(&"m".repeat(65), 0, 2_000_000), MALFORMED),
        ("unknown model", policy("nope", 0, 2_000_000), err(Code::NotFound, R::UnknownModel)),
        (
            "floor above cap",
            policy(MODEL, 2_000_000, 1_000_000),
            err(Code::InvalidArgument, R::InvalidQualityPolicy),
        ),
    ] {
        let got = rep.apply_quality_policy(req).await;
        sw.check("Reputation.ApplyQualityPolicy", what, got, want).await;
    }

    // Every RPC has cases of its own beyond the framing ones, or is listed as taking no
    // fields; and every RPC got the framing cases.
    let no_fields = [
        "Auth.WhoAmI",
        "Registry.ListModels",
        "Channels.ListChannels",
        "Operator.GetNodeInfo",
        "Operator.NewOnchainAddress",
        "Operator.GetOnchainBalance",
        "Operator.ListLightningChannels",
        "Operator.SettleNow",
        "Operator.SetSettlementPaused",
        "Operator.ListTokens",
        "Operator.Backup",
    ];
    let names: BTreeSet<&str> = all.iter().map(|r| r.name.as_str()).collect();
    for rpc in &names {
        assert_eq!(garbage_only.get(*rpc), Some(&3), "{rpc}: framing cases");
        let own = sw.cases.get(*rpc).copied().unwrap_or(0);
        // Two are the empty-request cases.
        assert!(
            own > 2 || no_fields.contains(rpc),
            "{rpc} has no hostile-input case of its own: add its fields' cases"
        );
    }
    for rpc in no_fields {
        assert!(names.contains(rpc), "{rpc} is not an RPC");
    }
    let Sweep { failures, cases, .. } = sw;
    let total: usize = cases.values().sum::<usize>() + garbage_only.values().sum::<usize>();
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let mut d = d;
    d.stop().await;
}
