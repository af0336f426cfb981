//! Tenant state sync: statuses, their bounded error history, and the
//! containers whose upload on release is still owed.

use std::collections::HashMap;
use std::str::FromStr;

use futures::FutureExt as _;

use boilerhouse_core::event::NewEvent;
use boilerhouse_core::sync::{ERROR_HISTORY, SyncErrorEntry, SyncState, SyncStatus};
use boilerhouse_core::{ContainerId, TenantId, Timestamp, WorkloadId};

use super::events::insert_event;
use super::lenient::{self, Lenient};
use super::sql;
use super::{Store, StoreError};

/// A container whose upload on release failed and is being retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReleaseUpload {
    /// The container holding the tenant's files.
    pub container_id: ContainerId,
    /// Whose.
    pub tenant_id: TenantId,
    /// Which workload.
    pub workload_id: WorkloadId,
    /// When the release happened.
    pub since: Timestamp,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The last failure.
    pub last_error: String,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

#[derive(sqlx::FromRow)]
struct StatusRow {
    tenant_id: String,
    workload_id: String,
    sync_id: String,
    state: String,
    last_sync_at: Option<i64>,
    last_upload_at: Option<i64>,
    pending_count: i64,
    bytes_transferred: i64,
    warning: String,
}

#[derive(sqlx::FromRow)]
struct ErrorRow {
    tenant_id: String,
    workload_id: String,
    sync_id: String,
    at: i64,
    mapping: String,
    message: String,
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    container_id: String,
    tenant_id: String,
    workload_id: String,
    since: i64,
    attempts: i64,
    last_error: String,
}

