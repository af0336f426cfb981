//! The pool controllers, as background tasks: the refiller (promotes ready
//! containers, fills pools, removes draining ones), affinity expiry and
//! the idle reaper. Each reads the current state itself on every run.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use boilerhouse_core::event::Severity;
use boilerhouse_core::pool::{ContainerState, to_create};
use boilerhouse_proto::pb;

use super::{Pools, event, subject};
use crate::store::PoolWrite;
use crate::tasks::BackgroundTask;

/// Longest wait between create attempts of a failing pool.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Keeps every pool at min_size idle containers.
pub struct Refiller(pub Pools);

impl BackgroundTask for Refiller {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let pools = &self.0;
            let resent = pools.resend_unfinished_creates().await?;
            let promoted = pools.promote_ready().await?;
            let removing = pools.remove_draining();
            let created = pools.fill().await?;
            Ok(
                serde_json::json!({ "promoted": promoted, "creating": created, "removing": removing, "resent": resent }),
            )
        })
    }
}

/// Destroys containers whose reservation expired.
pub struct AffinityExpiry(pub Pools);

impl BackgroundTask for AffinityExpiry {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let expired = self.0.expire_reservations().await?;
            Ok(serde_json::json!({ "expired": expired }))
        })
    }
}

/// Releases claims idle for longer than their workload's idle_timeout.
pub struct IdleReaper(pub Pools);

impl BackgroundTask for IdleReaper {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let flushed = self.0.flush_activity().await?;
            let released = self.0.reap_idle().await?;
            Ok(serde_json::json!({ "released": released, "activity_flushed": flushed }))
        })
    }
}

