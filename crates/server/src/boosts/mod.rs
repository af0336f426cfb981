//! Resource boosts: admission against the capacity ledger, enforcement on
//! the host, expiry and recovery.
//!
//! The database is the truth. A boost is committed (with the boosts it
//! preempts) before anything touches a host, and every container's limits
//! are then driven towards "workload base + live boosts" from that truth:
//! by the request itself, by release and expiry, and by a periodic pass
//! that compares each agent's report with the wanted limits. That one
//! pass is what re-applies boosts after an agent restart, reverts boosts
//! that ended while a node was unreachable, and finishes reverting boosts
//! that expired while the server was down.

pub mod expiry;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use boilerhouse_core::boost::{
    self, AdmitError, Boost, BoostAsk, BoostRequest, BoostResource, BoostStatus, BoostTarget,
    NodeLedger, ResolvedTarget,
};
use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::node::NodeStatus;
use boilerhouse_core::pool::{ContainerRecord, ContainerState};
use boilerhouse_core::units::format_duration;
use boilerhouse_core::workload::Limits;
use boilerhouse_core::{BoostId, ContainerId, NodeId, Timestamp};
use boilerhouse_proto::{convert, pb};

use crate::agents::Registry;
use crate::clock::Clock;
use crate::locks::KeyedLocks;
use crate::pools::Pools;
use crate::store::{BoostWrite, IdempotentRecord, Store, StoreError};
use crate::tasks::BackgroundTask;

/// The live (pending and active) boosts, shared with placement. Cheap to
/// clone.
#[derive(Clone, Default)]
pub struct BoostLedger {
    live: Arc<RwLock<BTreeMap<BoostId, Boost>>>,
    changed: Arc<Notify>,
    /// How late each expiry was enforced, until /metrics takes them.
    expiry_lags: Arc<Mutex<Vec<std::time::Duration>>>,
}

/// Placement counts what node boosts move between nodes.
impl crate::pools::CapacityView for BoostLedger {
    fn effective(
        &self,
        node: &boilerhouse_core::NodeId,
        base: boilerhouse_core::node::Resources,
    ) -> boilerhouse_core::node::Resources {
        boost::effective_capacity(node, base, &self.live())
    }
}

impl BoostLedger {
    /// Every live boost.
    pub fn live(&self) -> Vec<Boost> {
        self.read().values().cloned().collect()
    }

    /// One live boost.
    pub fn get(&self, id: &BoostId) -> Option<Boost> {
        self.read().get(id).cloned()
    }

