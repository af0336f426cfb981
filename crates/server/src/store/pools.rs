//! Containers, claims and affinity reservations.
//!
//! Every pool decision is one [`PoolWrite`]: the rows it changes, its
//! idempotency key and its events, committed in one transaction. A claim is
//! therefore either entirely durable (claim row, container row, consumed
//! reservation, request id, event) or not there at all.
//!
//! Every row change is conditional: an update or delete names the state it
//! expects to replace in its `WHERE`, and touching no row is a conflict
//! that rolls the whole write back. A decision made on a stale view can
//! therefore never overwrite what happened meanwhile.

use futures::FutureExt as _;

use boilerhouse_core::event::NewEvent;
use boilerhouse_core::pool::write::PoolWrite;
use boilerhouse_core::pool::{ClaimRecord, ContainerRecord, Reservation};
use boilerhouse_core::{ContainerId, TenantId, Timestamp, WorkloadId};

use super::events::{insert_event, recorded};
use super::lenient;
use super::sql;
use super::{Store, StoreError};

mod rows;
mod snapshot;
mod writes;
use rows::{ClaimRow, ContainerRow, ReservationRow, corrupt};

/// Operator overrides of a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolOverride {
    /// min_size, if scaled.
    pub min_size: Option<u32>,
    /// max_size, if scaled.
    pub max_size: Option<u32>,
    /// Drained: no refill, idle containers destroyed.
    pub draining: bool,
}

/// Everything needed to rebuild the in-memory pool index.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    /// Every container row.
    pub containers: Vec<ContainerRecord>,
    /// Active claims.
    pub claims: Vec<ClaimRecord>,
    /// Reservations.
    pub reservations: Vec<Reservation>,
    /// Rows that could not be read, and were left out.
    pub unreadable: Vec<lenient::Unreadable>,
}

/// The columns a container row is read with ([`ContainerRow`]).
macro_rules! container_columns {
    () => {
        "container_id, workload_id, node_id, docker_id, state, spec_hash, tenant_id, last_tenant_id, \
         claim_generation, revision, limits_cpus, limits_memory, state_path, comm_path, created_at, updated_at"
    };
}
pub(super) use container_columns;

/// The columns a claim row is read with ([`ClaimRow`]).
macro_rules! claim_columns {
    () => {
        "claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
         claimed_at, last_activity_at, released_at, restored"
    };
}
pub(super) use claim_columns;

/// The columns a reservation row is read with ([`ReservationRow`]).
macro_rules! reservation_columns {
    () => {
        "tenant_id, workload_id, container_id, node_id, reserved_at, expires_at"
    };
}
pub(super) use reservation_columns;

/// A container row as read, or why it cannot be; keyed by its id.
pub(super) fn read_container(
    row: &sqlx::any::AnyRow,
) -> Result<ContainerRecord, lenient::Unreadable> {
    lenient::decode_one::<_, ContainerRow, ContainerRecord>(row, "containers", |r| {
        lenient::text(r, "container_id")
    })
}

/// A claim row as read, or why it cannot be.
pub(super) fn read_claim(row: &sqlx::any::AnyRow) -> Result<ClaimRecord, lenient::Unreadable> {
    lenient::decode_one::<_, ClaimRow, ClaimRecord>(row, "claims", |r| lenient::text(r, "claim_id"))
}

/// A reservation row as read, or why it cannot be.
pub(super) fn read_reservation(
    row: &sqlx::any::AnyRow,
) -> Result<Reservation, lenient::Unreadable> {
    lenient::decode_one::<_, ReservationRow, Reservation>(
        row,
        "affinity_reservations",
        reservation_key,
    )
}

/// How a reservation is named when it cannot be read.
fn reservation_key(row: &sqlx::any::AnyRow) -> String {
    format!(
        "({}, {})",
        lenient::text(row, "tenant_id"),
        lenient::text(row, "workload_id")
    )
}

