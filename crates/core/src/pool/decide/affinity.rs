//! Affinity reservations: ending, extending and restarting them.

use std::time::Duration;

use crate::event::EventKind;
use crate::ids::{ContainerId, TenantId, WorkloadId};
use crate::pool::index::Index;
use crate::pool::write::{ContainerChange, PoolWrite, ReservationChange};
use crate::pool::{ContainerState, Reservation};
use crate::time::Timestamp;

use super::{Refusal, event};

/// Why a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationEnd {
    /// Its time ran out.
    Expired,
    /// An operator ended it.
    Revoked,
}

fn held<'a>(
    index: &'a Index,
    tenant: &TenantId,
    workload: &WorkloadId,
) -> Result<&'a Reservation, Refusal> {
    index
        .reservation(tenant, workload)
        .ok_or_else(|| Refusal::NoReservation(tenant.clone(), workload.clone()))
}

/// Ends a reservation: its container is destroyed, never handed to anyone
/// else.
pub fn end_reservation(
    index: &Index,
    tenant: &TenantId,
    workload: &WorkloadId,
    why: ReservationEnd,
    now: Timestamp,
) -> Result<(PoolWrite, Reservation), Refusal> {
    let r = held(index, tenant, workload)?;
    let mut write = PoolWrite {
        reservations: vec![ReservationChange::remove(r)],
        ..Default::default()
    };
    let (kind, verb) = match why {
        ReservationEnd::Expired => (EventKind::AffinityExpired, "expired"),
        ReservationEnd::Revoked => (EventKind::AffinityRevoked, "revoked"),
    };
    let message = format!(
        "reservation of {tenant} for {workload} {verb}; container {} will be destroyed",
        r.container_id
    );
    match index.container(&r.container_id) {
        Some(c) => {
            let mut gone = c.successor(now);
            gone.state = ContainerState::Draining;
            write.containers.push(ContainerChange::update(c, gone));
            write
                .events
                .push(event(now, kind, Some(tenant), c, message));
        }
        None => write
            .events
            .push(crate::event::NewEvent::new(now, kind, message)),
    }
    Ok((write, r.clone()))
}

/// Pushes a reservation's expiry later by `by`. One past its expiry is
/// over, whether or not the expiry pass has reached it yet (a claim never
/// goes through it): it is refused, not brought back to life, unless
/// `kept` says its container outlives its expiry (its tenant's files are
/// still owed upstream), in which case `by` counts from `now`.
pub fn extend_reservation(
    index: &Index,
    tenant: &TenantId,
    workload: &WorkloadId,
    by: Duration,
    now: Timestamp,
    kept: impl Fn(&ContainerId) -> bool,
) -> Result<(PoolWrite, Reservation), Refusal> {
    let r = held(index, tenant, workload)?;
    if r.expires_at <= now && !kept(&r.container_id) {
        return Err(Refusal::Precondition(format!(
            "the reservation of {tenant} for {workload} expired at {}; it is ending, and its container with it",
            r.expires_at
        )));
    }
    let mut new = r.clone();
    new.expires_at = r.expires_at.max(now).saturating_add(by);
    let message = format!(
        "reservation of {tenant} for {workload} extended to {}",
        new.expires_at
    );
    let mut write = PoolWrite {
        reservations: vec![ReservationChange::Update {
            expected: r.clone(),
            new: new.clone(),
        }],
        ..Default::default()
    };
    if let Some(c) = index.container(&r.container_id) {
        write.events.push(event(
            now,
            EventKind::AffinityExtended,
            Some(tenant),
            c,
            message,
        ));
    }
    Ok((write, new))
}

/// Starts the reservation on `container` afresh (its full `timeout` from
/// `now`): the tenant's files reached the sink only now.
pub fn restart_reservation(
    index: &Index,
    tenant: &TenantId,
    workload: &WorkloadId,
    container: &ContainerId,
    timeout: Duration,
    now: Timestamp,
) -> Result<(PoolWrite, Reservation), Refusal> {
    let r = held(index, tenant, workload)?;
    if &r.container_id != container {
        return Err(Refusal::NoReservation(tenant.clone(), workload.clone()));
    }
    let mut new = r.clone();
    new.reserved_at = now;
    new.expires_at = now.saturating_add(timeout);
    Ok((
        PoolWrite {
            reservations: vec![ReservationChange::Update {
                expected: r.clone(),
                new: new.clone(),
            }],
            ..Default::default()
        },
        new,
    ))
}
