//! Who is calling, and what they may do.
//!
//! - [`TokenStore`]: bearer tokens bound to a role (and, for contributors, a key), created and
//!   revoked by the operator. Only the SHA-256 of a token is stored; the store keeps every
//!   token in memory too, so authenticating a call is one hash and one map lookup.
//! - [`ChallengeBook`]: contributor login by signing a challenge (`tribute/auth-challenge/v1`)
//!   with the contributor key; a good answer earns a short-lived session token, kept in
//!   memory only.
//! - [`Authenticator`] reads `authorization: Bearer <token>` and finds the [`Caller`];
//!   [`AuthInterceptor`] runs it on every call of every service except `Auth`, refusing
//!   calls without valid credentials and leaving the `Caller` in the request's extensions.
//! - [`require`] / [`require_own_channel`] are the per-RPC policy; [`policy`] lists the
//!   roles each RPC allows, in one table that is tested as a matrix.
//! - [`AuthService`]: the `tribute.v1.Auth` gRPC service. `GetChallenge` and `Login` need no
//!   credentials (that is how a contributor gets some), so the service is mounted without
//!   the interceptor; `WhoAmI` authenticates its own call.
//!
//! Tokens look like `trb_<token id>_<64 hex digits>`: the prefix makes leaked tokens easy
//! for secret scanners to find, and the id lets logs and the CLI name a token without
//! revealing it. The 256 random bits make a plain SHA-256 safe to store: there is nothing
//! to brute-force, so no slow password hash is needed.

use crate::config::{network_name, AuthConfig};
use crate::error::ApiError;
use crate::store::{self, StoreError};
use ldk_node::bitcoin::hashes::{sha256, Hash};
use rusqlite::{params, Connection};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tribute_channels::auth::{AuthChallenge, AuthError};
use tribute_channels::codec::Encode;
use tribute_channels::{Network, PublicKey, Signed, Timestamp};
use tribute_proto::v1::auth_server::Auth;
use tribute_proto::v1::{
    Challenge, ErrorReason, GetChallengeRequest, LoginRequest, LoginResponse, WhoAmIRequest,
    WhoAmIResponse,
};

/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "trb_";
/// Random bytes in a token id (hex in the token).
const TOKEN_ID_BYTES: usize = 8;
/// Random bytes in a token's secret part (hex in the token).
const TOKEN_SECRET_BYTES: usize = 32;
/// Longer `authorization` values are refused before any work is done.
const MAX_TOKEN_LEN: usize = 128;
/// Longest token label, in bytes.
pub const MAX_LABEL_LEN: usize = 128;
/// Longest signed challenge accepted by `Login`, in bytes (the canonical form is 178).
const MAX_SIGNED_CHALLENGE_BYTES: usize = 512;

/// What a caller may do. See DESIGN.md, "Auth".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The inference provider: meters requests, registers models and training runs.
    Provider,
    /// A data contributor: its own channel only.
    Contributor,
    /// Runs the daemon: everything administrative.
    Operator,
    /// Reconciles: read-only reports.
    Accountant,
    /// Submits signed evaluation records (its token is bound to the evaluator key that
    /// signs them; the provider may hold one for its own key).
    Evaluator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] =
        [Role::Provider, Role::Contributor, Role::Operator, Role::Accountant, Role::Evaluator];

    /// The role's name, as stored and as shown: `provider`, `contributor`, `operator`,
    /// `accountant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Provider => "provider",
            Role::Contributor => "contributor",
            Role::Operator => "operator",
            Role::Accountant => "accountant",
            Role::Evaluator => "evaluator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}`: expected provider, contributor, operator, accountant or evaluator")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// The authenticated identity of a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The role the credentials grant.
    pub role: Role,
    /// The key a contributor or evaluator credential is bound to (`None` for other roles):
    /// the contributor key, or the evaluator key that signs evaluation records.
    pub contributor_key: Option<PublicKey>,
    /// The id of the token used (never the token itself), for logs and audit.
    pub token_id: Option<String>,
    /// True only when the daemon runs with `auth.required = false` and the call carried no
    /// credentials: every role check passes, as on a single-user loopback setup (the
    /// daemon refuses that mode on any other address). `role` is then `Operator`.
    pub auth_disabled: bool,
}

impl Caller {
    /// The caller of a daemon running without authentication.
    pub fn unauthenticated_local() -> Caller {
        Caller { role: Role::Operator, contributor_key: None, token_id: None, auth_disabled: true }
    }
}

