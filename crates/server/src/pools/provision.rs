//! Making and unmaking containers, for cold starts and the refiller alike:
//! placement, the create command, waiting until a container is ready,
//! promotion to idle, and removal of draining containers.
//!
//! A container's row is committed (Warming) before its create is sent, so
//! a crash in between leaves a row whose create is resent, never a
//! container nobody knows. A create slot is taken under the index lock
//! (`Inflight::creating`) before that commit, so concurrent creates can
//! never push a pool past `max_size`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boilerhouse_core::container::{ContainerSpec, ObservedContainer, VolumeKind, volume_host_path};
use boilerhouse_core::node::Resources;
use boilerhouse_core::pool::decide::{self, DrainScope};
use boilerhouse_core::pool::{ContainerRecord, ContainerState, NodeCandidate, choose_node};
use boilerhouse_core::workload::{WorkloadRecord, WorkloadSpec};
use boilerhouse_core::{ContainerId, NodeId, Timestamp, WorkloadId};
use boilerhouse_proto::pb;

use super::shortfall::last_check;
use super::{BusyGuard, PoolError, Pools};

/// How many new container rows share a write; see `Pools::record_new`.
const ROWS_PER_COMMIT: usize = 8;

/// Gives a create slot back when dropped (the row committed, or not).
struct SlotGuard {
    pools: Pools,
    pool: WorkloadId,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut state = self.pools.state();
        if let Some(n) = state.inflight.creating.get_mut(&self.pool) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.inflight.creating.remove(&self.pool);
            }
        }
    }
}

impl Pools {
    /// The create command for a new container; its id makes it idempotent
    /// across resends.
    pub(crate) fn create_command(spec: &WorkloadSpec, record: &ContainerRecord) -> pb::Command {
        let container_spec =
            ContainerSpec::for_workload(spec, record.id, &record.node_id, record.created_at);
        pb::Command {
            command_id: format!("create-{}", record.id),
            generation: 0,
            command: Some(pb::command::Command::Create(pb::CreateContainer {
                spec: Some(pb::ContainerSpec::from(&container_spec)),
                start: true,
            })),
        }
    }

    /// A new warming container record for `spec` on `node`.
    pub(crate) fn new_container(
        spec: &WorkloadSpec,
        spec_hash: &str,
        id: ContainerId,
        node: (NodeId, String),
        now: Timestamp,
    ) -> ContainerRecord {
        let (node_id, state_root) = node;
        let path = |kind: VolumeKind, wanted: bool| {
            if wanted {
                volume_host_path(&state_root, &id, &kind)
            } else {
                String::new()
            }
        };
        ContainerRecord {
            id,
            workload_id: spec.id.clone(),
            node_id,
            docker_id: None,
            state: ContainerState::Warming,
            spec_hash: spec_hash.to_owned(),
            tenant_id: None,
            last_tenant_id: None,
            claim_generation: 0,
            revision: 0,
            limits: spec.limits,
            state_path: path(VolumeKind::State, spec.volumes.state.is_some()),
            comm_path: path(VolumeKind::Comm, spec.volumes.comm.is_some()),
            created_at: now,
            updated_at: now,
        }
    }

    /// The node for a new container, with its state root; or why no node
    /// can take one. `nodes` and `allocated` are read by the caller, so
    /// that a batch reads them once and counts its own choices.
    fn place(
        &self,
        nodes: &[boilerhouse_core::node::Node],
        allocated: &HashMap<NodeId, Resources>,
        spec: &WorkloadSpec,
        now: Timestamp,
    ) -> Result<(NodeId, String), String> {
        let candidates: Vec<NodeCandidate> = nodes
            .iter()
            .map(|n| NodeCandidate {
                id: n.id.clone(),
                live: n.status == boilerhouse_core::node::NodeStatus::Ready
                    && self.node_live(&n.id, now),
                cordoned: n.cordoned,
                labels: n.labels.clone(),
                capacity: self.inner.capacity.effective(&n.id, n.capacity),
                allocated: allocated.get(&n.id).copied().unwrap_or_default(),
            })
            .collect();
        let Some(chosen) = choose_node(&candidates, spec).map(|c| c.id.clone()) else {
            return Err(boilerhouse_core::pool::why_no_node(&candidates, spec));
        };
        nodes
            .iter()
            .find(|n| n.id == chosen)
            .map(|n| (n.id.clone(), n.state_root.clone()))
            .ok_or_else(|| format!("node {chosen} is gone"))
    }