impl Store {
    /// Records sync results: each status as it now stands, the errors it
    /// gained (the history is trimmed to the newest [`ERROR_HISTORY`]),
    /// and events, in one transaction.
    pub async fn record_sync(
        &self,
        statuses: Vec<SyncStatus>,
        new_errors: Vec<(SyncStatus, SyncErrorEntry)>,
        events: Vec<NewEvent>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| {
                async move {
                    for s in &statuses {
                        sql::query(
                            "INSERT INTO sync_status (tenant_id, workload_id, sync_id, state, last_sync_at, \
                             last_upload_at, pending_count, bytes_transferred, updated_at, warning) \
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                             ON CONFLICT (tenant_id, workload_id, sync_id) DO UPDATE SET \
                             state = excluded.state, last_sync_at = excluded.last_sync_at, \
                             last_upload_at = excluded.last_upload_at, pending_count = excluded.pending_count, \
                             bytes_transferred = excluded.bytes_transferred, updated_at = excluded.updated_at, \
                             warning = excluded.warning",
                        )
                        .bind(s.tenant_id.as_str())
                        .bind(s.workload_id.as_str())
                        .bind(&s.sync_id)
                        .bind(s.state.as_str())
                        .bind(s.last_sync_at.map(Timestamp::as_millis))
                        .bind(s.last_upload_at.map(Timestamp::as_millis))
                        .bind(i64::from(s.pending_count))
                        .bind(i64::try_from(s.bytes_transferred).unwrap_or(i64::MAX))
                        .bind(now.as_millis())
                        .bind(s.warning.as_deref().unwrap_or(""))
                        .execute(tx.conn())
                        .await?;
                    }
                    for (s, e) in &new_errors {
                        sql::query(
                            "INSERT INTO sync_errors (tenant_id, workload_id, sync_id, at, mapping, message) \
                             VALUES (?, ?, ?, ?, ?, ?)",
                        )
                        .bind(s.tenant_id.as_str())
                        .bind(s.workload_id.as_str())
                        .bind(&s.sync_id)
                        .bind(e.at.as_millis())
                        .bind(&e.mapping)
                        .bind(&e.message)
                        .execute(tx.conn())
                        .await?;
                        sql::query(
                            "DELETE FROM sync_errors WHERE tenant_id = ?1 AND workload_id = ?2 AND sync_id = ?3 \
                             AND id NOT IN (SELECT id FROM sync_errors WHERE tenant_id = ?1 AND workload_id = ?2 \
                             AND sync_id = ?3 ORDER BY id DESC LIMIT ?4)",
                        )
                        .bind(s.tenant_id.as_str())
                        .bind(s.workload_id.as_str())
                        .bind(&s.sync_id)
                        .bind(ERROR_HISTORY as i64)
                        .execute(tx.conn())
                        .await?;
                    }
                    for event in events {
                        insert_event(tx, event).await?;
                    }
                    Ok(())
                }
                .boxed()
            })
            .await
    }

    /// Every stored status with its recent errors.
    pub async fn sync_statuses(&self) -> Result<Lenient<SyncStatus>, StoreError> {
        let rows: Vec<StatusRow> = sql::query_as(
            "SELECT tenant_id, workload_id, sync_id, state, last_sync_at, last_upload_at, \
             pending_count, bytes_transferred, warning FROM sync_status ORDER BY tenant_id, workload_id, sync_id",
        )
        .fetch_all(&self.reads)
        .await?;
        let errors: Vec<ErrorRow> = sql::query_as(
            "SELECT tenant_id, workload_id, sync_id, at, mapping, message FROM sync_errors ORDER BY id",
        )
        .fetch_all(&self.reads)
        .await?;
        let mut by_key: HashMap<(String, String, String), Vec<SyncErrorEntry>> = HashMap::new();
        for e in errors {
            by_key
                .entry((e.tenant_id, e.workload_id, e.sync_id))
                .or_default()
                .push(SyncErrorEntry {
                    at: Timestamp::from_millis(e.at),
                    mapping: e.mapping,
                    message: e.message,
                });
        }
        let rows = rows.into_iter().map(|r| {
            let key = format!("({}, {}, {})", r.tenant_id, r.workload_id, r.sync_id);
            let status = (|| {
                let recent_errors = by_key
                    .remove(&(
                        r.tenant_id.clone(),
                        r.workload_id.clone(),
                        r.sync_id.clone(),
                    ))
                    .unwrap_or_default();
                Ok(SyncStatus {
                    tenant_id: TenantId::new(r.tenant_id).map_err(|e| corrupt("sync tenant", e))?,
                    workload_id: WorkloadId::new(r.workload_id)
                        .map_err(|e| corrupt("sync workload", e))?,
                    sync_id: r.sync_id,
                    state: SyncState::from_str(&r.state).map_err(|e| corrupt("sync state", e))?,
                    last_sync_at: r.last_sync_at.map(Timestamp::from_millis),
                    last_upload_at: r.last_upload_at.map(Timestamp::from_millis),
                    pending_count: u32::try_from(r.pending_count).unwrap_or(u32::MAX),
                    bytes_transferred: u64::try_from(r.bytes_transferred).unwrap_or(0),
                    recent_errors,
                    warning: Some(r.warning).filter(|w| !w.is_empty()),
                })
            })();
            (key, status)
        });
        Ok(lenient::partition("sync_status", rows))
    }

    /// Records (or updates) a container's owed upload.
    pub async fn put_pending_release(
        &self,
        pending: PendingReleaseUpload,
        events: Vec<NewEvent>,
    ) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| {
                async move {
                    sql::query(
                        "INSERT INTO sync_release_pending (container_id, tenant_id, workload_id, since, attempts, last_error) \
                         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (container_id) DO UPDATE SET \
                         attempts = excluded.attempts, last_error = excluded.last_error",
                    )
                    .bind(pending.container_id.to_string())
                    .bind(pending.tenant_id.as_str())
                    .bind(pending.workload_id.as_str())
                    .bind(pending.since.as_millis())
                    .bind(i64::from(pending.attempts))
                    .bind(&pending.last_error)
                    .execute(tx.conn())
                    .await?;
                    for event in events {
                        insert_event(tx, event).await?;
                    }
                    Ok(())
                }
                .boxed()
            })
            .await
    }

    /// Forgets a container's owed upload: it succeeded, or the container
    /// went back to its tenant or away.
    pub async fn clear_pending_release(
        &self,
        container: ContainerId,
        events: Vec<NewEvent>,
    ) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| {
                async move {
                    sql::query("DELETE FROM sync_release_pending WHERE container_id = ?")
                        .bind(container.to_string())
                        .execute(tx.conn())
                        .await?;
                    for event in events {
                        insert_event(tx, event).await?;
                    }
                    Ok(())
                }
                .boxed()
            })
            .await
    }

    /// Every owed upload.
    pub async fn pending_releases(&self) -> Result<Lenient<PendingReleaseUpload>, StoreError> {
        let rows: Vec<PendingRow> = sql::query_as(
            "SELECT container_id, tenant_id, workload_id, since, attempts, last_error \
             FROM sync_release_pending ORDER BY since",
        )
        .fetch_all(&self.reads)
        .await?;
        let rows = rows.into_iter().map(|r| {
            let key = r.container_id.clone();
            let pending = (|| {
                Ok(PendingReleaseUpload {
                    container_id: ContainerId::from_str(&r.container_id)
                        .map_err(|e| corrupt("pending container", e))?,
                    tenant_id: TenantId::new(r.tenant_id)
                        .map_err(|e| corrupt("pending tenant", e))?,
                    workload_id: WorkloadId::new(r.workload_id)
                        .map_err(|e| corrupt("pending workload", e))?,
                    since: Timestamp::from_millis(r.since),
                    attempts: u32::try_from(r.attempts).unwrap_or(u32::MAX),
                    last_error: r.last_error,
                })
            })();
            (key, pending)
        });
        Ok(lenient::partition("sync_release_pending", rows))
    }
}
