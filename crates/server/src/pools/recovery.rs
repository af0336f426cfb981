//! When hosts fail: node loss, containers the engine destroyed, containers
//! that come back. The agents module publishes what it sees
//! ([`NodeSignal`]); this module acts on it, and also looks for lost nodes
//! on its own, so a missed signal only delays recovery.

use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::node::NodeStatus;
use boilerhouse_core::pool::ContainerState;
use boilerhouse_core::pool::decide;
use boilerhouse_core::pool::index::{Index, RowChanges};
use std::collections::{BTreeSet, HashMap, HashSet};

use boilerhouse_core::workload::Disconnect;
use boilerhouse_core::{ContainerId, NodeId, WorkloadId};
use futures::future::BoxFuture;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{PoolError, Pools};
use crate::agents::NodeSignal;
use crate::store::Unreadable;
use crate::tasks::BackgroundTask;

impl Pools {
    /// A node was declared lost. Its claims are given up only where their
    /// workload's `disconnect.replace` says so and the node has been
    /// silent for its `lost_after`; those tenants can claim elsewhere. The
    /// others keep their claims, and their containers, until the node
    /// returns. Its reservations end and its idle containers are set
    /// aside (they may come back with the node; a used one then goes back
    /// only to its tenant). A reserved container whose tenant's files are
    /// still owed upstream stays reserved. Returns how many containers it
    /// set aside.
    pub async fn node_lost(&self, node: &NodeId, reason: &str) -> Result<usize, PoolError> {
        let now = crate::clock::now();
        let Some(record) = self.inner.store.get_node(node).await? else {
            return Ok(0);
        };
        if record.status != NodeStatus::Lost {
            // It spoke again before the signal was acted on.
            return Ok(0);
        }
        let silent = now.saturating_since(record.last_heartbeat_at.max(self.inner.started_at));
        let policies = self.disconnect_policies(node).await;
        let count = self
            .commit_decided(|index| {
                // It may have spoken again since the status was read.
                if self.node_live(node, crate::clock::now()) {
                    return Ok(None);
                }
                let gives_up = |w: &WorkloadId| {
                    // A workload deleted since keeps the safe default.
                    policies.get(w).is_some_and(|d| d.gives_up(silent))
                };
                let write =
                    decide::node_lost(index, node, reason, |c| self.retained(c), gives_up, now);
                Ok(write.map(|w| {
                    let n = w.containers.len();
                    (w, n)
                }))
            })
            .await?
            .unwrap_or(0);
        if count > 0 {
            tracing::warn!(node = %node, containers = count, "containers of a lost node set aside; pools refill elsewhere");
            self.inner.refill.notify_one();
        }
        Ok(count)
    }

    /// The `disconnect` policy of every workload with a claim on `node`.
    async fn disconnect_policies(&self, node: &NodeId) -> HashMap<WorkloadId, Disconnect> {
        let workloads: BTreeSet<WorkloadId> = self.read(|index| {
            index
                .containers_on(node)
                .filter_map(|c| index.claim_on(&c.id))
                .map(|claim| claim.workload_id.clone())
                .collect()
        });
        let mut policies = HashMap::new();
        for w in workloads {
            if let Ok(record) = self.workload_record(&w).await {
                policies.insert(w, record.spec.disconnect);
            }
        }
        policies
    }

    /// Applies node loss to every node the database says is lost. The
    /// level-triggered twin of [`NodeSignal::NodeLost`]: it covers a
    /// signal missed, a crash between the status change and the signal,
    /// and a `disconnect.lost_after` that ran out since.
    pub async fn recover_lost_nodes(&self) -> Result<usize, PoolError> {
        let mut count = 0;
        for node in self.inner.store.list_nodes().await? {
            if node.status == NodeStatus::Lost {
                count += self
                    .node_lost(&node.id, "its agent stopped heartbeating")
                    .await?;
            }
        }
        Ok(count)
    }

