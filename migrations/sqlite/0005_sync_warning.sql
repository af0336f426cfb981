-- Tenant state sync you can trust (issue 14).
--
-- A sync that completed but saved nothing it was there to save (its
-- directory is missing, or nothing matched while the sink holds files) is
-- a 'warning', with its reason, never 'ok'. SQLite cannot alter a CHECK
-- constraint, so the table is rebuilt.
CREATE TABLE sync_status_new (
    tenant_id         TEXT NOT NULL,
    workload_id       TEXT NOT NULL,
    sync_id           TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('idle', 'pending', 'running', 'ok', 'warning', 'error')),
    last_sync_at      INTEGER,
    pending_count     INTEGER NOT NULL DEFAULT 0,
    bytes_transferred INTEGER NOT NULL DEFAULT 0,
    updated_at        INTEGER NOT NULL,
    last_upload_at    INTEGER,
    warning           TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, workload_id, sync_id)
) STRICT;
INSERT INTO sync_status_new (tenant_id, workload_id, sync_id, state, last_sync_at,
    pending_count, bytes_transferred, updated_at, last_upload_at)
SELECT tenant_id, workload_id, sync_id, state, last_sync_at,
    pending_count, bytes_transferred, updated_at, last_upload_at
FROM sync_status;
DROP TABLE sync_status;
ALTER TABLE sync_status_new RENAME TO sync_status;
