//! Loaded workloads and their pools.

use futures::FutureExt as _;

use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::workload::{WorkloadRecord, WorkloadSpec};
use boilerhouse_core::{Timestamp, WorkloadId};

use super::events::insert_event;
use super::lenient::{self, Lenient};
use super::sql;
use super::{Store, StoreError};

/// What storing a workload changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadChange {
    /// It was new.
    Created,
    /// Its spec, YAML or file changed.
    Updated,
    /// Nothing changed.
    Unchanged,
}

#[derive(sqlx::FromRow)]
struct WorkloadRow {
    workload_id: String,
    spec_json: String,
    spec_hash: String,
    yaml: String,
    source_path: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<WorkloadRow> for WorkloadRecord {
    type Error = StoreError;
    fn try_from(row: WorkloadRow) -> Result<Self, StoreError> {
        let spec: WorkloadSpec = serde_json::from_str(&row.spec_json)
            .map_err(|e| StoreError::Corrupt(format!("workload {}: {e}", row.workload_id)))?;
        Ok(WorkloadRecord {
            spec,
            spec_hash: row.spec_hash,
            yaml: row.yaml,
            source_path: row.source_path,
            created_at: Timestamp::from_millis(row.created_at),
            updated_at: Timestamp::from_millis(row.updated_at),
        })
    }
}

/// The column list every workload read uses, as a literal so that queries
/// stay `&'static str` (sqlx 0.9 refuses runtime-built SQL by default).
macro_rules! select_workload {
    ($rest:literal) => {
        concat!(
            "SELECT workload_id, spec_json, spec_hash, yaml, source_path, created_at, \
             updated_at FROM workloads ",
            $rest
        )
    };
}

impl Store {
    /// Stores a workload (and creates its pool row), recording an event that
    /// says what changed. `via_api` marks an ApplyWorkload rather than a
    /// file reload.
    pub async fn put_workload(
        &self,
        spec: WorkloadSpec,
        yaml: String,
        source_path: String,
        now: Timestamp,
        via_api: bool,
    ) -> Result<(WorkloadRecord, WorkloadChange), StoreError> {
        let spec_json =
            serde_json::to_string(&spec).map_err(|e| StoreError::Internal(e.to_string()))?;
        let spec_hash = spec.spec_hash();
        self.writer
            .write(move |tx| {
                async move {
                    let id = spec.id.to_string();
                    let existing: Option<(String, String, String, i64, i64, String)> = sql::query_as(
                        "SELECT spec_hash, yaml, source_path, created_at, updated_at, spec_json \
                         FROM workloads WHERE workload_id = ?",
                    )
                    .bind(&id)
                    .fetch_optional(tx.conn())
                    .await?;
                    let (change, created_at, updated_at) = match &existing {
                        None => (WorkloadChange::Created, now, now),
                        Some((hash, old_yaml, old_path, created, updated, old_json)) => {
                            // A stored spec that no longer reads is
                            // rewritten from the file, which heals it.
                            let same = *hash == spec_hash
                                && *old_yaml == yaml
                                && *old_path == source_path
                                && serde_json::from_str::<WorkloadSpec>(old_json).is_ok();
                            let change = if same {
                                WorkloadChange::Unchanged
                            } else {
                                WorkloadChange::Updated
                            };
                            let updated_at = if same {
                                Timestamp::from_millis(*updated)
                            } else {
                                now
                            };
                            (change, Timestamp::from_millis(*created), updated_at)
                        }
                    };
                    if change != WorkloadChange::Unchanged {
                        sql::query(
                            "INSERT INTO workloads (workload_id, name, image, spec_json, \
                             spec_hash, yaml, source_path, created_at, updated_at) \
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                             ON CONFLICT (workload_id) DO UPDATE SET name = excluded.name, \
                             image = excluded.image, spec_json = excluded.spec_json, \
                             spec_hash = excluded.spec_hash, yaml = excluded.yaml, \
                             source_path = excluded.source_path, updated_at = excluded.updated_at",
                        )
                        .bind(&id)
                        .bind(&spec.name)
                        .bind(&spec.image)
                        .bind(&spec_json)
                        .bind(&spec_hash)
                        .bind(&yaml)
                        .bind(&source_path)
                        .bind(created_at.as_millis())
                        .bind(updated_at.as_millis())
                        .execute(tx.conn())
                        .await?;
                        sql::query(
                            "INSERT INTO pools (pool_id, created_at, updated_at) VALUES (?, ?, ?) \
                             ON CONFLICT (pool_id) DO NOTHING",
                        )
                        .bind(&id)
                        .bind(now.as_millis())
                        .bind(now.as_millis())
                        .execute(tx.conn())
                        .await?;
                        let (kind, message) = match (change, via_api) {
                            (_, true) => (
                                EventKind::WorkloadApplied,
                                format!("workload {id} applied to {source_path}"),
                            ),
                            (WorkloadChange::Created, false) => (
                                EventKind::WorkloadLoaded,
                                format!("workload {id} loaded from {source_path}"),
                            ),
                            _ => (
                                EventKind::WorkloadUpdated,
                                format!("workload {id} reloaded from {source_path}"),
                            ),
                        };
                        let event = NewEvent::new(now, kind, message)
                            .with_subject(EventSubject {
                                workload_id: Some(id.clone()),
                                ..Default::default()
                            })
                            .with_attribute("path", source_path.clone())
                            .with_attribute("spec_hash", spec_hash.clone());
                        insert_event(tx, event).await?;
                    }
                    let record = WorkloadRecord {
                        spec,
                        spec_hash,
                        yaml,
                        source_path,
                        created_at,
                        updated_at,
                    };
                    Ok((record, change))
                }
                .boxed()
            })
            .await
    }

