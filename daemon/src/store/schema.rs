//! The SQLite schema, as versioned migrations (`PRAGMA user_version`). A migration, once
//! released, is never edited: changes are new migrations appended to the list.
//!
//! Amounts: SQLite integers are i64, so an `Nsat` (u128) is stored as a whole-msat column
//! (`*_msat`) plus a sub-msat remainder column (`*_rem_nsat`, `0..10^6`); `Msat` (u64) values
//! are stored as i64 and checked on the way in and out.

use rusqlite_migration::{Migrations, M};

/// Every migration, in order.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(V1), M::up(V2), M::up(V3), M::up(V4), M::up(V5)])
}

const V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;

CREATE TABLE contributors (
    contributor_key BLOB PRIMARY KEY,
    node_id         BLOB,
    bolt12_offer    TEXT,
    registered_at   INTEGER NOT NULL,
    signed          BLOB NOT NULL
) STRICT;

CREATE TABLE licences (
    licence_id      BLOB PRIMARY KEY,
    dataset_hash    BLOB NOT NULL,
    contributor_key BLOB NOT NULL,
    signed          BLOB NOT NULL,
    revoked_at      INTEGER,
    revocation      BLOB
) STRICT;
CREATE INDEX licences_by_dataset ON licences(dataset_hash);

CREATE TABLE models (
    model_id              TEXT PRIMARY KEY,
    contributor_share_ppm INTEGER NOT NULL,
    per_request_nsat      INTEGER NOT NULL,
    per_input_token_nsat  INTEGER NOT NULL,
    per_output_token_nsat INTEGER NOT NULL
) STRICT;

-- Accepted training runs; each made attribution version `attribution_version` of its model.
CREATE TABLE training_runs (
    run_id              TEXT PRIMARY KEY,
    model_id            TEXT NOT NULL REFERENCES models(model_id),
    attribution_version INTEGER NOT NULL,
    signed              BLOB NOT NULL,
    UNIQUE (model_id, attribution_version)
) STRICT;

