//! The pool index: an in-memory mirror of the committed container,
//! active-claim and reservation rows, with the lookups the claim hot path
//! needs (idle containers per pool, claims by tenant and by container).
//!
//! A leader's index has one mutator, [`Index::apply`], called with each
//! [`PoolWrite`] after the store committed it. Nothing else changes it
//! (a standby's warm copy follows the rows instead, [`Index::put_rows`]),
//! so memory is always exactly what was committed: a restart rebuilds the
//! same value from the rows ([`Index::from_rows`]), and [`Index::check`]
//! states the rules a committed state must satisfy. Maps are ordered so that every
//! iteration, and with it every decision, is deterministic.

mod check;
mod load;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use load::NodeLoad;

use crate::ids::{ContainerId, NodeId, TenantId, WorkloadId};
use crate::pool::write::{ClaimChange, ContainerChange, PoolWrite, ReservationChange};
use crate::pool::{
    ClaimRecord, ClaimStatus, ContainerRecord, ContainerState, PoolCounts, Reservation,
};
use crate::time::Timestamp;

/// A claim or reservation is keyed by who holds it and of what.
pub type TenantKey = (TenantId, WorkloadId);

/// The mirror. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Index {
    /// Shared, so a pass that needs every container at one instant (the
    /// reconciler) copies pointers under the lock claims wait on, not
    /// 100,000 records.
    containers: BTreeMap<ContainerId, Arc<ContainerRecord>>,
    /// Idle containers per pool, oldest first.
    idle: BTreeMap<WorkloadId, BTreeSet<(Timestamp, ContainerId)>>,
    counts: BTreeMap<WorkloadId, PoolCounts>,
    /// The same counts per spec: a refill compares a pool with its current
    /// spec on every claim, and counting the pool's containers each time
    /// held the index lock for a scan of the whole pool.
    spec_counts: BTreeMap<(WorkloadId, String), PoolCounts>,
    claims: BTreeMap<TenantKey, ClaimRecord>,
    claim_of_container: BTreeMap<ContainerId, TenantKey>,
    claim_by_id: BTreeMap<String, TenantKey>,
    reservations: BTreeMap<TenantKey, Reservation>,
    /// Each node's containers and what their limits sum to.
    by_node: BTreeMap<NodeId, NodeLoad>,
    /// The containers in each state a container passes through (see
    /// [`Index::passing`]): the refiller looks for these after every burst
    /// of claims, and scanning 100,000 containers for the few warming or
    /// draining ones held the index lock claims wait on.
    passing: BTreeMap<ContainerState, BTreeSet<ContainerId>>,
}

/// Rows read from the database since some moment, for
/// [`Index::put_rows`]: the keys of rows gone (deleted, ended, or no
/// longer readable) and the rows as they now are.
#[derive(Debug, Clone, Default)]
pub struct RowChanges {
    /// Containers gone.
    pub removed_containers: Vec<ContainerId>,
    /// Claims, by claim id, no longer active.
    pub removed_claims: Vec<String>,
    /// Reservations gone.
    pub removed_reservations: Vec<TenantKey>,
    /// Container rows as they now are.
    pub containers: Vec<ContainerRecord>,
    /// Claim rows as they now are (an ended one is removed).
    pub claims: Vec<ClaimRecord>,
    /// Reservation rows as they now are.
    pub reservations: Vec<Reservation>,
}

/// A committed write that did not fit what memory held: the mirror had
/// drifted from the database. Memory takes the committed value anyway (the
/// database is the truth); the anomaly is reported so it can be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly(pub String);

impl Index {
    /// Rebuilds the index from stored rows: every container, the active
    /// claims and the reservations.
    pub fn from_rows(
        containers: impl IntoIterator<Item = ContainerRecord>,
        claims: impl IntoIterator<Item = ClaimRecord>,
        reservations: impl IntoIterator<Item = Reservation>,
    ) -> Self {
        let mut index = Index::default();
        for c in containers {
            index.put_container(c);
        }
        for claim in claims
            .into_iter()
            .filter(|c| c.status == ClaimStatus::Active)
        {
            index.put_claim(claim);
        }
        for r in reservations {
            index
                .reservations
                .insert((r.tenant_id.clone(), r.workload_id.clone()), r);
        }
        index
    }

