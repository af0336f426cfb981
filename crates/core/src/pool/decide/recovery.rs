//! Node loss and recovery: what happens to claims and containers when a
//! node or a container disappears, and when one comes back.

use crate::container::StateFile;
use crate::event::EventKind;
use crate::ids::{ContainerId, NodeId, TenantId, WorkloadId};
use crate::pool::index::Index;
use crate::pool::write::{ClaimChange, ContainerChange, PoolWrite, ReservationChange};
use crate::pool::{ClaimRecord, ClaimSource, ClaimStatus, ContainerRecord, ContainerState};
use crate::time::Timestamp;

use super::event;

/// Ends `claim` as LOST in `write`, with its event.
fn lose_claim(
    write: &mut PoolWrite,
    claim: &ClaimRecord,
    c: &ContainerRecord,
    why: &str,
    now: Timestamp,
) {
    let mut lost = claim.clone();
    lost.status = ClaimStatus::Lost;
    lost.released_at = Some(now);
    write.claims.push(ClaimChange::End(lost));
    write.events.push(event(
        now,
        EventKind::ClaimLost,
        Some(&claim.tenant_id),
        c,
        format!(
            "claim of {} on {} is lost: {why}",
            claim.tenant_id, claim.container_id
        ),
    ));
}

/// A node was declared lost. A claim on it is given up only where its
/// workload's `disconnect` says so (`gives_up`): that claim becomes LOST,
/// so its tenant can claim elsewhere, and its container is set aside as
/// Lost. Every other claim is kept, with its container, until the node
/// returns: silence is not evidence that the container is gone. The
/// node's idle containers are set aside as Lost (they may come back with
/// the node), and its reservations end, in the database as in memory,
/// except those whose container `retained` says must be kept (it holds
/// files whose upload is still owed).
pub fn node_lost(
    index: &Index,
    node: &NodeId,
    reason: &str,
    retained: impl Fn(&ContainerId) -> bool,
    gives_up: impl Fn(&WorkloadId) -> bool,
    now: Timestamp,
) -> Option<PoolWrite> {
    let mut write = PoolWrite::default();
    let why = format!("node {node} is lost ({reason})");
    for c in index.containers_on(node) {
        let keep = c.state == ContainerState::Reserved && retained(&c.id);
        if keep || matches!(c.state, ContainerState::Lost | ContainerState::Draining) {
            continue;
        }
        if let Some(claim) = index.claim_on(&c.id) {
            if !gives_up(&claim.workload_id) {
                continue;
            }
            lose_claim(&mut write, claim, c, &why, now);
        }
        if let Some(r) = index.reservation_on(&c.id) {
            write.reservations.push(ReservationChange::remove(r));
        }
        let mut lost = c.successor(now);
        lost.state = ContainerState::Lost;
        write.containers.push(ContainerChange::update(c, lost));
    }
    (!write.changes_nothing()).then_some(write)
}

/// A container is missing from its node's fresh full report. A claimed one
/// is set aside as Lost first (its claim ends; the report may have missed
/// it and it may come back); any other row, or one already Lost and still
/// missing, is forgotten.
pub fn mark_lost(
    index: &Index,
    id: &ContainerId,
    reason: &str,
    now: Timestamp,
) -> Option<PoolWrite> {
    lose(index, id, reason, false, now)
}

/// The engine destroyed a container: unlike a report that missed it, that
/// is final, so its row is forgotten at once whatever its state (its claim
/// ends; who it served stays in the claims table, which adoption reads).
pub fn destroyed(
    index: &Index,
    id: &ContainerId,
    reason: &str,
    now: Timestamp,
) -> Option<PoolWrite> {
    lose(index, id, reason, true, now)
}

fn lose(
    index: &Index,
    id: &ContainerId,
    reason: &str,
    certain: bool,
    now: Timestamp,
) -> Option<PoolWrite> {
    let c = index.container(id)?;
    let mut write = PoolWrite::default();
    if let Some(claim) = index.claim_on(id) {
        lose_claim(&mut write, claim, c, reason, now);
    }
    if let Some(r) = index.reservation_on(id) {
        write.reservations.push(ReservationChange::remove(r));
    }
    if c.state == ContainerState::Claimed && !certain {
        let mut lost = c.successor(now);
        lost.state = ContainerState::Lost;
        write.containers.push(ContainerChange::update(c, lost));
    } else {
        write.containers.push(ContainerChange::remove(c));
    }
    write.events.push(event(
        now,
        EventKind::ContainerLost,
        None,
        c,
        format!("container {id} of {} is gone: {reason}", c.workload_id),
    ));
    Some(write)
}