    /// Takes up to `wanted` create slots of `pool` under `max`, counting
    /// committed containers and slots already taken.
    fn take_slots(&self, pool: &WorkloadId, wanted: u32, max: u32) -> Vec<SlotGuard> {
        let mut state = self.state();
        let taken = state.inflight.creating.get(pool).copied().unwrap_or(0);
        let total = state.index.counts(pool).total() + taken;
        let n = wanted.min(max.saturating_sub(total));
        if n > 0 {
            *state.inflight.creating.entry(pool.clone()).or_default() += n;
        }
        drop(state);
        (0..n)
            .map(|_| SlotGuard {
                pools: self.clone(),
                pool: pool.clone(),
            })
            .collect()
    }

    /// Places and records new warming containers, one per slot, busy for
    /// the caller: placed one after another on one reading of the nodes
    /// (each counting the ones before it), committed [`ROWS_PER_COMMIT`] at
    /// a time. A slot that no node can take ends the batch with the reason;
    /// the ones placed before it are still recorded.
    async fn record_new(
        &self,
        workload: &WorkloadRecord,
        slots: Vec<SlotGuard>,
        now: Timestamp,
    ) -> Result<(Vec<(ContainerRecord, BusyGuard)>, Option<String>), PoolError> {
        let spec = &workload.spec;
        let nodes = self.inner.store.list_nodes().await?;
        let mut allocated = self.allocations();
        let mut placed = Vec::new();
        let mut why_not = None;
        let mut used = Vec::new();
        for slot in slots {
            let node = match self.place(&nodes, &allocated, spec, now) {
                Ok(node) => node,
                Err(why) => {
                    why_not = Some(why);
                    break;
                }
            };
            let id = ContainerId::from_uuid(boilerhouse_core::ids::Uuid::now_v7());
            let record = Self::new_container(spec, &workload.spec_hash, id, node, now);
            let busy = self.take_busy(id).ok_or_else(|| {
                PoolError::Unavailable(format!("container id {id} is already in use"))
            })?;
            let sums = allocated.entry(record.node_id.clone()).or_default();
            sums.cpus += record.limits.cpus.unwrap_or(0.0);
            sums.memory_bytes += record.limits.memory_bytes.unwrap_or(0);
            placed.push((record, busy));
            used.push(slot);
        }
        // A few rows per write: one write of sixty-four took ten
        // milliseconds of the single writer, and every claim that arrived
        // meanwhile waited for all of it. Each chunk's slots go once it is
        // committed: the index counts those rows from then on.
        let mut used = used.into_iter();
        for chunk in placed.chunks(ROWS_PER_COMMIT) {
            let mut write = boilerhouse_core::pool::write::PoolWrite::default();
            for (record, _) in chunk {
                write.extend(decide::insert(record.clone()));
            }
            self.commit(write).await?;
            used.by_ref().take(chunk.len()).for_each(drop);
        }
        Ok((placed, why_not))
    }

    /// Creates a container for one claim and waits until it is ready.
    /// Returns it still Warming and busy: the caller grants it.
    pub(super) async fn cold_start(
        &self,
        workload: &WorkloadRecord,
        deadline: Instant,
    ) -> Result<(ContainerId, BusyGuard), PoolError> {
        let spec = &workload.spec;
        let overrides = self.overrides(&spec.id).await?;
        if overrides.draining {
            return Err(PoolError::Exhausted(format!(
                "pool {} is drained; `bh pool scale` puts it back in service",
                spec.id
            )));
        }
        let max = overrides.max_size.unwrap_or(spec.pool.max_size);
        let Some(slot) = self.take_slots(&spec.id, 1, max).pop() else {
            return Err(PoolError::Exhausted(format!(
                "pool {} is at max_size {max} and has no idle container; retry shortly",
                spec.id
            )));
        };
        let now = crate::clock::now();
        let (mut placed, why_not) = self.record_new(workload, vec![slot], now).await?;
        let (record, busy) = placed.pop().ok_or_else(|| {
            PoolError::Exhausted(format!(
                "no node can take a container of {}: {}",
                spec.id,
                why_not.unwrap_or_default()
            ))
        })?;
        match self.create_and_wait(spec, &record, deadline).await {
            Ok(()) => Ok((record.id, busy)),
            Err(e) => {
                drop(busy);
                if let Err(drain) = self
                    .drain(
                        &record.id,
                        DrainScope::Unowned,
                        &format!("cold start failed: {e}"),
                    )
                    .await
                {
                    tracing::warn!(container = %record.id, error = %drain, "cannot drain a failed cold start; the refiller will");
                }
                Err(e)
            }
        }
    }