    /// A row whose container is gone. Its claim becomes LOST and its
    /// reservation ends; a claimed container's row stays, as Lost with its
    /// tenant, so that if it turns up again it goes back only to that
    /// tenant. Anything else is forgotten.
    /// Returns whether it was marked (not when the state moved on).
    pub async fn mark_lost(&self, id: &ContainerId, reason: &str) -> Result<bool, PoolError> {
        let now = crate::clock::now();
        let marked = self
            .commit_decided(|index| Ok(decide::mark_lost(index, id, reason, now).map(|w| (w, ()))))
            .await?;
        self.inner.refill.notify_one();
        Ok(marked.is_some())
    }

    /// A row the database calls unused whose container's state file names
    /// a tenant: back to that tenant, or drained; never offered.
    pub async fn reclaim(
        &self,
        id: &ContainerId,
        state: &boilerhouse_core::container::StateFile,
        running: bool,
        reason: &str,
    ) -> Result<bool, PoolError> {
        let now = crate::clock::now();
        let reclaimed = self
            .commit_decided(|index| {
                let claim_id = boilerhouse_core::ids::Uuid::now_v7().to_string();
                Ok(decide::reclaim(
                    index, id, state, running, claim_id, reason, now,
                ))
            })
            .await?;
        if reclaimed.is_some() {
            // Only now: planned on a view a moment old, a container claimed
            // in that moment is no such thing, and the decision says so.
            tracing::warn!(container = %id, %reason, "a container the database calls unused was held by a tenant");
        }
        if let Some(Some(_)) = &reclaimed
            && let Some(c) = self.container(id)
        {
            self.write_state_file(&c, now);
        }
        self.inner.refill.notify_one();
        Ok(reclaimed.is_some())
    }

    /// The engine destroyed a container its node's agent watches: act at
    /// once rather than wait for reconciliation's grace, so a claim never
    /// points at a container that is gone, and its row is forgotten (its
    /// capacity is free again). A draining container was being removed
    /// anyway.
    pub async fn container_gone(
        &self,
        node: &NodeId,
        docker_id: &str,
        container: Option<ContainerId>,
    ) -> Result<(), PoolError> {
        let record = self.read(|index| {
            let matches = |c: &&boilerhouse_core::pool::ContainerRecord| {
                &c.node_id == node && c.docker_id.as_deref() == Some(docker_id)
            };
            match container {
                Some(id) => index.container(&id).filter(matches).cloned(),
                None => index.containers_on(node).find(matches).cloned(),
            }
        });
        // Not ours, or an older container of the same id (a create resent
        // after a restart makes a twin, and the older one is removed).
        let Some(c) = record else {
            if let Some(id) = container
                && self.read(|index| index.container(&id).is_some_and(|c| &c.node_id != node))
            {
                return self.restricted(node, &id, "a destroy event").await;
            }
            return Ok(());
        };
        let now = crate::clock::now();
        if c.state == ContainerState::Draining {
            self.commit_decided(|index| Ok(decide::removed(index, &c.id, now).map(|w| (w, ()))))
                .await?;
            return Ok(());
        }
        let reason = format!(
            "the engine on {node} destroyed it (docker id {})",
            &docker_id[..docker_id.len().min(12)]
        );
        self.commit_decided(|index| {
            Ok(decide::destroyed(index, &c.id, &reason, now).map(|w| (w, ())))
        })
        .await?;
        self.inner.refill.notify_one();
        Ok(())
    }

    /// A container of a lost node runs again. Its tenant, if it had one
    /// and holds nothing else of the workload now, gets it back with a new
    /// generation; a container that served someone else goes; an unused
    /// one rejoins the pool.
    pub async fn resume(
        &self,
        id: &ContainerId,
        running: bool,
        reason: &str,
    ) -> Result<bool, PoolError> {
        let now = crate::clock::now();
        let resumed = self
            .commit_decided(|index| {
                let claim_id = boilerhouse_core::ids::Uuid::now_v7().to_string();
                Ok(decide::resume(index, id, running, reason, claim_id, now))
            })
            .await?;
        if let Some(Some(_)) = &resumed
            && let Some(c) = self.container(id)
        {
            self.write_state_file(&c, now);
        }
        self.inner.refill.notify_one();
        Ok(resumed.is_some())
    }