/// A token as issued: the secret is shown once and never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct NewToken {
    /// The token's id (safe to log, used to revoke it).
    pub token_id: String,
    /// The bearer token, `trb_<token id>_<hex>`.
    pub secret: String,
    /// Last second it is accepted, if it expires.
    pub expires_at: Option<Timestamp>,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("token_id", &self.token_id)
            .field("secret", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A stored token's public facts (for `list`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Id.
    pub token_id: String,
    /// Role it grants.
    pub role: Role,
    /// Contributor key it is bound to (contributor tokens only).
    pub contributor_key: Option<PublicKey>,
    /// The operator's note.
    pub label: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// Last second it is accepted, if it expires.
    pub expires_at: Option<Timestamp>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// A token as the authentication path needs it.
#[derive(Clone, Debug)]
struct CachedToken {
    caller: Caller,
    expires_at: Option<Timestamp>,
    revoked_at: Option<Timestamp>,
}

impl CachedToken {
    fn check(&self, now: Timestamp) -> Result<Caller, ApiError> {
        if self.revoked_at.is_some() {
            return Err(ApiError::new(
                Code::Unauthenticated,
                ErrorReason::TokenRevoked,
                "this token was revoked",
            ));
        }
        if self.expires_at.is_some_and(|e| now > e) {
            return Err(ApiError::new(
                Code::Unauthenticated,
                ErrorReason::TokenExpired,
                "this token has expired",
            ));
        }
        Ok(self.caller.clone())
    }
}

/// Operator-issued bearer tokens: durable in the `tokens` table, mirrored in memory.
///
/// The table is written only through this type, so the in-memory copy is complete: it is
/// loaded once at start-up and every change updates both, table first.
pub struct TokenStore {
    /// Its own connection, so token administration never waits behind metering.
    conn: Mutex<Connection>,
    /// SHA-256 of the token → what it grants. Bounded by the number of rows in `tokens`.
    cache: RwLock<HashMap<[u8; 32], CachedToken>>,
}

impl TokenStore {
    /// Loads every token from `conn` (schema already migrated, see
    /// [`crate::store::initialize`]).
    pub fn open(conn: Connection) -> Result<TokenStore, StoreError> {
        let cache = load_tokens(&conn)?;
        Ok(TokenStore { conn: Mutex::new(conn), cache: RwLock::new(cache) })
    }

    /// Re-reads the table, picking up tokens created or revoked by another process (the
    /// `tributed token` command while the daemon runs).
    pub fn reload(&self) -> Result<(), StoreError> {
        let cache = {
            let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            load_tokens(&conn)?
        };
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = cache;
        Ok(())
    }

    /// Creates a token. Contributor tokens must name the contributor key; other roles must
    /// not. `expires_at`, if given, must be after `now`.
    pub fn create(
        &self,
        role: Role,
        contributor_key: Option<PublicKey>,
        label: &str,
        expires_at: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<NewToken, ApiError> {
        match (role, contributor_key.is_some()) {
            (Role::Contributor | Role::Evaluator, false) => {
                return Err(ApiError::malformed(
                    "contributor_key",
                    format!("a {role} token must be bound to a key"),
                ))
            }
            (Role::Contributor | Role::Evaluator, true) => {}
            (_, true) => {
                return Err(ApiError::malformed(
                    "contributor_key",
                    "only contributor and evaluator tokens are bound to a key",
                ))
            }
            (_, false) => {}
        }
        if label.len() > MAX_LABEL_LEN || label.chars().any(char::is_control) {
            return Err(ApiError::malformed(
                "label",
                format!("at most {MAX_LABEL_LEN} bytes, no control characters"),
            ));
        }
        if expires_at.is_some_and(|e| e <= now) {
            return Err(ApiError::malformed("expires_at", "must be in the future"));
        }

        let (token_id, secret) = new_token_secret()?;
        let hash = token_hash(&secret);
        let conn = lock(&self.conn);
        conn.execute(
            "INSERT INTO tokens (token_hash, token_id, role, contributor_key, label, created_at,
                                 expires_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)",
            params![
                hash.as_slice(),
                token_id,
                role.as_str(),
                contributor_key.map(|k| k.to_bytes().to_vec()),
                label,
                store::u64_to_column(now.0, "created_at")?,
                expires_at.map(|e| store::u64_to_column(e.0, "expires_at")).transpose()?,
            ],
        )
        .map_err(ApiError::storage)?;
        // Still under the connection lock, so cache updates happen in table order.
        let caller = Caller {
            role,
            contributor_key,
            token_id: Some(token_id.clone()),
            auth_disabled: false,
        };
        write(&self.cache).insert(hash, CachedToken { caller, expires_at, revoked_at: None });
        drop(conn);
        Ok(NewToken { token_id, secret, expires_at })
    }

    /// Every stored token (revoked and expired ones too), oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, ApiError> {
        let conn = lock(&self.conn);
        let mut stmt = conn
            .prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, token_id"))
            .map_err(ApiError::storage)?;
        let mut rows = stmt.query([]).map_err(ApiError::storage)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(ApiError::storage)? {
            out.push(token_info(row).map_err(ApiError::storage)?);
        }
        Ok(out)
    }

    /// Revokes a token from `now` on. Revoking a revoked token changes nothing (the first
    /// revocation time stays). An unknown id is `NOT_FOUND`.
    pub fn revoke(&self, token_id: &str, now: Timestamp) -> Result<(), ApiError> {
        let conn = lock(&self.conn);
        let hash: Option<Vec<u8>> = {
            let mut stmt = conn
                .prepare_cached("SELECT token_hash FROM tokens WHERE token_id = ?1")
                .map_err(ApiError::storage)?;
            let mut rows = stmt.query(params![token_id]).map_err(ApiError::storage)?;
            rows.next()
                .map_err(ApiError::storage)?
                .map(|r| r.get(0))
                .transpose()
                .map_err(ApiError::storage)?
        };
        let Some(hash) = hash else {
            return Err(ApiError::new(
                Code::NotFound,
                ErrorReason::MalformedField,
                format!("no token with id `{token_id}`"),
            )
            .with("field", "token_id"));
        };
        let now_column = store::u64_to_column(now.0, "revoked_at")?;
        conn.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE token_id = ?1 AND revoked_at IS NULL",
            params![token_id, now_column],
        )
        .map_err(ApiError::storage)?;
        let hash: [u8; 32] = hash
            .try_into()
            .map_err(|_| ApiError::storage(format!("token {token_id}: corrupt hash")))?;
        if let Some(entry) = write(&self.cache).get_mut(&hash) {
            entry.revoked_at.get_or_insert(now);
        }
        Ok(())
    }

    /// The caller a token stands for: `UNAUTHENTICATED` if unknown, `TOKEN_REVOKED`,
    /// `TOKEN_EXPIRED` (a token is accepted up to and including its `expires_at` second).
    /// Touches only memory.
    pub fn authenticate(&self, secret: &str, now: Timestamp) -> Result<Caller, ApiError> {
        self.authenticate_hash(&token_hash(secret), now).unwrap_or_else(|| Err(unknown_token()))
    }

    fn authenticate_hash(
        &self,
        hash: &[u8; 32],
        now: Timestamp,
    ) -> Option<Result<Caller, ApiError>> {
        read(&self.cache).get(hash).map(|t| t.check(now))
    }
}

/// Every token in the table, by hash.
fn load_tokens(conn: &Connection) -> Result<HashMap<[u8; 32], CachedToken>, StoreError> {
    let mut cache = HashMap::new();
    let mut stmt = conn.prepare(&format!("SELECT {TOKEN_COLUMNS}, token_hash FROM tokens"))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let info = token_info(row)?;
        let hash: Vec<u8> = row.get(7)?;
        let hash: [u8; 32] = hash
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("token {}: hash length", info.token_id)))?;
        let entry = CachedToken {
            caller: Caller {
                role: info.role,
                contributor_key: info.contributor_key,
                token_id: Some(info.token_id),
                auth_disabled: false,
            },
            expires_at: info.expires_at,
            revoked_at: info.revoked_at,
        };
        cache.insert(hash, entry);
    }
    Ok(cache)
}

/// The columns [`token_info`] reads, in order.
const TOKEN_COLUMNS: &str =
    "token_id, role, contributor_key, label, created_at, expires_at, revoked_at";

/// A `tokens` row (selected as [`TOKEN_COLUMNS`]), checked as it is read.
fn token_info(row: &rusqlite::Row<'_>) -> Result<TokenInfo, StoreError> {
    let token_id: String = row.get(0)?;
    let corrupt = |what: &str| StoreError::Corrupt(format!("token {token_id}: {what}"));
    let role: Role = row.get::<_, String>(1)?.parse().map_err(|_| corrupt("unknown role"))?;
    let contributor_key = row
        .get::<_, Option<Vec<u8>>>(2)?
        .map(|k| {
            <[u8; 32]>::try_from(k)
                .ok()
                .and_then(|b| PublicKey::from_bytes(b).ok())
                .ok_or_else(|| corrupt("contributor key"))
        })
        .transpose()?;
    if matches!(role, Role::Contributor | Role::Evaluator) != contributor_key.is_some() {
        return Err(corrupt("a key must be set for contributors and evaluators, and only them"));
    }
    let ts = |v: Option<i64>, what| {
        v.map(|v| store::u64_from_column(v, what).map(Timestamp)).transpose()
    };
    Ok(TokenInfo {
        role,
        contributor_key,
        label: row.get(3)?,
        created_at: Timestamp(store::u64_from_column(row.get(4)?, "created_at")?),
        expires_at: ts(row.get(5)?, "expires_at")?,
        revoked_at: ts(row.get(6)?, "revoked_at")?,
        token_id,
    })
}