impl Pools {
    /// Warming containers with no Docker id whose create is not in flight:
    /// their command was lost with a server restart or a dropped session.
    /// The create is sent again; it is idempotent (the agent finds the twin
    /// by name), so a container that was made is adopted, not duplicated.
    async fn resend_unfinished_creates(&self) -> anyhow::Result<usize> {
        let workloads = self.inner.store.list_workloads().await?;
        let now = crate::clock::now();
        let stuck: Vec<_> = {
            let mut index = self.index();
            let stuck: Vec<_> = index
                .containers
                .values()
                .filter(|c| {
                    c.state == ContainerState::Warming
                        && c.docker_id.is_none()
                        && !index.busy.contains(&c.id)
                })
                .filter(|c| self.node_live(&c.node_id, now))
                .cloned()
                .collect();
            for c in &stuck {
                index.busy.insert(c.id);
            }
            stuck
        };
        let count = stuck.len();
        for record in stuck {
            let Some(spec) = workloads
                .iter()
                .find(|w| w.spec.id == record.workload_id)
                .map(|w| w.spec.clone())
            else {
                self.index().busy.remove(&record.id);
                self.mark_draining(record.id, "its workload was removed")
                    .await;
                continue;
            };
            let pools = self.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + pools.inner.config.command_timeout;
                if let Err(e) = pools.create_only(&spec, record.clone(), deadline).await {
                    tracing::warn!(container = %record.id, error = %e, "resending a create failed; will retry");
                }
                pools.index().busy.remove(&record.id);
            });
        }
        Ok(count)
    }

    /// Warming containers that Docker reports running (and healthy, with a
    /// healthcheck) become idle.
    async fn promote_ready(&self) -> anyhow::Result<usize> {
        let workloads = self.inner.store.list_workloads().await?;
        let ready: Vec<_> = {
            let index = self.index();
            index
                .containers
                .values()
                .filter(|c| {
                    c.state == ContainerState::Warming
                        && c.tenant_id.is_none()
                        && !index.busy.contains(&c.id)
                })
                .filter_map(|c| {
                    let docker_id = c.docker_id.as_ref()?;
                    let report = self.inner.agents.report(&c.node_id)?;
                    let seen = report.containers.get(docker_id)?;
                    let needs_health = workloads
                        .iter()
                        .find(|w| w.spec.id == c.workload_id)
                        .is_some_and(|w| w.spec.healthcheck.is_some());
                    let ok = seen.is_running()
                        && (!needs_health || seen.health.as_deref() == Some("healthy"));
                    ok.then(|| c.clone())
                })
                .collect()
        };
        if ready.is_empty() {
            return Ok(0);
        }
        let now = crate::clock::now();
        let promoted: Vec<_> = ready
            .into_iter()
            .map(|mut c| {
                c.state = ContainerState::Idle;
                c.updated_at = now;
                c
            })
            .collect();
        let count = promoted.len();
        self.inner
            .store
            .apply_pool_write(PoolWrite {
                containers: promoted.clone(),
                ..Default::default()
            })
            .await?;
        let mut index = self.index();
        for c in promoted {
            // Only if nothing else changed it meanwhile.
            if index
                .containers
                .get(&c.id)
                .is_some_and(|x| x.state == ContainerState::Warming)
            {
                index.set(c);
            }
        }
        Ok(count)
    }

    /// Starts removal of every draining container not already being removed.
    fn remove_draining(&self) -> usize {
        let targets: Vec<_> = {
            let mut index = self.index();
            let targets: Vec<_> = index
                .containers
                .values()
                .filter(|c| c.state == ContainerState::Draining && !index.busy.contains(&c.id))
                .cloned()
                .collect();
            for c in &targets {
                index.busy.insert(c.id);
            }
            targets
        };
        let count = targets.len();
        for c in targets {
            let pools = self.clone();
            tokio::spawn(async move {
                let command = pb::Command {
                    command_id: format!("remove-{}", c.id),
                    generation: 0,
                    command: Some(pb::command::Command::Remove(pb::RemoveContainer {
                        container_id: c.id.to_string(),
                        remove_volumes: true,
                    })),
                };
                let result = pools
                    .inner
                    .agents
                    .send(&c.node_id, command, pools.inner.config.command_timeout)
                    .await;
                match result {
                    Ok(_) => {
                        let now = crate::clock::now();
                        let write = PoolWrite {
                            removed_containers: vec![c.id],
                            events: vec![event(
                                now,
                                "container.destroyed",
                                Severity::Info,
                                format!("container {} of {} destroyed", c.id, c.workload_id),
                                subject(None, &c.workload_id, Some(&c.id), Some(&c.node_id)),
                            )],
                            ..Default::default()
                        };
                        if pools.inner.store.apply_pool_write(write).await.is_ok() {
                            pools.index().remove(&c.id);
                            pools.inner.refill.notify_one();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(container = %c.id, node = %c.node_id, error = %e, "removal not confirmed; will retry")
                    }
                }
                pools.index().busy.remove(&c.id);
            });
        }
        count
    }

    /// Starts creating containers for every pool below min_size.
    async fn fill(&self) -> anyhow::Result<usize> {
        let workloads = self.inner.store.list_workloads().await?;
        self.refresh_workloads(&workloads);
        let overrides = self.inner.store.pool_overrides().await?;
        let now = crate::clock::now();
        let mut started = 0;
        // Pools of deleted workloads, and drained pools, lose their idle
        // containers; claimed ones stay until released.
        let idle_orphans: Vec<_> = {
            let index = self.index();
            index
                .containers
                .values()
                .filter(|c| {
                    matches!(c.state, ContainerState::Idle | ContainerState::Warming)
                        && c.tenant_id.is_none()
                })
                .filter(|c| {
                    let drained = overrides
                        .iter()
                        .any(|(id, o)| id == &c.workload_id && o.draining);
                    let gone = !workloads.iter().any(|w| w.spec.id == c.workload_id);
                    drained || gone
                })
                .filter(|c| !index.busy.contains(&c.id))
                .map(|c| c.id)
                .collect()
        };
        for id in idle_orphans {
            self.mark_draining(id, "its pool was drained or its workload removed")
                .await;
        }
        for workload in &workloads {
            let spec = &workload.spec;
            let o = overrides
                .iter()
                .find(|(id, _)| *id == spec.id)
                .map(|(_, o)| o.clone())
                .unwrap_or_default();
            if o.draining {
                continue;
            }
            if self
                .index()
                .backoff
                .get(&spec.id)
                .is_some_and(|(_, until)| Instant::now() < *until)
            {
                continue;
            }
            let counts = self.counts(&spec.id);
            let min = o.min_size.unwrap_or(spec.pool.min_size);
            let max = o.max_size.unwrap_or(spec.pool.max_size);
            let n = to_create(&counts, min, max, spec.pool.fill_concurrency);
            for _ in 0..n {
                let Some(node) = self.place(spec, now).await? else {
                    tracing::debug!(pool = %spec.id, "no node can take a new container");
                    break;
                };
                let record = self.new_container(spec, &workload.spec_hash, node, now);
                self.inner
                    .store
                    .apply_pool_write(PoolWrite {
                        containers: vec![record.clone()],
                        ..Default::default()
                    })
                    .await?;
                {
                    let mut index = self.index();
                    index.busy.insert(record.id);
                    index.set(record.clone());
                }
                started += 1;
                let pools = self.clone();
                let spec = spec.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + pools.inner.config.command_timeout;
                    let created = pools.create_only(&spec, record.clone(), deadline).await;
                    pools.index().busy.remove(&record.id);
                    match created {
                        Ok(()) => {
                            pools.index().backoff.remove(&spec.id);
                        }
                        Err(e) => {
                            let failures = {
                                let mut index = pools.index();
                                let entry = index
                                    .backoff
                                    .entry(spec.id.clone())
                                    .or_insert((0, Instant::now()));
                                entry.0 += 1;
                                let wait = Duration::from_millis(500)
                                    .saturating_mul(1 << entry.0.min(7))
                                    .min(MAX_BACKOFF);
                                entry.1 = Instant::now() + wait;
                                entry.0
                            };
                            let now = crate::clock::now();
                            let _ = pools
                                .inner
                                .store
                                .append_event(event(
                                    now,
                                    "pool.create_failed",
                                    Severity::Warning,
                                    format!("creating a container for pool {} failed ({failures} in a row, backing off): {e}", spec.id),
                                    subject(None, &spec.id, Some(&record.id), Some(&record.node_id)),
                                ))
                                .await;
                            pools.mark_draining(record.id, "create failed").await;
                        }
                    }
                });
            }
        }
        Ok(started)
    }

    /// Sends a create command and records the Docker id; promotion to idle
    /// happens once the agent reports the container ready.
    async fn create_only(
        &self,
        spec: &boilerhouse_core::workload::WorkloadSpec,
        record: boilerhouse_core::pool::ContainerRecord,
        deadline: Instant,
    ) -> Result<(), super::PoolError> {
        let command = Pools::create_command(spec, &record);
        let timeout = deadline.saturating_duration_since(Instant::now());
        let result = self
            .inner
            .agents
            .send(&record.node_id, command, timeout)
            .await
            .map_err(|e| super::PoolError::Unavailable(e.to_string()))?;
        let docker_id = result.container.map(|c| c.docker_id);
        let updated = {
            let mut index = self.index();
            let Some(mut c) = index.containers.get(&record.id).cloned() else {
                return Ok(());
            };
            c.docker_id = docker_id;
            index.set(c.clone());
            c
        };
        self.inner
            .store
            .apply_pool_write(PoolWrite {
                containers: vec![updated],
                ..Default::default()
            })
            .await?;
        self.inner.refill.notify_one();
        Ok(())
    }

    /// Ends every reservation past its expiry. Also run once at startup,
    /// before the API opens, for reservations that expired during downtime.
    pub async fn expire_reservations(&self) -> anyhow::Result<usize> {
        let now = crate::clock::now();
        let expired: Vec<_> = self
            .reservations()
            .into_iter()
            .filter(|r| r.expires_at <= now)
            // Its container holds files whose upload is still owed: it
            // must outlive the reservation until the upload succeeds.
            .filter(|r| !self.inner.syncs.release_upload_owed(&r.container_id))
            .collect();
        for r in &expired {
            self.end_reservation(&r.tenant_id, &r.workload_id, true)
                .await?;
        }
        Ok(expired.len())
    }

    /// Releases claims whose workload's idle_timeout has passed without
    /// activity.
    async fn reap_idle(&self) -> anyhow::Result<usize> {
        let workloads = self.inner.store.list_workloads().await?;
        let now = crate::clock::now();
        let idle: Vec<_> = self
            .active_claims()
            .into_iter()
            .filter(|g| {
                workloads
                    .iter()
                    .find(|w| w.spec.id == g.claim.workload_id)
                    .and_then(|w| w.spec.pool.idle_timeout)
                    .is_some_and(|timeout| {
                        now.saturating_since(g.claim.last_activity_at) >= timeout
                    })
            })
            .collect();
        for g in &idle {
            let reason = format!("idle since {}", g.claim.last_activity_at);
            match self
                .release(
                    g.claim.tenant_id.clone(),
                    g.claim.workload_id.clone(),
                    None,
                    &reason,
                    None,
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(tenant = %g.claim.tenant_id, workload = %g.claim.workload_id, "released an idle claim")
                }
                Err(e) => {
                    tracing::warn!(tenant = %g.claim.tenant_id, error = %e, "cannot release an idle claim")
                }
            }
        }
        Ok(idle.len())
    }
}
