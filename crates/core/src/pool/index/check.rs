//! The rules a committed index satisfies, stated as a check that tests
//! and the simulation run after every step.

use std::collections::{BTreeMap, BTreeSet};

use super::{Index, load};
use crate::ids::{ContainerId, WorkloadId};
use crate::pool::{ContainerState, PoolCounts};

impl Index {
    /// Checks the rules every committed state satisfies; returns each one
    /// broken, in words. Used by tests and the simulation after every step.
    pub fn check(&self) -> Vec<String> {
        let mut broken = Vec::new();
        let mut counts: BTreeMap<WorkloadId, PoolCounts> = BTreeMap::new();
        for c in self.containers.values() {
            counts
                .entry(c.workload_id.clone())
                .or_default()
                .add(c.state);
            let idle_listed = self
                .idle
                .get(&c.workload_id)
                .is_some_and(|s| s.contains(&(c.created_at, c.id)));
            if idle_listed != (c.state == ContainerState::Idle) {
                broken.push(format!(
                    "container {} ({}) idle list says {idle_listed}",
                    c.id, c.state
                ));
            }
            let claim = self.claim_on(&c.id);
            match c.state {
                ContainerState::Warming | ContainerState::Idle => {
                    if c.used() {
                        broken.push(format!(
                            "{} container {} was used (tenant {:?}, last {:?}, generation {})",
                            c.state, c.id, c.tenant_id, c.last_tenant_id, c.claim_generation
                        ));
                    }
                }
                ContainerState::Claimed => match claim {
                    Some(claim) => {
                        if c.tenant_id.as_ref() != Some(&claim.tenant_id)
                            || c.workload_id != claim.workload_id
                            || c.node_id != claim.node_id
                            || c.claim_generation != claim.generation
                        {
                            broken.push(format!(
                                "claimed container {} (tenant {:?}, generation {}) disagrees with claim {} of {} (generation {})",
                                c.id, c.tenant_id, c.claim_generation, claim.claim_id, claim.tenant_id, claim.generation
                            ));
                        }
                    }
                    None => broken.push(format!("claimed container {} has no active claim", c.id)),
                },
                ContainerState::Reserved => {
                    let reservation = self.reservation_on(&c.id);
                    let ok = reservation.is_some_and(|r| {
                        c.tenant_id.is_none()
                            && c.last_tenant_id.as_ref() == Some(&r.tenant_id)
                            && c.workload_id == r.workload_id
                    });
                    if !ok {
                        broken.push(format!(
                            "reserved container {} (last tenant {:?}) has reservation {reservation:?}",
                            c.id, c.last_tenant_id
                        ));
                    }
                }
                ContainerState::Draining | ContainerState::Lost => {}
            }
            if c.state != ContainerState::Claimed && claim.is_some() {
                broken.push(format!(
                    "{} container {} has an active claim",
                    c.state, c.id
                ));
            }
            if c.tenant_id.is_some()
                && !matches!(
                    c.state,
                    ContainerState::Claimed | ContainerState::Lost | ContainerState::Draining
                )
            {
                broken.push(format!(
                    "{} container {} names tenant {:?}",
                    c.state, c.id, c.tenant_id
                ));
            }
        }
        if load::recount(self.containers()) != self.by_node {
            broken.push("the per-node sums disagree with the containers".into());
        }
        let mut spec_counts: BTreeMap<(WorkloadId, String), PoolCounts> = BTreeMap::new();
        for c in self.containers.values() {
            spec_counts
                .entry((c.workload_id.clone(), c.spec_hash.clone()))
                .or_default()
                .add(c.state);
        }
        let mut passing: BTreeMap<ContainerState, BTreeSet<ContainerId>> = BTreeMap::new();
        for c in self.containers.values().filter(|c| Self::passing(c.state)) {
            passing.entry(c.state).or_default().insert(c.id);
        }
        if passing != self.passing {
            broken.push(format!(
                "containers by passing state {:?} but containers give {passing:?}",
                self.passing
            ));
        }
        if spec_counts != self.spec_counts {
            broken.push(format!(
                "counts by spec {:?} but containers give {spec_counts:?}",
                self.spec_counts
            ));
        }
        if counts != self.counts {
            broken.push(format!(
                "counts {:?} but containers give {counts:?}",
                self.counts
            ));
        }
        for claim in self.claims.values() {
            if !self.containers.contains_key(&claim.container_id) {
                broken.push(format!(
                    "claim {} points at missing container {}",
                    claim.claim_id, claim.container_id
                ));
            }
        }
        if self.claim_of_container.len() != self.claims.len()
            || self.claim_by_id.len() != self.claims.len()
        {
            broken.push("claim lookups disagree with the claims".into());
        }
        for key in self.reservations.keys() {
            if self.claims.contains_key(key) {
                broken.push(format!(
                    "{}/{} holds a claim and a reservation",
                    key.0, key.1
                ));
            }
        }
        let mut reserved = BTreeSet::new();
        for r in self.reservations.values() {
            if !reserved.insert(r.container_id) {
                broken.push(format!("container {} has two reservations", r.container_id));
            }
            match self.containers.get(&r.container_id) {
                Some(c) if c.state == ContainerState::Reserved => {}
                other => broken.push(format!(
                    "reservation of {} points at {} in state {:?}",
                    r.tenant_id,
                    r.container_id,
                    other.map(|c| c.state)
                )),
            }
        }
        broken
    }
}