    /// Brings an index kept beside a database that another server writes
    /// (a standby's warm copy) to the rows as they now are: the named rows
    /// go, then the given ones are put. A leader's index never changes
    /// this way, only by [`Index::apply`]; a copy changed this way equals
    /// [`Index::from_rows`] of the same rows.
    pub fn put_rows(&mut self, changes: RowChanges) {
        for id in &changes.removed_containers {
            self.remove_container(id);
        }
        for claim_id in &changes.removed_claims {
            if let Some(key) = self.claim_by_id.get(claim_id).cloned() {
                self.remove_claim(&key);
            }
        }
        for key in &changes.removed_reservations {
            self.reservations.remove(key);
        }
        for c in changes.containers {
            self.put_container(c);
        }
        for claim in changes.claims {
            if claim.status == ClaimStatus::Active {
                self.put_claim(claim);
            } else if let Some(key) = self.claim_by_id.get(&claim.claim_id).cloned() {
                self.remove_claim(&key);
            }
        }
        for r in changes.reservations {
            self.reservations
                .insert((r.tenant_id.clone(), r.workload_id.clone()), r);
        }
    }

    /// Makes memory what `write` committed. The only mutator of a
    /// leader's index.
    pub fn apply(&mut self, write: &PoolWrite) -> Vec<Anomaly> {
        let mut anomalies = Vec::new();
        let mut drift = |what: String| anomalies.push(Anomaly(what));
        for change in &write.reservations {
            match change {
                ReservationChange::Insert(r) => {
                    let key = (r.tenant_id.clone(), r.workload_id.clone());
                    if let Some(old) = self.reservations.insert(key, r.clone()) {
                        drift(format!("inserted reservation over {old:?}"));
                    }
                }
                ReservationChange::Update { expected, new } => {
                    let key = (new.tenant_id.clone(), new.workload_id.clone());
                    let old = self.reservations.insert(key, new.clone());
                    if old.as_ref() != Some(expected) {
                        drift(format!("updated reservation {expected:?} but held {old:?}"));
                    }
                }
                ReservationChange::Remove { expected } => {
                    let key = (expected.tenant_id.clone(), expected.workload_id.clone());
                    match self.reservations.remove(&key) {
                        Some(r) if &r == expected => {}
                        other => drift(format!(
                            "removed reservation {expected:?} but held {other:?}"
                        )),
                    }
                }
            }
        }
        for change in &write.containers {
            match change {
                ContainerChange::Insert(c) => {
                    if let Some(old) = self.put_container(c.clone()) {
                        drift(format!("inserted container {} over {old:?}", c.id));
                    }
                }
                ContainerChange::Update { expected, record } => {
                    let before = self.put_container(record.clone());
                    if !before.as_ref().is_some_and(|old| expected.matches(old)) {
                        drift(format!(
                            "container {} updated from {expected:?} but held {before:?}",
                            record.id
                        ));
                    }
                }
                ContainerChange::Remove { id, expected } => match self.remove_container(id) {
                    Some(old) if expected.matches(&old) => {}
                    other => drift(format!(
                        "removed container {id} as {expected:?} but held {other:?}"
                    )),
                },
            }
        }
        for change in &write.claims {
            match change {
                ClaimChange::Insert(claim) => {
                    if let Some(old) = self.put_claim(claim.clone()) {
                        drift(format!(
                            "claim {} replaced active claim {}",
                            claim.claim_id, old.claim_id
                        ));
                    }
                }
                ClaimChange::End(claim) => {
                    let key = (claim.tenant_id.clone(), claim.workload_id.clone());
                    match self.claims.get(&key) {
                        Some(held) if held.claim_id == claim.claim_id => {
                            self.remove_claim(&key);
                        }
                        other => drift(format!(
                            "ended claim {} but held {:?}",
                            claim.claim_id,
                            other.map(|c| &c.claim_id)
                        )),
                    }
                }
                ClaimChange::Touch { claim_id, at } => {
                    // A touch of a claim that ended meanwhile is fine: the
                    // store updates the ended row, memory has nothing.
                    if let Some(key) = self.claim_by_id.get(claim_id)
                        && let Some(claim) = self.claims.get_mut(key)
                    {
                        claim.last_activity_at = claim.last_activity_at.max(*at);
                    }
                }
                ClaimChange::Restored { claim_id } => {
                    if let Some(key) = self.claim_by_id.get(claim_id)
                        && let Some(claim) = self.claims.get_mut(key)
                    {
                        claim.restored = true;
                    }
                }
            }
        }
        anomalies
    }

