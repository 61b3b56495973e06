//! What a contributor does against the daemon: log in with a signed challenge, register
//! payout destinations, license datasets and revoke licences — every message signed here
//! with the contributor key, so the daemon never holds it.

use crate::connect::{Authed, Bearer, DaemonEndpoint};
use crate::error::ClientError;
use crate::keys::{random_bytes, ContributorKey};
use tonic::transport::Channel;
use tribute_channels::auth::AuthChallenge;
use tribute_channels::codec::Encode;
use tribute_channels::licence::{Licence, Revocation, Uses};
use tribute_channels::registration::ContributorRegistration;
use tribute_channels::{DatasetHash, Network, PublicKey, Signed, Timestamp};
use tribute_proto::v1 as pb;
use tribute_proto::v1::auth_client::AuthClient;
use tribute_proto::v1::registry_client::RegistryClient;

/// A logged-in contributor: a bearer token and what the daemon is.
pub struct Contributor {
    channel: Channel,
    key: ContributorKey,
    token: String,
    network: Network,
    provider_key: PublicKey,
}

/// Where the daemon pays a contributor, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payout {
    /// Node id for keysend payouts.
    pub node_id: Option<[u8; 33]>,
    /// BOLT12 offer (paid through when set).
    pub offer: Option<String>,
    /// When the registration was signed.
    pub registered_at: Timestamp,
}

/// What the daemon said a licence now is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenceStatus {
    /// The licence's id (its signing digest).
    pub licence_id: [u8; 32],
    /// The dataset.
    pub dataset_hash: DatasetHash,
    /// SPDX expression.
    pub spdx_license_id: String,
    /// Permits training.
    pub training: bool,
    /// Permits retrieval.
    pub retrieval: bool,
    /// Validity window.
    pub not_before: Timestamp,
    /// Validity window end ([`Timestamp::MAX`]: none).
    pub not_after: Timestamp,
    /// Revoked from then on, if revoked.
    pub revoked_at: Option<Timestamp>,
}

impl LicenceStatus {
    fn from_pb(call: &'static str, l: &pb::LicenceInfo) -> Result<Self, ClientError> {
        let arr = |b: &[u8], what: &str| -> Result<[u8; 32], ClientError> {
            b.try_into().map_err(|_| ClientError::protocol(call, format!("{what} is not 32 bytes")))
        };
        Ok(LicenceStatus {
            licence_id: arr(&l.licence_id, "licence_id")?,
            dataset_hash: DatasetHash(arr(&l.dataset_hash, "dataset_hash")?),
            spdx_license_id: l.spdx_license_id.clone(),
            training: l.permits_training,
            retrieval: l.permits_retrieval,
            not_before: Timestamp(l.not_before),
            not_after: Timestamp(l.not_after),
            revoked_at: (l.revoked_at != 0).then_some(Timestamp(l.revoked_at)),
        })
    }
}

/// Asks for a challenge, checks it names this contributor (and `expect_provider`, when
/// pinned), signs it, and returns the session token with the challenge that was answered.
pub async fn login(
    channel: Channel,
    key: &ContributorKey,
    expect_provider: Option<PublicKey>,
) -> Result<(String, AuthChallenge), ClientError> {
    const CHALLENGE: &str = "Auth.GetChallenge";
    const LOGIN: &str = "Auth.Login";
    let mut auth = AuthClient::new(channel);
    let answer = auth
        .get_challenge(pb::GetChallengeRequest {
            contributor_key: key.public().to_bytes().to_vec(),
        })
        .await
        .map_err(|s| ClientError::rpc(CHALLENGE, &s))?
        .into_inner();
    let challenge = AuthChallenge::decode(&answer.challenge)
        .map_err(|e| ClientError::protocol(CHALLENGE, format!("challenge does not decode: {e}")))?;
    if challenge.contributor_key != key.public() {
        return Err(ClientError::protocol(CHALLENGE, "the challenge names another contributor"));
    }
    if let Some(p) = expect_provider {
        if challenge.audience != p {
            return Err(ClientError::protocol(
                CHALLENGE,
                format!("the daemon's provider key is {}, expected {p}", challenge.audience),
            ));
        }
    }
    let signed = Signed::sign(challenge.clone(), key.keypair(), &random_bytes()?)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let session = auth
        .login(pb::LoginRequest { signed_challenge: signed.encode() })
        .await
        .map_err(|s| ClientError::rpc(LOGIN, &s))?
        .into_inner();
    Ok((session.token, challenge))
}

