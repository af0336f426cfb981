//! Warm pools and claims: the executor of the pool state machine.
//!
//! The rules live in `core::pool`: [`decide`] turns the committed state
//! into the conditional [`PoolWrite`] of each transition, and [`Index`] is
//! the in-memory mirror of the committed rows. This module runs them:
//! decide under the index lock, commit, and let the store's writer apply
//! the committed write to the index (see [`Pools::commit`]), then act on
//! the hosts (create, remove, state files). So:
//!
//! - memory changes only by applying what was committed, in commit order,
//!   whether or not the caller is still waiting;
//! - a decision made on a view that changed meanwhile is refused by the
//!   store as a conflict; the caller decides again or gives up, and never
//!   overwrites what happened;
//! - what is not a mirror is kept apart in [`Inflight`]: containers an
//!   operation in flight owns, create slots taken but not yet committed,
//!   activity not yet flushed, create backoff.
//!
//! The claim hot path touches no Docker call and no table scan. Decisions
//! for one (tenant, workload) are serialised by a keyed lock, and the
//! database's unique indexes back the in-memory rules up.
//!
//! Submodules, by concern: [`claims`] (claim, release, touch),
//! [`provision`] (creating containers for cold starts and the refiller,
//! removing them), [`affinity`] (reservations) and [`recovery`] (node
//! loss, containers the engine destroyed). The background tasks are in
//! [`tasks`]. Reconciliation's apply half lives in `crate::reconcile`.

pub mod affinity;
pub mod claims;
pub mod provision;
pub mod recovery;
mod removal;
mod rollout;
mod shortfall;
pub mod tasks;
#[cfg(test)]
pub(crate) mod tests;
mod views;

pub use views::SCAN_SLICE;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boilerhouse_core::container::StateFile;
use boilerhouse_core::node::Resources;
use boilerhouse_core::pool::decide::{self, Refusal};
use boilerhouse_core::pool::index::Index;
use boilerhouse_core::pool::write::PoolWrite;
use boilerhouse_core::pool::{ClaimRecord, ContainerRecord};
use boilerhouse_core::workload::WorkloadRecord;
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp, WorkloadId};

use crate::agents::Registry;
use crate::locks::{KeyGuard, KeyedLocks};
use crate::store::{PoolOverride, Store, StoreError, WarmPool};
/// Why a pool operation failed, in terms the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No such workload.
    #[error("workload {0} not found")]
    UnknownWorkload(WorkloadId),
    /// The state does not allow it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// No container can be had now.
    #[error("{0}")]
    Exhausted(String),
    /// A dependency failed.
    #[error("{0}")]
    Unavailable(String),
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
    /// How long idle containers above min_size stay before they go.
    pub surplus_grace: Duration,
}

/// What placement may count on each node beyond its reported capacity
/// (node boosts move capacity between nodes). Provided by the boosts, read
/// as a snapshot: the pools do not depend on them.
pub trait CapacityView: Send + Sync {
    /// The schedulable capacity of `node`, whose hardware offers `base`.
    fn effective(&self, node: &NodeId, base: Resources) -> Resources;
}

/// Containers that must outlive their reservation: they hold a tenant's
/// only up-to-date files, whose upload is still owed. Provided by the
/// syncs: the pools do not depend on them.
pub trait Retention: Send + Sync {
    /// Whether `container` must be kept.
    fn must_keep(&self, container: &ContainerId) -> bool;
}

/// Capacity as the hardware reports it, and nothing retained: for tests
/// and tools that run the pools alone.
pub struct Plain;

impl CapacityView for Plain {
    fn effective(&self, _: &NodeId, base: Resources) -> Resources {
        base
    }
}

impl Retention for Plain {
    fn must_keep(&self, _: &ContainerId) -> bool {
        false
    }
}

