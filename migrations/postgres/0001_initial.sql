-- Boilerhouse schema for PostgreSQL, version 1: the SQLite schema as of
-- its migration 0006, in PostgreSQL's types (BIGINT for INTEGER, DOUBLE
-- PRECISION for REAL, BYTEA for BLOB, BOOLEAN for flags, identity columns
-- for AUTOINCREMENT). The store's SQL is the same on both; later changes
-- get a migration in each directory.
-- Boilerhouse schema, version 1. Times are Unix milliseconds (BIGINT).
-- Ids are TEXT: node names and workload ids are DNS labels, container and
-- boost ids are UUIDv7 strings, tenant ids are opaque strings.

-- Docker hosts. A node is named by its agent's config, never by us.
CREATE TABLE nodes (
    node_id           TEXT PRIMARY KEY NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('ready', 'suspect', 'lost')),
    cordoned          BOOLEAN NOT NULL DEFAULT FALSE,
    boot_id           TEXT NOT NULL DEFAULT '',
    agent_version     TEXT NOT NULL DEFAULT '',
    engine_version    TEXT NOT NULL DEFAULT '',
    capacity_cpus     DOUBLE PRECISION NOT NULL DEFAULT 0,
    capacity_memory   BIGINT NOT NULL DEFAULT 0,
    capacity_gpus     BIGINT NOT NULL DEFAULT 0,
    labels_json       TEXT NOT NULL DEFAULT '{}',
    first_seen_at     BIGINT NOT NULL,
    last_heartbeat_at BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    state_root        TEXT NOT NULL DEFAULT ''
);

-- Loaded workloads: the last valid version of each file. A file that turns
-- invalid keeps its last valid row, so a typo never drains a pool.
CREATE TABLE workloads (
    workload_id  TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    image        TEXT NOT NULL,
    spec_json    TEXT NOT NULL,
    spec_hash    TEXT NOT NULL,
    yaml         TEXT NOT NULL,
    source_path  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

-- One pool per workload. Operator overrides (Scale, Drain) live here so they
-- survive restarts and file reloads.
CREATE TABLE pools (
    pool_id           TEXT PRIMARY KEY NOT NULL,
    min_size_override BIGINT,
    max_size_override BIGINT,
    draining          BOOLEAN NOT NULL DEFAULT FALSE,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);

-- Managed containers: desired state. Docker is the truth for what runs;
-- reconciliation makes the two agree.
CREATE TABLE containers (
    container_id     TEXT PRIMARY KEY NOT NULL,
    pool_id          TEXT NOT NULL,
    workload_id      TEXT NOT NULL,
    node_id          TEXT NOT NULL,
    docker_id        TEXT,
    state            TEXT NOT NULL CHECK (state IN ('warming', 'idle', 'claimed', 'reserved', 'draining', 'lost')),
    spec_hash        TEXT NOT NULL,
    -- At most one tenant per container: a single column cannot hold two.
    tenant_id        TEXT,
    last_tenant_id   TEXT,
    claim_generation BIGINT NOT NULL DEFAULT 0,
    limits_cpus      DOUBLE PRECISION,
    limits_memory    BIGINT,
    state_path       TEXT NOT NULL DEFAULT '',
    comm_path        TEXT NOT NULL DEFAULT '',
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    revision         BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX containers_by_pool_state ON containers (pool_id, state);
CREATE INDEX containers_by_node ON containers (node_id);
CREATE UNIQUE INDEX containers_docker_id ON containers (docker_id) WHERE docker_id IS NOT NULL;

-- Claims. The partial unique indexes are the invariants: at most one active
-- claim per (tenant, workload), at most one active claim per container.
CREATE TABLE claims (
    claim_id         TEXT PRIMARY KEY NOT NULL,
    tenant_id        TEXT NOT NULL,
    workload_id      TEXT NOT NULL,
    container_id     TEXT NOT NULL,
    node_id          TEXT NOT NULL,
    generation       BIGINT NOT NULL,
    source           TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('active', 'released', 'lost')),
    claimed_at       BIGINT NOT NULL,
    last_activity_at BIGINT NOT NULL,
    released_at      BIGINT,
    restored         BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE UNIQUE INDEX claims_one_per_tenant ON claims (tenant_id, workload_id) WHERE status = 'active';
CREATE UNIQUE INDEX claims_one_per_container ON claims (container_id) WHERE status = 'active';
CREATE INDEX claims_by_container ON claims (container_id);

-- Affinity reservations: a released container kept for its last tenant.
CREATE TABLE affinity_reservations (
    tenant_id    TEXT NOT NULL,
    workload_id  TEXT NOT NULL,
    container_id TEXT NOT NULL UNIQUE,
    node_id      TEXT NOT NULL,
    reserved_at  BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, workload_id)
);
CREATE INDEX affinity_by_expiry ON affinity_reservations (expires_at);

-- Resource boosts. They live here, not in memory, so request, status and
-- release work from separate processes and survive restarts.
CREATE TABLE boosts (
    boost_id            TEXT PRIMARY KEY NOT NULL,
    target_node_id      TEXT,
    target_container_id TEXT,
    target_tenant_id    TEXT,
    target_workload_id  TEXT,
    resource            TEXT NOT NULL CHECK (resource IN ('cpu', 'memory', 'gpu')),
    amount              DOUBLE PRECISION NOT NULL CHECK (amount > 0),
    priority            TEXT NOT NULL CHECK (priority IN ('low', 'normal', 'high', 'critical')),
    source_node_id      TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('pending', 'active', 'released', 'expired', 'preempted', 'failed')),
    reason              TEXT NOT NULL DEFAULT '',
    requested_at        BIGINT NOT NULL,
    allocated_at        BIGINT,
    expires_at          BIGINT NOT NULL,
    ended_at            BIGINT
);
CREATE INDEX boosts_by_status_expiry ON boosts (status, expires_at);
CREATE INDEX boosts_by_source ON boosts (source_node_id, status);

