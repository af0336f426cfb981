//! Read-only views of the pool index for the API and the periodic
//! passes: copies of what they need, taken under the index lock, each
//! kept short because claims wait on that lock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use boilerhouse_core::node::Resources;
use boilerhouse_core::pool::{ContainerRecord, PoolCounts, Reservation};
use boilerhouse_core::{ContainerId, NodeId, TenantId, WorkloadId};

use super::{Granted, Pools, granted};

/// How many containers [`Pools::scan`] reads per hold of the index lock:
/// well under a millisecond's work.
pub const SCAN_SLICE: usize = 512;

impl Pools {
    /// Calls `f` on every container and collects what it returns. The
    /// records are taken a slice of [`SCAN_SLICE`] at a time under the
    /// index lock (shared, not copied) and `f` runs outside it. Not one
    /// snapshot: each container is seen as it was when its slice was read,
    /// and one added meanwhile may be missed; for passes that decide each
    /// container on its own and check again before acting. A claim waits
    /// for the taking of one slice, never for `f` or the whole pass, and
    /// a pass on a low-priority thread (see `background`) holds the lock
    /// for microseconds at a time.
    pub fn scan<T>(&self, mut f: impl FnMut(&ContainerRecord) -> Option<T>) -> Vec<T> {
        let mut found = Vec::new();
        let mut slice: Vec<Arc<ContainerRecord>> = Vec::with_capacity(SCAN_SLICE);
        loop {
            let after = slice.last().map(|c| c.id);
            slice.clear();
            let state = self.state();
            slice.extend(state.index.containers_after(after, SCAN_SLICE).cloned());
            // To whoever waits (a claim, the writer applying a commit):
            // an ordinary unlock let this loop take it straight back.
            parking_lot::MutexGuard::unlock_fair(state);
            found.extend(slice.iter().filter_map(|c| f(c)));
            if slice.len() < SCAN_SLICE {
                return found;
            }
        }
    }

    /// What each node's containers reserve: the sum of their base limits.
    /// (Container boosts are counted by the boost ledger, as drawn from the
    /// node.)
    pub fn allocations(&self) -> HashMap<NodeId, Resources> {
        self.read(|index| {
            index
                .allocations()
                .map(|(node, sums)| (node.clone(), sums))
                .collect()
        })
    }

    /// The tenant's active claim, with its last activity as seen so far.
    pub fn active_claim(&self, tenant: &TenantId, workload: &WorkloadId) -> Option<Granted> {
        let state = self.state();
        let claim = state.index.claim(tenant, workload)?;
        granted(&state, claim)
    }

    /// Every active claim with its container.
    pub fn active_claims(&self) -> Vec<Granted> {
        let state = self.state();
        state
            .index
            .claims()
            .filter_map(|claim| granted(&state, claim))
            .collect()
    }

    /// The active claims in the pools `pool` accepts, with their
    /// containers; the pools are asked about once each.
    pub fn active_claims_in(&self, mut pool: impl FnMut(&WorkloadId) -> bool) -> Vec<Granted> {
        let state = self.state();
        let pools: HashSet<&WorkloadId> = state
            .index
            .pools()
            .filter(|(id, counts)| counts.claimed > 0 && pool(id))
            .map(|(id, _)| id)
            .collect();
        if pools.is_empty() {
            return Vec::new();
        }
        state
            .index
            .claims()
            .filter(|claim| pools.contains(&claim.workload_id))
            .filter_map(|claim| granted(&state, claim))
            .collect()
    }

    /// The pools that hold containers, by id.
    pub fn pool_ids(&self) -> Vec<WorkloadId> {
        self.read(|index| index.pools().map(|(id, _)| id.clone()).collect())
    }

    /// Every reservation.
    pub fn reservations(&self) -> Vec<Reservation> {
        self.read(|i| i.reservations().cloned().collect())
    }

    /// Every container.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.read(|i| i.containers().cloned().collect())
    }

    /// Every container at one instant, shared with the index: a copy of
    /// pointers, so the lock claims wait on is held for microseconds.
    pub fn containers_shared(&self) -> Vec<Arc<ContainerRecord>> {
        self.read(|i| i.containers_shared().cloned().collect())
    }

    /// One container.
    pub fn container(&self, id: &ContainerId) -> Option<ContainerRecord> {
        self.read(|i| i.container(id).cloned())
    }

    /// Counts per state for one pool.
    pub fn counts(&self, pool: &WorkloadId) -> PoolCounts {
        self.read(|i| i.counts(pool))
    }

    /// Containers of `pool`, draining and lost aside, whose spec is not
    /// `spec_hash`.
    pub fn stale(&self, pool: &WorkloadId, spec_hash: &str) -> u32 {
        self.read(|index| {
            index
                .containers()
                .filter(|c| &c.workload_id == pool && c.spec_hash != spec_hash)
                .filter(|c| {
                    !matches!(
                        c.state,
                        boilerhouse_core::pool::ContainerState::Draining
                            | boilerhouse_core::pool::ContainerState::Lost
                    )
                })
                .count()
        })
        .try_into()
        .unwrap_or(u32::MAX)
    }
}