/// What is not a mirror of the database: the in-flight table.
#[derive(Default)]
struct Inflight {
    /// Containers an operation in flight owns: a claim about to commit, a
    /// cold start, a create or a removal. Nobody else offers or acts on
    /// them meanwhile.
    busy: HashSet<ContainerId>,
    /// Create slots taken (max_size checked) whose row is not committed
    /// yet, per pool.
    creating: HashMap<WorkloadId, u32>,
    /// Activity seen since the last flush, by claim id.
    activity: HashMap<String, Timestamp>,
    /// Consecutive create failures per pool and when to try again.
    backoff: HashMap<WorkloadId, (u32, Instant)>,
    /// Since when each pool has held more idle containers than it wants.
    surplus_since: HashMap<WorkloadId, Instant>,
    /// Why a pool below its min_size is not being filled, as last seen:
    /// the reason, since when, and whether it was evented.
    shortfall: HashMap<WorkloadId, (String, Instant, bool)>,
}

struct State {
    index: Index,
    inflight: Inflight,
    /// Committed writes that did not fit memory (a bug if ever non-zero).
    anomalies: u64,
}

struct Inner {
    store: Store,
    agents: Registry,
    config: PoolsConfig,
    /// The index, under a lock that hands itself to a waiting thread when
    /// a long pass lets go between slices (see [`Pools::scan`]); a
    /// std mutex let the pass take it straight back, and the writer's
    /// commit waited out the whole pass (60 ms at 60,000 containers).
    state: parking_lot::Mutex<State>,
    tenant_locks: KeyedLocks,
    /// Wakes the refiller when capacity was consumed or freed.
    refill: tokio::sync::Notify,
    /// Workloads by id, so a claim parses no spec and reads no table.
    /// Replaced wholesale by the refiller every second; a miss reads the
    /// database, so a newly applied workload is claimable at once.
    workloads: std::sync::RwLock<HashMap<WorkloadId, Arc<WorkloadRecord>>>,
    capacity: Arc<dyn CapacityView>,
    retention: Arc<dyn Retention>,
    /// When this process started: a node's silence is never counted from
    /// before it (the server's own downtime is not the node's fault).
    started_at: Timestamp,
    /// Containers whose rows could not be read at startup: left alone.
    unreadable: HashSet<ContainerId>,
}

/// The pool machinery. Cheap to clone.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Inner>,
}

/// Proof that the caller holds the lock of one (tenant, workload).
pub type TenantGuard<'a> = KeyGuard<'a>;

/// Marks a container busy until dropped.
struct BusyGuard {
    pools: Pools,
    id: ContainerId,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.pools.state().inflight.busy.remove(&self.id);
    }
}

impl Pools {
    /// Rebuilds the index from the database, or from a standby's `warm`
    /// copy of the pool's rows brought up to date with what changed since.
    pub async fn load(
        store: Store,
        agents: Registry,
        config: PoolsConfig,
        capacity: Arc<dyn CapacityView>,
        retention: Arc<dyn Retention>,
        warm: Option<WarmPool>,
    ) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        let (index, unreadable) = match warm {
            // A copy never read (elected at its first campaign) is no
            // warmer than the database.
            Some(mut warm) if warm.version().is_some() => {
                // Read after the lease became this server's: what the old
                // leader committed up to its end is in the catch-up.
                let from = warm.version();
                let caught_up = store.catch_up(&mut warm).await?;
                let (index, unreadable) = warm.into_parts();
                tracing::info!(
                    from_version = ?from,
                    version = caught_up.version,
                    rows_read = caught_up.rows,
                    read_everything = caught_up.full,
                    containers = index.containers().count(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "pool index restored from the standby's warm copy"
                );
                (index, unreadable)
            }
            _ => {
                let s = store.load_pool_snapshot().await?;
                let read_ms = started.elapsed().as_secs_f64() * 1e3;
                let index = Index::from_rows(s.containers, s.claims, s.reservations);
                tracing::info!(
                    containers = index.containers().count(),
                    read_ms,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "pool index restored from the database"
                );
                (index, s.unreadable)
            }
        };
        let (index, unreadable) = recovery::without_orphans(index, unreadable);
        store
            .report_unreadable(&unreadable, crate::clock::now())
            .await?;
        let unreadable = recovery::unreadable_containers(&unreadable);
        Ok(Self {
            inner: Arc::new(Inner {
                started_at: crate::clock::now(),
                store,
                agents,
                config,
                state: parking_lot::Mutex::new(State {
                    index,
                    inflight: Inflight::default(),
                    anomalies: 0,
                }),
                tenant_locks: KeyedLocks::default(),
                refill: tokio::sync::Notify::new(),
                workloads: std::sync::RwLock::default(),
                capacity,
                retention,
                unreadable,
            }),
        })
    }

