//! Warm pools and claims.
//!
//! The claim hot path touches no Docker call and no table scan: an
//! in-memory index (idle containers per pool, active claims and
//! reservations by tenant) is rebuilt from the database at startup and
//! kept in step with it. Decisions are serialised per (tenant, workload)
//! and on the index; each one is committed as a single [`PoolWrite`]
//! before it is acknowledged, and the database's unique indexes (one
//! active claim per tenant and workload, one per container) back the
//! in-memory rules up.

pub mod tasks;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boilerhouse_core::container::{ContainerSpec, StateFile, VolumeKind, volume_host_path};
use boilerhouse_core::event::{EventSubject, NewEvent, Severity};
use boilerhouse_core::pool::{
    ClaimRecord, ClaimSource, ClaimStatus, ContainerRecord, ContainerState, PoolCounts, Reservation,
};
use boilerhouse_core::workload::{WorkloadRecord, WorkloadSpec};
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp, WorkloadId};
use boilerhouse_proto::pb;

use crate::agents::Registry;
use crate::api::idempotency::KeyedLocks;
use crate::store::{IdempotentRecord, PoolOverride, PoolWrite, Store, StoreError};

/// Why a pool operation failed, in terms the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No such workload.
    #[error("workload {0} not found")]
    UnknownWorkload(WorkloadId),
    /// The tenant holds no active claim of that workload.
    #[error("tenant {0} has no active claim of workload {1}")]
    NoClaim(TenantId, WorkloadId),
    /// A fencing token that is not the claim's current one.
    #[error("generation {given} is stale: the claim's generation is {current}")]
    StaleGeneration {
        /// What the caller sent.
        given: u64,
        /// The claim's.
        current: u64,
    },
    /// No container can be had now.
    #[error("{0}")]
    Exhausted(String),
    /// A dependency failed.
    #[error("{0}")]
    Unavailable(String),
    /// Not allowed in the current state.
    #[error("{0}")]
    Precondition(String),
    /// No such container.
    #[error("container {0} not found")]
    UnknownContainer(ContainerId),
    /// No such reservation.
    #[error("tenant {0} has no reservation for workload {1}")]
    NoReservation(TenantId, WorkloadId),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A granted claim.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The claim.
    pub claim: ClaimRecord,
    /// Its container.
    pub container: ContainerRecord,
}

/// Tunables of the pool machinery.
#[derive(Debug, Clone, Copy)]
pub struct PoolsConfig {
    /// Heartbeat silence after which a node's containers are not offered.
    pub suspect_after: Duration,
    /// How long to wait for an agent to answer a command.
    pub command_timeout: Duration,
    /// Default cold-start wait when a claim does not say.
    pub acquire_timeout: Duration,
}

type Key = (TenantId, WorkloadId);

#[derive(Default)]
struct Index {
    containers: HashMap<ContainerId, ContainerRecord>,
    idle: HashMap<WorkloadId, VecDeque<ContainerId>>,
    claims: HashMap<Key, ClaimRecord>,
    reservations: HashMap<Key, Reservation>,
    /// Containers with a create or remove command in flight.
    busy: HashSet<ContainerId>,
    /// Consecutive create failures per pool and when to try again.
    backoff: HashMap<WorkloadId, (u32, Instant)>,
    /// Activity seen since the last flush, by claim id.
    unflushed_activity: HashMap<String, Timestamp>,
}

impl Index {
    fn counts(&self, pool: &WorkloadId) -> PoolCounts {
        let mut counts = PoolCounts::default();
        for c in self.containers.values().filter(|c| &c.workload_id == pool) {
            counts.add(c.state);
        }
        counts
    }

    fn set(&mut self, c: ContainerRecord) {
        let id = c.id;
        if c.state == ContainerState::Idle {
            let queue = self.idle.entry(c.workload_id.clone()).or_default();
            if !queue.contains(&id) {
                queue.push_back(id);
            }
        } else if let Some(queue) = self.idle.get_mut(&c.workload_id) {
            queue.retain(|x| *x != id);
        }
        self.containers.insert(id, c);
    }

    fn remove(&mut self, id: &ContainerId) -> Option<ContainerRecord> {
        let c = self.containers.remove(id)?;
        if let Some(queue) = self.idle.get_mut(&c.workload_id) {
            queue.retain(|x| x != id);
        }
        Some(c)
    }
}

struct Inner {
    store: Store,
    agents: Registry,
    config: PoolsConfig,
    index: Mutex<Index>,
    tenant_locks: KeyedLocks,
    /// Wakes the refiller when capacity was consumed or freed.
    refill: tokio::sync::Notify,
    /// Workloads by id, so a claim parses no spec and reads no table.
    /// Replaced wholesale by the refiller every second; a miss reads the
    /// database, so a newly applied workload is claimable at once.
    workloads: std::sync::RwLock<HashMap<WorkloadId, Arc<WorkloadRecord>>>,
    /// Live boosts, which move schedulable capacity between nodes.
    boosts: crate::boosts::BoostLedger,
    /// Tenant state sync: downloads on claim, uploads on release.
    syncs: crate::syncs::Syncs,
}

/// The pool machinery. Cheap to clone.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Inner>,
}

fn subject(
    tenant: Option<&TenantId>,
    workload: &WorkloadId,
    container: Option<&ContainerId>,
    node: Option<&NodeId>,
) -> EventSubject {
    EventSubject {
        tenant_id: tenant.map(ToString::to_string),
        workload_id: Some(workload.to_string()),
        container_id: container.map(ToString::to_string),
        node_id: node.map(ToString::to_string),
        boost_id: None,
    }
}

fn event(
    now: Timestamp,
    kind: &str,
    severity: Severity,
    message: String,
    subject: EventSubject,
) -> NewEvent {
    NewEvent {
        at: now,
        kind: kind.to_owned(),
        severity,
        message,
        subject,
        attributes: Default::default(),
    }
}

