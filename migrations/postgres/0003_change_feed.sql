-- The change feed that standbys keep their copy of the pool's rows warm
-- from (PostgreSQL only: replicas exist only here, and SQLite's single
-- server has no standby to feed).
--
-- change_clock.version counts committed write transactions that changed
-- a pool row. The first such change in a transaction takes the next value
-- (an UPDATE of this one row, whose lock is held to COMMIT, so a second
-- writer waits for the first to end): versions are therefore handed out
-- in commit order, and a reader that sees version V in its snapshot has
-- every change stamped V or lower and none of any later one. Each changed
-- row carries its transaction's version in change_version, and each
-- deleted row leaves a tombstone here with it; a standby reads what is
-- above the version it last saw. Tombstones are trimmed after a while,
-- raising trimmed_through: a standby further behind than that reads
-- everything again.
--
-- While a transaction that changed a pool row is open it holds the clock
-- row: every other such transaction waits for it. The server's single
-- writer is not slowed by that, but a hand-made transaction in psql that
-- changes a pool row holds up the leader's writes until it ends.
CREATE TABLE change_clock (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    version         BIGINT NOT NULL,
    trimmed_through BIGINT NOT NULL
);
INSERT INTO change_clock (id, version, trimmed_through) VALUES (1, 0, 0);

-- A random token per version, so that a version number handed out twice
-- is told apart: a history rewound under a running standby (a backup
-- restored, a failover to a PostgreSQL replica that was behind, commits
-- lost with synchronous_commit off) hands out the same numbers again for
-- other changes. A standby whose version no longer has its token reads
-- everything again. Trimmed with the tombstones; the newest is kept.
CREATE TABLE change_versions (
    version  BIGINT PRIMARY KEY,
    token    UUID NOT NULL,
    taken_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO change_versions (version, token) VALUES (0, gen_random_uuid());

CREATE TABLE deleted_rows (
    table_name     TEXT NOT NULL,
    row_key        TEXT NOT NULL,
    -- The second half of a two-column key (affinity_reservations), or ''.
    row_key2       TEXT NOT NULL DEFAULT '',
    change_version BIGINT NOT NULL,
    deleted_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX deleted_rows_by_change ON deleted_rows (change_version);
CREATE INDEX deleted_rows_by_age ON deleted_rows (deleted_at);

ALTER TABLE containers ADD COLUMN change_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE claims ADD COLUMN change_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE affinity_reservations ADD COLUMN change_version BIGINT NOT NULL DEFAULT 0;
CREATE INDEX containers_by_change ON containers (change_version);
CREATE INDEX claims_by_change ON claims (change_version);
CREATE INDEX affinity_by_change ON affinity_reservations (change_version);

-- This transaction's version, taken on its first change. The setting is
-- local to the transaction (and undone with a rolled-back savepoint,
-- like the UPDATE that took the value).
CREATE FUNCTION boilerhouse_change_version() RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    taken TEXT := current_setting('boilerhouse.change_version', true);
    new_version BIGINT;
BEGIN
    IF taken IS NOT NULL AND taken <> '' THEN
        RETURN taken::BIGINT;
    END IF;
    UPDATE change_clock SET version = version + 1 WHERE id = 1 RETURNING change_clock.version INTO new_version;
    -- A number handed out again (a rewound history) gets a new token.
    INSERT INTO change_versions (version, token) VALUES (new_version, gen_random_uuid())
        ON CONFLICT (version) DO UPDATE SET token = EXCLUDED.token, taken_at = now();
    PERFORM set_config('boilerhouse.change_version', new_version::TEXT, true);
    RETURN new_version;
END $$;

CREATE FUNCTION boilerhouse_stamp_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_version := boilerhouse_change_version();
    RETURN NEW;
END $$;

-- TG_ARGV names the key's columns.
CREATE FUNCTION boilerhouse_record_deletion() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_row JSONB := to_jsonb(OLD);
BEGIN
    INSERT INTO deleted_rows (table_name, row_key, row_key2, change_version)
    VALUES (
        TG_TABLE_NAME,
        old_row ->> TG_ARGV[0],
        CASE WHEN TG_NARGS > 1 THEN old_row ->> TG_ARGV[1] ELSE '' END,
        boilerhouse_change_version()
    );
    RETURN OLD;
END $$;

CREATE TRIGGER containers_stamp BEFORE INSERT OR UPDATE ON containers
    FOR EACH ROW EXECUTE FUNCTION boilerhouse_stamp_change();
CREATE TRIGGER claims_stamp BEFORE INSERT OR UPDATE ON claims
    FOR EACH ROW EXECUTE FUNCTION boilerhouse_stamp_change();
CREATE TRIGGER affinity_stamp BEFORE INSERT OR UPDATE ON affinity_reservations
    FOR EACH ROW EXECUTE FUNCTION boilerhouse_stamp_change();

CREATE TRIGGER containers_deleted AFTER DELETE ON containers
    FOR EACH ROW EXECUTE FUNCTION boilerhouse_record_deletion('container_id');
CREATE TRIGGER claims_deleted AFTER DELETE ON claims
    FOR EACH ROW EXECUTE FUNCTION boilerhouse_record_deletion('claim_id');
CREATE TRIGGER affinity_deleted AFTER DELETE ON affinity_reservations
    FOR EACH ROW EXECUTE FUNCTION boilerhouse_record_deletion('tenant_id', 'workload_id');