-- One row per channel. A row is written when the channel opens and whenever one of its
-- signed states is stored, not on every batch: it shows the head as of batch
-- `applied_batch_seq` (signed when `head_signed` = 1). Accruals of later batches are in
-- those batches' `receipt_batches.accruals`; the current head is the row plus them (see
-- `ledger::Unapplied`). Every channel's row covers at least the batches up to the
-- watermark in `meta` (`accruals_applied_through`), so only batches after it are read.
CREATE TABLE channels (
    channel_id           BLOB PRIMARY KEY,
    contributor_key      BLOB NOT NULL,
    nonce                BLOB NOT NULL,
    status               INTEGER NOT NULL,
    seq                  INTEGER NOT NULL,
    accrued_msat         INTEGER NOT NULL,
    accrued_rem_nsat     INTEGER NOT NULL,
    settled_msat         INTEGER NOT NULL,
    last_settlement_hash BLOB NOT NULL,
    head_signed          INTEGER NOT NULL,
    opened_batch_seq     INTEGER NOT NULL,
    applied_batch_seq    INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX channels_active_per_contributor ON channels(contributor_key) WHERE status = 0;

-- Every signed state, kept as evidence of what the provider promised.
CREATE TABLE channel_states (
    channel_id BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    state      BLOB NOT NULL,
    PRIMARY KEY (channel_id, seq)
) STRICT, WITHOUT ROWID;

-- The metering log: one row per accepted request, keyed by an increasing sequence, so
-- inserts append. The split is deterministic, so its inputs are what is stored; the
-- per-channel effect of each batch is in `receipt_batches.accruals`. There is deliberately no index
-- on request_id: idempotency is checked in memory against a map rebuilt from this log.
CREATE TABLE meter_events (
    seq                 INTEGER PRIMARY KEY,
    request_id          TEXT NOT NULL,
    content_hash        BLOB NOT NULL,
    model_id            TEXT NOT NULL,
    attribution_version INTEGER NOT NULL,
    attribution         BLOB,
    price_nsat          INTEGER NOT NULL,
    pool_nsat           INTEGER NOT NULL,
    batch_seq           INTEGER NOT NULL,
    leaf_index          INTEGER NOT NULL,
    created_at          INTEGER NOT NULL
) STRICT;

-- One row per committed batch: the provider-signed Merkle root over its receipts, the
-- leaves themselves so inclusion proofs need no recomputation, and what the batch added to
-- each channel (`accruals`: entries of channel id (32 bytes) and amount in nsat (u128,
-- big-endian), sorted by channel id; Σ over batches == a channel's accrued).
CREATE TABLE receipt_batches (
    batch_seq     INTEGER PRIMARY KEY,
    receipt_count INTEGER NOT NULL,
    merkle_root   BLOB NOT NULL,
    signed_root   BLOB NOT NULL,
    leaves        BLOB NOT NULL,
    accruals      BLOB NOT NULL,
    created_at    INTEGER NOT NULL
) STRICT;

-- Bearer tokens, stored as SHA-256 of the secret.
CREATE TABLE tokens (
    token_hash      BLOB PRIMARY KEY,
    token_id        TEXT NOT NULL UNIQUE,
    role            TEXT NOT NULL,
    contributor_key BLOB,
    label           TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    revoked_at      INTEGER
) STRICT;
"#;

/// Settlements: one row per payout attempt of a channel's whole msat (the saga's durable
/// record). `status`: `pending` from the intent (written before anything is paid) until the
/// outcome is known; then `succeeded` (with the preimage, fee and the signed state that
/// carries it) or `failed` (definitely not paid: the amount stays owed, and a later
/// settlement with a new id pays it). At most one `pending` per channel.
/// Proofs of provider misbehaviour reported by contributors (`Channels.ReportMisbehaviour`),
/// verified before they are kept: two states the provider key signed that conflict.
const V3: &str = r#"
CREATE TABLE misbehaviour_reports (
    report_id       INTEGER PRIMARY KEY,
    channel_id      BLOB NOT NULL,
    contributor_key BLOB NOT NULL,
    kind            TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    held            BLOB NOT NULL,
    received        BLOB NOT NULL,
    reported_at     INTEGER NOT NULL,
    UNIQUE (held, received)
) STRICT;
"#;

/// Signed evaluation records (`Reputation.SubmitEvaluation`), kept verbatim: reputation is
/// recomputed from `signed` alone (`tribute report reputation`). The other columns are
/// copies of fields inside it, for lookups.
const V4: &str = r#"
CREATE TABLE evaluations (
    evaluation_id       TEXT PRIMARY KEY,
    evaluator_key       BLOB NOT NULL,
    model_id            TEXT NOT NULL REFERENCES models(model_id),
    attribution_version INTEGER NOT NULL,
    evaluated_at        INTEGER NOT NULL,
    received_at         INTEGER NOT NULL,
    signed              BLOB NOT NULL
) STRICT;

-- Attribution versions made by a quality policy (not by a training run): the datasets of
-- run-derived version `base_version` with adjusted weights. `datasets`: entries of dataset
-- hash (32 bytes), factor ppm (u32 BE) and adjusted weight (u64 BE), in hash order. Version
-- numbers are shared with training_runs: each version is in exactly one of the two tables.
CREATE TABLE quality_versions (
    model_id            TEXT NOT NULL REFERENCES models(model_id),
    attribution_version INTEGER NOT NULL,
    base_version        INTEGER NOT NULL,
    policy_id           TEXT NOT NULL,
    policy_version      INTEGER NOT NULL,
    gain_ppm            INTEGER NOT NULL,
    floor_ppm           INTEGER NOT NULL,
    cap_ppm             INTEGER NOT NULL,
    as_of               INTEGER NOT NULL,
    datasets            BLOB NOT NULL,
    created_at          INTEGER NOT NULL,
    PRIMARY KEY (model_id, attribution_version),
    UNIQUE (model_id, policy_id, policy_version)
) STRICT;
"#;

/// Channels the daemon keeps open (`keeper`): one row per peer the operator opened a
/// channel to, with the size to reopen at. `kept` = 0 once the operator closed it.
const V5: &str = r#"
CREATE TABLE lightning_channel_targets (
    node_id      BLOB PRIMARY KEY,
    address      TEXT NOT NULL,
    capacity_sat INTEGER NOT NULL,
    announce     INTEGER NOT NULL,
    kept         INTEGER NOT NULL,
    reopens      INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;
"#;

const V2: &str = r#"
CREATE TABLE settlements (
    settlement_id     INTEGER PRIMARY KEY,
    channel_id        BLOB NOT NULL,
    contributor_key   BLOB NOT NULL,
    amount_msat       INTEGER NOT NULL,
    state_seq         INTEGER NOT NULL,
    method            TEXT NOT NULL,
    destination       TEXT NOT NULL,
    payment_id        BLOB,
    payment_hash      BLOB,
    preimage          BLOB,
    fee_msat          INTEGER,
    status            TEXT NOT NULL,
    error             TEXT,
    settled_state_seq INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX settlements_one_pending_per_channel ON settlements(channel_id)
    WHERE status = 'pending';
CREATE INDEX settlements_by_channel ON settlements(channel_id, settlement_id);
"#;
