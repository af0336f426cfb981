//! Every pool transition, as a pure function from the index (what was
//! committed) to the [`PoolWrite`] that makes it.
//!
//! The server and the simulation call the same functions: the server
//! decides under its index lock, commits the write, and the index applies
//! it; the simulation decides on snapshots it chooses and commits in the
//! order it chooses. Each write states what it expects to replace, so a
//! decision made on a stale view is refused by the store, never applied
//! over what happened meanwhile.
//!
//! The rules that keep tenants apart are here, in one place:
//! - a container a tenant ever held (`ContainerRecord::used`) goes back
//!   only to that tenant, or is destroyed; it is never idle again;
//! - a tenant holds at most one claim or reservation of a workload;
//! - a claim's generation only grows, so a fencing token is never reused.

mod affinity;
mod claims;
mod lifecycle;
mod recovery;

pub use affinity::{ReservationEnd, end_reservation, extend_reservation, restart_reservation};
pub use claims::{AfterRelease, Choice, Released, choose, grant, grant_resolved, release, touch};
pub use lifecycle::{DrainScope, drain, insert, promote, removed, set_docker_id};
pub use recovery::{adopt, destroyed, mark_lost, node_lost, reclaim, resume};

use crate::event::{EventKind, EventSubject, NewEvent};
use crate::ids::{ContainerId, TenantId, WorkloadId};
use crate::pool::ContainerRecord;
use crate::time::Timestamp;

/// Why a transition cannot be made on the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The tenant holds no active claim of the workload.
    #[error("tenant {0} has no active claim of workload {1}")]
    NoClaim(TenantId, WorkloadId),
    /// A fencing token that is not the claim's current one.
    #[error("generation {given} is stale: the claim's generation is {current}")]
    StaleGeneration {
        /// What the caller sent.
        given: u64,
        /// The claim's.
        current: u64,
    },
    /// The tenant has no reservation of the workload.
    #[error("tenant {0} has no reservation for workload {1}")]
    NoReservation(TenantId, WorkloadId),
    /// No such container.
    #[error("container {0} not found")]
    UnknownContainer(ContainerId),
    /// Not allowed in the current state.
    #[error("{0}")]
    Precondition(String),
    /// The state is in flux (a claim whose container is being reconciled);
    /// a retry shortly will do.
    #[error("{0}")]
    Busy(String),
}

/// What an event about a container concerns.
fn subject(tenant: Option<&TenantId>, c: &ContainerRecord) -> EventSubject {
    EventSubject {
        tenant_id: tenant.map(ToString::to_string),
        workload_id: Some(c.workload_id.to_string()),
        container_id: Some(c.id.to_string()),
        node_id: Some(c.node_id.to_string()),
        boost_id: None,
    }
}

fn event(
    now: Timestamp,
    kind: EventKind,
    tenant: Option<&TenantId>,
    c: &ContainerRecord,
    message: String,
) -> NewEvent {
    NewEvent::new(now, kind, message).with_subject(subject(tenant, c))
}

#[cfg(test)]
mod tests;
