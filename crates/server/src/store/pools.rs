//! Containers, claims and affinity reservations.
//!
//! Every pool decision is one [`PoolWrite`]: the rows it changes, its
//! idempotency key and its events, committed in one transaction. A claim is
//! therefore either entirely durable (claim row, container row, consumed
//! reservation, request id, event) or not there at all.

use std::str::FromStr;

use futures::FutureExt as _;

use boilerhouse_core::event::{Event, NewEvent};
use boilerhouse_core::pool::{
    ClaimRecord, ClaimSource, ClaimStatus, ContainerRecord, ContainerState, Reservation,
};
use boilerhouse_core::workload::Limits;
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp, WorkloadId};

use super::events::insert_event;
use super::idempotency::insert_idempotent;
use super::{IdempotentRecord, Store, StoreError, WriteTx};

/// One atomic change to pool state.
#[derive(Debug, Default)]
pub struct PoolWrite {
    /// Containers to insert or update.
    pub containers: Vec<ContainerRecord>,
    /// Containers to forget.
    pub removed_containers: Vec<ContainerId>,
    /// Claims to insert or update.
    pub claims: Vec<ClaimRecord>,
    /// Reservations to insert or update.
    pub reservations: Vec<Reservation>,
    /// Reservations to delete, by (tenant, workload).
    pub removed_reservations: Vec<(TenantId, WorkloadId)>,
    /// The request id this write answers.
    pub idempotency: Option<IdempotentRecord>,
    /// Events to record with it.
    pub events: Vec<NewEvent>,
}

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
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn opt_tenant(s: Option<String>) -> Result<Option<TenantId>, StoreError> {
    s.map(|t| TenantId::new(t).map_err(|e| corrupt("tenant id", e)))
        .transpose()
}