    /// Records `boost`'s new state: kept while live, dropped once ended.
    pub fn put(&self, boost: Boost) {
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            if boost.status.is_live() {
                live.insert(boost.id, boost);
            } else {
                live.remove(&boost.id);
            }
        }
        self.changed.notify_one();
    }

    /// When the next active boost expires.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        boost::next_expiry(&self.live())
    }

    /// Expiry lags recorded since the last call (metrics pull them).
    pub fn take_expiry_lags(&self) -> Vec<std::time::Duration> {
        std::mem::take(&mut *self.expiry_lags.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn record_expiry_lags(&self, lags: impl IntoIterator<Item = std::time::Duration>) {
        let mut kept = self.expiry_lags.lock().unwrap_or_else(|e| e.into_inner());
        kept.extend(lags);
        // Unscraped, keep the newest only: a histogram, not a log.
        let excess = kept.len().saturating_sub(10_000);
        kept.drain(..excess);
    }

    /// Notified whenever a boost changes.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<BoostId, Boost>> {
        self.live.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a boost operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BoostError {
    /// The target or boost does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A request field does not fit the cluster (a source that is not the
    /// container's node, a node that does not exist).
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The target cannot take this boost in its current state.
    #[error("{0}")]
    Precondition(String),
    /// Not enough capacity, even after preempting lower priorities.
    #[error("{0}")]
    Short(AdmitError),
    /// The host could not apply the boost; it was recorded as failed.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tunables.
#[derive(Debug, Clone, Copy)]
pub struct BoostsConfig {
    /// How long to wait for an agent to apply limits.
    pub command_timeout: Duration,
}

/// An admitted boost and what it preempted.
#[derive(Debug, Clone)]
pub struct Requested {
    /// The boost, as it stands when the call returns.
    pub boost: Boost,
    /// Boosts preempted to admit it.
    pub preempted: Vec<BoostId>,
}

/// What startup did with boosts that outlived the last run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovered {
    /// Active boosts that expired while the server was down.
    pub expired: usize,
    /// Boosts that were pending: their host never confirmed them.
    pub failed: usize,
    /// Boosts still live.
    pub live: usize,
}

struct Inner {
    store: Store,
    agents: Registry,
    pools: Pools,
    ledger: BoostLedger,
    clock: Clock,
    config: BoostsConfig,
    /// Serialises admission decisions, so two requests never both take the
    /// last free core.
    admission: tokio::sync::Mutex<()>,
    /// One limits update at a time per container, each computing the
    /// wanted limits afresh, so updates cannot land out of order.
    container_locks: KeyedLocks,
    /// Containers with an update in flight from the periodic pass.
    enforcing: Mutex<HashSet<ContainerId>>,
}

/// The boost machinery. Cheap to clone.
#[derive(Clone)]
pub struct Boosts {
    inner: Arc<Inner>,
}

fn boost_event(kind: EventKind, b: &Boost, message: String, now: Timestamp) -> NewEvent {
    NewEvent::new(now, kind, message)
        .with_subject(EventSubject {
            node_id: Some(b.source_node.to_string()),
            container_id: b.container_id.map(|c| c.to_string()),
            tenant_id: match &b.target {
                BoostTarget::Tenant(t, _) => Some(t.to_string()),
                _ => None,
            },
            workload_id: match &b.target {
                BoostTarget::Tenant(_, w) => Some(w.to_string()),
                _ => None,
            },
            boost_id: Some(b.id.to_string()),
        })
        .with_attribute("resource", b.resource.as_str())
        .with_attribute("amount", b.amount.to_string())
        .with_attribute("priority", b.priority.as_str())
        .with_attribute("target", b.target.to_string())
}

/// Ends `b` with `status` and `reason` as of `now`, adding it and its
/// event to `write`.
fn end_into(
    write: &mut BoostWrite,
    mut b: Boost,
    status: BoostStatus,
    reason: String,
    now: Timestamp,
) {
    let kind = match status {
        BoostStatus::Expired => EventKind::BoostExpired,
        BoostStatus::Preempted => EventKind::BoostPreempted,
        BoostStatus::Failed => EventKind::BoostFailed,
        _ => EventKind::BoostReleased,
    };
    b.end(status, reason, now);
    write.events.push(boost_event(
        kind,
        &b,
        format!("{}: {}", describe(&b), b.reason),
        now,
    ));
    write.boosts.push(b);
}

/// "1.5 cpu", "512M memory", "1 gpu".
pub fn describe_amount(resource: BoostResource, amount: f64) -> String {
    match resource {
        BoostResource::Memory => format!(
            "{} memory",
            boilerhouse_core::units::format_size(amount.max(0.0).round() as u64)
        ),
        other => format!("{amount} {other}"),
    }
}

fn describe(b: &Boost) -> String {
    format!(
        "{} boost {} of {} for {}",
        b.priority,
        b.id,
        describe_amount(b.resource, b.amount),
        b.target
    )
}

fn runs(c: &ContainerRecord) -> bool {
    c.docker_id.is_some()
        && matches!(
            c.state,
            ContainerState::Idle | ContainerState::Claimed | ContainerState::Reserved
        )
}

impl Boosts {
    /// Rebuilds the ledger from the database, ending what cannot be live
    /// any more: boosts that expired while the server was down, and
    /// pending boosts whose host never confirmed them. Their containers'
    /// limits are reverted by the periodic pass once the agents report.
    pub async fn load(
        store: Store,
        agents: Registry,
        pools: Pools,
        ledger: BoostLedger,
        clock: Clock,
        config: BoostsConfig,
    ) -> Result<(Self, Recovered), StoreError> {
        let now = clock.now();
        let mut recovered = Recovered::default();
        let mut write = BoostWrite::default();
        for b in store.live_boosts().await? {
            if b.status == BoostStatus::Pending {
                recovered.failed += 1;
                let reason = "the server stopped before the host confirmed the boost".into();
                end_into(&mut write, b, BoostStatus::Failed, reason, now);
            } else if b.expires_at <= now {
                recovered.expired += 1;
                let reason = format!("expired at {} while the server was down", b.expires_at);
                end_into(&mut write, b, BoostStatus::Expired, reason, now);
            } else {
                recovered.live += 1;
                ledger.put(b);
            }
        }
        if !write.boosts.is_empty() {
            store.apply_boost_write(write).await?;
        }
        let boosts = Self {
            inner: Arc::new(Inner {
                store,
                agents,
                pools,
                ledger,
                clock,
                config,
                admission: tokio::sync::Mutex::new(()),
                container_locks: KeyedLocks::default(),
                enforcing: Mutex::default(),
            }),
        };
        Ok((boosts, recovered))
    }

    /// The ledger.
    pub fn ledger(&self) -> &BoostLedger {
        &self.inner.ledger
    }

    /// The clock boosts are timed by.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Admits, records and applies a boost.
    ///
    /// The boost and its preemptions commit before any host is touched. A
    /// container boost is then applied through the agent and confirmed by
    /// inspecting the container; only then is it active (and its clock
    /// starts). If the host cannot apply it, it is recorded as failed and
    /// the container keeps, or gets back, the limits it should have.
    pub async fn request(
        &self,
        request: BoostRequest,
        idempotency: impl FnOnce(&Boost, &[BoostId]) -> Option<IdempotentRecord>,
    ) -> Result<Requested, BoostError> {
        let inner = &self.inner;
        let guard = inner.admission.lock().await;
        let now = self.now();
        let (target, container) = self.resolve(&request).await?;
        let nodes = self.ledger_nodes().await?;
        let live = inner.ledger.live();
        let ask = BoostAsk {
            target,
            resource: request.resource,
            amount: request.amount,
            priority: request.priority,
            source: request.source.clone(),
        };
        let admission = boost::admit(&ask, &nodes, &live).map_err(|e| match e {
            AdmitError::UnknownSource(n) => BoostError::Invalid {
                field: "source_node_id",
                reason: format!("node {n} is not known"),
            },
            e @ (AdmitError::SourceIsTarget(_) | AdmitError::SourceNotContainerNode { .. }) => {
                BoostError::Invalid {
                    field: "source_node_id",
                    reason: e.to_string(),
                }
            }
            e @ (AdmitError::NoSource(..) | AdmitError::Short { .. }) => BoostError::Short(e),
        })?;
        let mut boost = Boost {
            id: BoostId::from_uuid(uuid::Uuid::now_v7()),
            target: request.target,
            container_id: container.as_ref().map(|c| c.id),
            resource: request.resource,
            amount: request.amount,
            priority: request.priority,
            source_node: admission.source,
            status: BoostStatus::Pending,
            reason: String::new(),
            requested_at: now,
            allocated_at: None,
            expires_at: now.saturating_add(request.duration),
            ended_at: None,
        };
        let on_host = boost.raises_container_limits();
        let mut write = BoostWrite::default();
        if on_host {
            write.events.push(boost_event(
                EventKind::BoostRequested,
                &boost,
                format!(
                    "{} admitted from node {}; applying it on the host",
                    describe(&boost),
                    boost.source_node
                ),
                now,
            ));
        } else {
            boost.activate(now);
            write.events.push(boost_event(
                EventKind::BoostActive,
                &boost,
                format!(
                    "{} active until {} (capacity ledger and scheduler; drawn from node {})",
                    describe(&boost),
                    boost.expires_at,
                    boost.source_node
                ),
                now,
            ));
        }
        let mut preempted = Vec::new();
        for id in &admission.preempt {
            let Some(victim) = live.iter().find(|b| &b.id == id).cloned() else {
                continue;
            };
            let reason = format!("preempted by {}", describe(&boost));
            end_into(&mut write, victim, BoostStatus::Preempted, reason, now);
            preempted.extend(write.boosts.pop());
        }
        let preempted_ids: Vec<BoostId> = preempted.iter().map(|b| b.id).collect();
        write.idempotency = idempotency(&boost, &preempted_ids);
        write.boosts.push(boost.clone());
        write.boosts.extend(preempted.iter().cloned());
        inner.store.apply_boost_write(write).await?;
        inner.ledger.put(boost.clone());
        for victim in &preempted {
            inner.ledger.put(victim.clone());
        }
        drop(guard);

        // Preempted boosts give their containers' limits back now; if a
        // node does not answer, the periodic pass retries.
        for victim in preempted.iter().filter(|b| b.raises_container_limits()) {
            if let Some(c) = victim.container_id {
                self.spawn_enforce(c);
            }
        }
        if !on_host {
            return Ok(Requested {
                boost,
                preempted: preempted_ids,
            });
        }
        let container = boost.container_id.ok_or_else(|| {
            BoostError::Precondition("a container boost lost its container".into())
        })?;
        let applied = self.enforce(container).await;
        let _guard = inner.admission.lock().await;
        // A release or a preemption may have ended it while it was being
        // applied; that decision stands.
        let Some(mut current) = inner.ledger.get(&boost.id) else {
            drop(_guard);
            self.spawn_enforce(container);
            let ended = inner.store.get_boost(&boost.id).await?.unwrap_or(boost);
            return Ok(Requested {
                boost: ended,
                preempted: preempted_ids,
            });
        };
        let now = self.now();
        let mut write = BoostWrite::default();
        match applied {
            Ok(limits) => {
                current.activate(now);
                write.events.push(boost_event(
                    EventKind::BoostActive,
                    &current,
                    format!(
                        "{} active until {}; the container's limits are now {}",
                        describe(&current),
                        current.expires_at,
                        describe_limits(&limits)
                    ),
                    now,
                ));
            }
            Err(reason) => {
                end_into(&mut write, current, BoostStatus::Failed, reason, now);
                current = write.boosts.pop().expect("just ended");
            }
        }
        write.boosts.push(current.clone());
        inner.store.apply_boost_write(write).await?;
        inner.ledger.put(current.clone());
        drop(_guard);
        if current.status == BoostStatus::Failed {
            // The update may have half-landed (a timeout after Docker took
            // it): put the container back to what it should have.
            self.spawn_enforce(container);
            return Err(BoostError::Unavailable(format!(
                "boost {} failed: {}; it holds no capacity and the container keeps its limits",
                current.id, current.reason
            )));
        }
        Ok(Requested {
            boost: current,
            preempted: preempted_ids,
        })
    }

    /// Ends a live boost at an operator's request and restores its
    /// container's limits.
    pub async fn release(&self, id: &BoostId) -> Result<Boost, BoostError> {
        let inner = &self.inner;
        let guard = inner.admission.lock().await;
        let Some(b) = inner.ledger.get(id) else {
            return match inner.store.get_boost(id).await? {
                Some(b) => Err(BoostError::Precondition(format!(
                    "boost {id} already ended: {} ({})",
                    b.status, b.reason
                ))),
                None => Err(BoostError::NotFound(format!("boost {id} not found"))),
            };
        };
        let now = self.now();
        let mut write = BoostWrite::default();
        let reason = "released by an operator".into();
        end_into(&mut write, b, BoostStatus::Released, reason, now);
        let b = write.boosts[0].clone();
        inner.store.apply_boost_write(write).await?;
        inner.ledger.put(b.clone());
        drop(guard);
        if b.raises_container_limits()
            && let Some(c) = b.container_id
            && let Err(e) = self.enforce(c).await
        {
            tracing::warn!(boost = %b.id, container = %c, error = %e, "limits not restored yet; retrying in the background");
        }
        Ok(b)
    }

    /// Ends boosts whose time is up and container boosts whose container
    /// is gone, then restores the limits they raised. Returns how many
    /// ended.
    pub async fn expire(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let guard = inner.admission.lock().await;
        let now = self.now();
        let live = inner.ledger.live();
        let due: HashSet<BoostId> = boost::due(&live, now).into_iter().collect();
        let mut write = BoostWrite::default();
        let mut lags = Vec::new();
        for b in live {
            if due.contains(&b.id) {
                lags.push(now.saturating_since(b.expires_at));
                let reason = format!("expired after {}", format_duration(b.duration()));
                end_into(&mut write, b, BoostStatus::Expired, reason, now);
            } else if let Some(c) = b.container_id
                && inner.pools.container(&c).is_none()
            {
                let reason = format!("released: container {c} was destroyed");
                end_into(&mut write, b, BoostStatus::Released, reason, now);
            }
        }
        if write.boosts.is_empty() {
            return Ok(0);
        }
        let ended = write.boosts.clone();
        inner.store.apply_boost_write(write).await?;
        for b in &ended {
            inner.ledger.put(b.clone());
        }
        drop(guard);
        inner.ledger.record_expiry_lags(lags);
        for b in ended.iter().filter(|b| b.raises_container_limits()) {
            if let Some(c) = b.container_id
                && inner.pools.container(&c).is_some()
            {
                self.spawn_enforce(c);
            }
        }
        Ok(ended.len())
    }

    /// Compares every running container's reported limits with its base
    /// plus live boosts and corrects those that differ. Returns how many
    /// updates it started.
    pub fn enforce_all(&self) -> usize {
        let inner = &self.inner;
        let live = inner.ledger.live();
        let mut started = 0;
        // One report per node, read once: a report holds every container
        // of its node, so reading it per container would copy it n times.
        let mut reports: HashMap<NodeId, Option<crate::agents::NodeReport>> = HashMap::new();
        for c in inner.pools.containers().into_iter().filter(runs) {
            let Some(docker_id) = c.docker_id.as_deref() else {
                continue;
            };
            let report = reports.entry(c.node_id.clone()).or_insert_with(|| {
                inner
                    .agents
                    .session(&c.node_id)
                    .and_then(|_| inner.agents.report(&c.node_id))
            });
            let Some(observed) = report.as_ref().and_then(|r| r.containers.get(docker_id)) else {
                continue;
            };
            if !observed.is_running() {
                continue;
            }
            let wanted = boost::boosted_limits(&c.limits, &c.id, &live);
            if !boost::limits_match(&observed.limits, &wanted) {
                tracing::info!(
                    container = %c.id,
                    node = %c.node_id,
                    reported = %describe_limits(&observed.limits),
                    wanted = %describe_limits(&wanted),
                    "container limits differ from base plus live boosts; correcting"
                );
                if self.spawn_enforce(c.id) {
                    started += 1;
                }
            }
        }
        started
    }

    /// Starts a background update of a container's limits unless one is
    /// already in flight. Returns whether it started one.
    fn spawn_enforce(&self, container: ContainerId) -> bool {
        {
            let mut enforcing = self
                .inner
                .enforcing
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !enforcing.insert(container) {
                return false;
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.enforce(container).await {
                tracing::warn!(container = %container, error = %e, "cannot set container limits yet; the periodic pass retries");
            }
            this.inner
                .enforcing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&container);
        });
        true
    }

    /// Sets a container's limits to its base plus its live boosts through
    /// its agent, and confirms them from the agent's inspection. Returns
    /// the limits in force.
    async fn enforce(&self, container: ContainerId) -> Result<Limits, String> {
        let inner = &self.inner;
        let _lock = inner.container_locks.lock(&container.to_string()).await;
        let c = inner
            .pools
            .container(&container)
            .ok_or_else(|| format!("container {container} no longer exists"))?;
        // Read after taking the lock: the newest decision wins.
        let wanted = boost::boosted_limits(&c.limits, &c.id, &inner.ledger.live());
        let command = pb::Command {
            command_id: format!("limits-{}-{}", c.id, uuid::Uuid::now_v7()),
            generation: c.claim_generation,
            command: Some(pb::command::Command::UpdateResources(pb::UpdateResources {
                container_id: c.id.to_string(),
                limits: Some(convert::limits_to_pb_resources(&wanted)),
            })),
        };
        let result = inner
            .agents
            .send(&c.node_id, command, inner.config.command_timeout)
            .await
            .map_err(|e| format!("node {}: {e}", c.node_id))?;
        let observed = result
            .container
            .as_ref()
            .map(|o| convert::limits_from_pb_resources(o.limits.as_ref()))
            .ok_or_else(|| {
                format!(
                    "node {} did not report the container after the update",
                    c.node_id
                )
            })?;
        if !boost::limits_match(&observed, &wanted) {
            return Err(format!(
                "Docker reports {} after the update, not {}",
                describe_limits(&observed),
                describe_limits(&wanted)
            ));
        }
        Ok(observed)
    }

    /// Resolves the target to a node or a running container.
    async fn resolve(
        &self,
        request: &BoostRequest,
    ) -> Result<(ResolvedTarget, Option<ContainerRecord>), BoostError> {
        let inner = &self.inner;
        let container = match &request.target {
            BoostTarget::Node(n) => {
                return match inner.store.get_node(n).await? {
                    Some(_) => Ok((ResolvedTarget::Node(n.clone()), None)),
                    None => Err(BoostError::NotFound(format!("node {n} not found"))),
                };
            }
            BoostTarget::Container(id) => inner
                .pools
                .container(id)
                .ok_or_else(|| BoostError::NotFound(format!("container {id} not found")))?,
            BoostTarget::Tenant(t, w) => {
                inner
                    .pools
                    .active_claim(t, w)
                    .ok_or_else(|| {
                        BoostError::NotFound(format!("tenant {t} holds no claim on workload {w}"))
                    })?
                    .container
            }
        };
        if !runs(&container) {
            return Err(BoostError::Precondition(format!(
                "container {} is {}; only a running container can be boosted",
                container.id, container.state
            )));
        }
        let has_base = match request.resource {
            BoostResource::Cpu => container.limits.cpus.is_some(),
            BoostResource::Memory => container.limits.memory_bytes.is_some(),
            BoostResource::Gpu => true,
        };
        if !has_base {
            return Err(BoostError::Precondition(format!(
                "container {} has no {} limit to raise: its workload {} sets none",
                container.id, request.resource, container.workload_id
            )));
        }
        Ok((
            ResolvedTarget::Container {
                id: container.id,
                node: container.node_id.clone(),
            },
            Some(container),
        ))
    }

    async fn ledger_nodes(&self) -> Result<Vec<NodeLedger>, StoreError> {
        let inner = &self.inner;
        let allocations = inner.pools.allocations();
        Ok(inner
            .store
            .list_nodes()
            .await?
            .into_iter()
            .map(|n| NodeLedger {
                live: n.status == NodeStatus::Ready && inner.pools.node_is_live(&n.id),
                allocated: allocations.get(&n.id).copied().unwrap_or_default(),
                capacity: n.capacity,
                id: n.id,
            })
            .collect())
    }
}

/// "0.75 cpus, 128M memory".
pub fn describe_limits(l: &Limits) -> String {
    let cpus = l
        .cpus
        .map_or_else(|| "unlimited cpus".to_owned(), |c| format!("{c} cpus"));
    let memory = l.memory_bytes.map_or_else(
        || "unlimited memory".to_owned(),
        |m| format!("{} memory", boilerhouse_core::units::format_size(m)),
    );
    format!("{cpus}, {memory}")
}

/// Expires boosts and keeps container limits at base plus live boosts.
pub struct BoostTask(pub Boosts);

impl BackgroundTask for BoostTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let ended = self.0.expire().await?;
            let corrections = self.0.enforce_all();
            Ok(serde_json::json!({
                "ended": ended,
                "limit_corrections": corrections,
                "live": self.0.ledger().live().len(),
            }))
        })
    }
}