    /// Sends the create command and records the Docker id it reports.
    async fn create(
        &self,
        spec: &WorkloadSpec,
        record: &ContainerRecord,
        timeout: Duration,
    ) -> Result<pb::ObservedContainer, PoolError> {
        let command = Self::create_command(spec, record);
        let result = self
            .inner
            .agents
            .send(&record.node_id, command, timeout)
            .await
            .map_err(|e| {
                PoolError::Unavailable(format!("creating a container on {}: {e}", record.node_id))
            })?;
        let observed = result
            .container
            .ok_or_else(|| PoolError::Unavailable("the agent returned no container".into()))?;
        let now = crate::clock::now();
        let docker_id = observed.docker_id.clone();
        self.commit_decided(|index| {
            Ok(decide::set_docker_id(index, &record.id, &docker_id, now).map(|w| (w, ())))
        })
        .await?;
        self.inner.refill.notify_one();
        Ok(observed)
    }

    /// Creates the container, then waits until Docker reports it running
    /// and, with a healthcheck, healthy.
    async fn create_and_wait(
        &self,
        spec: &WorkloadSpec,
        record: &ContainerRecord,
        deadline: Instant,
    ) -> Result<(), PoolError> {
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .min(self.inner.config.command_timeout);
        let observed = self.create(spec, record, timeout).await?;
        let needs_health = spec.healthcheck.is_some();
        if observed.docker_state == "running" && (!needs_health || observed.health == "healthy") {
            return Ok(());
        }
        // The agent streams state changes into the node's report; wait for
        // a change, then look again. Armed before each look, so a change
        // between the look and the wait still wakes it.
        loop {
            let changed = self.inner.agents.report_changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let seen = self.reported(&record.node_id, &observed.docker_id);
            if seen.as_ref().is_some_and(|c| ready(c, needs_health)) {
                return Ok(());
            }
            // The engine's verdict: waiting longer will not make it pass.
            if let Some(c) = seen
                .as_ref()
                .filter(|c| c.health.as_deref() == Some("unhealthy"))
            {
                return Err(PoolError::Unavailable(format!(
                    "container {} is unhealthy: {}",
                    record.id,
                    last_check(c)
                )));
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                return Err(match seen.filter(|c| c.is_running() && needs_health) {
                    Some(c) => PoolError::Unavailable(format!(
                        "container {} did not become healthy in time (health {}: {})",
                        record.id,
                        c.health.as_deref().unwrap_or("unknown"),
                        last_check(&c)
                    )),
                    None => PoolError::Exhausted(format!(
                        "container {} did not become ready in time",
                        record.id
                    )),
                });
            }
        }
    }

    /// A container as its node last reported it.
    pub(super) fn reported(
        &self,
        node: &NodeId,
        docker_id: &str,
    ) -> Option<Arc<ObservedContainer>> {
        self.inner
            .agents
            .report(node)
            .and_then(|r| r.containers.get(docker_id).cloned())
    }

    fn reported_ready(&self, node: NodeId, docker_id: &str, needs_health: bool) -> bool {
        self.reported(&node, docker_id)
            .is_some_and(|c| ready(&c, needs_health))
    }

    /// Warming containers with no Docker id that no operation owns: their
    /// create was lost with a server restart or a dropped session. It is
    /// sent again; it is idempotent (the agent finds the twin by name), so
    /// a container that was made is adopted, not duplicated.
    pub(super) async fn resend_unfinished_creates(
        &self,
        workloads: &[WorkloadRecord],
    ) -> Result<usize, PoolError> {
        let now = crate::clock::now();
        let stuck: Vec<ContainerRecord> = self.read(|index| {
            index
                .containers_in(ContainerState::Warming)
                .filter(|c| c.docker_id.is_none())
                .filter(|c| self.node_live(&c.node_id, now))
                .cloned()
                .collect()
        });
        let mut resent = 0;
        for record in stuck {
            let Some(busy) = self.take_busy(record.id) else {
                continue;
            };
            let Some(workload) = workloads.iter().find(|w| w.spec.id == record.workload_id) else {
                drop(busy);
                self.drain(&record.id, DrainScope::Unowned, "its workload was removed")
                    .await?;
                continue;
            };
            resent += 1;
            let pools = self.clone();
            let spec = workload.spec.clone();
            tokio::spawn(async move {
                let timeout = pools.inner.config.command_timeout;
                if let Err(e) = pools.create(&spec, &record, timeout).await {
                    tracing::warn!(container = %record.id, error = %e, "resending a create failed; will retry");
                }
                drop(busy);
            });
        }
        Ok(resent)
    }