/// A row the database calls unused whose container's state file says a
/// tenant held it (see `reconcile::ActionKind::Reclaim`). It never serves
/// anyone else. Its current tenant, if it is running and the tenant holds
/// nothing else of the workload, gets it back at once as a new claim (as
/// adoption would); otherwise it is drained. Its generation moves past
/// the state file's, so a fencing token is never handed out twice.
pub fn reclaim(
    index: &Index,
    id: &ContainerId,
    state: &StateFile,
    running: bool,
    claim_id: String,
    reason: &str,
    now: Timestamp,
) -> Option<(PoolWrite, Option<ClaimRecord>)> {
    let c = index
        .container(id)
        .filter(|c| matches!(c.state, ContainerState::Idle | ContainerState::Warming))
        .filter(|c| !c.used())?;
    let holder = state.tenant_id.as_ref().or(state.last_tenant_id.as_ref())?;
    let mut back = c.successor(now);
    back.claim_generation = back.claim_generation.max(state.claim_generation);
    let mut write = PoolWrite::default();
    let mut claim = None;
    match &state.tenant_id {
        Some(t)
            if running
                && index.claim(t, &c.workload_id).is_none()
                && index.reservation(t, &c.workload_id).is_none() =>
        {
            claim = Some(give_back(
                &mut write,
                &mut back,
                c,
                t,
                claim_id,
                (
                    state.claimed_at.unwrap_or(now),
                    state.last_activity_at.unwrap_or(now).max(now),
                ),
                reason,
                now,
            ));
        }
        _ => {
            back.state = ContainerState::Draining;
            back.last_tenant_id = Some(holder.clone());
            write.events.push(event(
                now,
                EventKind::ContainerDraining,
                Some(holder),
                c,
                format!(
                    "container {id} served {holder} and will be destroyed (its tenant holds another, or it is stopped): {reason}"
                ),
            ));
        }
    }
    write.containers.push(ContainerChange::update(c, back));
    Some((write, claim))
}

/// Gives `c` (as `back`, its next version) to `tenant` as a new claim with
/// the next generation, recorded in `write` with its event: what `resume`
/// and `reclaim` do when the container's tenant may have it back.
/// `times` are the claim's start and last activity.
#[allow(clippy::too_many_arguments)]
fn give_back(
    write: &mut PoolWrite,
    back: &mut ContainerRecord,
    c: &ContainerRecord,
    tenant: &TenantId,
    claim_id: String,
    times: (Timestamp, Timestamp),
    reason: &str,
    now: Timestamp,
) -> ClaimRecord {
    back.state = ContainerState::Claimed;
    back.tenant_id = Some(tenant.clone());
    back.claim_generation += 1;
    let claim = ClaimRecord {
        claim_id,
        tenant_id: tenant.clone(),
        workload_id: c.workload_id.clone(),
        container_id: c.id,
        node_id: c.node_id.clone(),
        generation: back.claim_generation,
        source: ClaimSource::Existing,
        status: ClaimStatus::Active,
        claimed_at: times.0,
        last_activity_at: times.1,
        released_at: None,
        restored: false,
    };
    write.claims.push(ClaimChange::Insert(claim.clone()));
    write.events.push(event(
        now,
        EventKind::ClaimResumed,
        Some(tenant),
        c,
        format!(
            "tenant {tenant} has container {} back as generation {}: {reason}",
            c.id, back.claim_generation
        ),
    ));
    claim
}

/// A Lost container runs again. Its tenant gets it back as a new claim
/// with the next generation (the old one was declared lost, so its fencing
/// token must not be honoured again), unless the tenant holds another
/// claim or reservation of the workload; a container a tenant ever held
/// is otherwise destroyed, never put back in the pool. One no tenant ever
/// held goes back to warming, so it rejoins the pool only once it is seen
/// ready. A container that came back stopped (`running` false: a host
/// rebooted) serves nobody and is destroyed.
pub fn resume(
    index: &Index,
    id: &ContainerId,
    running: bool,
    reason: &str,
    claim_id: String,
    now: Timestamp,
) -> Option<(PoolWrite, Option<ClaimRecord>)> {
    let c = index
        .container(id)
        .filter(|c| c.state == ContainerState::Lost)?;
    let mut back = c.successor(now);
    let mut write = PoolWrite::default();
    let mut claim = None;
    match &c.tenant_id {
        Some(t)
            if running
                && index.claim(t, &c.workload_id).is_none()
                && index.reservation(t, &c.workload_id).is_none() =>
        {
            claim = Some(give_back(
                &mut write,
                &mut back,
                c,
                t,
                claim_id,
                (now, now),
                reason,
                now,
            ));
        }
        _ if c.used() || !running => {
            let holder = c.tenant_id.as_ref().or(c.last_tenant_id.as_ref());
            back.state = ContainerState::Draining;
            if let Some(t) = back.tenant_id.take() {
                back.last_tenant_id = Some(t);
            }
            write.events.push(event(
                now,
                EventKind::ContainerDraining,
                holder,
                c,
                match holder {
                    Some(h) if running => format!(
                        "container {id} is back but will be destroyed: it served {h} and never serves anyone else"
                    ),
                    _ => format!("container {id} is back but stopped: it will be destroyed"),
                },
            ));
        }
        _ => back.state = ContainerState::Warming,
    }
    write.containers.push(ContainerChange::update(c, back));
    Some((write, claim))
}

