-- The leader lease of the replicas that share this database (PostgreSQL
-- only: SQLite is one file on one server, which always leads).
--
-- One row. A replica leads while it is the holder and expires_at, in the
-- database's own clock, is in the future; it renews by moving expires_at.
-- A replica takes the lease only once it has expired, and every taking
-- adds one to epoch. Every write transaction of the leader first reads
-- epoch under a share lock and rolls back if it is not its own: a deposed
-- leader that wakes up late commits nothing, and a new leader cannot take
-- the lease while an old transaction that passed the check is open.
CREATE TABLE leadership (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    epoch      BIGINT NOT NULL,
    holder     TEXT NOT NULL,
    address    TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO leadership (id, epoch, holder, address, expires_at)
VALUES (1, 0, '', '', to_timestamp(0));
