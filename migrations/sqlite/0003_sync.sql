-- Tenant state sync (issue 7).
--
-- last_upload_at: the last complete upload of a mapping. Periodic syncs
-- count their interval from it, so after a restart a sync whose interval
-- passed while the server was down runs at once (catch-up).
ALTER TABLE sync_status ADD COLUMN last_upload_at INTEGER;

-- Containers whose upload on release failed. While a row exists the
-- container holds the only copy of the tenant's newest files: it is never
-- destroyed by reservation expiry, and the upload is retried with backoff.
CREATE TABLE sync_release_pending (
    container_id TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL,
    workload_id  TEXT NOT NULL,
    since        INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT ''
) STRICT;
