//! The pool tables' rows as read, and their conversion into the core's
//! records (a row that does not convert is corruption, named).

use std::str::FromStr;

use boilerhouse_core::pool::{
    ClaimRecord, ClaimSource, ClaimStatus, ContainerRecord, ContainerState, Reservation,
};
use boilerhouse_core::workload::Limits;
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp, WorkloadId};

use crate::store::StoreError;

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn opt_tenant(s: Option<String>) -> Result<Option<TenantId>, StoreError> {
    s.map(|t| TenantId::new(t).map_err(|e| corrupt("tenant id", e)))
        .transpose()
}

/// Also read from JSON: an array of the columns in this order (the
/// restart's read, `snapshot::CONTAINER_ROWS_AS_JSON`), where `limits_cpus`
/// is text, since SQLite's JSON keeps only 15 digits of a REAL.
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(super) struct ContainerRow {
    container_id: String,
    workload_id: String,
    node_id: String,
    docker_id: Option<String>,
    state: String,
    spec_hash: String,
    tenant_id: Option<String>,
    last_tenant_id: Option<String>,
    claim_generation: i64,
    revision: i64,
    #[serde(deserialize_with = "real_from_text")]
    limits_cpus: Option<f64>,
    limits_memory: Option<i64>,
    state_path: String,
    comm_path: String,
    created_at: i64,
    updated_at: i64,
}

impl ContainerRow {
    /// Its key, for naming it when it does not convert.
    pub(super) fn key(&self) -> &str {
        &self.container_id
    }
}

/// A REAL written out in full by SQLite's `printf('%!.17g', ...)`.
fn real_from_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    use serde::Deserialize as _;
    Option::<String>::deserialize(d)?
        .map(|text| text.parse::<f64>().map_err(serde::de::Error::custom))
        .transpose()
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
            revision: r.revision.max(0) as u64,
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
pub(super) struct ClaimRow {
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
    restored: super::sql::Flag,
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
            restored: r.restored.0,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ReservationRow {
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