#[derive(sqlx::FromRow)]
struct ContainerRow {
    container_id: String,
    workload_id: String,
    node_id: String,
    docker_id: Option<String>,
    state: String,
    spec_hash: String,
    tenant_id: Option<String>,
    last_tenant_id: Option<String>,
    claim_generation: i64,
    limits_cpus: Option<f64>,
    limits_memory: Option<i64>,
    state_path: String,
    comm_path: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<ContainerRow> for ContainerRecord {
    type Error = StoreError;
    fn try_from(r: ContainerRow) -> Result<Self, StoreError> {
        Ok(ContainerRecord {
            id: ContainerId::from_str(&r.container_id).map_err(|e| corrupt("container id", e))?,
            workload_id: WorkloadId::new(r.workload_id).map_err(|e| corrupt("workload id", e))?,
            node_id: NodeId::new(r.node_id).map_err(|e| corrupt("node id", e))?,
            docker_id: r.docker_id,
            state: ContainerState::from_str(&r.state).map_err(|e| corrupt("container state", e))?,
            spec_hash: r.spec_hash,
            tenant_id: opt_tenant(r.tenant_id)?,
            last_tenant_id: opt_tenant(r.last_tenant_id)?,
            claim_generation: r.claim_generation.max(0) as u64,
            limits: Limits {
                cpus: r.limits_cpus,
                memory_bytes: r.limits_memory.map(|m| m.max(0) as u64),
            },
            state_path: r.state_path,
            comm_path: r.comm_path,
            created_at: Timestamp::from_millis(r.created_at),
            updated_at: Timestamp::from_millis(r.updated_at),
        })
    }
}

#[derive(sqlx::FromRow)]
struct ClaimRow {
    claim_id: String,
    tenant_id: String,
    workload_id: String,
    container_id: String,
    node_id: String,
    generation: i64,
    source: String,
    status: String,
    claimed_at: i64,
    last_activity_at: i64,
    released_at: Option<i64>,
}

impl TryFrom<ClaimRow> for ClaimRecord {
    type Error = StoreError;
    fn try_from(r: ClaimRow) -> Result<Self, StoreError> {
        Ok(ClaimRecord {
            claim_id: r.claim_id,
            tenant_id: TenantId::new(r.tenant_id).map_err(|e| corrupt("tenant id", e))?,
            workload_id: WorkloadId::new(r.workload_id).map_err(|e| corrupt("workload id", e))?,
            container_id: ContainerId::from_str(&r.container_id)
                .map_err(|e| corrupt("container id", e))?,
            node_id: NodeId::new(r.node_id).map_err(|e| corrupt("node id", e))?,
            generation: r.generation.max(0) as u64,
            source: ClaimSource::from_str(&r.source).map_err(|e| corrupt("claim source", e))?,
            status: ClaimStatus::from_str(&r.status).map_err(|e| corrupt("claim status", e))?,
            claimed_at: Timestamp::from_millis(r.claimed_at),
            last_activity_at: Timestamp::from_millis(r.last_activity_at),
            released_at: r.released_at.map(Timestamp::from_millis),
        })
    }
}

#[derive(sqlx::FromRow)]
struct ReservationRow {
    tenant_id: String,
    workload_id: String,
    container_id: String,
    node_id: String,
    reserved_at: i64,
    expires_at: i64,
}

impl TryFrom<ReservationRow> for Reservation {
    type Error = StoreError;
    fn try_from(r: ReservationRow) -> Result<Self, StoreError> {
        Ok(Reservation {
            tenant_id: TenantId::new(r.tenant_id).map_err(|e| corrupt("tenant id", e))?,
            workload_id: WorkloadId::new(r.workload_id).map_err(|e| corrupt("workload id", e))?,
            container_id: ContainerId::from_str(&r.container_id)
                .map_err(|e| corrupt("container id", e))?,
            node_id: NodeId::new(r.node_id).map_err(|e| corrupt("node id", e))?,
            reserved_at: Timestamp::from_millis(r.reserved_at),
            expires_at: Timestamp::from_millis(r.expires_at),
        })
    }
}

async fn apply(tx: &mut WriteTx, write: PoolWrite) -> Result<Vec<Event>, StoreError> {
    // Deletions of reservations come first: an affinity claim consumes the
    // reservation before the container changes state.
    for (tenant, workload) in &write.removed_reservations {
        sqlx::query("DELETE FROM affinity_reservations WHERE tenant_id = ? AND workload_id = ?")
            .bind(tenant.as_str())
            .bind(workload.as_str())
            .execute(tx.conn())
            .await?;
    }
    for id in &write.removed_containers {
        sqlx::query("DELETE FROM affinity_reservations WHERE container_id = ?")
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
        sqlx::query("DELETE FROM containers WHERE container_id = ?")
            .bind(id.to_string())
            .execute(tx.conn())
            .await?;
    }
    for c in &write.containers {
        sqlx::query(
            "INSERT INTO containers (container_id, pool_id, workload_id, node_id, docker_id, state, spec_hash, \
             tenant_id, last_tenant_id, claim_generation, limits_cpus, limits_memory, state_path, comm_path, \
             created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (container_id) DO UPDATE SET docker_id = excluded.docker_id, state = excluded.state, \
             tenant_id = excluded.tenant_id, last_tenant_id = excluded.last_tenant_id, \
             claim_generation = excluded.claim_generation, limits_cpus = excluded.limits_cpus, \
             limits_memory = excluded.limits_memory, state_path = excluded.state_path, \
             comm_path = excluded.comm_path, updated_at = excluded.updated_at",
        )
        .bind(c.id.to_string())
        .bind(c.workload_id.as_str())
        .bind(c.workload_id.as_str())
        .bind(c.node_id.as_str())
        .bind(&c.docker_id)
        .bind(c.state.as_str())
        .bind(&c.spec_hash)
        .bind(c.tenant_id.as_ref().map(TenantId::as_str))
        .bind(c.last_tenant_id.as_ref().map(TenantId::as_str))
        .bind(c.claim_generation as i64)
        .bind(c.limits.cpus)
        .bind(c.limits.memory_bytes.map(|m| m as i64))
        .bind(&c.state_path)
        .bind(&c.comm_path)
        .bind(c.created_at.as_millis())
        .bind(c.updated_at.as_millis())
        .execute(tx.conn())
        .await?;
    }
    for c in &write.claims {
        sqlx::query(
            "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, \
             status, claimed_at, last_activity_at, released_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (claim_id) DO UPDATE SET status = excluded.status, \
             last_activity_at = excluded.last_activity_at, released_at = excluded.released_at",
        )
        .bind(&c.claim_id)
        .bind(c.tenant_id.as_str())
        .bind(c.workload_id.as_str())
        .bind(c.container_id.to_string())
        .bind(c.node_id.as_str())
        .bind(c.generation as i64)
        .bind(c.source.as_str())
        .bind(c.status.as_str())
        .bind(c.claimed_at.as_millis())
        .bind(c.last_activity_at.as_millis())
        .bind(c.released_at.map(|t| t.as_millis()))
        .execute(tx.conn())
        .await?;
    }
    for r in &write.reservations {
        sqlx::query(
            "INSERT INTO affinity_reservations (tenant_id, workload_id, container_id, node_id, reserved_at, \
             expires_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, workload_id) DO UPDATE SET \
             container_id = excluded.container_id, node_id = excluded.node_id, \
             reserved_at = excluded.reserved_at, expires_at = excluded.expires_at",
        )
        .bind(r.tenant_id.as_str())
        .bind(r.workload_id.as_str())
        .bind(r.container_id.to_string())
        .bind(r.node_id.as_str())
        .bind(r.reserved_at.as_millis())
        .bind(r.expires_at.as_millis())
        .execute(tx.conn())
        .await?;
    }
    if let Some(record) = &write.idempotency {
        insert_idempotent(tx, record).await?;
    }
    let mut recorded = Vec::with_capacity(write.events.len());
    for event in write.events {
        recorded.push(insert_event(tx, event).await?);
    }
    Ok(recorded)
}

impl Store {
    /// Commits one pool decision atomically.
    pub async fn apply_pool_write(&self, write: PoolWrite) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| async move { apply(tx, write).await.map(|_| ()) }.boxed())
            .await
    }

    /// Every container, active claim and reservation: what the pool index
    /// is rebuilt from at startup.
    pub async fn load_pool_snapshot(&self) -> Result<PoolSnapshot, StoreError> {
        let containers: Vec<ContainerRow> = sqlx::query_as(
            "SELECT container_id, workload_id, node_id, docker_id, state, spec_hash, tenant_id, last_tenant_id, \
             claim_generation, limits_cpus, limits_memory, state_path, comm_path, created_at, updated_at \
             FROM containers ORDER BY created_at",
        )
        .fetch_all(&self.reads)
        .await?;
        let claims: Vec<ClaimRow> = sqlx::query_as(
            "SELECT claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
             claimed_at, last_activity_at, released_at FROM claims WHERE status = 'active'",
        )
        .fetch_all(&self.reads)
        .await?;
        let reservations: Vec<ReservationRow> = sqlx::query_as(
            "SELECT tenant_id, workload_id, container_id, node_id, reserved_at, expires_at FROM affinity_reservations",
        )
        .fetch_all(&self.reads)
        .await?;
        Ok(PoolSnapshot {
            containers: containers
                .into_iter()
                .map(ContainerRecord::try_from)
                .collect::<Result<_, _>>()?,
            claims: claims
                .into_iter()
                .map(ClaimRecord::try_from)
                .collect::<Result<_, _>>()?,
            reservations: reservations
                .into_iter()
                .map(Reservation::try_from)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Claims, newest first; ended ones only when asked.
    pub async fn list_claims(
        &self,
        include_ended: bool,
        limit: u32,
    ) -> Result<Vec<ClaimRecord>, StoreError> {
        let rows: Vec<ClaimRow> = sqlx::query_as(
            "SELECT claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
             claimed_at, last_activity_at, released_at FROM claims WHERE (? OR status = 'active') \
             ORDER BY claimed_at DESC LIMIT ?",
        )
        .bind(include_ended)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter().map(ClaimRecord::try_from).collect()
    }

    /// Records tenant activity on claims, in one write.
    pub async fn touch_claims(&self, touches: Vec<(String, Timestamp)>) -> Result<(), StoreError> {
        if touches.is_empty() {
            return Ok(());
        }
        self.writer
            .write(move |tx| {
                async move {
                    for (claim_id, at) in touches {
                        sqlx::query("UPDATE claims SET last_activity_at = max(last_activity_at, ?) WHERE claim_id = ?")
                            .bind(at.as_millis())
                            .bind(&claim_id)
                            .execute(tx.conn())
                            .await?;
                    }
                    Ok(())
                }
                .boxed()
            })
            .await
    }

    /// Every pool's operator overrides.
    pub async fn pool_overrides(&self) -> Result<Vec<(WorkloadId, PoolOverride)>, StoreError> {
        let rows: Vec<(String, Option<i64>, Option<i64>, bool)> = sqlx::query_as(
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
                        draining,
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
                    sqlx::query(
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
