//! Claims: which container a tenant gets (EXISTING, AFFINITY, POOL, else a
//! cold start), granting it, releasing it and recording activity.

use crate::event::EventKind;
use crate::ids::{ContainerId, TenantId, WorkloadId};
use crate::pool::index::Index;
use crate::pool::write::{ClaimChange, ContainerChange, PoolWrite, ReservationChange};
use crate::pool::{
    ClaimRecord, ClaimSource, ClaimStatus, ContainerRecord, ContainerState, Reservation,
};
use crate::time::Timestamp;

use super::{Refusal, event};

/// Where a claim is served from.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The tenant's current claim.
    Existing(ClaimRecord, ContainerRecord),
    /// The tenant's reservation, on a node that can be reached.
    Affinity(Reservation, ContainerRecord),
    /// An idle container that no one ever held. `superseded` is the
    /// tenant's reservation on a node that cannot be reached: the claim
    /// ends it, and its container is destroyed, so the tenant never holds
    /// two containers of one workload.
    Pool(ContainerRecord, Option<Reservation>),
    /// Nothing to offer: create a container. `superseded` as for `Pool`.
    Cold(Option<Reservation>),
}

/// EXISTING → AFFINITY → POOL → cold, over what was committed.
/// `taken` says whether an operation in flight owns a container (asked of
/// idle ones before their records are looked up), `offerable` whether it
/// may be handed out now (its node is live, say): a reserved or idle
/// container is offered only if it is not taken and offerable.
/// `spec_hash` is the workload's current spec, preferred among idle
/// containers.
pub fn choose(
    index: &Index,
    tenant: &TenantId,
    workload: &WorkloadId,
    spec_hash: &str,
    taken: impl Fn(&ContainerId) -> bool,
    offerable: impl Fn(&ContainerRecord) -> bool,
) -> Result<Choice, Refusal> {
    if let Some(claim) = index.claim(tenant, workload) {
        let container = index.container(&claim.container_id).ok_or_else(|| {
            Refusal::Busy(format!(
                "the container of {tenant}'s claim is being reconciled; retry shortly"
            ))
        })?;
        return Ok(Choice::Existing(claim.clone(), container.clone()));
    }
    let superseded = match index.reservation(tenant, workload) {
        Some(r) => match index.container(&r.container_id) {
            Some(c) if c.state == ContainerState::Reserved && !taken(&c.id) && offerable(c) => {
                return Ok(Choice::Affinity(r.clone(), c.clone()));
            }
            _ => Some(r.clone()),
        },
        None => None,
    };
    // A container of the workload's current spec when there is one; one
    // of an older spec (a rollout under way) only rather than a cold start.
    let mut stale = None;
    let mut idle = None;
    // Containers other claims are taking sit at the front (they are the
    // oldest idle, as this one's would be): passed over by id, before
    // their records are looked up.
    let candidates = index
        .idle_ids(workload)
        .filter(|id| !taken(id))
        .filter_map(|id| index.container(id));
    for c in candidates.filter(|c| !c.used() && offerable(c)) {
        if c.spec_hash == spec_hash {
            idle = Some(c.clone());
            break;
        }
        if stale.is_none() {
            stale = Some(c.clone());
        }
    }
    let idle = idle.or(stale);
    Ok(match idle {
        Some(c) => Choice::Pool(c, superseded),
        None => Choice::Cold(superseded),
    })
}

/// Grants `container` to `tenant`: it becomes Claimed with the next
/// generation, and the claim is recorded. `consumed` is the reservation an
/// affinity claim uses up; `superseded` a reservation the tenant leaves
/// behind (its container is destroyed).
#[allow(clippy::too_many_arguments)]
pub fn grant(
    index: &Index,
    tenant: &TenantId,
    container: &ContainerRecord,
    source: ClaimSource,
    consumed: Option<&Reservation>,
    superseded: Option<&Reservation>,
    claim_id: String,
    now: Timestamp,
) -> Result<(PoolWrite, ClaimRecord, ContainerRecord), Refusal> {
    let superseded = superseded.map(|r| (r, index.container(&r.container_id)));
    grant_resolved(
        tenant, container, source, consumed, superseded, claim_id, now,
    )
}