impl Contributor {
    /// Connects and logs in with `key` (signed challenge). `network`, when given, must be
    /// the daemon's; `expect_provider` pins the daemon's provider key.
    pub async fn login(
        endpoint: &DaemonEndpoint,
        key: ContributorKey,
        network: Option<Network>,
        expect_provider: Option<PublicKey>,
    ) -> Result<Self, ClientError> {
        let channel = endpoint.connect().await?;
        let (token, challenge) = login(channel.clone(), &key, expect_provider).await?;
        if let Some(n) = network {
            if n != challenge.network {
                return Err(ClientError::Config(format!(
                    "the daemon runs on {:?}, this contributor is configured for {n:?}",
                    challenge.network
                )));
            }
        }
        Ok(Contributor::from_session(channel, key, token, &challenge))
    }

    /// A contributor already logged in on `channel` with `token` (the answer to `challenge`).
    pub fn from_session(
        channel: Channel,
        key: ContributorKey,
        token: String,
        challenge: &AuthChallenge,
    ) -> Self {
        Contributor {
            channel,
            key,
            token,
            network: challenge.network,
            provider_key: challenge.audience,
        }
    }

    /// The payout destination the daemon has for this contributor, with when it was
    /// registered; `None` if it has none.
    pub async fn payout(&self) -> Result<Option<Payout>, ClientError> {
        const CALL: &str = "Registry.GetContributor";
        let c = match self
            .registry()?
            .get_contributor(pb::GetContributorRequest {
                contributor_key: self.key.public().to_bytes().to_vec(),
            })
            .await
        {
            Ok(c) => c.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(ClientError::rpc(CALL, &s)),
        };
        let node_id = match c.node_id.as_slice() {
            [] => None,
            b => Some(
                <[u8; 33]>::try_from(b)
                    .map_err(|_| ClientError::protocol(CALL, "node_id is not 33 bytes"))?,
            ),
        };
        Ok(Some(Payout {
            node_id,
            offer: (!c.bolt12_offer.is_empty()).then_some(c.bolt12_offer),
            registered_at: Timestamp(c.registered_at),
        }))
    }

    /// Registers `node_id` and `offer` as the payout destination unless the daemon has
    /// exactly that already. `true` if it registered. The registration is dated `now`, or
    /// just after the one it replaces (the daemon keeps the newer of two).
    pub async fn ensure_payout(
        &self,
        node_id: [u8; 33],
        offer: Option<String>,
        now: Timestamp,
    ) -> Result<bool, ClientError> {
        let current = self.payout().await?;
        let at = match &current {
            Some(p) if p.node_id == Some(node_id) && p.offer == offer => return Ok(false),
            Some(p) => Timestamp(now.0.max(p.registered_at.0.saturating_add(1))),
            None => now,
        };
        self.register(Some(node_id), offer, at).await?;
        Ok(true)
    }

    /// The contributor key.
    pub fn key(&self) -> &ContributorKey {
        &self.key
    }

    /// The daemon's network.
    pub fn network(&self) -> Network {
        self.network
    }

    /// The daemon's state-signing key.
    pub fn provider_key(&self) -> PublicKey {
        self.provider_key
    }