-- Sync status per (tenant, workload, mapping), and recent errors.
CREATE TABLE sync_status (
    tenant_id         TEXT NOT NULL,
    workload_id       TEXT NOT NULL,
    sync_id           TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('idle', 'pending', 'running', 'ok', 'warning', 'error')),
    last_sync_at      BIGINT,
    pending_count     BIGINT NOT NULL DEFAULT 0,
    bytes_transferred BIGINT NOT NULL DEFAULT 0,
    updated_at        BIGINT NOT NULL,
    last_upload_at    BIGINT,
    warning           TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, workload_id, sync_id)
);

CREATE TABLE sync_errors (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    workload_id TEXT NOT NULL,
    sync_id     TEXT NOT NULL,
    at          BIGINT NOT NULL,
    mapping     TEXT NOT NULL DEFAULT '',
    message     TEXT NOT NULL
);
CREATE INDEX sync_errors_by_key ON sync_errors (tenant_id, workload_id, sync_id, id);

-- The activity log. AUTOINCREMENT keeps ids strictly increasing even after
-- the newest rows are trimmed, so resume tokens never repeat.
CREATE TABLE events (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              BIGINT NOT NULL,
    kind            TEXT NOT NULL,
    severity        TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'error')),
    message         TEXT NOT NULL,
    node_id         TEXT,
    workload_id     TEXT,
    container_id    TEXT,
    tenant_id       TEXT,
    boost_id        TEXT,
    attributes_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_by_kind ON events (kind, id);
CREATE INDEX events_by_at ON events (at);
CREATE INDEX events_by_workload ON events (workload_id, id) WHERE workload_id IS NOT NULL;
CREATE INDEX events_by_node ON events (node_id, id) WHERE node_id IS NOT NULL;
CREATE INDEX events_by_tenant ON events (tenant_id, id) WHERE tenant_id IS NOT NULL;

-- Idempotency keys for mutating RPCs: a retried request_id gets the first
-- answer back; the same id with a different request is refused.
CREATE TABLE idempotency_keys (
    request_id   TEXT NOT NULL,
    method       TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response     BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (method, request_id)
);
CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);

CREATE TABLE sync_release_pending (
    container_id TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL,
    workload_id  TEXT NOT NULL,
    since        BIGINT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT ''
);