/// Limits of the challenge login, from [`AuthConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChallengeLimits {
    /// Seconds a challenge may be answered.
    pub challenge_ttl_secs: u64,
    /// Seconds a session token lasts.
    pub session_ttl_secs: u64,
    /// Most unanswered challenges kept.
    pub max_outstanding_challenges: usize,
    /// Most sessions kept.
    pub max_sessions: usize,
}

impl From<&AuthConfig> for ChallengeLimits {
    fn from(c: &AuthConfig) -> Self {
        ChallengeLimits {
            challenge_ttl_secs: c.challenge_ttl_secs,
            session_ttl_secs: c.session_ttl_secs,
            max_outstanding_challenges: c.max_outstanding_challenges,
            max_sessions: c.max_sessions,
        }
    }
}

impl Default for ChallengeLimits {
    fn default() -> Self {
        (&AuthConfig::default()).into()
    }
}

/// Outstanding challenges, oldest first. `order` may hold nonces already answered (they
/// are skipped when reached); it is bounded at twice the map's bound.
#[derive(Default)]
struct Challenges {
    by_nonce: HashMap<[u8; 32], AuthChallenge>,
    order: VecDeque<[u8; 32]>,
}

/// Live sessions, oldest first (all have the same lifetime, so oldest = first to expire).
#[derive(Default)]
struct Sessions {
    by_hash: HashMap<[u8; 32], CachedToken>,
    order: VecDeque<[u8; 32]>,
}

/// A session token earned by a challenge login.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// The bearer token, `trb_<token id>_<hex>`.
    pub token: String,
    /// Its id.
    pub token_id: String,
    /// The contributor it is bound to.
    pub contributor_key: PublicKey,
    /// Last second it is accepted.
    pub expires_at: Timestamp,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("token", &"***")
            .field("token_id", &self.token_id)
            .field("contributor_key", &self.contributor_key)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Contributor login by signed challenge, and the session tokens it issues.
///
/// Challenges are single-use: an answer consumes its challenge whether or not it is good,
/// so an answer can never be replayed. Both books are bounded; past a bound the oldest
/// entry is dropped. Nothing here is persisted: after a restart contributors log in again.
pub struct ChallengeBook {
    network: Network,
    provider_key: PublicKey,
    limits: ChallengeLimits,
    challenges: Mutex<Challenges>,
    sessions: RwLock<Sessions>,
}

impl ChallengeBook {
    /// A book for the daemon whose state-signing key is `provider_key` (the challenges'
    /// audience) on `network`.
    pub fn new(network: Network, provider_key: PublicKey, limits: ChallengeLimits) -> Self {
        ChallengeBook {
            network,
            provider_key,
            limits,
            challenges: Mutex::new(Challenges::default()),
            sessions: RwLock::new(Sessions::default()),
        }
    }

    /// The daemon's network.
    pub fn network(&self) -> Network {
        self.network
    }

    /// The daemon's provider key.
    pub fn provider_key(&self) -> PublicKey {
        self.provider_key
    }

    /// Issues a fresh challenge for `contributor_key`, answerable until
    /// `now + challenge_ttl_secs`.
    pub fn issue(
        &self,
        contributor_key: PublicKey,
        now: Timestamp,
    ) -> Result<AuthChallenge, ApiError> {
        let challenge = AuthChallenge {
            network: self.network,
            audience: self.provider_key,
            contributor_key,
            nonce: random_array()?,
            issued_at: now,
            expires_at: Timestamp(now.0.saturating_add(self.limits.challenge_ttl_secs)),
        };
        let max = self.limits.max_outstanding_challenges.max(1);
        let mut book = lock(&self.challenges);
        // Drop answered, expired and (past the bound) oldest challenges from the front.
        while let Some(front) = book.order.front().copied() {
            let drop_it = match book.by_nonce.get(&front) {
                None => true,
                Some(c) => now > c.expires_at || book.by_nonce.len() >= max,
            } || book.order.len() >= 2 * max;
            if !drop_it {
                break;
            }
            book.order.pop_front();
            book.by_nonce.remove(&front);
        }
        book.by_nonce.insert(challenge.nonce, challenge.clone());
        book.order.push_back(challenge.nonce);
        Ok(challenge)
    }

    /// Checks a signed answer and, if it is good, issues a session token for the
    /// contributor role bound to the signer's key. Refused with `CHALLENGE_FAILED` (unknown,
    /// already used, expired or altered challenge) or `BAD_SIGNATURE`.
    pub fn login(
        &self,
        answer: &Signed<AuthChallenge>,
        now: Timestamp,
    ) -> Result<Session, ApiError> {
        let issued =
            lock(&self.challenges).by_nonce.remove(&answer.message.nonce).ok_or_else(|| {
                ApiError::new(
                    Code::Unauthenticated,
                    ErrorReason::ChallengeFailed,
                    "unknown or already used challenge: ask for a new one",
                )
            })?;
        let contributor_key = issued.check_answer(answer, now).map_err(|e| match e {
            AuthError::BadSignature => ApiError::new(
                Code::Unauthenticated,
                ErrorReason::BadSignature,
                "the answer is not signed by the challenge's contributor key",
            ),
            AuthError::Expired | AuthError::ChallengeMismatch => ApiError::new(
                Code::Unauthenticated,
                ErrorReason::ChallengeFailed,
                format!("{e}: ask for a new challenge"),
            ),
        })?;

        let (token_id, token) = new_token_secret()?;
        let expires_at = Timestamp(now.0.saturating_add(self.limits.session_ttl_secs));
        let hash = token_hash(&token);
        let entry = CachedToken {
            caller: Caller {
                role: Role::Contributor,
                contributor_key: Some(contributor_key),
                token_id: Some(token_id.clone()),
                auth_disabled: false,
            },
            expires_at: Some(expires_at),
            revoked_at: None,
        };
        let max = self.limits.max_sessions.max(1);
        let mut sessions = write(&self.sessions);
        while let Some(front) = sessions.order.front().copied() {
            let expired =
                sessions.by_hash.get(&front).is_none_or(|s| s.expires_at.is_some_and(|e| now > e));
            if !expired && sessions.by_hash.len() < max {
                break;
            }
            sessions.order.pop_front();
            sessions.by_hash.remove(&front);
        }
        sessions.by_hash.insert(hash, entry);
        sessions.order.push_back(hash);
        Ok(Session { token, token_id, contributor_key, expires_at })
    }