/// Takes in a managed container that has no row. `record` is its row as
/// built from its labels (Warming, no tenant); its state file says who
/// held it; `prior` is what the database still knows of its claims (the
/// tenant and the highest generation), which outlives the row and, unlike
/// the state file, never lags behind an acknowledged claim. Its tenant
/// gets its claim back unless the evidence disagrees or the tenant holds
/// another claim or reservation of the workload; after a claim the
/// database has seen, the generation moves past it, so a fencing token is
/// never handed out twice. A container a tenant ever held is otherwise
/// destroyed, never put in the pool.
#[allow(clippy::too_many_arguments)]
pub fn adopt(
    index: &Index,
    mut record: ContainerRecord,
    running: bool,
    state: &StateFile,
    prior: Option<(&TenantId, u64)>,
    claim_id: String,
    reason: &str,
    now: Timestamp,
) -> Option<(PoolWrite, Option<ClaimRecord>)> {
    if index.container(&record.id).is_some() {
        return None;
    }
    record.tenant_id = None;
    record.last_tenant_id = state
        .last_tenant_id
        .clone()
        .or_else(|| prior.map(|(t, _)| t.clone()));
    record.claim_generation = state.claim_generation.max(prior.map_or(0, |(_, g)| g));
    record.revision = 0;
    record.updated_at = now;
    let mut write = PoolWrite::default();
    let mut claim = None;
    let tenant = state.tenant_id.as_ref();
    let agrees = |t: &TenantId| {
        prior.is_none_or(|(p, _)| p == t) && state.last_tenant_id.as_ref().is_none_or(|l| l == t)
    };
    let free = tenant.is_some_and(|t| {
        agrees(t)
            && index.claim(t, &record.workload_id).is_none()
            && index.reservation(t, &record.workload_id).is_none()
    });
    match tenant {
        Some(t) if running && free => {
            record.state = ContainerState::Claimed;
            record.tenant_id = Some(t.clone());
            let past = prior.map_or(0, |(_, g)| g + 1);
            record.claim_generation = state.claim_generation.max(past).max(1);
            let adopted = ClaimRecord {
                claim_id,
                tenant_id: t.clone(),
                workload_id: record.workload_id.clone(),
                container_id: record.id,
                node_id: record.node_id.clone(),
                generation: record.claim_generation,
                source: ClaimSource::Existing,
                status: ClaimStatus::Active,
                claimed_at: state.claimed_at.unwrap_or(now),
                last_activity_at: state.last_activity_at.unwrap_or(now).max(now),
                released_at: None,
                restored: false,
            };
            write.claims.push(ClaimChange::Insert(adopted.clone()));
            claim = Some(adopted);
        }
        None if running && !record.used() => record.state = ContainerState::Idle,
        // Stopped, used by a tenant before, conflicting evidence, or the
        // tenant moved on: it never serves anyone else.
        _ => {
            record.state = ContainerState::Draining;
            if let Some(t) = tenant.filter(|_| record.last_tenant_id.is_none()) {
                record.last_tenant_id = Some(t.clone());
            }
        }
    }
    write.events.push(event(
        now,
        EventKind::ReconcileAdopted,
        tenant,
        &record,
        format!(
            "adopted container {} of {} on {} as {}{}: {reason}",
            record.id,
            record.workload_id,
            record.node_id,
            record.state,
            tenant
                .map(|t| format!(" for tenant {t}"))
                .unwrap_or_default()
        ),
    ));
    write.containers.push(ContainerChange::Insert(record));
    Some((write, claim))
}
