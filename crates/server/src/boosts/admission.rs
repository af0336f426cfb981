//! Admission: resolving a boost request's target, deciding against the
//! capacity ledger (with preemption), committing the decision and then
//! applying a container boost on its host.
//!
//! Admission is serialised by `Inner::admission`, so two requests never
//! both take the last free core; the host is only touched after the
//! decision has committed.

use boilerhouse_core::BoostId;
use boilerhouse_core::boost::{
    self, AdmitError, Boost, BoostAsk, BoostRequest, BoostResource, BoostStatus, BoostTarget,
    NodeLedger, ResolvedTarget,
};
use boilerhouse_core::event::EventKind;
use boilerhouse_core::node::NodeStatus;
use boilerhouse_core::pool::ContainerRecord;

use super::enforcement::describe_limits;
use super::{BoostError, Boosts, Requested, boost_event, describe, end_into, runs};
use crate::store::{BoostWrite, IdempotentRecord, StoreError};

impl Boosts {
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