    /// Whether `id`'s row could not be read at startup. Reconciliation
    /// leaves such a container alone: without its row there is no
    /// evidence of who holds it, and nothing destructive is done on
    /// missing evidence.
    pub fn row_unreadable(&self, id: &ContainerId) -> bool {
        self.inner.unreadable.contains(id)
    }

    fn state(&self) -> parking_lot::MutexGuard<'_, State> {
        self.inner.state.lock()
    }

    /// Reads the committed state.
    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.state().index)
    }

    /// Commits `write`. The index applies it on the store's writer task
    /// right after the commit, in commit order, before this returns and
    /// even if the caller was dropped meanwhile; a conflict (a row was not
    /// as the decision saw it) comes back as `StoreError::Conflict` and
    /// changes nothing.
    pub async fn commit(&self, write: PoolWrite) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.inner
            .store
            .commit_pool_write(write, move |committed| {
                let mut state = inner.state.lock();
                let anomalies = state.index.apply(committed);
                if !anomalies.is_empty() {
                    state.anomalies += anomalies.len() as u64;
                    for a in anomalies {
                        tracing::error!(anomaly = %a.0, "the pool index had drifted from the database; it now holds the committed value");
                    }
                }
            })
            .await
    }

    /// Commits what `decide` makes of the current state, deciding again on
    /// a conflict (a few times: each conflict means someone else's change
    /// committed, so the next view is newer). `Ok(None)` when there is
    /// nothing to do.
    pub async fn commit_decided<T>(
        &self,
        mut decide: impl FnMut(&Index) -> Result<Option<(PoolWrite, T)>, PoolError>,
    ) -> Result<Option<T>, PoolError> {
        const ATTEMPTS: usize = 8;
        for _ in 0..ATTEMPTS {
            let Some((write, value)) = decide(&self.state().index)? else {
                return Ok(None);
            };
            match self.commit(write).await {
                Ok(()) => return Ok(Some(value)),
                Err(StoreError::Conflict(why)) => {
                    tracing::debug!(%why, "pool write refused as stale; deciding again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(PoolError::Unavailable(
            "the pool kept changing under this operation; retry".into(),
        ))
    }

    /// Committed writes that did not fit memory, since startup.
    pub fn anomalies(&self) -> u64 {
        self.state().anomalies
    }

    /// Marks `id` busy; `None` if it already is.
    fn take_busy(&self, id: ContainerId) -> Option<BusyGuard> {
        self.state().inflight.busy.insert(id).then(|| BusyGuard {
            pools: self.clone(),
            id,
        })
    }

    /// Whether a node's containers may be offered: it has a live session
    /// with a recent heartbeat.
    fn node_live(&self, node: &NodeId, now: Timestamp) -> bool {
        self.inner.agents.session(node).is_some_and(|s| {
            now.saturating_since(s.last_heartbeat) < self.inner.config.suspect_after
        })
    }

    /// Whether `node` has a live, heartbeating agent.
    pub fn node_is_live(&self, node: &NodeId) -> bool {
        self.node_live(node, crate::clock::now())
    }

    /// Nodes whose activity the server cannot vouch for now: not
    /// heartbeating, or reconnected and not yet reconciled (the activity
    /// its agent kept while away arrives after its first full report).
    pub fn unsettled_nodes(&self) -> std::collections::HashSet<NodeId> {
        let now = crate::clock::now();
        let mut nodes: std::collections::HashSet<NodeId> =
            self.inner.agents.unreconciled().into_iter().collect();
        // Per node, not per container: this runs on every reaper tick.
        let held: Vec<NodeId> = self.read(|index| index.nodes().cloned().collect());
        nodes.extend(held.into_iter().filter(|n| !self.node_live(n, now)));
        nodes
    }

    /// Why `node` cannot be reached now, for a tenant whose claim is
    /// kept there; `None` while its agent heartbeats.
    pub fn unreachable(&self, node: &NodeId) -> Option<String> {
        let now = crate::clock::now();
        match self.inner.agents.session(node) {
            Some(s) if now.saturating_since(s.last_heartbeat) < self.inner.config.suspect_after => {
                None
            }
            Some(s) => Some(format!(
                "node {node} has not been heard from for {}s; the claim stays there, and is never given to anyone else, until the node returns or the workload's disconnect policy gives it up",
                now.saturating_since(s.last_heartbeat).as_secs()
            )),
            None => Some(format!(
                "node {node} has no connected agent; the claim stays there, and is never given to anyone else, until the node returns or the workload's disconnect policy gives it up"
            )),
        }
    }

    /// Serialises decisions for one (tenant, workload).
    pub async fn lock_tenant(&self, tenant: &TenantId, workload: &WorkloadId) -> TenantGuard<'_> {
        self.inner
            .tenant_locks
            .lock(&format!("{tenant}\0{workload}"))
            .await
    }

    /// Whether `container` must outlive its reservation.
    pub fn retained(&self, container: &ContainerId) -> bool {
        self.inner.retention.must_keep(container)
    }

    /// Wakes the refiller.
    pub fn refill_notify(&self) -> &tokio::sync::Notify {
        &self.inner.refill
    }

    /// A workload as the pools see it (cached).
    pub async fn workload_record(&self, id: &WorkloadId) -> Result<Arc<WorkloadRecord>, PoolError> {
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

    /// Records the tenant in the container's state file, in the background
    /// (the change is already durable and acknowledged): queued for the
    /// node's next batch of state files, which its agent makes durable
    /// together.
    pub fn write_state_file(&self, container: &ContainerRecord, now: Timestamp) {
        let state = StateFile {
            tenant_id: container.tenant_id.clone(),
            last_tenant_id: container.last_tenant_id.clone(),
            claimed_at: container.tenant_id.as_ref().map(|_| now),
            last_activity_at: Some(now),
            claim_generation: container.claim_generation,
        };
        self.inner.agents.write_state_file(
            &container.node_id,
            container.id,
            state,
            self.inner.config.command_timeout,
        );
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

    /// Marks a container for removal, as far as `scope` allows; a claim on
    /// it becomes LOST. Returns the container as it now stands.
    pub async fn drain(
        &self,
        id: &ContainerId,
        scope: decide::DrainScope,
        reason: &str,
    ) -> Result<ContainerRecord, PoolError> {
        let now = crate::clock::now();
        self.commit_decided(|index| {
            Ok(decide::drain(index, id, scope, reason, now)?.map(|w| (w, ())))
        })
        .await?;
        self.inner.refill.notify_one();
        self.container(id)
            .ok_or(PoolError::Refused(Refusal::UnknownContainer(*id)))
    }
    /// Drains a container no tenant holds, for reconciliation; whether it
    /// did. One already draining, claimed since the plan was made, or gone
    /// is left as it is: the plan's view had moved on.
    pub async fn drain_unclaimed(&self, id: &ContainerId, reason: &str) -> Result<bool, PoolError> {
        let now = crate::clock::now();
        let drained = self
            .commit_decided(|index| {
                match decide::drain(index, id, decide::DrainScope::Unclaimed, reason, now) {
                    Ok(write) => Ok(write.map(|w| (w, ()))),
                    Err(Refusal::Precondition(_) | Refusal::UnknownContainer(_)) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            })
            .await?;
        self.inner.refill.notify_one();
        Ok(drained.is_some())
    }
}

/// A claim with its container and the newest activity seen.
fn granted(state: &State, claim: &ClaimRecord) -> Option<Granted> {
    let container = state.index.container(&claim.container_id)?.clone();
    let mut claim = claim.clone();
    claim.last_activity_at = last_seen(state, &claim);
    Some(Granted { claim, container })
}

/// A claim's newest activity: committed, or seen since and not yet flushed.
fn last_seen(state: &State, claim: &ClaimRecord) -> Timestamp {
    state
        .inflight
        .activity
        .get(&claim.claim_id)
        .map_or(claim.last_activity_at, |at| claim.last_activity_at.max(*at))
}
