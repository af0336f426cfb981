//! A container's life outside claims: recorded before it is created, given
//! its Docker id, promoted to idle once ready, drained, and forgotten once
//! removed.

use crate::event::EventKind;
use crate::ids::ContainerId;
use crate::pool::index::Index;
use crate::pool::write::{ClaimChange, ContainerChange, PoolWrite, ReservationChange};
use crate::pool::{ClaimStatus, ContainerRecord, ContainerState};
use crate::time::Timestamp;

use super::{Refusal, event};

/// Records a new warming container before it is created, so a crash
/// between the two leaves a row to resend the create for, never an
/// unknown container.
pub fn insert(record: ContainerRecord) -> PoolWrite {
    PoolWrite {
        containers: vec![ContainerChange::Insert(record)],
        ..Default::default()
    }
}

/// Records the Docker id the agent reported for a create.
pub fn set_docker_id(
    index: &Index,
    id: &ContainerId,
    docker_id: &str,
    now: Timestamp,
) -> Option<PoolWrite> {
    let c = index.container(id)?;
    if c.docker_id.as_deref() == Some(docker_id) {
        return None;
    }
    let mut new = c.successor(now);
    new.docker_id = Some(docker_id.to_owned());
    Some(PoolWrite {
        containers: vec![ContainerChange::update(c, new)],
        ..Default::default()
    })
}

/// A warming container that is ready becomes idle, if no one ever held it.
pub fn promote(index: &Index, id: &ContainerId, now: Timestamp) -> Option<PoolWrite> {
    let c = index.container(id)?;
    if c.state != ContainerState::Warming || c.used() || c.docker_id.is_none() {
        return None;
    }
    let mut new = c.successor(now);
    new.state = ContainerState::Idle;
    Some(PoolWrite {
        containers: vec![ContainerChange::update(c, new)],
        ..Default::default()
    })
}

/// Which containers a drain may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainScope {
    /// Only containers no tenant holds or is promised: idle and warming
    /// ones (pool drains, removed workloads).
    Unowned,
    /// Anything but a claimed container (reservations end).
    Unclaimed,
    /// Anything; a claim becomes LOST (an operator's forced destroy).
    Any,
}

/// Marks a container for removal. `Ok(None)` when it is draining already.
pub fn drain(
    index: &Index,
    id: &ContainerId,
    scope: DrainScope,
    reason: &str,
    now: Timestamp,
) -> Result<Option<PoolWrite>, Refusal> {
    let c = index.container(id).ok_or(Refusal::UnknownContainer(*id))?;
    let allowed = match (scope, c.state) {
        (_, ContainerState::Draining) => return Ok(None),
        (DrainScope::Unowned, s) => {
            matches!(s, ContainerState::Idle | ContainerState::Warming) && !c.used()
        }
        (DrainScope::Unclaimed, s) => s != ContainerState::Claimed,
        (DrainScope::Any, _) => true,
    };
    if !allowed {
        let holder = c
            .tenant_id
            .as_ref()
            .map(|t| format!(" by {t}"))
            .unwrap_or_default();
        return Err(Refusal::Precondition(format!(
            "container {id} is {}{holder}; pass force to destroy it anyway",
            c.state
        )));
    }
    let mut write = PoolWrite::default();
    let mut gone = c.successor(now);
    gone.state = ContainerState::Draining;
    if let Some(claim) = index.claim_on(id) {
        let mut lost = claim.clone();
        lost.status = ClaimStatus::Lost;
        lost.released_at = Some(now);
        write.claims.push(ClaimChange::End(lost));
        write.events.push(event(
            now,
            EventKind::ClaimLost,
            Some(&claim.tenant_id),
            c,
            format!("claim of {} on {id} is lost: {reason}", claim.tenant_id),
        ));
        gone.last_tenant_id = Some(claim.tenant_id.clone());
    }
    if let Some(r) = index.reservation_on(id) {
        write.reservations.push(ReservationChange::remove(r));
    }
    if let Some(t) = gone.tenant_id.take() {
        gone.last_tenant_id = Some(t);
    }
    write.containers.push(ContainerChange::update(c, gone));
    write.events.push(event(
        now,
        EventKind::ContainerDraining,
        None,
        c,
        format!("container {id} will be destroyed: {reason}"),
    ));
    Ok(Some(write))
}

/// The agent confirmed a draining container is removed: forget the row.
pub fn removed(index: &Index, id: &ContainerId, now: Timestamp) -> Option<PoolWrite> {
    let c = index
        .container(id)
        .filter(|c| c.state == ContainerState::Draining)?;
    Some(PoolWrite {
        containers: vec![ContainerChange::remove(c)],
        events: vec![event(
            now,
            EventKind::ContainerDestroyed,
            None,
            c,
            format!("container {id} of {} destroyed", c.workload_id),
        )],
        ..Default::default()
    })
}
