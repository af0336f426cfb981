//! The wire mapping shared by the pool services: pool records to their pb
//! messages, and [`PoolError`] to [`ApiError`].
//!
//! In one place so that every service answers with the same shapes and
//! the same status codes for the same failures.

use std::time::Duration;

use boilerhouse_core::pool::decide::Refusal;
use boilerhouse_core::pool::{
    ClaimRecord, ClaimSource, ClaimStatus, ContainerRecord, ContainerState, Reservation,
};
use boilerhouse_proto::convert::{limits_to_pb_resources, timestamp_to_pb};
use boilerhouse_proto::pb;

use crate::error::ApiError;
use crate::pools::PoolError;

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::UnknownWorkload(id) => ApiError::NotFound {
                what: "workload",
                id: id.to_string(),
            },
            PoolError::Refused(Refusal::UnknownContainer(id)) => ApiError::NotFound {
                what: "container",
                id: id.to_string(),
            },
            PoolError::Refused(r @ (Refusal::NoClaim(..) | Refusal::NoReservation(..))) => {
                ApiError::Missing(r.to_string())
            }
            PoolError::Refused(
                r @ (Refusal::StaleGeneration { .. } | Refusal::Precondition(_)),
            ) => ApiError::FailedPrecondition(r.to_string()),
            PoolError::Refused(Refusal::Busy(m)) => ApiError::Unavailable(m),
            PoolError::Exhausted(message) => ApiError::ResourceExhausted {
                message,
                retry_after: Duration::from_secs(1),
            },
            PoolError::Unavailable(m) => ApiError::Unavailable(m),
            PoolError::Store(s) => s.into(),
        }
    }
}

/// The wire source of a claim whose tenant files were restored.
pub(super) fn with_data(s: ClaimSource) -> pb::ClaimSource {
    match s {
        ClaimSource::Existing => pb::ClaimSource::ExistingWithData,
        ClaimSource::Affinity => pb::ClaimSource::AffinityWithData,
        ClaimSource::Pool => pb::ClaimSource::PoolWithData,
        ClaimSource::Cold => pb::ClaimSource::ColdWithData,
    }
}

fn source_to_pb(s: ClaimSource) -> pb::ClaimSource {
    match s {
        ClaimSource::Existing => pb::ClaimSource::Existing,
        ClaimSource::Affinity => pb::ClaimSource::Affinity,
        ClaimSource::Pool => pb::ClaimSource::Pool,
        ClaimSource::Cold => pb::ClaimSource::Cold,
    }
}

fn status_to_pb(s: ClaimStatus) -> pb::ClaimStatus {
    match s {
        ClaimStatus::Active => pb::ClaimStatus::Active,
        ClaimStatus::Released => pb::ClaimStatus::Released,
        ClaimStatus::Lost => pb::ClaimStatus::Lost,
    }
}

pub(super) fn state_to_pb(s: ContainerState) -> pb::ContainerState {
    match s {
        ContainerState::Warming => pb::ContainerState::Warming,
        ContainerState::Idle => pb::ContainerState::Idle,
        ContainerState::Claimed => pb::ContainerState::Claimed,
        ContainerState::Reserved => pb::ContainerState::Reserved,
        ContainerState::Draining => pb::ContainerState::Draining,
        ContainerState::Lost => pb::ContainerState::Lost,
    }
}

pub(super) fn claim_info(
    claim: &ClaimRecord,
    container: Option<&ContainerRecord>,
    source: ClaimSource,
) -> pb::ClaimInfo {
    pb::ClaimInfo {
        tenant_id: claim.tenant_id.to_string(),
        workload_id: claim.workload_id.to_string(),
        container_id: claim.container_id.to_string(),
        node_id: claim.node_id.to_string(),
        docker_id: container
            .and_then(|c| c.docker_id.clone())
            .unwrap_or_default(),
        state_path: container.map(|c| c.state_path.clone()).unwrap_or_default(),
        comm_path: container.map(|c| c.comm_path.clone()).unwrap_or_default(),
        source: if claim.restored {
            with_data(source)
        } else {
            source_to_pb(source)
        } as i32,
        generation: claim.generation,
        status: status_to_pb(claim.status) as i32,
        claimed_at: Some(timestamp_to_pb(claim.claimed_at)),
        last_activity_at: Some(timestamp_to_pb(claim.last_activity_at)),
        released_at: claim.released_at.map(timestamp_to_pb),
    }
}

pub(super) fn container_to_pb(c: &ContainerRecord) -> pb::Container {
    pb::Container {
        container_id: c.id.to_string(),
        pool_id: c.workload_id.to_string(),
        workload_id: c.workload_id.to_string(),
        node_id: c.node_id.to_string(),
        docker_id: c.docker_id.clone().unwrap_or_default(),
        state: state_to_pb(c.state) as i32,
        tenant_id: c
            .tenant_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        last_tenant_id: c
            .last_tenant_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        spec_hash: c.spec_hash.clone(),
        claim_generation: c.claim_generation,
        limits: Some(limits_to_pb_resources(&c.limits)),
        state_path: c.state_path.clone(),
        created_at: Some(timestamp_to_pb(c.created_at)),
        updated_at: Some(timestamp_to_pb(c.updated_at)),
    }
}

pub(super) fn reservation_to_pb(r: &Reservation) -> pb::Reservation {
    pb::Reservation {
        tenant_id: r.tenant_id.to_string(),
        workload_id: r.workload_id.to_string(),
        container_id: r.container_id.to_string(),
        node_id: r.node_id.to_string(),
        reserved_at: Some(timestamp_to_pb(r.reserved_at)),
        expires_at: Some(timestamp_to_pb(r.expires_at)),
        held: String::new(),
    }
}