/// [`grant`] with the superseded reservation's container already looked
/// up (`None` if it has no row): it reads no index, so a server can build
/// the write after letting go of the index's lock. The write is
/// conditional on the rows as given, so a view that changed meanwhile is
/// refused at commit, not written over.
#[allow(clippy::too_many_arguments)]
pub fn grant_resolved(
    tenant: &TenantId,
    container: &ContainerRecord,
    source: ClaimSource,
    consumed: Option<&Reservation>,
    superseded: Option<(&Reservation, Option<&ContainerRecord>)>,
    claim_id: String,
    now: Timestamp,
) -> Result<(PoolWrite, ClaimRecord, ContainerRecord), Refusal> {
    let fits = match source {
        ClaimSource::Pool => container.state == ContainerState::Idle && !container.used(),
        ClaimSource::Cold => container.state == ContainerState::Warming && !container.used(),
        ClaimSource::Affinity => {
            container.state == ContainerState::Reserved
                && container.last_tenant_id.as_ref() == Some(tenant)
                && consumed.is_some_and(|r| r.container_id == container.id)
        }
        ClaimSource::Existing => false,
    };
    if !fits {
        return Err(Refusal::Precondition(format!(
            "container {} ({}, last tenant {:?}) cannot be granted to {tenant} as {}",
            container.id,
            container.state,
            container.last_tenant_id,
            source.as_str()
        )));
    }
    let mut write = PoolWrite::default();
    if let Some(r) = consumed {
        write.reservations.push(ReservationChange::remove(r));
    }
    if let Some((r, old)) = superseded {
        write.reservations.push(ReservationChange::remove(r));
        if let Some(old) = old {
            let mut gone = old.successor(now);
            gone.state = ContainerState::Draining;
            write.containers.push(ContainerChange::update(old, gone));
            write.events.push(event(
                now,
                EventKind::ContainerDraining,
                Some(tenant),
                old,
                format!(
                    "container {} will be destroyed: {tenant} claimed anew while its node {} was unreachable",
                    old.id, old.node_id
                ),
            ));
        }
    }
    let mut claimed = container.successor(now);
    claimed.state = ContainerState::Claimed;
    claimed.tenant_id = Some(tenant.clone());
    claimed.claim_generation += 1;
    let claim = ClaimRecord {
        claim_id,
        tenant_id: tenant.clone(),
        workload_id: container.workload_id.clone(),
        container_id: container.id,
        node_id: container.node_id.clone(),
        generation: claimed.claim_generation,
        source,
        status: ClaimStatus::Active,
        claimed_at: now,
        last_activity_at: now,
        released_at: None,
        restored: false,
    };
    write
        .containers
        .push(ContainerChange::update(container, claimed.clone()));
    write.claims.push(ClaimChange::Insert(claim.clone()));
    write.events.push(event(
        now,
        EventKind::ClaimCreated,
        Some(tenant),
        container,
        format!(
            "tenant {tenant} claimed container {} of {} ({})",
            container.id,
            container.workload_id,
            source.as_str()
        ),
    ));
    Ok((write, claim, claimed))
}

/// What happens to a released container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRelease {
    /// Kept for the tenant until then.
    Reserve {
        /// When the reservation ends.
        until: Timestamp,
    },
    /// Destroyed (a workload that does not reuse containers, or is gone).
    Destroy,
}

/// A release, decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    /// What to commit.
    pub write: PoolWrite,
    /// The claim as it ends.
    pub claim: ClaimRecord,
    /// The reservation it leaves, if kept.
    pub reservation: Option<Reservation>,
    /// The container as it becomes, if it still had a row.
    pub container: Option<ContainerRecord>,
}

/// The tenant's active claim of `workload`; with `generation`, only if it
/// is that one (a fencing token).
fn held<'a>(
    index: &'a Index,
    tenant: &TenantId,
    workload: &WorkloadId,
    generation: Option<u64>,
) -> Result<&'a ClaimRecord, Refusal> {
    let claim = index
        .claim(tenant, workload)
        .ok_or_else(|| Refusal::NoClaim(tenant.clone(), workload.clone()))?;
    match generation.filter(|g| *g != claim.generation) {
        Some(given) => Err(Refusal::StaleGeneration {
            given,
            current: claim.generation,
        }),
        None => Ok(claim),
    }
}

/// Releases the tenant's claim. With `generation`, only that claim.
pub fn release(
    index: &Index,
    tenant: &TenantId,
    workload: &WorkloadId,
    generation: Option<u64>,
    after: AfterRelease,
    reason: &str,
    now: Timestamp,
) -> Result<Released, Refusal> {
    let claim = held(index, tenant, workload, generation)?;
    let mut ended = claim.clone();
    ended.status = ClaimStatus::Released;
    ended.released_at = Some(now);
    let mut write = PoolWrite {
        claims: vec![ClaimChange::End(ended.clone())],
        ..Default::default()
    };
    let mut reservation = None;
    let mut container = None;
    if let Some(old) = index.container(&claim.container_id) {
        let mut c = old.successor(now);
        c.tenant_id = None;
        c.last_tenant_id = Some(tenant.clone());
        match after {
            AfterRelease::Reserve { until } => {
                c.state = ContainerState::Reserved;
                let r = Reservation {
                    tenant_id: tenant.clone(),
                    workload_id: workload.clone(),
                    container_id: c.id,
                    node_id: c.node_id.clone(),
                    reserved_at: now,
                    expires_at: until,
                };
                write
                    .reservations
                    .push(ReservationChange::Insert(r.clone()));
                reservation = Some(r);
            }
            AfterRelease::Destroy => c.state = ContainerState::Draining,
        }
        write
            .containers
            .push(ContainerChange::update(old, c.clone()));
        container = Some(c);
    }
    let until = reservation
        .as_ref()
        .map(|r| format!("; reserved until {}", r.expires_at))
        .unwrap_or_default();
    let message = format!(
        "tenant {tenant} released container {} of {workload} ({reason}){until}",
        claim.container_id
    );
    write.events.push(
        crate::event::NewEvent::new(now, EventKind::ClaimReleased, message).with_subject(
            crate::event::EventSubject {
                tenant_id: Some(tenant.to_string()),
                workload_id: Some(workload.to_string()),
                container_id: Some(claim.container_id.to_string()),
                node_id: Some(claim.node_id.to_string()),
                boost_id: None,
            },
        ),
    );
    Ok(Released {
        write,
        claim: ended,
        reservation,
        container,
    })
}

/// Records activity on a claim; with `generation`, checks it first.
pub fn touch(
    index: &Index,
    tenant: &TenantId,
    workload: &WorkloadId,
    generation: Option<u64>,
    at: Timestamp,
) -> Result<PoolWrite, Refusal> {
    let claim = held(index, tenant, workload, generation)?;
    Ok(PoolWrite {
        claims: vec![ClaimChange::Touch {
            claim_id: claim.claim_id.clone(),
            at,
        }],
        ..Default::default()
    })
}