impl Store {
    /// Commits one pool decision atomically, or refuses it whole with
    /// [`StoreError::Conflict`] when a row is not as the decision saw it.
    /// `on_commit` gets the write once it committed, on the writer task and
    /// in commit order (see [`super::writer`]): the pool index applies it
    /// there, so memory follows every commit even if the caller is gone.
    pub async fn commit_pool_write(
        &self,
        write: PoolWrite,
        on_commit: impl FnOnce(&PoolWrite) + Send + 'static,
    ) -> Result<(), StoreError> {
        let (statements, events) =
            writes::statements_of(&write, self.backend(), crate::auth::current().as_ref())?;
        self.writer
            .write_statements_then(
                statements,
                move |tx, ids| recorded(tx, ids, events),
                move || on_commit(&write),
            )
            .await
    }

    /// The tenant of the claims the database has on a container, and the
    /// highest generation among them: evidence that outlives the
    /// container's row (adoption reads it).
    pub async fn claim_history(
        &self,
        container: &ContainerId,
    ) -> Result<Option<(TenantId, u64)>, StoreError> {
        let row: Option<(String, i64)> = sql::query_as(
            "SELECT tenant_id, generation FROM claims WHERE container_id = ? ORDER BY generation DESC LIMIT 1",
        )
        .bind(container.to_string())
        .fetch_optional(&self.reads)
        .await?;
        row.map(|(t, g)| {
            Ok((
                TenantId::new(t).map_err(|e| corrupt("tenant id", e))?,
                g.max(0) as u64,
            ))
        })
        .transpose()
    }

    /// One claim by id, active or ended.
    pub async fn get_claim(&self, claim_id: &str) -> Result<Option<ClaimRecord>, StoreError> {
        let row: Option<ClaimRow> = sql::query_as(
            "SELECT claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
             claimed_at, last_activity_at, released_at, restored FROM claims WHERE claim_id = ?",
        )
        .bind(claim_id)
        .fetch_optional(&self.reads)
        .await?;
        row.map(ClaimRecord::try_from).transpose()
    }

    /// Claims, newest first; ended ones only when asked.
    pub async fn list_claims(
        &self,
        include_ended: bool,
        limit: u32,
    ) -> Result<Vec<ClaimRecord>, StoreError> {
        let rows: Vec<ClaimRow> = sql::query_as(
            "SELECT claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
             claimed_at, last_activity_at, released_at, restored FROM claims WHERE (? OR status = 'active') \
             ORDER BY claimed_at DESC LIMIT ?",
        )
        .bind(include_ended)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter().map(ClaimRecord::try_from).collect()
    }

    /// Every pool's operator overrides.
    pub async fn pool_overrides(&self) -> Result<Vec<(WorkloadId, PoolOverride)>, StoreError> {
        let rows: Vec<(String, Option<i64>, Option<i64>, sql::Flag)> = sql::query_as(
            "SELECT pool_id, min_size_override, max_size_override, draining FROM pools",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter()
            .map(|(id, min, max, draining)| {
                Ok((
                    WorkloadId::new(id).map_err(|e| corrupt("pool id", e))?,
                    PoolOverride {
                        min_size: min.map(|m| m.clamp(0, i64::from(u32::MAX)) as u32),
                        max_size: max.map(|m| m.clamp(0, i64::from(u32::MAX)) as u32),
                        draining: draining.0,
                    },
                ))
            })
            .collect()
    }

    /// Sets a pool's overrides, recording `event`.
    pub async fn set_pool_override(
        &self,
        pool: WorkloadId,
        value: PoolOverride,
        event: NewEvent,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| {
                async move {
                    sql::query(
                        "INSERT INTO pools (pool_id, min_size_override, max_size_override, draining, created_at, \
                         updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (pool_id) DO UPDATE SET \
                         min_size_override = excluded.min_size_override, max_size_override = excluded.max_size_override, \
                         draining = excluded.draining, updated_at = excluded.updated_at",
                    )
                    .bind(pool.as_str())
                    .bind(value.min_size.map(i64::from))
                    .bind(value.max_size.map(i64::from))
                    .bind(value.draining)
                    .bind(now.as_millis())
                    .bind(now.as_millis())
                    .execute(tx.conn())
                    .await?;
                    insert_event(tx, event).await?;
                    Ok(())
                }
                .boxed()
            })
            .await
    }
}