impl Pools {
    /// Rebuilds the index from the database. Placement counts the live
    /// boosts in `boosts`.
    pub async fn load(
        store: Store,
        agents: Registry,
        config: PoolsConfig,
        boosts: crate::boosts::BoostLedger,
        syncs: crate::syncs::Syncs,
    ) -> Result<Self, StoreError> {
        let snapshot = store.load_pool_snapshot().await?;
        let mut index = Index::default();
        for mut c in snapshot.containers {
            // A warming container holding a tenant is a cold start that was
            // interrupted: no claim was acknowledged on it, so it simply
            // joins the pool.
            if c.state == ContainerState::Warming {
                c.tenant_id = None;
            }
            index.set(c);
        }
        for claim in snapshot.claims {
            index
                .claims
                .insert((claim.tenant_id.clone(), claim.workload_id.clone()), claim);
        }
        for r in snapshot.reservations {
            index
                .reservations
                .insert((r.tenant_id.clone(), r.workload_id.clone()), r);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                agents,
                config,
                index: Mutex::new(index),
                tenant_locks: KeyedLocks::default(),
                refill: tokio::sync::Notify::new(),
                workloads: std::sync::RwLock::default(),
                boosts,
                syncs,
            }),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a node's containers may be offered: it has a live session
    /// with a recent heartbeat.
    fn node_live(&self, node: &NodeId, now: Timestamp) -> bool {
        self.inner.agents.session(node).is_some_and(|s| {
            now.saturating_since(s.last_heartbeat) < self.inner.config.suspect_after
        })
    }