    /// Number of unanswered challenges held (some may have expired but not been dropped).
    pub fn outstanding_challenges(&self) -> usize {
        lock(&self.challenges).by_nonce.len()
    }

    /// Number of sessions held (some may have expired but not been dropped).
    pub fn live_sessions(&self) -> usize {
        read(&self.sessions).by_hash.len()
    }

    fn authenticate_hash(
        &self,
        hash: &[u8; 32],
        now: Timestamp,
    ) -> Option<Result<Caller, ApiError>> {
        read(&self.sessions).by_hash.get(hash).map(|t| t.check(now))
    }
}

/// Finds the caller of a call from its credentials: stored tokens and session tokens.
pub struct Authenticator {
    tokens: Arc<TokenStore>,
    challenges: Arc<ChallengeBook>,
    required: bool,
}

impl Authenticator {
    /// `required = false` lets calls without credentials through as
    /// [`Caller::unauthenticated_local`]; credentials that are present are still checked.
    pub fn new(tokens: Arc<TokenStore>, challenges: Arc<ChallengeBook>, required: bool) -> Self {
        Authenticator { tokens, challenges, required }
    }

    /// The token store (for token administration).
    pub fn tokens(&self) -> &Arc<TokenStore> {
        &self.tokens
    }

    /// The challenge book (for the `Auth` service).
    pub fn challenges(&self) -> &Arc<ChallengeBook> {
        &self.challenges
    }

    /// Whether calls must carry credentials.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The caller of a call with these request headers, at the current time.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        self.authenticate_at(metadata, unix_now())
    }

    /// [`authenticate`](Self::authenticate) at time `now`.
    pub fn authenticate_at(
        &self,
        metadata: &MetadataMap,
        now: Timestamp,
    ) -> Result<Caller, ApiError> {
        match bearer_token(metadata)? {
            Some(token) => self.authenticate_token(token, now),
            None if !self.required => Ok(Caller::unauthenticated_local()),
            None => Err(ApiError::new(
                Code::Unauthenticated,
                ErrorReason::Unauthenticated,
                "no credentials: send `authorization: Bearer <token>`",
            )),
        }
    }

    /// The caller a bearer token stands for (stored token or session).
    pub fn authenticate_token(&self, token: &str, now: Timestamp) -> Result<Caller, ApiError> {
        if token.len() > MAX_TOKEN_LEN || !token.starts_with(TOKEN_PREFIX) {
            return Err(ApiError::new(
                Code::Unauthenticated,
                ErrorReason::Unauthenticated,
                format!("not a Tribute token (they start with `{TOKEN_PREFIX}`)"),
            ));
        }
        let hash = token_hash(token);
        self.tokens
            .authenticate_hash(&hash, now)
            .or_else(|| self.challenges.authenticate_hash(&hash, now))
            .unwrap_or_else(|| Err(unknown_token()))
    }

    /// An interceptor for every service except `Auth`: refuses calls without valid
    /// credentials and puts the [`Caller`] in the request's extensions (read it with
    /// [`caller`] or [`authorize`]).
    pub fn interceptor(self: &Arc<Self>) -> AuthInterceptor {
        AuthInterceptor { auth: Arc::clone(self) }
    }
}

