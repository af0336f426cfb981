//! Why a pool stays below its min_size, said once and shown in its status:
//! no node can take a container, creates fail, or containers never become
//! healthy. Failures back the pool off; the reasons carry the engine's
//! words.

use std::time::{Duration, Instant};

use boilerhouse_core::WorkloadId;
use boilerhouse_core::container::ObservedContainer;
use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::pool::decide::DrainScope;
use boilerhouse_core::pool::{ContainerRecord, ContainerState};

use super::{PoolError, Pools};

/// How long a pool stays short for the same reason before an event says
/// so: long enough for agents to come back after a server start.
const SHORTFALL_GRACE: Duration = Duration::from_secs(5);
/// Longest wait between create attempts of a failing pool.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Pools {
    /// Records why `pool` stays below `min`; says so once in the events
    /// when the same reason has held for [`SHORTFALL_GRACE`], so a pool
    /// short of capacity is not silent, and the moments after a start
    /// (before the agents are back) are not a flood either.
    pub(super) async fn note_shortfall(&self, pool: &WorkloadId, min: u32, why: String) {
        let due = {
            let mut state = self.state();
            let entry = state
                .inflight
                .shortfall
                .entry(pool.clone())
                .or_insert_with(|| (why.clone(), Instant::now(), false));
            if entry.0 != why {
                *entry = (why.clone(), Instant::now(), false);
            }
            let due = !entry.2 && entry.1.elapsed() >= SHORTFALL_GRACE;
            entry.2 |= due;
            due
        };
        if !due {
            return;
        }
        tracing::warn!(pool = %pool, reason = %why, "pool below min_size");
        let event = NewEvent::new(
            crate::clock::now(),
            EventKind::PoolShortfall,
            format!("pool {pool} cannot reach min_size {min}: {why}"),
        )
        .with_subject(EventSubject {
            workload_id: Some(pool.to_string()),
            ..Default::default()
        });
        if let Err(e) = self.inner.store.append_event(event).await {
            tracing::warn!(error = %e, "cannot record a pool shortfall");
        }
    }

    pub(super) fn clear_shortfall(&self, pool: &WorkloadId) {
        self.state().inflight.shortfall.remove(pool);
    }

    /// Why `pool` is below its min_size and not being filled, if it is.
    pub fn shortfall(&self, pool: &WorkloadId) -> Option<String> {
        let state = self.state();
        if let Some((why, _, _)) = state.inflight.shortfall.get(pool) {
            return Some(why.clone());
        }
        state
            .inflight
            .backoff
            .get(pool)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(failures, _)| format!("backing off after {failures} failed create(s) in a row; see the pool.create_failed events"))
    }

    /// A refill create failed, or its container never became healthy: back
    /// the pool off, say so, drain the row.
    pub(super) async fn create_failed(
        &self,
        pool: &WorkloadId,
        record: &ContainerRecord,
        e: &PoolError,
    ) {
        let failures = {
            let mut state = self.state();
            let entry = state
                .inflight
                .backoff
                .entry(pool.clone())
                .or_insert((0, Instant::now()));
            entry.0 += 1;
            let wait = Duration::from_millis(500)
                .saturating_mul(1 << entry.0.min(7))
                .min(MAX_BACKOFF);
            entry.1 = Instant::now() + wait;
            entry.0
        };
        let event = NewEvent::new(
            crate::clock::now(),
            EventKind::PoolCreateFailed,
            format!("creating a container for pool {pool} failed ({failures} in a row, backing off): {e}"),
        )
        .with_subject(EventSubject {
            workload_id: Some(pool.to_string()),
            container_id: Some(record.id.to_string()),
            node_id: Some(record.node_id.to_string()),
            ..Default::default()
        });
        if let Err(e) = self.inner.store.append_event(event).await {
            tracing::warn!(error = %e, "cannot record a failed create");
        }
        if let Err(e) = self
            .drain(&record.id, DrainScope::Unowned, "create failed")
            .await
        {
            tracing::warn!(container = %record.id, error = %e, "cannot drain a failed create");
        }
    }

    /// Warming containers the engine reports unhealthy (their healthcheck
    /// failed its retries) are destroyed and the pool backs off, with an
    /// event carrying what the check printed; the pool's shortfall says
    /// the same, so `bh pool get` shows why it stays empty.
    pub(super) async fn replace_unhealthy(&self) -> usize {
        let unhealthy: Vec<(ContainerRecord, String)> = {
            let state = self.state();
            state
                .index
                .containers_in(ContainerState::Warming)
                .filter(|c| !state.inflight.busy.contains(&c.id))
                .filter_map(|c| {
                    let seen = self.reported(&c.node_id, c.docker_id.as_deref()?)?;
                    (seen.health.as_deref() == Some("unhealthy"))
                        .then(|| (c.clone(), last_check(&seen)))
                })
                .collect()
        };
        let count = unhealthy.len();
        for (record, output) in unhealthy {
            let why = format!("its healthcheck fails: {output}");
            self.create_failed(
                &record.workload_id,
                &record,
                &PoolError::Unavailable(format!(
                    "container {} never became healthy; {why}",
                    record.id
                )),
            )
            .await;
            // Shown as the pool's shortfall at once, and marked evented:
            // the create_failed event above already said it.
            self.state().inflight.shortfall.insert(
                record.workload_id.clone(),
                (
                    format!("containers never become healthy; {why}"),
                    Instant::now(),
                    true,
                ),
            );
        }
        count
    }
}

/// What a container's last healthcheck printed, for messages.
pub(super) fn last_check(c: &ObservedContainer) -> String {
    match c.health_output.as_deref() {
        Some(out) => format!("last check printed {out:?}"),
        None => "the last check printed nothing".into(),
    }
}
