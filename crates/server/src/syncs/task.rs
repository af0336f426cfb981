//! The sync scheduler: periodic uploads of claimed containers (with
//! catch-up after a restart), and retries of owed uploads on release.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;

use boilerhouse_core::pool::ContainerState;
use boilerhouse_core::sync::{periodic_due, retry_delay};
use boilerhouse_core::{ContainerId, TenantId, Timestamp, WorkloadId};

use super::{Phase, SyncReason, Syncs, runs_in};
use crate::pools::Pools;
use crate::tasks::BackgroundTask;

/// What runs now or waits after failing, per (tenant, workload).
#[derive(Default)]
struct Schedule {
    running: HashSet<(TenantId, WorkloadId)>,
    /// Consecutive failures and when to try again.
    failures: HashMap<(TenantId, WorkloadId), (u32, Instant)>,
    retrying: HashSet<ContainerId>,
}

/// The `sync_scheduler` background task.
pub struct SyncScheduler {
    syncs: Syncs,
    pools: Pools,
    started_at: Timestamp,
    schedule: Arc<Mutex<Schedule>>,
}

impl SyncScheduler {
    /// A scheduler; `started_at` tells a catch-up from a periodic sync.
    pub fn new(syncs: Syncs, pools: Pools, started_at: Timestamp) -> Self {
        Self {
            syncs,
            pools,
            started_at,
            schedule: Arc::default(),
        }
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn pass(&mut self) -> anyhow::Result<serde_json::Value> {
        if self.syncs.stopping() {
            return Ok(serde_json::json!({ "stopping": true }));
        }
        let now = crate::clock::now();
        let mut started = 0;
        let mut max_lag = 0i64;
        // Only the claims of pools that upload periodically are copied out
        // of the index: with thousands of claims and none of them syncing,
        // copying every one each pass held the lock claims wait on.
        let mut periodic = HashSet::new();
        for pool in self.pools.pool_ids() {
            if let Ok(workload) = self.pools.workload_record(&pool).await
                && let Some(spec) = &workload.spec.sync
                && spec.policy.interval.is_some()
                && runs_in(spec, Phase::Upload)
            {
                periodic.insert(pool);
            }
        }
        for granted in self.pools.active_claims_in(|pool| periodic.contains(pool)) {
            let tenant = granted.claim.tenant_id.clone();
            let workload_id = granted.claim.workload_id.clone();
            let Ok(workload) = self.pools.workload_record(&workload_id).await else {
                continue;
            };
            let Some(spec) = &workload.spec.sync else {
                continue;
            };
            let Some(interval) = spec.policy.interval else {
                continue;
            };
            if !runs_in(spec, Phase::Upload) {
                continue;
            }
            let last = self.syncs.last_upload(&tenant, &workload_id, spec);
            let due = periodic_due(interval, granted.claim.claimed_at, last);
            let base = last.map_or(granted.claim.claimed_at, |l| {
                l.max(granted.claim.claimed_at)
            });
            max_lag = max_lag.max(now.saturating_since(base).as_millis() as i64);
            if now < due || !self.pools.node_is_live(&granted.container.node_id) {
                continue;
            }
            let key = (tenant.clone(), workload_id.clone());
            {
                let mut schedule = self.schedule();
                if schedule.running.contains(&key)
                    || schedule
                        .failures
                        .get(&key)
                        .is_some_and(|(_, next)| *next > Instant::now())
                {
                    continue;
                }
                schedule.running.insert(key.clone());
            }
            // Due before this server started: the interval passed while
            // it was down.
            let reason = if due < self.started_at {
                SyncReason::CatchUp
            } else {
                SyncReason::Periodic
            };
            let syncs = self.syncs.clone();
            let schedule = self.schedule.clone();
            let container = granted.container.clone();
            started += 1;
            tokio::spawn(async move {
                let run = syncs
                    .run(&tenant, &workload, &container, Phase::Upload, None, reason)
                    .await;
                let mut schedule = schedule.lock().unwrap_or_else(|e| e.into_inner());
                schedule.running.remove(&key);
                if run.ok() {
                    schedule.failures.remove(&key);
                } else {
                    let failures = schedule.failures.get(&key).map_or(1, |(n, _)| n + 1);
                    schedule
                        .failures
                        .insert(key, (failures, Instant::now() + retry_delay(failures)));
                }
            });
        }
        self.syncs
            .counters()
            .max_lag_ms
            .store(max_lag, Ordering::Relaxed);

        let mut retried = 0;
        for owed in self.syncs.owed_due() {
            if self.schedule().retrying.contains(&owed.container_id) {
                continue;
            }
            let Some(container) = self.pools.container(&owed.container_id) else {
                self.syncs
                    .settle_release_upload(
                        owed.container_id,
                        "abandoned: the container no longer exists",
                    )
                    .await?;
                continue;
            };
            if container.state == ContainerState::Claimed
                && container.tenant_id.as_ref() == Some(&owed.tenant_id)
            {
                // Its tenant has it back: the files are in use again and go
                // up with the next release.
                self.syncs
                    .settle_release_upload(
                        container.id,
                        "no longer owed: claimed again by its tenant",
                    )
                    .await?;
                continue;
            }
            if !self.pools.node_is_live(&container.node_id) {
                continue;
            }
            let Ok(workload) = self.pools.workload_record(&owed.workload_id).await else {
                continue;
            };
            self.schedule().retrying.insert(owed.container_id);
            retried += 1;
            let syncs = self.syncs.clone();
            let pools = self.pools.clone();
            let schedule = self.schedule.clone();
            tokio::spawn(async move {
                let run = syncs
                    .run(
                        &owed.tenant_id,
                        &workload,
                        &container,
                        Phase::Upload,
                        None,
                        SyncReason::Retry,
                    )
                    .await;
                match &run.error {
                    None => {
                        if let Err(e) = upload_done(&syncs, &pools, &owed, &workload).await {
                            tracing::warn!(error = %e, container = %container.id, "cannot settle an owed upload");
                        }
                    }
                    Some(e) => syncs.retry_failed(&owed.container_id, e).await,
                }
                schedule
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retrying
                    .remove(&owed.container_id);
            });
        }
        Ok(serde_json::json!({
            "periodic_started": started,
            "owed_uploads": self.syncs.owed().len(),
            "retries_started": retried,
            "max_lag_ms": max_lag,
        }))
    }
}

/// An owed upload on release finally succeeded. The reservation begins
/// now with its full affinity_timeout (or, for a workload that does not
/// reuse containers, ends at the next expiry pass); then the debt is
/// settled. In that order, so the container is never unretained with an
/// old expiry in between.
pub(crate) async fn upload_done(
    syncs: &Syncs,
    pools: &Pools,
    owed: &crate::store::PendingReleaseUpload,
    workload: &boilerhouse_core::workload::WorkloadRecord,
) -> anyhow::Result<()> {
    let timeout = if workload.spec.pool.reuse {
        workload.spec.pool.affinity_timeout
    } else {
        std::time::Duration::ZERO
    };
    match pools
        .restart_reservation(
            &owed.tenant_id,
            &owed.workload_id,
            &owed.container_id,
            timeout,
        )
        .await
    {
        // Claimed back or revoked meanwhile: nothing to restart.
        Ok(_) | Err(crate::pools::PoolError::Refused(_)) => {}
        Err(e) => return Err(e.into()),
    }
    syncs
        .settle_release_upload(
            owed.container_id,
            &format!("uploaded after {} failed attempts", owed.attempts),
        )
        .await?;
    pools.refill_notify().notify_one();
    Ok(())
}

impl BackgroundTask for SyncScheduler {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(self.pass())
    }
}