    /// Whether the store would accept `write` on this state: the same
    /// conditions its SQL checks, in the same order, as a model for tests
    /// and the simulation. `Err` names the first condition that fails.
    pub fn admit(&self, write: &PoolWrite) -> Result<(), String> {
        let mut scratch = self.clone();
        for change in &write.reservations {
            let ok = match change {
                ReservationChange::Insert(r) => {
                    scratch.reservation(&r.tenant_id, &r.workload_id).is_none()
                        && scratch.reservation_on(&r.container_id).is_none()
                }
                ReservationChange::Update { expected, new } => {
                    scratch.reservation(&new.tenant_id, &new.workload_id) == Some(expected)
                }
                ReservationChange::Remove { expected } => {
                    scratch.reservation(&expected.tenant_id, &expected.workload_id)
                        == Some(expected)
                }
            };
            if !ok {
                return Err(format!("reservation change refused: {change:?}"));
            }
            scratch.apply(&PoolWrite {
                reservations: vec![change.clone()],
                ..Default::default()
            });
        }
        for change in &write.containers {
            let ok = match change {
                ContainerChange::Insert(c) => scratch.container(&c.id).is_none(),
                ContainerChange::Update { expected, record } => scratch
                    .container(&record.id)
                    .is_some_and(|old| expected.matches(old)),
                ContainerChange::Remove { id, expected } => scratch
                    .container(id)
                    .is_some_and(|old| expected.matches(old)),
            };
            if !ok {
                return Err(format!(
                    "container {} changed since it was read",
                    change.id()
                ));
            }
            scratch.apply(&PoolWrite {
                containers: vec![change.clone()],
                ..Default::default()
            });
        }
        for change in &write.claims {
            let ok = match change {
                ClaimChange::Insert(claim) => {
                    scratch
                        .claim(&claim.tenant_id, &claim.workload_id)
                        .is_none()
                        && scratch.claim_on(&claim.container_id).is_none()
                }
                ClaimChange::End(claim) => scratch
                    .claim(&claim.tenant_id, &claim.workload_id)
                    .is_some_and(|c| {
                        c.claim_id == claim.claim_id && c.generation == claim.generation
                    }),
                ClaimChange::Touch { .. } | ClaimChange::Restored { .. } => true,
            };
            if !ok {
                return Err(format!("claim change refused: {change:?}"));
            }
            scratch.apply(&PoolWrite {
                claims: vec![change.clone()],
                ..Default::default()
            });
        }
        // What the write leaves: a tenant holds a claim or a reservation
        // of a workload, never both.
        let inserted = write
            .claims
            .iter()
            .filter_map(|c| match c {
                ClaimChange::Insert(c) => Some((&c.tenant_id, &c.workload_id)),
                _ => None,
            })
            .chain(write.reservations.iter().filter_map(|r| match r {
                ReservationChange::Insert(r) => Some((&r.tenant_id, &r.workload_id)),
                _ => None,
            }));
        for (tenant, workload) in inserted {
            if scratch.claim(tenant, workload).is_some()
                && scratch.reservation(tenant, workload).is_some()
            {
                return Err(format!(
                    "{tenant}/{workload} would hold a claim and a reservation"
                ));
            }
        }
        Ok(())
    }