/// The `tonic` interceptor made by [`Authenticator::interceptor`]:
/// `MeteringServer::with_interceptor(svc, auth.interceptor())`.
#[derive(Clone)]
pub struct AuthInterceptor {
    auth: Arc<Authenticator>,
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.auth.authenticate(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller the interceptor identified. `UNAUTHENTICATED` when there is none, which also
/// covers a service mounted without the interceptor: the mistake fails closed.
pub fn caller<T>(request: &Request<T>) -> Result<&Caller, ApiError> {
    request.extensions().get::<Caller>().ok_or_else(|| {
        ApiError::new(Code::Unauthenticated, ErrorReason::Unauthenticated, "not authenticated")
    })
}

/// The caller, if its role is in `allowed`: [`caller`] then [`require`].
pub fn authorize<T>(request: &Request<T>, allowed: &[Role]) -> Result<Caller, ApiError> {
    let caller = caller(request)?;
    require(caller, allowed)?;
    Ok(caller.clone())
}

/// `PERMISSION_DENIED` + `WRONG_ROLE` unless the caller's role is in `allowed`.
pub fn require(caller: &Caller, allowed: &[Role]) -> Result<(), ApiError> {
    if caller.auth_disabled || allowed.contains(&caller.role) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
    Err(ApiError::new(
        Code::PermissionDenied,
        ErrorReason::WrongRole,
        format!("role {} may not do this (allowed: {})", caller.role, names.join(", ")),
    )
    .with("role", caller.role.as_str())
    .with("allowed", names.join(",")))
}

/// `PERMISSION_DENIED` + `NOT_YOUR_CHANNEL` if a contributor asks about another
/// contributor's channel. Other roles may see any channel once [`require`] let them in.
pub fn require_own_channel(caller: &Caller, contributor_key: &PublicKey) -> Result<(), ApiError> {
    if caller.role != Role::Contributor || caller.auth_disabled {
        return Ok(());
    }
    if caller.contributor_key.as_ref() == Some(contributor_key) {
        return Ok(());
    }
    Err(ApiError::new(
        Code::PermissionDenied,
        ErrorReason::NotYourChannel,
        "contributors may only see their own channel",
    )
    .with("contributor_key", contributor_key.to_hex()))
}

/// The contributor a channel request is about: the requested key (checked with
/// [`require_own_channel`]), or, when none is given, the caller's own key.
pub fn channel_subject(
    caller: &Caller,
    requested: Option<PublicKey>,
) -> Result<PublicKey, ApiError> {
    match requested {
        Some(key) => require_own_channel(caller, &key).map(|()| key),
        None => caller.contributor_key.ok_or_else(|| {
            ApiError::malformed("contributor_key", "required unless the caller is a contributor")
        }),
    }
}

/// Which roles each RPC allows: the one table the services consult, so the policy can be
/// read (and is tested) in one place. Contributor access to a particular channel or
/// receipt is further limited by [`require_own_channel`]; signed registrations are
/// additionally checked against their signer by the registry.
pub mod policy {
    use super::Role::{self, Accountant, Contributor, Evaluator, Operator, Provider};

    /// `Metering.Meter`, `Metering.MeterStream`.
    pub const METER: &[Role] = &[Provider];
    /// `Registry.RegisterModel`, `Registry.RegisterTrainingRun`.
    pub const REGISTER_MODEL: &[Role] = &[Provider, Operator];
    /// `Registry.RegisterContributor`, `RegisterLicence`, `RevokeLicence` (signed by the
    /// contributor key, which the registry checks).
    pub const REGISTER_CONTRIBUTION: &[Role] = &[Contributor, Operator];
    /// `Registry.Get*` / `List*`: models, licences, attribution are public to every role.
    pub const READ_REGISTRY: &[Role] = &[Provider, Contributor, Operator, Accountant, Evaluator];
    /// `Reputation.SubmitEvaluation` (the record's signer must be the token's key).
    pub const SUBMIT_EVALUATION: &[Role] = &[Evaluator];
    /// `Reputation.GetReputation` / `ListReputation`: public, like the registry.
    pub const READ_REPUTATION: &[Role] = &[Provider, Contributor, Operator, Accountant, Evaluator];
    /// `Channels.SubscribeChannel`, `Channels.GetChannel` (contributors: own channel only).
    pub const READ_CHANNEL: &[Role] = &[Contributor, Operator, Accountant];
    /// `Channels.ListChannels`.
    pub const LIST_CHANNELS: &[Role] = &[Operator, Accountant];
    /// `Receipts.GetReceipt` (contributors: receipts of their own channel only).
    pub const READ_RECEIPT: &[Role] = &[Provider, Contributor, Operator, Accountant];
    /// Reports and reconciliation exports.
    pub const REPORTS: &[Role] = &[Operator, Accountant];
    /// Token administration, settlement control, pausing, channel open/close.
    pub const ADMIN: &[Role] = &[Operator];
    /// `Auth.WhoAmI`.
    pub const ANY: &[Role] = &Role::ALL;
}

/// Refuses listener settings that would expose the API: a non-loopback address needs TLS
/// (bearer tokens must not cross a network in clear) and authentication.
pub fn check_listen_policy(
    addr: &SocketAddr,
    tls_configured: bool,
    auth_required: bool,
) -> Result<(), String> {
    if is_loopback(addr) {
        return Ok(());
    }
    if !auth_required {
        return Err(format!(
            "refusing to run unauthenticated on non-loopback address {addr}: set auth.required \
             = true, or listen on 127.0.0.1"
        ));
    }
    if !tls_configured {
        return Err(format!(
            "refusing to listen on non-loopback address {addr} without TLS: bearer tokens would \
             cross the network in clear; configure [tls] cert_path and key_path, or listen on \
             127.0.0.1"
        ));
    }
    Ok(())
}

/// Whether only this machine can reach `addr`. IPv4-mapped IPv6 loopback
/// (`::ffff:127.0.0.1`) counts; the unspecified address (`0.0.0.0`, `::`) does not.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The `tribute.v1.Auth` service. Mount it *without* the interceptor:
/// `AuthServer::new(AuthService::new(auth))`.
pub struct AuthService {
    auth: Arc<Authenticator>,
}

impl AuthService {
    /// The service over `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        AuthService { auth }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn get_challenge(
        &self,
        request: Request<GetChallengeRequest>,
    ) -> Result<Response<Challenge>, Status> {
        let key = parse_key(&request.get_ref().contributor_key, "contributor_key")?;
        let challenge = self.auth.challenges.issue(key, unix_now())?;
        Ok(Response::new(Challenge { challenge: challenge.encode() }))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let bytes = &request.get_ref().signed_challenge;
        if bytes.len() > MAX_SIGNED_CHALLENGE_BYTES {
            return Err(ApiError::malformed("signed_challenge", "too long").into());
        }
        let answer = Signed::<AuthChallenge>::decode(bytes)
            .map_err(|e| ApiError::malformed("signed_challenge", e.to_string()))?;
        let session = self.auth.challenges.login(&answer, unix_now())?;
        tracing::info!(
            contributor = %session.contributor_key,
            token_id = %session.token_id,
            "contributor logged in"
        );
        Ok(Response::new(LoginResponse { token: session.token, expires_at: session.expires_at.0 }))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        // Mounted without the interceptor (GetChallenge and Login must work without
        // credentials), so this call authenticates itself.
        let caller = self.auth.authenticate(request.metadata())?;
        let book = &self.auth.challenges;
        Ok(Response::new(WhoAmIResponse {
            role: caller.role.as_str().to_owned(),
            contributor_key: caller
                .contributor_key
                .map(|k| k.to_bytes().to_vec())
                .unwrap_or_default(),
            provider_key: book.provider_key.to_bytes().to_vec(),
            network: network_name(book.network).to_owned(),
        }))
    }
}

fn parse_key(bytes: &[u8], field: &str) -> Result<PublicKey, ApiError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| ApiError::malformed(field, "expected a 32-byte x-only public key"))?;
    PublicKey::from_bytes(bytes).map_err(|_| ApiError::malformed(field, "not a valid public key"))
}

/// The bearer token in `authorization`, if the header is present.
fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::new(
            Code::Unauthenticated,
            ErrorReason::Unauthenticated,
            "malformed authorization header: expected `Bearer <token>`",
        )
    };
    let text = value.to_str().map_err(|_| malformed())?;
    // The scheme is case-insensitive (RFC 7235).
    let (scheme, token) = text.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(malformed());
    }
    Ok(Some(token.trim()))
}

fn unknown_token() -> ApiError {
    ApiError::new(Code::Unauthenticated, ErrorReason::Unauthenticated, "unknown token")
}

fn token_hash(secret: &str) -> [u8; 32] {
    sha256::Hash::hash(secret.as_bytes()).to_byte_array()
}

/// A fresh (token id, token).
fn new_token_secret() -> Result<(String, String), ApiError> {
    let token_id = hex::encode(random_array::<TOKEN_ID_BYTES>()?);
    let secret = hex::encode(random_array::<TOKEN_SECRET_BYTES>()?);
    let token = format!("{TOKEN_PREFIX}{token_id}_{secret}");
    Ok((token_id, token))
}

fn random_array<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|e| {
        ApiError::new(Code::Internal, ErrorReason::Internal, format!("no randomness: {e}"))
    })?;
    Ok(out)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