    /// Warming containers that Docker reports running (and healthy, with a
    /// healthcheck) become idle.
    pub(super) async fn promote_ready(&self, workloads: &[WorkloadRecord]) -> usize {
        let ready: Vec<ContainerId> = {
            let state = self.state();
            state
                .index
                .containers_in(ContainerState::Warming)
                .filter(|c| !state.inflight.busy.contains(&c.id))
                .filter(|c| {
                    let needs_health = workloads
                        .iter()
                        .find(|w| w.spec.id == c.workload_id)
                        .is_some_and(|w| w.spec.healthcheck.is_some());
                    c.docker_id
                        .as_deref()
                        .is_some_and(|d| self.reported_ready(c.node_id.clone(), d, needs_health))
                })
                .map(|c| c.id)
                .collect()
        };
        let now = crate::clock::now();
        let mut promoted = 0;
        for id in ready {
            // Refused if anything changed it meanwhile: it is decided again
            // next round, on what is then committed.
            match self
                .commit_decided(|index| Ok(decide::promote(index, &id, now).map(|w| (w, ()))))
                .await
            {
                Ok(Some(())) => promoted += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot promote a ready container")
                }
            }
        }
        promoted
    }

    /// Drains idle containers of drained pools and of removed workloads,
    /// then starts creating containers for every pool below min_size.
    pub(super) async fn fill(&self, workloads: &[WorkloadRecord]) -> Result<usize, PoolError> {
        let overrides = self.inner.store.pool_overrides().await?;
        let now = crate::clock::now();
        // Found by pool first (this runs after every claim; a scan of
        // every container under the index lock did not scale), then the
        // containers of the few pools that are orphaned.
        let orphans: Vec<ContainerId> = self.read(|index| {
            let orphaned: Vec<&WorkloadId> = index
                .pools()
                .filter(|(_, counts)| counts.idle + counts.warming > 0)
                .map(|(pool, _)| pool)
                .filter(|pool| {
                    let drained = overrides.iter().any(|(id, o)| id == *pool && o.draining);
                    drained || !workloads.iter().any(|w| &w.spec.id == *pool)
                })
                .collect();
            if orphaned.is_empty() {
                return Vec::new();
            }
            index
                .containers()
                .filter(|c| matches!(c.state, ContainerState::Idle | ContainerState::Warming))
                .filter(|c| orphaned.contains(&&c.workload_id))
                .map(|c| c.id)
                .collect()
        });
        for id in orphans {
            // A claim that took it meanwhile wins: the drain is refused.
            if self.state().inflight.busy.contains(&id) {
                continue;
            }
            if let Err(e) = self
                .drain(
                    &id,
                    DrainScope::Unowned,
                    "its pool was drained or its workload removed",
                )
                .await
            {
                tracing::debug!(container = %id, error = %e, "not drained");
            }
        }
        // A node whose containers no reconciliation pass has seen yet may
        // run this pool's containers already (a fresh database, a server
        // restarted while agents kept running): creating now would double
        // the pool once they are adopted.
        let waiting = self.inner.agents.unreconciled();
        if !waiting.is_empty() {
            tracing::debug!(nodes = ?waiting, "waiting for the first reconciled reports before filling");
            return Ok(0);
        }
        let mut started = 0;
        for workload in workloads {
            let spec = &workload.spec;
            let o = overrides
                .iter()
                .find(|(id, _)| *id == spec.id)
                .map(|(_, o)| o.clone())
                .unwrap_or_default();
            let backing_off = self
                .state()
                .inflight
                .backoff
                .get(&spec.id)
                .is_some_and(|(_, until)| Instant::now() < *until);
            if o.draining {
                self.clear_shortfall(&spec.id);
                continue;
            }
            if backing_off {
                continue;
            }
            let min = o.min_size.unwrap_or(spec.pool.min_size);
            let max = o.max_size.unwrap_or(spec.pool.max_size);
            let (wanted, replace) = self.plan_fill(workload, min, max);
            for (id, why) in replace {
                if let Err(e) = self.drain(&id, DrainScope::Unowned, why).await {
                    tracing::debug!(container = %id, error = %e, "stale container not drained");
                }
            }
            if wanted == 0 && !backing_off {
                self.clear_shortfall(&spec.id);
            }
            let slots = self.take_slots(&spec.id, wanted, max);
            if slots.is_empty() {
                continue;
            }
            let (placed, why_not) = self.record_new(workload, slots, now).await?;
            match why_not {
                Some(why) => self.note_shortfall(&spec.id, min, why).await,
                None => self.clear_shortfall(&spec.id),
            }
            for (record, busy) in placed {
                started += 1;
                let pools = self.clone();
                let workload = workload.clone();
                tokio::spawn(async move {
                    let timeout = pools.inner.config.command_timeout;
                    let created = pools.create(&workload.spec, &record, timeout).await;
                    drop(busy);
                    match created {
                        Ok(_) => {
                            pools.state().inflight.backoff.remove(&workload.spec.id);
                        }
                        Err(e) => pools.create_failed(&workload.spec.id, &record, &e).await,
                    }
                });
            }
        }
        Ok(started)
    }
}

/// Whether a reported container can serve a claim.
fn ready(c: &ObservedContainer, needs_health: bool) -> bool {
    c.is_running() && (!needs_health || c.health.as_deref() == Some("healthy"))
}