    fn put_container(&mut self, c: ContainerRecord) -> Option<ContainerRecord> {
        let old = self.remove_container(&c.id);
        self.counts
            .entry(c.workload_id.clone())
            .or_default()
            .add(c.state);
        self.spec_counts
            .entry((c.workload_id.clone(), c.spec_hash.clone()))
            .or_default()
            .add(c.state);
        if c.state == ContainerState::Idle {
            self.idle
                .entry(c.workload_id.clone())
                .or_default()
                .insert((c.created_at, c.id));
        }
        self.by_node.entry(c.node_id.clone()).or_default().add(&c);
        if Self::passing(c.state) {
            self.passing.entry(c.state).or_default().insert(c.id);
        }
        self.containers.insert(c.id, Arc::new(c));
        old
    }

    fn remove_container(&mut self, id: &ContainerId) -> Option<ContainerRecord> {
        let old = Arc::unwrap_or_clone(self.containers.remove(id)?);
        if let Some(load) = self.by_node.get_mut(&old.node_id)
            && load.remove(&old)
        {
            self.by_node.remove(&old.node_id);
        }
        if let Some(counts) = self.counts.get_mut(&old.workload_id) {
            counts.remove(old.state);
            if *counts == PoolCounts::default() {
                self.counts.remove(&old.workload_id);
            }
        }
        let spec = (old.workload_id.clone(), old.spec_hash.clone());
        if let Some(counts) = self.spec_counts.get_mut(&spec) {
            counts.remove(old.state);
            if *counts == PoolCounts::default() {
                self.spec_counts.remove(&spec);
            }
        }
        if let Some(ids) = self.passing.get_mut(&old.state) {
            ids.remove(&old.id);
            if ids.is_empty() {
                self.passing.remove(&old.state);
            }
        }
        if old.state == ContainerState::Idle
            && let Some(idle) = self.idle.get_mut(&old.workload_id)
        {
            idle.remove(&(old.created_at, old.id));
            if idle.is_empty() {
                self.idle.remove(&old.workload_id);
            }
        }
        Some(old)
    }

    fn put_claim(&mut self, claim: ClaimRecord) -> Option<ClaimRecord> {
        let key = (claim.tenant_id.clone(), claim.workload_id.clone());
        let old = self.remove_claim(&key);
        self.claim_of_container
            .insert(claim.container_id, key.clone());
        self.claim_by_id.insert(claim.claim_id.clone(), key.clone());
        self.claims.insert(key, claim);
        old
    }

    fn remove_claim(&mut self, key: &TenantKey) -> Option<ClaimRecord> {
        let old = self.claims.remove(key)?;
        self.claim_of_container.remove(&old.container_id);
        self.claim_by_id.remove(&old.claim_id);
        Some(old)
    }

    /// One container.
    pub fn container(&self, id: &ContainerId) -> Option<&ContainerRecord> {
        self.containers.get(id).map(Arc::as_ref)
    }

    /// Every container, by id.
    pub fn containers(&self) -> impl Iterator<Item = &ContainerRecord> {
        self.containers.values().map(Arc::as_ref)
    }

    /// Every container, by id, shared: for a copy of all of them at one
    /// instant.
    pub fn containers_shared(&self) -> impl Iterator<Item = &Arc<ContainerRecord>> {
        self.containers.values()
    }