    /// Serialises decisions for one (tenant, workload).
    async fn lock_tenant(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
    ) -> crate::api::idempotency::KeyGuard<'_> {
        self.inner
            .tenant_locks
            .lock(&format!("{tenant}\0{workload}"))
            .await
    }

    /// The create command for a new container; its id makes it idempotent
    /// across resends.
    fn create_command(spec: &WorkloadSpec, record: &ContainerRecord) -> pb::Command {
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

    /// Wakes the refiller.
    pub fn refill_notify(&self) -> &tokio::sync::Notify {
        &self.inner.refill
    }

    async fn workload(&self, id: &WorkloadId) -> Result<Arc<WorkloadRecord>, PoolError> {
        let cached = self
            .inner
            .workloads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if let Some(w) = cached {
            return Ok(w);
        }
        let record = Arc::new(
            self.inner
                .store
                .get_workload(id)
                .await?
                .ok_or_else(|| PoolError::UnknownWorkload(id.clone()))?,
        );
        self.inner
            .workloads
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), record.clone());
        Ok(record)
    }

    /// A workload as the pools see it (cached).
    pub async fn workload_record(&self, id: &WorkloadId) -> Result<Arc<WorkloadRecord>, PoolError> {
        self.workload(id).await
    }

    /// Replaces the workload cache with what the database holds now.
    pub fn refresh_workloads(&self, workloads: &[WorkloadRecord]) {
        let fresh = workloads
            .iter()
            .map(|w| (w.spec.id.clone(), Arc::new(w.clone())))
            .collect();
        *self
            .inner
            .workloads
            .write()
            .unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    /// Claims a container of `workload` for `tenant`: its existing claim,
    /// its reservation, an idle container, or a cold start, in that order.
    /// `idempotency` turns the decision into the record stored with it.
    pub async fn claim(
        &self,
        tenant: TenantId,
        workload_id: WorkloadId,
        acquire_timeout: Option<Duration>,
        idempotency: impl Fn(&Granted, ClaimSource, bool) -> Option<IdempotentRecord>,
    ) -> Result<(Granted, ClaimSource, bool), PoolError> {
        let workload = self.workload(&workload_id).await?;
        let key = (tenant.clone(), workload_id.clone());
        let _guard = self.lock_tenant(&tenant, &workload_id).await;
        let now = crate::clock::now();

        // 1 EXISTING, 2 AFFINITY, 3 POOL: decided under the index lock.
        let decision = {
            let mut index = self.index();
            if let Some(claim) = index.claims.get(&key).cloned() {
                let container = index
                    .containers
                    .get(&claim.container_id)
                    .cloned()
                    .ok_or_else(|| {
                        PoolError::Unavailable(format!(
                            "the container of {tenant}'s claim is being reconciled; retry shortly"
                        ))
                    })?;
                Some((ClaimSource::Existing, container, None))
            } else if let Some(r) = index
                .reservations
                .get(&key)
                .filter(|r| self.node_live(&r.node_id, now))
                .cloned()
            {
                index
                    .containers
                    .get(&r.container_id)
                    .cloned()
                    .map(|c| (ClaimSource::Affinity, c, Some(key.clone())))
            } else {
                let live: Option<ContainerId> = {
                    let candidates: Vec<ContainerId> = index
                        .idle
                        .get(&workload_id)
                        .map(|q| q.iter().copied().collect())
                        .unwrap_or_default();
                    candidates.into_iter().find(|id| {
                        index
                            .containers
                            .get(id)
                            .is_some_and(|c| self.node_live(&c.node_id, now))
                    })
                };
                live.and_then(|id| {
                    let mut c = index.containers.get(&id).cloned()?;
                    // Taken now, under the lock: no other claim can have it.
                    c.state = ContainerState::Claimed;
                    c.tenant_id = Some(tenant.clone());
                    index.set(c.clone());
                    Some((ClaimSource::Pool, c, None))
                })
            }
        };

        let (source, container, consumed) = match decision {
            Some(d) => d,
            None => (
                ClaimSource::Cold,
                self.cold_start(&workload, &tenant, acquire_timeout, now)
                    .await?,
                None,
            ),
        };

        if source == ClaimSource::Existing {
            let claim = self
                .index()
                .claims
                .get(&key)
                .cloned()
                .ok_or_else(|| PoolError::NoClaim(tenant.clone(), workload_id.clone()))?;
            let granted = Granted { claim, container };
            if let Some(record) = idempotency(&granted, source, false) {
                self.inner
                    .store
                    .apply_pool_write(PoolWrite {
                        idempotency: Some(record),
                        ..Default::default()
                    })
                    .await?;
            }
            return Ok((granted, source, false));
        }
        // With a download to run first, the answer (and the request id's
        // record of it) waits for the download: a claim whose restore fails
        // is not granted, and a retry must not replay it as granted.
        let restore = workload.spec.sync.as_ref().is_some_and(|s| {
            s.policy.on_claim && crate::syncs::runs_in(s, crate::syncs::Phase::Download)
        });

        let mut claimed = container.clone();
        claimed.state = ContainerState::Claimed;
        claimed.tenant_id = Some(tenant.clone());
        claimed.claim_generation += 1;
        claimed.updated_at = now;
        let claim = ClaimRecord {
            claim_id: boilerhouse_core::ids::Uuid::now_v7().to_string(),
            tenant_id: tenant.clone(),
            workload_id: workload_id.clone(),
            container_id: claimed.id,
            node_id: claimed.node_id.clone(),
            generation: claimed.claim_generation,
            source,
            status: ClaimStatus::Active,
            claimed_at: now,
            last_activity_at: now,
            released_at: None,
        };
        let granted = Granted {
            claim: claim.clone(),
            container: claimed.clone(),
        };
        let write = PoolWrite {
            containers: vec![claimed.clone()],
            claims: vec![claim.clone()],
            removed_reservations: consumed.clone().into_iter().collect(),
            idempotency: if restore {
                None
            } else {
                idempotency(&granted, source, false)
            },
            events: vec![event(
                now,
                "claim.created",
                Severity::Info,
                format!(
                    "tenant {tenant} claimed container {} of {workload_id} ({})",
                    claimed.id,
                    source.as_str()
                ),
                subject(
                    Some(&tenant),
                    &workload_id,
                    Some(&claimed.id),
                    Some(&claimed.node_id),
                ),
            )],
            ..Default::default()
        };
        if let Err(e) = self.inner.store.apply_pool_write(write).await {
            // Not durable, so not granted: undo the in-memory decision.
            let mut index = self.index();
            if source == ClaimSource::Pool || source == ClaimSource::Cold {
                let mut back = container;
                back.state = if source == ClaimSource::Pool {
                    ContainerState::Idle
                } else {
                    ContainerState::Draining
                };
                back.tenant_id = None;
                index.set(back);
            }
            return Err(e.into());
        }
        {
            let mut index = self.index();
            if let Some(k) = &consumed {
                index.reservations.remove(k);
            }
            index.set(claimed.clone());
            index.claims.insert(key, claim.clone());
        }
        self.inner.refill.notify_one();
        self.write_state_file(
            &claimed,
            StateFile {
                tenant_id: Some(tenant.clone()),
                last_tenant_id: claimed.last_tenant_id.clone(),
                claimed_at: Some(now),
                last_activity_at: Some(now),
                claim_generation: claimed.claim_generation,
            },
        );
        if consumed.is_some() && self.inner.syncs.release_upload_owed(&claimed.id) {
            // Its tenant has it back: the files are in use again and go up
            // with the next release.
            self.inner
                .syncs
                .settle_release_upload(claimed.id, "no longer owed: claimed again by its tenant")
                .await?;
        }
        if !restore {
            return Ok((granted, source, false));
        }
        let policy = workload.spec.sync.as_ref().map(|s| s.policy.on_claim_error);
        let run = self
            .inner
            .syncs
            .run(
                &tenant,
                &workload,
                &claimed,
                crate::syncs::Phase::Download,
                None,
                crate::syncs::SyncReason::Claim,
            )
            .await;
        let with_data = run.ok();
        if let Some(e) = run.error
            && policy != Some(boilerhouse_core::workload::OnClaimError::Continue)
        {
            // Not granted. The container keeps no one else's data and is
            // kept for this tenant, so a retry lands on it (AFFINITY) and
            // tries the restore again; nothing is uploaded from it, since
            // it lacks the tenant's files.
            self.release_locked(
                &tenant,
                &workload_id,
                None,
                "restoring the tenant's files failed",
                None,
                false,
            )
            .await?;
            return Err(PoolError::Unavailable(format!(
                "cannot restore {tenant}'s files for {workload_id} into container {}: {e}; \
                 the claim was not granted (retry, or set sync.policy.on_claim_error: continue to claim without them)",
                claimed.id
            )));
        }
        if let Some(record) = idempotency(&granted, source, with_data) {
            self.inner
                .store
                .apply_pool_write(PoolWrite {
                    idempotency: Some(record),
                    ..Default::default()
                })
                .await?;
        }
        Ok((granted, source, with_data))
    }

    /// Creates a container for one claim and waits until it is ready.
    async fn cold_start(
        &self,
        workload: &WorkloadRecord,
        tenant: &TenantId,
        acquire_timeout: Option<Duration>,
        now: Timestamp,
    ) -> Result<ContainerRecord, PoolError> {
        let spec = &workload.spec;
        let overrides = self.overrides(&spec.id).await?;
        if overrides.draining {
            return Err(PoolError::Precondition(format!(
                "pool {} is drained; `bh pool scale` puts it back in service",
                spec.id
            )));
        }
        let max = overrides.max_size.unwrap_or(spec.pool.max_size);
        let node = self.place(spec, now).await?.ok_or_else(|| {
            PoolError::Exhausted(format!(
                "no ready, uncordoned node can fit a container of {}",
                spec.id
            ))
        })?;
        let mut record = self.new_container(spec, &workload.spec_hash, node, now);
        record.tenant_id = Some(tenant.clone());
        {
            // Check and take the slot under one lock, so concurrent cold
            // starts can never push the pool past max_size.
            let mut index = self.index();
            if index.counts(&spec.id).total() >= max {
                return Err(PoolError::Exhausted(format!(
                    "pool {} is at max_size {max} and has no idle container; retry shortly",
                    spec.id
                )));
            }
            index.busy.insert(record.id);
            index.set(record.clone());
        }
        if let Err(e) = self
            .inner
            .store
            .apply_pool_write(PoolWrite {
                containers: vec![record.clone()],
                ..Default::default()
            })
            .await
        {
            // Never recorded, so never created: give the slot back.
            self.index().remove(&record.id);
            self.index().busy.remove(&record.id);
            return Err(e.into());
        }
        let deadline =
            Instant::now() + acquire_timeout.unwrap_or(self.inner.config.acquire_timeout);
        let result = self.create_and_wait(spec, record.clone(), deadline).await;
        self.index().busy.remove(&record.id);
        match result {
            Ok(ready) => Ok(ready),
            Err(e) => {
                self.mark_draining(record.id, &format!("cold start failed: {e}"))
                    .await;
                Err(e)
            }
        }
    }

    /// A new warming container record for `spec` on `node`.
    fn new_container(
        &self,
        spec: &WorkloadSpec,
        spec_hash: &str,
        node: (NodeId, String),
        now: Timestamp,
    ) -> ContainerRecord {
        let id = ContainerId::from_uuid(boilerhouse_core::ids::Uuid::now_v7());
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
            limits: spec.limits,
            state_path: path(VolumeKind::State, spec.volumes.state.is_some()),
            comm_path: path(VolumeKind::Comm, spec.volumes.comm.is_some()),
            created_at: now,
            updated_at: now,
        }
    }

    /// Sends the create command, then waits until Docker reports the
    /// container running and, with a healthcheck, healthy.
    async fn create_and_wait(
        &self,
        spec: &WorkloadSpec,
        mut record: ContainerRecord,
        deadline: Instant,
    ) -> Result<ContainerRecord, PoolError> {
        let command = Self::create_command(spec, &record);
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .min(self.inner.config.command_timeout);
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
        record.docker_id = Some(observed.docker_id.clone());
        let needs_health = spec.healthcheck.is_some();
        let mut ready =
            observed.docker_state == "running" && (!needs_health || observed.health == "healthy");
        while !ready {
            if Instant::now() >= deadline {
                return Err(PoolError::Exhausted(format!(
                    "container {} did not become ready in time",
                    record.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let report = self.inner.agents.report(&record.node_id);
            let seen = report
                .as_ref()
                .and_then(|r| r.containers.get(&observed.docker_id));
            ready = seen.is_some_and(|c| {
                c.is_running() && (!needs_health || c.health.as_deref() == Some("healthy"))
            });
        }
        record.updated_at = crate::clock::now();
        Ok(record)
    }

    /// The node for a new container, with its state root.
    async fn place(
        &self,
        spec: &WorkloadSpec,
        now: Timestamp,
    ) -> Result<Option<(NodeId, String)>, PoolError> {
        let nodes = self.inner.store.list_nodes().await?;
        let allocated = self.allocations();
        let boosts = self.inner.boosts.live();
        let candidates: Vec<boilerhouse_core::pool::NodeCandidate> = nodes
            .iter()
            .map(|n| boilerhouse_core::pool::NodeCandidate {
                id: n.id.clone(),
                live: n.status == boilerhouse_core::node::NodeStatus::Ready
                    && self.node_live(&n.id, now),
                cordoned: n.cordoned,
                labels: n.labels.clone(),
                capacity: boilerhouse_core::boost::effective_capacity(&n.id, n.capacity, &boosts),
                allocated: allocated.get(&n.id).copied().unwrap_or_default(),
            })
            .collect();
        let chosen = boilerhouse_core::pool::choose_node(&candidates, spec).map(|c| c.id.clone());
        Ok(chosen.and_then(|id| {
            nodes
                .into_iter()
                .find(|n| n.id == id)
                .map(|n| (n.id, n.state_root))
        }))
    }

    /// Records the tenant in the container's state file, in the background:
    /// the claim is already durable and acknowledged.
    fn write_state_file(&self, container: &ContainerRecord, state: StateFile) {
        let agents = self.inner.agents.clone();
        let node = container.node_id.clone();
        let timeout = self.inner.config.command_timeout;
        let command = pb::Command {
            command_id: format!(
                "state-{}-{}-{}",
                container.id,
                container.claim_generation,
                state.tenant_id.is_some()
            ),
            generation: container.claim_generation,
            command: Some(pb::command::Command::WriteStateFile(pb::WriteStateFile {
                container_id: container.id.to_string(),
                state: Some(pb::ContainerStateFile::from(&state)),
            })),
        };
        tokio::spawn(async move {
            if let Err(e) = agents.send(&node, command, timeout).await {
                tracing::warn!(node = %node, error = %e, "state file not written yet; it stays pending for the agent");
            }
        });
    }

    /// Releases a claim: the container is reserved for the tenant for the
    /// workload's affinity_timeout (or destroyed if the workload does not
    /// reuse containers).
    pub async fn release(
        &self,
        tenant: TenantId,
        workload_id: WorkloadId,
        generation: Option<u64>,
        reason: &str,
        idempotency: Option<IdempotentRecord>,
    ) -> Result<(ClaimRecord, Option<Reservation>), PoolError> {
        let _guard = self.lock_tenant(&tenant, &workload_id).await;
        self.release_locked(&tenant, &workload_id, generation, reason, idempotency, true)
            .await
    }

    /// Releases with the tenant's lock held. `upload` runs the workload's
    /// upload on release first; if it fails, the container is kept for the
    /// tenant (whatever `reuse` says) and the upload is retried until it
    /// succeeds, so the tenant's newest files are never destroyed.
    async fn release_locked(
        &self,
        tenant: &TenantId,
        workload_id: &WorkloadId,
        generation: Option<u64>,
        reason: &str,
        idempotency: Option<IdempotentRecord>,
        upload: bool,
    ) -> Result<(ClaimRecord, Option<Reservation>), PoolError> {
        let tenant = tenant.clone();
        let workload_id = workload_id.clone();
        let key = (tenant.clone(), workload_id.clone());
        let (claim, container) = {
            let index = self.index();
            let claim = index
                .claims
                .get(&key)
                .cloned()
                .ok_or_else(|| PoolError::NoClaim(tenant.clone(), workload_id.clone()))?;
            if let Some(given) = generation.filter(|g| *g != claim.generation) {
                return Err(PoolError::StaleGeneration {
                    given,
                    current: claim.generation,
                });
            }
            let container = index.containers.get(&claim.container_id).cloned();
            (claim, container)
        };
        // A workload deleted since the claim means the container is not reused.
        let workload = self.workload(&workload_id).await.ok();
        let mut owed = false;
        if upload
            && let (Some(w), Some(c)) = (&workload, &container)
            && w.spec.sync.as_ref().is_some_and(|s| {
                s.policy.on_release && crate::syncs::runs_in(s, crate::syncs::Phase::Upload)
            })
        {
            let run = self
                .inner
                .syncs
                .run(
                    &tenant,
                    w,
                    c,
                    crate::syncs::Phase::Upload,
                    None,
                    crate::syncs::SyncReason::Release,
                )
                .await;
            if let Some(e) = run.error {
                // Recorded before the release commits: a crash in between
                // leaves an owed upload on a claimed container, which is
                // harmless, never a released container nobody will upload.
                self.inner
                    .syncs
                    .owe_release_upload(&tenant, &workload_id, c, &e)
                    .await?;
                owed = true;
            }
        }
        let now = crate::clock::now();
        let mut ended = claim.clone();
        ended.status = ClaimStatus::Released;
        ended.released_at = Some(now);
        let mut write = PoolWrite {
            claims: vec![ended.clone()],
            idempotency,
            ..Default::default()
        };
        let mut reservation = None;
        let mut updated = None;
        if let Some(mut c) = container {
            c.tenant_id = None;
            c.last_tenant_id = Some(tenant.clone());
            c.updated_at = now;
            match workload.as_ref().filter(|w| w.spec.pool.reuse || owed) {
                Some(w) => {
                    c.state = ContainerState::Reserved;
                    let r = Reservation {
                        tenant_id: tenant.clone(),
                        workload_id: workload_id.clone(),
                        container_id: c.id,
                        node_id: c.node_id.clone(),
                        reserved_at: now,
                        expires_at: now.saturating_add(w.spec.pool.affinity_timeout),
                    };
                    write.reservations.push(r.clone());
                    reservation = Some(r);
                }
                None => c.state = ContainerState::Draining,
            }
            write.containers.push(c.clone());
            updated = Some(c);
        }
        write.events.push(event(
            now,
            "claim.released",
            Severity::Info,
            format!(
                "tenant {tenant} released container {} of {workload_id} ({reason}){}",
                claim.container_id,
                reservation
                    .as_ref()
                    .map(|r| format!("; reserved until {}", r.expires_at))
                    .unwrap_or_default()
            ),
            subject(
                Some(&tenant),
                &workload_id,
                Some(&claim.container_id),
                Some(&claim.node_id),
            ),
        ));
        self.inner.store.apply_pool_write(write).await?;
        {
            let mut index = self.index();
            index.claims.remove(&key);
            if let Some(r) = &reservation {
                index.reservations.insert(key, r.clone());
            }
            if let Some(c) = &updated {
                index.set(c.clone());
            }
        }
        if let Some(c) = &updated {
            self.write_state_file(
                c,
                StateFile {
                    tenant_id: None,
                    last_tenant_id: Some(tenant),
                    claimed_at: None,
                    last_activity_at: Some(now),
                    claim_generation: c.claim_generation,
                },
            );
        }
        self.inner.refill.notify_one();
        Ok((ended, reservation))
    }

    /// Records activity on a claim; with a generation, checks it.
    pub async fn touch(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        generation: Option<u64>,
    ) -> Result<Timestamp, PoolError> {
        let now = crate::clock::now();
        let claim_id = {
            let mut index = self.index();
            let claim = index
                .claims
                .get_mut(&(tenant.clone(), workload.clone()))
                .ok_or_else(|| PoolError::NoClaim(tenant.clone(), workload.clone()))?;
            if let Some(given) = generation.filter(|g| *g != claim.generation) {
                return Err(PoolError::StaleGeneration {
                    given,
                    current: claim.generation,
                });
            }
            claim.last_activity_at = claim.last_activity_at.max(now);
            claim.claim_id.clone()
        };
        self.inner.store.touch_claims(vec![(claim_id, now)]).await?;
        Ok(now)
    }

    /// Records activity seen on a container (its state directory changed).
    pub fn container_activity(&self, container: &ContainerId, at: Timestamp) {
        let mut index = self.index();
        let touched = index
            .claims
            .values_mut()
            .find(|c| &c.container_id == container)
            .map(|claim| {
                claim.last_activity_at = claim.last_activity_at.max(at);
                (claim.claim_id.clone(), claim.last_activity_at)
            });
        if let Some((claim_id, at)) = touched {
            index.unflushed_activity.insert(claim_id, at);
        }
    }

    /// Writes activity seen on containers to the database, so a restarted
    /// server does not reap a claim that was in use.
    pub async fn flush_activity(&self) -> Result<usize, StoreError> {
        let touches: Vec<(String, Timestamp)> = self.index().unflushed_activity.drain().collect();
        let count = touches.len();
        self.inner.store.touch_claims(touches).await?;
        Ok(count)
    }

    /// What each node's containers reserve: the sum of their base limits.
    /// (Container boosts are counted by the boost ledger, as drawn from the
    /// node.)
    pub fn allocations(&self) -> HashMap<NodeId, boilerhouse_core::node::Resources> {
        let index = self.index();
        let mut sums: HashMap<NodeId, boilerhouse_core::node::Resources> = HashMap::new();
        for c in index.containers.values() {
            let entry = sums.entry(c.node_id.clone()).or_default();
            entry.cpus += c.limits.cpus.unwrap_or(0.0);
            entry.memory_bytes += c.limits.memory_bytes.unwrap_or(0);
        }
        sums
    }

    /// Whether `node` has a live, heartbeating agent.
    pub fn node_is_live(&self, node: &NodeId) -> bool {
        self.node_live(node, crate::clock::now())
    }

    /// The tenant's active claim.
    pub fn active_claim(&self, tenant: &TenantId, workload: &WorkloadId) -> Option<Granted> {
        let index = self.index();
        let claim = index
            .claims
            .get(&(tenant.clone(), workload.clone()))?
            .clone();
        let container = index.containers.get(&claim.container_id)?.clone();
        Some(Granted { claim, container })
    }

    /// Every active claim with its container.
    pub fn active_claims(&self) -> Vec<Granted> {
        let index = self.index();
        index
            .claims
            .values()
            .filter_map(|claim| {
                Some(Granted {
                    claim: claim.clone(),
                    container: index.containers.get(&claim.container_id)?.clone(),
                })
            })
            .collect()
    }

    /// Every reservation.
    pub fn reservations(&self) -> Vec<Reservation> {
        self.index().reservations.values().cloned().collect()
    }

    /// Every container.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        self.index().containers.values().cloned().collect()
    }

    /// One container.
    pub fn container(&self, id: &ContainerId) -> Option<ContainerRecord> {
        self.index().containers.get(id).cloned()
    }

    /// Counts per state for one pool.
    pub fn counts(&self, pool: &WorkloadId) -> PoolCounts {
        self.index().counts(pool)
    }

    /// A pool's operator overrides.
    pub async fn overrides(&self, pool: &WorkloadId) -> Result<PoolOverride, PoolError> {
        Ok(self
            .inner
            .store
            .pool_overrides()
            .await?
            .into_iter()
            .find(|(id, _)| id == pool)
            .map(|(_, o)| o)
            .unwrap_or_default())
    }

    /// The tenant's reservation for the workload.
    fn reservation(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
    ) -> Result<Reservation, PoolError> {
        self.index()
            .reservations
            .get(&(tenant.clone(), workload.clone()))
            .cloned()
            .ok_or_else(|| PoolError::NoReservation(tenant.clone(), workload.clone()))
    }

    /// Pushes a reservation's expiry later.
    pub async fn extend(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        by: Duration,
    ) -> Result<Reservation, PoolError> {
        let key = (tenant.clone(), workload.clone());
        let _guard = self.lock_tenant(tenant, workload).await;
        let mut r = self.reservation(tenant, workload)?;
        let now = crate::clock::now();
        r.expires_at = r.expires_at.saturating_add(by);
        self.inner
            .store
            .apply_pool_write(PoolWrite {
                reservations: vec![r.clone()],
                events: vec![event(
                    now,
                    "affinity.extended",
                    Severity::Info,
                    format!(
                        "reservation of {tenant} for {workload} extended to {}",
                        r.expires_at
                    ),
                    subject(
                        Some(tenant),
                        workload,
                        Some(&r.container_id),
                        Some(&r.node_id),
                    ),
                )],
                ..Default::default()
            })
            .await?;
        self.index().reservations.insert(key, r.clone());
        Ok(r)
    }

    /// Ends a reservation now, or (`expired`) because its time ran out:
    /// its container is destroyed, never handed to anyone else.
    pub async fn end_reservation(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        expired: bool,
    ) -> Result<Reservation, PoolError> {
        let key = (tenant.clone(), workload.clone());
        let _guard = self.lock_tenant(tenant, workload).await;
        let r = self.reservation(tenant, workload)?;
        if self.inner.syncs.release_upload_owed(&r.container_id) {
            if expired {
                return Err(PoolError::Precondition(format!(
                    "container {} holds {tenant}'s files whose upload is still owed",
                    r.container_id
                )));
            }
            // An operator's revoke is the operator acting: the owed files
            // are given up, and the event says so.
            self.inner
                .syncs
                .settle_release_upload(
                    r.container_id,
                    "abandoned: the reservation was revoked by an operator",
                )
                .await?;
        }
        let now = crate::clock::now();
        let mut write = PoolWrite {
            removed_reservations: vec![key.clone()],
            ..Default::default()
        };
        let container = self.index().containers.get(&r.container_id).cloned();
        if let Some(mut c) = container.clone() {
            c.state = ContainerState::Draining;
            c.updated_at = now;
            write.containers.push(c);
        }
        let (kind, why) = if expired {
            ("affinity.expired", "expired")
        } else {
            ("affinity.revoked", "revoked")
        };
        write.events.push(event(
            now,
            kind,
            Severity::Info,
            format!(
                "reservation of {tenant} for {workload} {why}; container {} will be destroyed",
                r.container_id
            ),
            subject(
                Some(tenant),
                workload,
                Some(&r.container_id),
                Some(&r.node_id),
            ),
        ));
        self.inner.store.apply_pool_write(write).await?;
        let mut index = self.index();
        index.reservations.remove(&key);
        if let Some(mut c) = container {
            c.state = ContainerState::Draining;
            index.set(c);
        }
        drop(index);
        self.inner.refill.notify_one();
        Ok(r)
    }

    /// Marks a container for removal. A claimed one needs `force`, and its
    /// claim becomes LOST.
    pub async fn destroy(
        &self,
        id: &ContainerId,
        force: bool,
        reason: &str,
    ) -> Result<ContainerRecord, PoolError> {
        let container = self.container(id).ok_or(PoolError::UnknownContainer(*id))?;
        if container.state == ContainerState::Claimed && !force {
            return Err(PoolError::Precondition(format!(
                "container {id} is claimed by {}; pass force to destroy it anyway",
                container
                    .tenant_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )));
        }
        if let Some(tenant) = &container.tenant_id {
            let key = (tenant.clone(), container.workload_id.clone());
            let _guard = self.lock_tenant(tenant, &container.workload_id).await;
            let claim = self.index().claims.get(&key).cloned();
            if let Some(mut claim) = claim.filter(|c| c.container_id == *id) {
                let now = crate::clock::now();
                claim.status = ClaimStatus::Lost;
                claim.released_at = Some(now);
                self.inner
                    .store
                    .apply_pool_write(PoolWrite {
                        claims: vec![claim.clone()],
                        events: vec![event(
                            now,
                            "claim.lost",
                            Severity::Warning,
                            format!("claim of {tenant} on {id} is lost: {reason}"),
                            subject(
                                Some(tenant),
                                &container.workload_id,
                                Some(id),
                                Some(&container.node_id),
                            ),
                        )],
                        ..Default::default()
                    })
                    .await?;
                self.index().claims.remove(&key);
            }
        }
        if self.inner.syncs.release_upload_owed(id) {
            self.inner
                .syncs
                .settle_release_upload(
                    *id,
                    &format!("abandoned: the container was destroyed ({reason})"),
                )
                .await?;
        }
        self.mark_draining(*id, reason).await;
        Ok(self.container(id).unwrap_or(container))
    }

    /// An owed upload on release finally succeeded: the reservation begins
    /// now (its full affinity_timeout), or ends at once for a workload that
    /// does not reuse containers.
    pub async fn release_upload_done(
        &self,
        owed: &crate::store::PendingReleaseUpload,
        container: &ContainerRecord,
    ) -> Result<(), PoolError> {
        let tenant = &owed.tenant_id;
        let workload = &owed.workload_id;
        self.inner
            .syncs
            .settle_release_upload(
                container.id,
                &format!("uploaded after {} failed attempts", owed.attempts),
            )
            .await?;
        let reuse = self
            .workload(workload)
            .await
            .map(|w| (w.spec.pool.reuse, w.spec.pool.affinity_timeout));
        let reservation = self
            .index()
            .reservations
            .get(&(tenant.clone(), workload.clone()))
            .filter(|r| r.container_id == container.id)
            .cloned();
        let Some(mut r) = reservation else {
            return Ok(());
        };
        match reuse {
            Ok((true, timeout)) => {
                let _guard = self.lock_tenant(tenant, workload).await;
                r.reserved_at = crate::clock::now();
                r.expires_at = r.reserved_at.saturating_add(timeout);
                self.inner
                    .store
                    .apply_pool_write(PoolWrite {
                        reservations: vec![r.clone()],
                        ..Default::default()
                    })
                    .await?;
                self.index()
                    .reservations
                    .insert((tenant.clone(), workload.clone()), r);
            }
            _ => {
                self.end_reservation(tenant, workload, true).await?;
            }
        }
        Ok(())
    }

    async fn mark_draining(&self, id: ContainerId, reason: &str) {
        let Some(mut c) = self.container(&id) else {
            return;
        };
        let now = crate::clock::now();
        c.state = ContainerState::Draining;
        c.updated_at = now;
        let write = PoolWrite {
            containers: vec![c.clone()],
            events: vec![event(
                now,
                "container.draining",
                Severity::Info,
                format!("container {id} will be destroyed: {reason}"),
                subject(None, &c.workload_id, Some(&id), Some(&c.node_id)),
            )],
            ..Default::default()
        };
        match self.inner.store.apply_pool_write(write).await {
            Ok(()) => {
                let mut index = self.index();
                // Drop any reservation that pointed at it.
                index.reservations.retain(|_, r| r.container_id != id);
                index.set(c);
            }
            Err(e) => {
                tracing::error!(container = %id, error = %e, "cannot mark a container draining")
            }
        }
        self.inner.refill.notify_one();
    }
}

impl Pools {
    /// Carries out one reconciliation action, recording it as an event.
    pub async fn apply_action(
        &self,
        action: &boilerhouse_core::reconcile::Action,
    ) -> Result<(), PoolError> {
        use boilerhouse_core::reconcile::ActionKind;
        let now = crate::clock::now();
        match &action.kind {
            ActionKind::MarkLost { container_id } => {
                self.mark_lost(*container_id, &action.reason, now).await
            }
            ActionKind::Drain { container_id } => {
                self.mark_draining(*container_id, &action.reason).await;
                Ok(())
            }
            ActionKind::Destroy {
                docker_id,
                container_id,
            } => {
                let Some(id) = container_id else {
                    return Err(PoolError::Precondition(format!(
                        "container {docker_id} carries no container id; remove it by hand"
                    )));
                };
                let command = pb::Command {
                    command_id: format!("reconcile-remove-{id}"),
                    generation: 0,
                    command: Some(pb::command::Command::Remove(pb::RemoveContainer {
                        container_id: id.to_string(),
                        remove_volumes: true,
                    })),
                };
                self.inner
                    .agents
                    .send(&action.node_id, command, self.inner.config.command_timeout)
                    .await
                    .map_err(|e| PoolError::Unavailable(e.to_string()))?;
                self.inner
                    .store
                    .append_event(event(
                        now,
                        "reconcile.destroyed",
                        Severity::Warning,
                        format!(
                            "destroyed container {id} on {}: {}",
                            action.node_id, action.reason
                        ),
                        EventSubject {
                            container_id: Some(id.to_string()),
                            node_id: Some(action.node_id.to_string()),
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
            ActionKind::Adopt { observed } => {
                self.adopt(observed, &action.node_id, &action.reason, now)
                    .await
            }
            ActionKind::Resume { container_id } => self.resume(*container_id, &action.reason).await,
        }
    }

    /// A row whose container is gone: forget it; its claim becomes LOST.
    async fn mark_lost(
        &self,
        id: ContainerId,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), PoolError> {
        let Some(c) = self.container(&id) else {
            return Ok(());
        };
        let claim = c.tenant_id.as_ref().and_then(|t| {
            self.index()
                .claims
                .get(&(t.clone(), c.workload_id.clone()))
                .cloned()
        });
        let mut write = PoolWrite {
            removed_containers: vec![id],
            ..Default::default()
        };
        if let Some(mut claim) = claim.clone().filter(|cl| cl.container_id == id) {
            claim.status = ClaimStatus::Lost;
            claim.released_at = Some(now);
            write.claims.push(claim.clone());
            write.events.push(event(
                now,
                "claim.lost",
                Severity::Warning,
                format!("claim of {} on {id} is lost: {reason}", claim.tenant_id),
                subject(
                    Some(&claim.tenant_id),
                    &c.workload_id,
                    Some(&id),
                    Some(&c.node_id),
                ),
            ));
        }
        write.events.push(event(
            now,
            "container.lost",
            Severity::Warning,
            format!("container {id} of {} is gone: {reason}", c.workload_id),
            subject(None, &c.workload_id, Some(&id), Some(&c.node_id)),
        ));
        self.inner.store.apply_pool_write(write).await?;
        let mut index = self.index();
        if let Some(claim) = claim.filter(|cl| cl.container_id == id) {
            index.claims.remove(&(claim.tenant_id, claim.workload_id));
        }
        index.reservations.retain(|_, r| r.container_id != id);
        index.remove(&id);
        drop(index);
        self.inner.refill.notify_one();
        Ok(())
    }

    /// A managed container with no row: take it in. Its tenant, from the
    /// state file, gets its claim back unless it already holds another
    /// container of the workload, in which case this one is destroyed: a
    /// tenant never holds two live containers of one workload.
    async fn adopt(
        &self,
        o: &boilerhouse_core::container::ObservedContainer,
        node: &NodeId,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), PoolError> {
        let (Some(id), Some(workload_id)) = (o.container_id(), o.workload_id()) else {
            return Err(PoolError::Precondition(
                "adoption needs valid container and workload labels".into(),
            ));
        };
        let workload = self.workload(&workload_id).await?;
        let state = o.state_file.clone().unwrap_or_default();
        let tenant = state.tenant_id.clone();
        let created_at = o
            .labels
            .get(boilerhouse_core::container::labels::CREATED_AT)
            .and_then(|t| t.parse::<i64>().ok())
            .map(Timestamp::from_millis)
            .unwrap_or(now);
        let state_root = self
            .inner
            .store
            .get_node(node)
            .await?
            .map(|n| n.state_root)
            .unwrap_or_default();
        let mut record = self.new_container(
            &workload.spec,
            &workload.spec_hash,
            (node.clone(), state_root),
            created_at,
        );
        let generated = record.id.to_string();
        record.id = id;
        record.state_path = record.state_path.replace(&generated, &id.to_string());
        record.comm_path = record.comm_path.replace(&generated, &id.to_string());
        record.docker_id = Some(o.docker_id.clone());
        record.last_tenant_id = state.last_tenant_id.clone();
        record.claim_generation = state.claim_generation;
        record.limits = o.limits;
        record.updated_at = now;
        let _guard = match &tenant {
            Some(t) => Some(self.lock_tenant(t, &workload_id).await),
            None => None,
        };
        let holds_another = tenant.as_ref().is_some_and(|t| {
            self.index()
                .claims
                .contains_key(&(t.clone(), workload_id.clone()))
        });
        let mut write = PoolWrite::default();
        let mut claim_record = None;
        match (&tenant, o.is_running()) {
            (Some(t), true) if !holds_another => {
                record.state = ContainerState::Claimed;
                record.tenant_id = Some(t.clone());
                let claim = ClaimRecord {
                    claim_id: boilerhouse_core::ids::Uuid::now_v7().to_string(),
                    tenant_id: t.clone(),
                    workload_id: workload_id.clone(),
                    container_id: id,
                    node_id: node.clone(),
                    generation: state.claim_generation.max(1),
                    source: ClaimSource::Existing,
                    status: ClaimStatus::Active,
                    claimed_at: state.claimed_at.unwrap_or(now),
                    last_activity_at: state.last_activity_at.unwrap_or(now).max(now),
                    released_at: None,
                };
                write.claims.push(claim.clone());
                claim_record = Some(claim);
            }
            (None, true) if state.last_tenant_id.is_none() => record.state = ContainerState::Idle,
            // Stopped, used by a tenant before, or the tenant moved on: it
            // never serves anyone else.
            _ => record.state = ContainerState::Draining,
        }
        write.containers.push(record.clone());
        write.events.push(event(
            now,
            "reconcile.adopted",
            Severity::Info,
            format!(
                "adopted container {id} of {workload_id} on {node} as {}{}: {reason}",
                record.state,
                tenant
                    .as_ref()
                    .map(|t| format!(" for tenant {t}"))
                    .unwrap_or_default()
            ),
            subject(tenant.as_ref(), &workload_id, Some(&id), Some(node)),
        ));
        self.inner.store.apply_pool_write(write).await?;
        let mut index = self.index();
        if let Some(claim) = claim_record {
            index
                .claims
                .insert((claim.tenant_id.clone(), workload_id.clone()), claim);
        }
        index.set(record);
        drop(index);
        self.inner.refill.notify_one();
        Ok(())
    }
}

impl Pools {
    /// A node was declared lost: its claims become LOST, so the tenants can
    /// claim elsewhere, and its containers are set aside (they may come
    /// back with the node). Reservations on it end.
    pub async fn node_lost(&self, node: &NodeId, reason: &str) -> Result<usize, PoolError> {
        let now = crate::clock::now();
        let (containers, claims): (Vec<ContainerRecord>, Vec<ClaimRecord>) = {
            let index = self.index();
            let containers: Vec<_> = index
                .containers
                .values()
                .filter(|c| {
                    &c.node_id == node
                        && !matches!(c.state, ContainerState::Lost | ContainerState::Draining)
                })
                .cloned()
                .collect();
            let claims = index
                .claims
                .values()
                .filter(|c| &c.node_id == node)
                .cloned()
                .collect();
            (containers, claims)
        };
        if containers.is_empty() && claims.is_empty() {
            return Ok(0);
        }
        let mut write = PoolWrite::default();
        for mut claim in claims.clone() {
            claim.status = ClaimStatus::Lost;
            claim.released_at = Some(now);
            write.events.push(event(
                now,
                "claim.lost",
                Severity::Warning,
                format!(
                    "claim of {} on {} is lost: node {node} is lost ({reason})",
                    claim.tenant_id, claim.container_id
                ),
                subject(
                    Some(&claim.tenant_id),
                    &claim.workload_id,
                    Some(&claim.container_id),
                    Some(node),
                ),
            ));
            write.claims.push(claim);
        }
        let lost: Vec<ContainerRecord> = containers
            .into_iter()
            .map(|mut c| {
                c.state = ContainerState::Lost;
                c.updated_at = now;
                c
            })
            .collect();
        write.containers = lost.clone();
        let count = lost.len();
        self.inner.store.apply_pool_write(write).await?;
        let mut index = self.index();
        for claim in claims {
            index.claims.remove(&(claim.tenant_id, claim.workload_id));
        }
        index.reservations.retain(|_, r| &r.node_id != node);
        for c in lost {
            index.set(c);
        }
        drop(index);
        self.inner.refill.notify_one();
        Ok(count)
    }

    /// A container of a lost node runs again: its tenant gets it back,
    /// unless the tenant claimed elsewhere meanwhile; then it is destroyed.
    /// An unclaimed one rejoins the pool.
    pub(crate) async fn resume(&self, id: ContainerId, reason: &str) -> Result<(), PoolError> {
        let Some(c) = self
            .container(&id)
            .filter(|c| c.state == ContainerState::Lost)
        else {
            return Ok(());
        };
        let now = crate::clock::now();
        let Some(tenant) = c.tenant_id.clone() else {
            let mut back = c.clone();
            back.state = ContainerState::Idle;
            back.updated_at = now;
            self.inner
                .store
                .apply_pool_write(PoolWrite {
                    containers: vec![back.clone()],
                    ..Default::default()
                })
                .await?;
            self.index().set(back);
            return Ok(());
        };
        let _guard = self.lock_tenant(&tenant, &c.workload_id).await;
        if self
            .index()
            .claims
            .contains_key(&(tenant.clone(), c.workload_id.clone()))
        {
            self.mark_draining(
                id,
                &format!(
                    "tenant {tenant} claimed another container while node {} was lost",
                    c.node_id
                ),
            )
            .await;
            return Ok(());
        }
        let mut back = c.clone();
        back.state = ContainerState::Claimed;
        back.claim_generation += 1;
        back.updated_at = now;
        let claim = ClaimRecord {
            claim_id: boilerhouse_core::ids::Uuid::now_v7().to_string(),
            tenant_id: tenant.clone(),
            workload_id: c.workload_id.clone(),
            container_id: id,
            node_id: c.node_id.clone(),
            generation: back.claim_generation,
            source: ClaimSource::Existing,
            status: ClaimStatus::Active,
            claimed_at: now,
            last_activity_at: now,
            released_at: None,
        };
        self.inner
            .store
            .apply_pool_write(PoolWrite {
                containers: vec![back.clone()],
                claims: vec![claim.clone()],
                events: vec![event(
                    now,
                    "claim.resumed",
                    Severity::Info,
                    format!("tenant {tenant} has container {id} back: {reason}"),
                    subject(Some(&tenant), &c.workload_id, Some(&id), Some(&c.node_id)),
                )],
                ..Default::default()
            })
            .await?;
        {
            let mut index = self.index();
            index.set(back.clone());
            index
                .claims
                .insert((tenant.clone(), c.workload_id.clone()), claim);
        }
        self.write_state_file(
            &back,
            StateFile {
                tenant_id: Some(tenant),
                last_tenant_id: back.last_tenant_id.clone(),
                claimed_at: Some(now),
                last_activity_at: Some(now),
                claim_generation: back.claim_generation,
            },
        );
        Ok(())
    }
}