    /// Records that `node`'s agent reported `what` about a container of
    /// another node, which was ignored (NodeRestriction).
    async fn restricted(
        &self,
        node: &NodeId,
        container: &ContainerId,
        what: &str,
    ) -> Result<(), PoolError> {
        tracing::warn!(node = %node, container = %container, what, "ignored an agent's report about another node's container");
        let event = NewEvent::new(
            crate::clock::now(),
            EventKind::NodeRestricted,
            format!("node {node} reported {what} for container {container}, which is another node's; ignored"),
        )
        .with_subject(EventSubject {
            node_id: Some(node.to_string()),
            container_id: Some(container.to_string()),
            ..Default::default()
        });
        self.inner.store.append_event(event).await?;
        Ok(())
    }

    /// Acts on what the agents publish until `shutdown`.
    pub async fn follow_signals(self, shutdown: CancellationToken) {
        let mut signals = self.inner.agents.subscribe();
        loop {
            let signal = tokio::select! {
                () = shutdown.cancelled() => return,
                s = signals.recv() => s,
            };
            let result = match signal {
                Ok(NodeSignal::Activity {
                    node,
                    container,
                    at,
                }) => {
                    if self.container_activity(&node, &container, at) {
                        Ok(())
                    } else {
                        self.restricted(&node, &container, "activity").await
                    }
                }
                Ok(NodeSignal::ContainerGone {
                    node,
                    docker_id,
                    container,
                }) => self.container_gone(&node, &docker_id, container).await,
                Ok(NodeSignal::NodeLost { node, reason }) => {
                    self.node_lost(&node, &reason).await.map(|_| ())
                }
                Err(RecvError::Lagged(missed)) => {
                    // Activity is a hint and reconciliation finds removed
                    // containers; node loss is checked again at once.
                    tracing::warn!(missed, "fell behind the agents' signals");
                    self.recover_lost_nodes().await.map(|_| ())
                }
                Err(RecvError::Closed) => return,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "acting on an agent signal failed");
            }
        }
    }
}

/// The periodic pass over lost nodes.
pub struct NodeLoss(pub Pools);

impl BackgroundTask for NodeLoss {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let set_aside = self.0.recover_lost_nodes().await?;
            Ok(serde_json::json!({ "set_aside": set_aside }))
        })
    }
}

/// The containers among `unreadable` rows, by the id their key names.
pub(super) fn unreadable_containers(unreadable: &[Unreadable]) -> HashSet<ContainerId> {
    unreadable
        .iter()
        .filter(|u| u.table == "containers")
        .filter_map(|u| u.key.parse().ok())
        .collect()
}

/// The index without the claims and reservations of container rows that
/// could not be read (they would point it at nothing), each named among
/// the unreadable rows.
pub(super) fn without_orphans(
    mut index: Index,
    mut unreadable: Vec<Unreadable>,
) -> (Index, Vec<Unreadable>) {
    let skipped: BTreeSet<&str> = unreadable
        .iter()
        .filter(|u| u.table == "containers")
        .map(|u| u.key.as_str())
        .collect();
    if skipped.is_empty() {
        return (index, unreadable);
    }
    let orphan = |table: &'static str, key: String, container: &ContainerId| Unreadable {
        table,
        key,
        reason: format!("its container {container} cannot be read"),
    };
    let mut orphans = Vec::new();
    let mut gone = RowChanges::default();
    for c in index.claims() {
        if skipped.contains(c.container_id.to_string().as_str()) {
            orphans.push(orphan("claims", c.claim_id.clone(), &c.container_id));
            gone.removed_claims.push(c.claim_id.clone());
        }
    }
    for r in index.reservations() {
        if skipped.contains(r.container_id.to_string().as_str()) {
            let key = format!("({}, {})", r.tenant_id, r.workload_id);
            orphans.push(orphan("affinity_reservations", key, &r.container_id));
            gone.removed_reservations
                .push((r.tenant_id.clone(), r.workload_id.clone()));
        }
    }
    // Still being built: no write has been applied to it yet.
    index.put_rows(gone);
    unreadable.extend(orphans);
    for u in unreadable.iter_mut().filter(|u| u.table == "containers") {
        u.reason
            .push_str("; reconciliation leaves its container alone until the row is repaired");
    }
    (index, unreadable)
}
