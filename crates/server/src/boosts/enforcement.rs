//! Enforcement: driving each container's limits towards "workload base
//! plus live boosts" through its agent.
//!
//! One update at a time per container, each computing the wanted limits
//! afresh under the container's lock, so updates cannot land out of
//! order. The periodic pass compares agents' reports with the wanted
//! limits and corrects what differs.

use std::collections::{HashMap, HashSet};

use boilerhouse_core::boost;
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::workload::Limits;
use boilerhouse_core::{ContainerId, NodeId};
use boilerhouse_proto::{convert, pb};

use super::{Boosts, runs};

impl Boosts {
    /// Compares running containers' reported limits with their base plus
    /// live boosts and corrects those that differ: every container when
    /// `full`, otherwise those with live boosts and those whose last update
    /// failed. Returns how many updates it started.
    pub fn enforce_all(&self, full: bool) -> usize {
        let inner = &self.inner;
        let live = inner.ledger.live();
        let targets: Option<HashSet<ContainerId>> = (!full).then(|| {
            let mut targets: HashSet<ContainerId> =
                live.iter().filter_map(|b| b.container_id).collect();
            targets.extend(
                inner
                    .unsettled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied(),
            );
            targets
        });
        // One report per node, looked up once (a shared copy, not a clone
        // of its containers).
        let mut reports: HashMap<NodeId, Option<std::sync::Arc<crate::agents::NodeReport>>> =
            HashMap::new();
        // Compared in place, a slice at a time under the index lock, and
        // only those that differ copied out: a full pass goes over every
        // container. A container seen in one state and changed
        // before its update runs is fine: `enforce` computes the wanted
        // limits afresh under the container's lock.
        let mut compare = |c: &ContainerRecord| {
            if !runs(c) {
                return None;
            }
            let docker_id = c.docker_id.as_deref()?;
            if !reports.contains_key(&c.node_id) {
                let report = inner
                    .agents
                    .session(&c.node_id)
                    .and_then(|_| inner.agents.report(&c.node_id));
                reports.insert(c.node_id.clone(), report);
            }
            let report = reports.get(&c.node_id)?;
            let observed = report.as_ref()?.containers.get(docker_id)?;
            if !observed.is_running() {
                return None;
            }
            let wanted = boost::boosted_limits(&c.limits, &c.id, &live);
            (!boost::limits_match(&observed.limits, &wanted)).then(|| {
                (
                    c.id,
                    c.node_id.clone(),
                    describe_limits(&observed.limits),
                    describe_limits(&wanted),
                )
            })
        };
        let differ: Vec<(ContainerId, NodeId, String, String)> = match &targets {
            None => inner.pools.scan(&mut compare),
            Some(ids) => {
                let (present, gone): (Vec<_>, Vec<_>) = ids
                    .iter()
                    .map(|id| (*id, inner.pools.container(id)))
                    .partition(|(_, c)| c.is_some());
                // A container that is gone needs no limits.
                let mut unsettled = inner.unsettled.lock().unwrap_or_else(|e| e.into_inner());
                for (id, _) in gone {
                    unsettled.remove(&id);
                }
                drop(unsettled);
                present
                    .into_iter()
                    .filter_map(|(_, c)| c.and_then(|c| compare(&c)))
                    .collect()
            }
        };
        let mut started = 0;
        for (id, node, reported, wanted) in differ {
            tracing::info!(
                container = %id,
                node = %node,
                %reported,
                %wanted,
                "container limits differ from base plus live boosts; correcting"
            );
            if self.spawn_enforce(id) {
                started += 1;
            }
        }
        started
    }

    /// Starts a background update of a container's limits unless one is
    /// already in flight. Returns whether it started one.
    pub(super) fn spawn_enforce(&self, container: ContainerId) -> bool {
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
    pub(super) async fn enforce(&self, container: ContainerId) -> Result<Limits, String> {
        let result = self.enforce_now(container).await;
        let mut unsettled = self
            .inner
            .unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => unsettled.remove(&container),
            Err(_) => unsettled.insert(container),
        };
        result
    }

    async fn enforce_now(&self, container: ContainerId) -> Result<Limits, String> {
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