// The guarded maps stay consistent even if a holder panicked (every update is a single
// insert or remove), so a poisoned lock is used as is rather than failing every later call.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldk_node::bitcoin::secp256k1::{Keypair, SecretKey};
    use tonic::metadata::MetadataValue;
    use tonic::service::Interceptor;
    use tribute_channels::sign::secp;

    const NOW: Timestamp = Timestamp(1_700_000_000);

    fn keypair(seed: u8) -> Keypair {
        Keypair::from_secret_key(secp(), &SecretKey::from_slice(&[seed; 32]).unwrap())
    }

    fn key(seed: u8) -> PublicKey {
        keypair(seed).x_only_public_key().0.into()
    }

    fn reason(e: &ApiError) -> ErrorReason {
        e.reason
    }

    fn token_store() -> (tempfile::TempDir, std::path::PathBuf, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tribute.sqlite");
        let conn = store::initialize(&path, store::Durability::Full).unwrap();
        (dir, path.clone(), TokenStore::open(conn).unwrap())
    }

    fn book() -> ChallengeBook {
        ChallengeBook::new(Network::Regtest, key(1), ChallengeLimits::default())
    }

    fn sign(challenge: AuthChallenge, kp: &Keypair) -> Signed<AuthChallenge> {
        Signed::sign(challenge, kp, &[0u8; 32]).unwrap()
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).unwrap());
        md
    }

    #[test]
    fn roles_round_trip_their_names() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("admin".parse::<Role>().is_err());
        assert!("Operator".parse::<Role>().is_err(), "names are exact");
    }

    #[test]
    fn token_create_authenticate_revoke_expire() {
        let (_dir, path, tokens) = token_store();
        let op = tokens.create(Role::Operator, None, "ops laptop", None, NOW).unwrap();
        assert!(op.secret.starts_with(&format!("trb_{}_", op.token_id)));
        assert_eq!(op.secret.len(), 4 + 16 + 1 + 64);
        let caller = tokens.authenticate(&op.secret, NOW).unwrap();
        assert_eq!(caller.role, Role::Operator);
        assert_eq!(caller.token_id.as_deref(), Some(op.token_id.as_str()));
        assert_eq!(caller.contributor_key, None);

        let c = tokens.create(Role::Contributor, Some(key(5)), "", None, NOW).unwrap();
        assert_eq!(tokens.authenticate(&c.secret, NOW).unwrap().contributor_key, Some(key(5)));

        // Binding rules.
        for (role, k) in [(Role::Contributor, None), (Role::Provider, Some(key(5)))] {
            let e = tokens.create(role, k, "", None, NOW).unwrap_err();
            assert_eq!(reason(&e), ErrorReason::MalformedField);
        }
        assert!(tokens.create(Role::Provider, None, "x", Some(NOW), NOW).is_err(), "past expiry");
        assert!(tokens.create(Role::Provider, None, "a\nb", None, NOW).is_err(), "control char");

        // Unknown and tampered tokens.
        let e = tokens.authenticate("trb_0000_1111", NOW).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::Unauthenticated, ErrorReason::Unauthenticated));
        let mut tampered = op.secret.clone();
        tampered.pop();
        tampered.push('x');
        assert!(tokens.authenticate(&tampered, NOW).is_err());

        // Expiry: accepted through its last second.
        let exp = Timestamp(NOW.0 + 10);
        let p = tokens.create(Role::Provider, None, "ci", Some(exp), NOW).unwrap();
        assert_eq!(tokens.authenticate(&p.secret, exp).unwrap().role, Role::Provider);
        let e = tokens.authenticate(&p.secret, Timestamp(exp.0 + 1)).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::Unauthenticated, ErrorReason::TokenExpired));

        // Revocation is immediate and idempotent.
        tokens.revoke(&op.token_id, Timestamp(NOW.0 + 5)).unwrap();
        let e = tokens.authenticate(&op.secret, Timestamp(NOW.0 + 5)).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::Unauthenticated, ErrorReason::TokenRevoked));
        tokens.revoke(&op.token_id, Timestamp(NOW.0 + 9)).unwrap();
        let e = tokens.revoke("nope", NOW).unwrap_err();
        assert_eq!(e.code, Code::NotFound);

        let list = tokens.list().unwrap();
        assert_eq!(list.len(), 3);
        let op_info = list.iter().find(|t| t.token_id == op.token_id).unwrap();
        assert_eq!(op_info.revoked_at, Some(Timestamp(NOW.0 + 5)), "first revocation kept");
        assert_eq!(op_info.label, "ops laptop");
        assert_eq!(op_info.created_at, NOW);
        let c_info = list.iter().find(|t| t.token_id == c.token_id).unwrap();
        assert_eq!((c_info.role, c_info.contributor_key), (Role::Contributor, Some(key(5))));

        // A restart rebuilds the same view from the table.
        drop(tokens);
        let tokens =
            TokenStore::open(store::connect(&path, store::Durability::Full).unwrap()).unwrap();
        assert_eq!(
            tokens.authenticate(&op.secret, NOW).unwrap_err().reason,
            ErrorReason::TokenRevoked
        );
        assert_eq!(tokens.authenticate(&c.secret, NOW).unwrap().contributor_key, Some(key(5)));
        assert_eq!(
            tokens.authenticate(&p.secret, Timestamp(exp.0 + 1)).unwrap_err().reason,
            ErrorReason::TokenExpired
        );
        assert_eq!(tokens.list().unwrap(), list);
    }

    #[test]
    fn corrupt_rows_stop_the_load() {
        let (_dir, path, tokens) = token_store();
        tokens.create(Role::Provider, None, "", None, NOW).unwrap();
        drop(tokens);
        let conn = store::connect(&path, store::Durability::Full).unwrap();
        conn.execute("UPDATE tokens SET role = 'contributor'", []).unwrap();
        let e = TokenStore::open(conn).err().unwrap();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        let conn = store::connect(&path, store::Durability::Full).unwrap();
        conn.execute("UPDATE tokens SET role = 'admin'", []).unwrap();
        assert!(matches!(TokenStore::open(conn), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn only_the_hash_is_stored() {
        let (dir, path, tokens) = token_store();
        let t = tokens.create(Role::Provider, None, "label", None, NOW).unwrap();
        let conn = store::connect(&path, store::Durability::Full).unwrap();
        let stored: Vec<u8> = conn
            .query_row("SELECT token_hash FROM tokens WHERE token_id = ?1", [&t.token_id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stored, sha256::Hash::hash(t.secret.as_bytes()).to_byte_array().to_vec());
        drop(conn);
        drop(tokens);
        // Neither the database nor its WAL holds the secret part, in any form.
        let secret_part = t.secret.rsplit('_').next().unwrap().to_owned();
        let secret_raw = hex::decode(&secret_part).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(secret_part.len()).any(|w| w == secret_part.as_bytes()));
            assert!(!bytes.windows(secret_raw.len()).any(|w| w == secret_raw.as_slice()));
        }
    }

    #[test]
    fn challenge_login_happy_path_and_session() {
        let book = book();
        let kp = keypair(7);
        let challenge = book.issue(key(7), NOW).unwrap();
        assert_eq!(challenge.audience, key(1));
        assert_eq!(challenge.network, Network::Regtest);
        assert_eq!(challenge.expires_at, Timestamp(NOW.0 + 60));
        let session = book.login(&sign(challenge, &kp), Timestamp(NOW.0 + 60)).unwrap();
        assert_eq!(session.contributor_key, key(7));
        assert_eq!(session.expires_at, Timestamp(NOW.0 + 60 + 3600));
        assert!(session.token.starts_with(&format!("trb_{}_", session.token_id)));
        assert!(!format!("{session:?}").contains(&session.token), "token not in Debug");

        let caller = book.authenticate_hash(&token_hash(&session.token), NOW).unwrap().unwrap();
        assert_eq!(caller.role, Role::Contributor);
        assert_eq!(caller.contributor_key, Some(key(7)));
        let late = Timestamp(session.expires_at.0 + 1);
        let e = book.authenticate_hash(&token_hash(&session.token), late).unwrap().unwrap_err();
        assert_eq!(e.reason, ErrorReason::TokenExpired);
    }

    #[test]
    fn challenge_answers_refused() {
        let book = book();
        let kp = keypair(7);

        // Replay: a challenge is single-use.
        let answer = sign(book.issue(key(7), NOW).unwrap(), &kp);
        book.login(&answer, NOW).unwrap();
        let e = book.login(&answer, NOW).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::Unauthenticated, ErrorReason::ChallengeFailed));

        // Expired (and consumed by the attempt).
        let answer = sign(book.issue(key(7), NOW).unwrap(), &kp);
        let e = book.login(&answer, Timestamp(NOW.0 + 61)).unwrap_err();
        assert_eq!(e.reason, ErrorReason::ChallengeFailed);
        assert!(e.message.contains("expired"), "{e}");
        assert_eq!(book.login(&answer, NOW).unwrap_err().reason, ErrorReason::ChallengeFailed);

        // An answer for a nonce that was never issued.
        let issued = book.issue(key(7), NOW).unwrap();
        let mut forged = issued.clone();
        forged.nonce = [9; 32];
        let e = book.login(&sign(forged, &kp), NOW).unwrap_err();
        assert_eq!(e.reason, ErrorReason::ChallengeFailed);

        // The issued nonce, but the answer altered (longer expiry): refused and consumed.
        let mut altered = issued.clone();
        altered.expires_at = Timestamp(NOW.0 + 10_000);
        let e = book.login(&sign(altered, &kp), NOW).unwrap_err();
        assert_eq!(e.reason, ErrorReason::ChallengeFailed);
        assert_eq!(
            book.login(&sign(issued, &kp), NOW).unwrap_err().reason,
            ErrorReason::ChallengeFailed
        );

        // Someone else's key cannot answer a challenge for key 7.
        let issued = book.issue(key(7), NOW).unwrap();
        let mut theirs = sign(issued.clone(), &kp);
        theirs.signature = sign_as_other(&issued);
        let e = book.login(&theirs, NOW).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::Unauthenticated, ErrorReason::BadSignature));

        // A challenge for another audience (another daemon) is not ours.
        let other = ChallengeBook::new(Network::Regtest, key(2), ChallengeLimits::default());
        let foreign = sign(other.issue(key(7), NOW).unwrap(), &kp);
        assert_eq!(book.login(&foreign, NOW).unwrap_err().reason, ErrorReason::ChallengeFailed);
        assert_eq!(book.live_sessions(), 1);
    }

    /// A valid BIP340 signature over the challenge's digest, by a key that is not its
    /// contributor.
    fn sign_as_other(c: &AuthChallenge) -> ldk_node::bitcoin::secp256k1::schnorr::Signature {
        use tribute_channels::Message;
        let digest = ldk_node::bitcoin::secp256k1::Message::from_digest(c.signing_digest());
        secp().sign_schnorr_with_aux_rand(&digest, &keypair(8), &[0u8; 32])
    }

    #[test]
    fn books_are_bounded() {
        let limits = ChallengeLimits {
            challenge_ttl_secs: 60,
            session_ttl_secs: 3600,
            max_outstanding_challenges: 3,
            max_sessions: 2,
        };
        let book = ChallengeBook::new(Network::Regtest, key(1), limits);
        let kp = keypair(7);
        let first = book.issue(key(7), NOW).unwrap();
        for _ in 0..3 {
            book.issue(key(7), NOW).unwrap();
        }
        assert_eq!(book.outstanding_challenges(), 3);
        let e = book.login(&sign(first, &kp), NOW).unwrap_err();
        assert_eq!(e.reason, ErrorReason::ChallengeFailed, "oldest evicted");
        // Answered challenges leave the queue too; it stays bounded.
        for _ in 0..100 {
            let c = book.issue(key(7), NOW).unwrap();
            book.login(&sign(c, &kp), NOW).unwrap();
        }
        assert!(lock(&book.challenges).order.len() <= 6);
        assert_eq!(book.live_sessions(), 2);
        // Expired challenges are dropped on the next issue.
        book.issue(key(7), Timestamp(NOW.0 + 1000)).unwrap();
        assert_eq!(book.outstanding_challenges(), 1);
    }

    #[test]
    fn authenticator_reads_bearer_tokens() {
        let (_dir, _path, tokens) = token_store();
        let p = tokens.create(Role::Provider, None, "", None, NOW).unwrap();
        let book = Arc::new(book());
        let challenge = book.issue(key(7), NOW).unwrap();
        let session = book.login(&sign(challenge, &keypair(7)), NOW).unwrap();
        let auth = Authenticator::new(Arc::new(tokens), book, true);

        assert_eq!(auth.authenticate_at(&bearer(&p.secret), NOW).unwrap().role, Role::Provider);
        let s = auth.authenticate_at(&bearer(&session.token), NOW).unwrap();
        assert_eq!((s.role, s.contributor_key), (Role::Contributor, Some(key(7))));

        let mut md = MetadataMap::new();
        md.insert(
            "authorization",
            MetadataValue::try_from(format!("bearer {}", p.secret)).unwrap(),
        );
        assert!(auth.authenticate_at(&md, NOW).is_ok(), "scheme is case-insensitive");

        let e = auth.authenticate_at(&MetadataMap::new(), NOW).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::Unauthenticated, ErrorReason::Unauthenticated));
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer abc", "Token trb_x"] {
            let mut md = MetadataMap::new();
            md.insert("authorization", MetadataValue::try_from(bad).unwrap());
            let e = auth.authenticate_at(&md, NOW).unwrap_err();
            assert_eq!(e.reason, ErrorReason::Unauthenticated, "{bad}");
        }
        let long = format!("trb_{}", "a".repeat(200));
        assert!(auth.authenticate_at(&bearer(&long), NOW).is_err());
    }

    #[test]
    fn auth_disabled_admits_anonymous_calls_but_still_checks_presented_tokens() {
        let (_dir, _path, tokens) = token_store();
        let auth = Authenticator::new(Arc::new(tokens), Arc::new(book()), false);
        let c = auth.authenticate_at(&MetadataMap::new(), NOW).unwrap();
        assert_eq!(c, Caller::unauthenticated_local());
        for allowed in [policy::METER, policy::ADMIN, policy::READ_CHANNEL] {
            require(&c, allowed).unwrap();
        }
        require_own_channel(&c, &key(3)).unwrap();
        assert!(auth.authenticate_at(&bearer("trb_00_11"), NOW).is_err());
    }

    #[test]
    fn interceptor_refuses_or_attaches_the_caller() {
        let (_dir, _path, tokens) = token_store();
        let p = tokens.create(Role::Provider, None, "", None, NOW).unwrap();
        let auth = Arc::new(Authenticator::new(Arc::new(tokens), Arc::new(book()), true));
        let mut icpt = auth.interceptor();

        let status = icpt.call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(tribute_proto::error_reason(&status), Some(ErrorReason::Unauthenticated));

        let mut req = Request::new(());
        *req.metadata_mut() = bearer(&p.secret);
        let req = icpt.call(req).unwrap();
        assert_eq!(caller(&req).unwrap().role, Role::Provider);
        assert_eq!(authorize(&req, policy::METER).unwrap().role, Role::Provider);
        let e = authorize(&req, policy::ADMIN).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::PermissionDenied, ErrorReason::WrongRole));

        // A service mounted without the interceptor fails closed.
        let e = caller(&Request::new(())).unwrap_err();
        assert_eq!(e.reason, ErrorReason::Unauthenticated);
    }

    #[test]
    fn role_policy_matrix() {
        use Role::*;
        // Columns: Provider, Contributor, Operator, Accountant, Evaluator.
        let matrix: &[(&str, &[Role], [bool; 5])] = &[
            ("METER", policy::METER, [true, false, false, false, false]),
            ("REGISTER_MODEL", policy::REGISTER_MODEL, [true, false, true, false, false]),
            (
                "REGISTER_CONTRIBUTION",
                policy::REGISTER_CONTRIBUTION,
                [false, true, true, false, false],
            ),
            ("READ_REGISTRY", policy::READ_REGISTRY, [true, true, true, true, true]),
            ("READ_CHANNEL", policy::READ_CHANNEL, [false, true, true, true, false]),
            ("LIST_CHANNELS", policy::LIST_CHANNELS, [false, false, true, true, false]),
            ("READ_RECEIPT", policy::READ_RECEIPT, [true, true, true, true, false]),
            ("REPORTS", policy::REPORTS, [false, false, true, true, false]),
            ("ADMIN", policy::ADMIN, [false, false, true, false, false]),
            ("SUBMIT_EVALUATION", policy::SUBMIT_EVALUATION, [false, false, false, false, true]),
            ("READ_REPUTATION", policy::READ_REPUTATION, [true, true, true, true, true]),
            ("ANY", policy::ANY, [true, true, true, true, true]),
        ];
        for (name, allowed, expected) in matrix {
            for (role, want) in Role::ALL.iter().zip(*expected) {
                let caller = Caller {
                    role: *role,
                    contributor_key: matches!(*role, Contributor | Evaluator).then(|| key(3)),
                    token_id: None,
                    auth_disabled: false,
                };
                match require(&caller, allowed) {
                    Ok(()) => assert!(want, "{role} must not pass {name}"),
                    Err(e) => {
                        assert!(!want, "{role} must pass {name}");
                        assert_eq!(
                            (e.code, e.reason),
                            (Code::PermissionDenied, ErrorReason::WrongRole)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn own_channel_rule() {
        let contributor = Caller {
            role: Role::Contributor,
            contributor_key: Some(key(3)),
            token_id: None,
            auth_disabled: false,
        };
        require_own_channel(&contributor, &key(3)).unwrap();
        let e = require_own_channel(&contributor, &key(4)).unwrap_err();
        assert_eq!((e.code, e.reason), (Code::PermissionDenied, ErrorReason::NotYourChannel));
        for role in [Role::Operator, Role::Accountant, Role::Provider] {
            let c = Caller { role, contributor_key: None, token_id: None, auth_disabled: false };
            require_own_channel(&c, &key(4)).unwrap();
            assert_eq!(
                channel_subject(&c, None).unwrap_err().reason,
                ErrorReason::MalformedField,
                "{role} must name the contributor"
            );
            assert_eq!(channel_subject(&c, Some(key(4))).unwrap(), key(4));
        }
        assert_eq!(channel_subject(&contributor, None).unwrap(), key(3));
        assert_eq!(
            channel_subject(&contributor, Some(key(4))).unwrap_err().reason,
            ErrorReason::NotYourChannel
        );
    }

    #[test]
    fn listen_policy() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        for lo in ["127.0.0.1:1", "127.8.9.1:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            assert!(is_loopback(&a(lo)), "{lo}");
            check_listen_policy(&a(lo), false, false).unwrap();
        }
        for remote in
            ["0.0.0.0:1", "[::]:1", "10.0.0.1:1", "[2001:db8::1]:1", "[::ffff:10.0.0.1]:1"]
        {
            let addr = a(remote);
            assert!(!is_loopback(&addr), "{remote}");
            assert!(check_listen_policy(&addr, false, true).unwrap_err().contains("TLS"));
            assert!(check_listen_policy(&addr, true, false)
                .unwrap_err()
                .contains("unauthenticated"));
            assert!(check_listen_policy(&addr, false, false).is_err());
            check_listen_policy(&addr, true, true).unwrap();
        }
    }

    #[tokio::test]
    async fn auth_service_login_flow() {
        let (_dir, _path, tokens) = token_store();
        let acct = tokens.create(Role::Accountant, None, "", None, unix_now()).unwrap();
        let auth = Arc::new(Authenticator::new(Arc::new(tokens), Arc::new(book()), true));
        let svc = AuthService::new(Arc::clone(&auth));

        // No credentials needed for the challenge and the login.
        let resp = svc
            .get_challenge(Request::new(GetChallengeRequest {
                contributor_key: key(7).to_bytes().to_vec(),
            }))
            .await
            .unwrap();
        let challenge = AuthChallenge::decode(&resp.get_ref().challenge).unwrap();
        let signed = sign(challenge, &keypair(7)).encode();
        let login = svc
            .login(Request::new(LoginRequest { signed_challenge: signed.clone() }))
            .await
            .unwrap()
            .into_inner();

        let mut req = Request::new(WhoAmIRequest {});
        *req.metadata_mut() = bearer(&login.token);
        let me = svc.who_am_i(req).await.unwrap().into_inner();
        assert_eq!(me.role, "contributor");
        assert_eq!(me.contributor_key, key(7).to_bytes().to_vec());
        assert_eq!(me.provider_key, key(1).to_bytes().to_vec());
        assert_eq!(me.network, "regtest");

        let mut req = Request::new(WhoAmIRequest {});
        *req.metadata_mut() = bearer(&acct.secret);
        let me = svc.who_am_i(req).await.unwrap().into_inner();
        assert_eq!((me.role.as_str(), me.contributor_key.len()), ("accountant", 0));

        // Replay of the same login, bad inputs, and WhoAmI without credentials.
        let status =
            svc.login(Request::new(LoginRequest { signed_challenge: signed })).await.unwrap_err();
        assert_eq!(tribute_proto::error_reason(&status), Some(ErrorReason::ChallengeFailed));
        let status = svc
            .get_challenge(Request::new(GetChallengeRequest { contributor_key: vec![1; 31] }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(tribute_proto::error_reason(&status), Some(ErrorReason::MalformedField));
        let status = svc
            .login(Request::new(LoginRequest { signed_challenge: vec![0; 10] }))
            .await
            .unwrap_err();
        assert_eq!(tribute_proto::error_reason(&status), Some(ErrorReason::MalformedField));
        let status = svc.who_am_i(Request::new(WhoAmIRequest {})).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}