    /// The session token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The connection to the daemon.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn registry(&self) -> Result<RegistryClient<Authed>, ClientError> {
        Ok(RegistryClient::with_interceptor(self.channel.clone(), Bearer::new(Some(&self.token))?))
    }

    fn sign<M: tribute_channels::Message>(&self, m: M) -> Result<Vec<u8>, ClientError> {
        Ok(Signed::sign(m, self.key.keypair(), &random_bytes()?)
            .map_err(|e| ClientError::Config(e.to_string()))?
            .encode())
    }

    /// Registers where payouts go: a Lightning node id (keysend) and/or a BOLT12 offer.
    pub async fn register(
        &self,
        node_id: Option<[u8; 33]>,
        bolt12_offer: Option<String>,
        now: Timestamp,
    ) -> Result<(), ClientError> {
        let reg = ContributorRegistration {
            network: self.network,
            contributor_key: self.key.public(),
            node_id,
            bolt12_offer,
            registered_at: now,
        };
        reg.validate().map_err(|e| ClientError::Config(e.to_string()))?;
        self.registry()?
            .register_contributor(pb::RegisterContributorRequest {
                signed_registration: self.sign(reg)?,
            })
            .await
            .map_err(|s| ClientError::rpc("Registry.RegisterContributor", &s))?;
        Ok(())
    }

    /// Signs and registers a licence for `dataset_hash`, signed at `now`.
    pub async fn register_licence(
        &self,
        dataset_hash: DatasetHash,
        spdx_license_id: &str,
        uses: Uses,
        not_before: Timestamp,
        not_after: Timestamp,
        now: Timestamp,
    ) -> Result<LicenceStatus, ClientError> {
        const CALL: &str = "Registry.RegisterLicence";
        let licence = Licence {
            network: self.network,
            dataset_hash,
            contributor_key: self.key.public(),
            spdx_license_id: spdx_license_id.to_owned(),
            uses,
            not_before,
            not_after,
            signed_at: now,
        };
        licence.validate().map_err(|e| ClientError::Config(format!("licence: {e}")))?;
        let info = self
            .registry()?
            .register_licence(pb::RegisterLicenceRequest { signed_licence: self.sign(licence)? })
            .await
            .map_err(|s| ClientError::rpc(CALL, &s))?
            .into_inner();
        LicenceStatus::from_pb(CALL, &info)
    }

    /// This contributor's licences (all datasets, or one).
    pub async fn licences(
        &self,
        dataset_hash: Option<DatasetHash>,
    ) -> Result<Vec<LicenceStatus>, ClientError> {
        const CALL: &str = "Registry.ListLicences";
        let list = self
            .registry()?
            .list_licences(pb::ListLicencesRequest {
                contributor_key: self.key.public().to_bytes().to_vec(),
                dataset_hash: dataset_hash.map(|h| h.0.to_vec()).unwrap_or_default(),
            })
            .await
            .map_err(|s| ClientError::rpc(CALL, &s))?
            .into_inner();
        list.licences.iter().map(|l| LicenceStatus::from_pb(CALL, l)).collect()
    }

    /// Revokes this contributor's licence of `dataset_hash` from `revoked_at` on. With
    /// several unrevoked licences for the dataset, `licence_id` must say which.
    pub async fn revoke(
        &self,
        dataset_hash: DatasetHash,
        licence_id: Option<[u8; 32]>,
        revoked_at: Timestamp,
    ) -> Result<LicenceStatus, ClientError> {
        const CALL: &str = "Registry.RevokeLicence";
        let all = self.licences(Some(dataset_hash)).await?;
        let candidates: Vec<&LicenceStatus> = all
            .iter()
            .filter(|l| licence_id.is_none_or(|id| id == l.licence_id))
            .filter(|l| licence_id.is_some() || l.revoked_at.is_none())
            .collect();
        let target = match candidates.as_slice() {
            [one] => *one,
            [] => {
                return Err(ClientError::Config(format!(
                    "no {}licence of yours for dataset {dataset_hash}",
                    if licence_id.is_some() { "such " } else { "unrevoked " }
                )))
            }
            many => {
                let ids: Vec<String> = many.iter().map(|l| hex::encode(l.licence_id)).collect();
                return Err(ClientError::Config(format!(
                    "dataset {dataset_hash} has {} unrevoked licences; pick one with --licence-id: {}",
                    many.len(),
                    ids.join(", ")
                )));
            }
        };
        let rev = Revocation {
            network: self.network,
            dataset_hash,
            contributor_key: self.key.public(),
            licence_id: target.licence_id,
            revoked_at,
        };
        let info = self
            .registry()?
            .revoke_licence(pb::RevokeLicenceRequest { signed_revocation: self.sign(rev)? })
            .await
            .map_err(|s| ClientError::rpc(CALL, &s))?
            .into_inner();
        LicenceStatus::from_pb(CALL, &info)
    }
}