    /// Up to `n` containers by id, from the first one after `after` (from
    /// the start without it): a pass over every container taken a slice
    /// at a time, so it never holds the index for long.
    pub fn containers_after(
        &self,
        after: Option<ContainerId>,
        n: usize,
    ) -> impl Iterator<Item = &Arc<ContainerRecord>> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.containers
            .range((from, Bound::Unbounded))
            .take(n)
            .map(|(_, c)| c)
    }

    /// Whether containers in `state` are kept in a set of their own: the
    /// states a container passes through on its way in (warming) and out
    /// (draining, or on a lost node), which few containers are in at once.
    pub fn passing(state: ContainerState) -> bool {
        matches!(
            state,
            ContainerState::Warming | ContainerState::Draining | ContainerState::Lost
        )
    }

    /// The containers in `state`, by id: from its own set for the states
    /// [`Index::passing`] names, by a scan of every container otherwise.
    pub fn containers_in(
        &self,
        state: ContainerState,
    ) -> Box<dyn Iterator<Item = &ContainerRecord> + '_> {
        if Self::passing(state) {
            Box::new(
                self.passing
                    .get(&state)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.container(id)),
            )
        } else {
            Box::new(self.containers().filter(move |c| c.state == state))
        }
    }

    /// The containers of `node`.
    pub fn containers_on<'a>(
        &'a self,
        node: &'a NodeId,
    ) -> impl Iterator<Item = &'a ContainerRecord> + 'a {
        self.containers_on_shared(node).map(Arc::as_ref)
    }

    /// The containers of `node`, by id, shared.
    pub fn containers_on_shared<'a>(
        &'a self,
        node: &'a NodeId,
    ) -> impl Iterator<Item = &'a Arc<ContainerRecord>> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flat_map(|load| load.containers.iter())
            .filter_map(|id| self.containers.get(id))
    }

    /// The nodes that hold containers.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.by_node.keys()
    }

    /// What the limits of the containers on each node that has any sum to,
    /// whatever their state.
    pub fn allocations(&self) -> impl Iterator<Item = (&NodeId, crate::node::Resources)> {
        self.by_node
            .iter()
            .map(|(node, load)| (node, load.resources()))
    }

    /// The tenant's active claim of the workload.
    pub fn claim(&self, tenant: &TenantId, workload: &WorkloadId) -> Option<&ClaimRecord> {
        self.claims.get(&(tenant.clone(), workload.clone()))
    }

    /// The active claim on a container.
    pub fn claim_on(&self, container: &ContainerId) -> Option<&ClaimRecord> {
        self.claims.get(self.claim_of_container.get(container)?)
    }

    /// An active claim by its id.
    pub fn claim_by_id(&self, claim_id: &str) -> Option<&ClaimRecord> {
        self.claims.get(self.claim_by_id.get(claim_id)?)
    }

    /// Every active claim.
    pub fn claims(&self) -> impl Iterator<Item = &ClaimRecord> {
        self.claims.values()
    }

    /// The tenant's reservation of the workload.
    pub fn reservation(&self, tenant: &TenantId, workload: &WorkloadId) -> Option<&Reservation> {
        self.reservations.get(&(tenant.clone(), workload.clone()))
    }

    /// Every reservation.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// The reservation that holds `container`, if any.
    pub fn reservation_on(&self, container: &ContainerId) -> Option<&Reservation> {
        self.reservations
            .values()
            .find(|r| &r.container_id == container)
    }

    /// A pool's idle containers, oldest first.
    pub fn idle(&self, pool: &WorkloadId) -> impl Iterator<Item = &ContainerRecord> {
        self.idle_ids(pool).filter_map(|id| self.container(id))
    }

    /// The ids of a pool's idle containers, oldest first, without looking
    /// each record up: a claim passes over the ones other claims are
    /// taking (as many as are in flight) by id alone.
    pub fn idle_ids(&self, pool: &WorkloadId) -> impl Iterator<Item = &ContainerId> {
        self.idle.get(pool).into_iter().flatten().map(|(_, id)| id)
    }

    /// How many containers of a pool are in each state.
    pub fn counts(&self, pool: &WorkloadId) -> PoolCounts {
        self.counts.get(pool).copied().unwrap_or_default()
    }

    /// Every pool with containers, and how many it has in each state.
    pub fn pools(&self) -> impl Iterator<Item = (&WorkloadId, &PoolCounts)> {
        self.counts.iter()
    }

    /// How many containers of a pool made from the spec `spec_hash` are in
    /// each state.
    pub fn spec_counts(&self, pool: &WorkloadId, spec_hash: &str) -> PoolCounts {
        // A borrowed key would need a tuple of references; pools are few
        // enough per server that building the owned key is cheap.
        self.spec_counts
            .get(&(pool.clone(), spec_hash.to_owned()))
            .copied()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