    /// Forgets a workload, recording why. Its pool row stays: the pool's
    /// containers are drained by the pool controller, not dropped here.
    pub async fn remove_workload(
        &self,
        id: WorkloadId,
        reason: String,
        now: Timestamp,
    ) -> Result<Option<WorkloadRecord>, StoreError> {
        self.writer
            .write(move |tx| {
                async move {
                    let row: Option<WorkloadRow> =
                        sql::query_as(select_workload!("WHERE workload_id = ?"))
                            .bind(id.as_str())
                            .fetch_optional(tx.conn())
                            .await?;
                    let Some(row) = row else { return Ok(None) };
                    let record = WorkloadRecord::try_from(row)?;
                    sql::query("DELETE FROM workloads WHERE workload_id = ?")
                        .bind(id.as_str())
                        .execute(tx.conn())
                        .await?;
                    let event = NewEvent::new(
                        now,
                        EventKind::WorkloadRemoved,
                        format!("workload {id} removed: {reason}"),
                    )
                    .with_subject(EventSubject {
                        workload_id: Some(id.to_string()),
                        ..Default::default()
                    })
                    .with_attribute("path", record.source_path.clone());
                    insert_event(tx, event).await?;
                    Ok(Some(record))
                }
                .boxed()
            })
            .await
    }

    /// Every stored workload that can be read, by id.
    pub async fn list_workloads(&self) -> Result<Vec<WorkloadRecord>, StoreError> {
        Ok(self.list_workloads_lenient().await?.0)
    }

    /// Every stored workload, by id, and the rows that cannot be read.
    pub async fn list_workloads_lenient(&self) -> Result<Lenient<WorkloadRecord>, StoreError> {
        let rows = sql::query(select_workload!("ORDER BY workload_id"))
            .fetch_all(&self.reads)
            .await?;
        Ok(lenient::decode::<_, WorkloadRow, _>(
            rows,
            "workloads",
            |r| lenient::text(r, "workload_id"),
        ))
    }

    /// One workload.
    pub async fn get_workload(
        &self,
        id: &WorkloadId,
    ) -> Result<Option<WorkloadRecord>, StoreError> {
        let row: Option<WorkloadRow> = sql::query_as(select_workload!("WHERE workload_id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.reads)
            .await?;
        row.map(WorkloadRecord::try_from).transpose()
    }
}
