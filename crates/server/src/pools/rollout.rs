//! What the refiller does for one pool this round: how many containers
//! to create, and which idle ones to drain, so that the pool follows its
//! workload (a changed spec is rolled out without emptying the pool) and
//! does not keep more idle containers than it wants for long.

use std::time::Instant;

use boilerhouse_core::ContainerId;
use boilerhouse_core::pool::{ContainerRecord, Stale, roll};
use boilerhouse_core::workload::WorkloadRecord;

use super::Pools;

impl Pools {
    /// `(create, drain)` for `workload`'s pool with effective sizes `min`
    /// and `max`: containers to create of the current spec, and idle ones
    /// to drain with the reason why (a stale spec once current ones cover
    /// `min`, or a surplus over `min` that outlived its grace).
    pub(super) fn plan_fill(
        &self,
        workload: &WorkloadRecord,
        min: u32,
        max: u32,
    ) -> (u32, Vec<(ContainerId, &'static str)>) {
        let spec = &workload.spec;
        let mut state = self.state();
        let mut counts = state.index.counts(&spec.id);
        // Idle and warming containers of an older spec: a rollout. Counted
        // from the index's sums: this runs on every claim's refill.
        let current = state.index.spec_counts(&spec.id, &workload.spec_hash);
        let stale = Stale {
            idle: counts.idle.saturating_sub(current.idle),
            warming: counts.warming.saturating_sub(current.warming),
        };
        counts.warming += state.inflight.creating.get(&spec.id).copied().unwrap_or(0);
        let (create, drain) = roll(&counts, stale, min, max, spec.pool.fill_concurrency);
        let mut replace: Vec<(ContainerId, &str)> = if drain == 0 {
            Vec::new()
        } else {
            state
                .index
                .idle(&spec.id)
                .filter(|c| c.spec_hash != workload.spec_hash)
                .filter(|c| !state.inflight.busy.contains(&c.id))
                .take(drain as usize)
                .map(|c| {
                    (
                        c.id,
                        "replaced: its workload's spec changed and current containers are ready",
                    )
                })
                .collect()
        };
        // More current idle containers than the pool wants (a
        // scale down, an adoption): the newest go after a grace.
        let current_idle = counts.idle.saturating_sub(stale.idle);
        let surplus = current_idle.saturating_sub(min);
        if surplus == 0 {
            state.inflight.surplus_since.remove(&spec.id);
        } else {
            let since = *state
                .inflight
                .surplus_since
                .entry(spec.id.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() >= self.inner.config.surplus_grace {
                state.inflight.surplus_since.remove(&spec.id);
                let mut current: Vec<&ContainerRecord> = state
                    .index
                    .idle(&spec.id)
                    .filter(|c| c.spec_hash == workload.spec_hash)
                    .filter(|c| !state.inflight.busy.contains(&c.id))
                    .collect();
                current.sort_by_key(|c| std::cmp::Reverse(c.created_at));
                replace.extend(current.into_iter().take(surplus as usize).map(|c| {
                    (
                        c.id,
                        "surplus: the pool held more idle containers than its min_size",
                    )
                }));
            }
        }
        (create, replace)
    }
}
