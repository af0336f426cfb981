//! The reconciliation planner: compares desired state (the database's
//! containers and claims) with observed state (the agents' reports) and
//! says what to do, with a reason for each action.
//!
//! Pure: no clock, no I/O. The server applies the plan and records every
//! action; `ReconcileService.Plan` shows it without applying it.
//!
//! The rule above all others: **nothing destructive on missing evidence.**
//! A node without a fresh full report (disconnected, never reported, or
//! stale) gets no action at all: its containers may be running fine behind
//! a network partition, and a lost heartbeat never reassigns a claimed
//! container.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::container::{ObservedContainer, labels};
use crate::ids::{ContainerId, NodeId, WorkloadId};
use crate::pool::{ContainerRecord, ContainerState};
use crate::time::Timestamp;

/// What the agents said about one node.
#[derive(Debug, Clone, PartialEq)]
pub enum Evidence {
    /// No fresh full report: plan nothing destructive for this node.
    Unknown,
    /// A full report taken at `observed_at`, kept current by events.
    Known {
        /// When the report was taken.
        observed_at: Timestamp,
        /// Every managed container of the node, shared with the report
        /// it came from: a pass over 100,000 containers copied each one
        /// (their labels most of all), ~100 MB every few seconds.
        containers: Vec<std::sync::Arc<ObservedContainer>>,
    },
}

/// The planner's inputs from the database.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Every container row (shared with the pool index, which is how a
    /// pass copies them all at one instant cheaply).
    pub containers: Vec<std::sync::Arc<ContainerRecord>>,
    /// Configured workloads and the spec hash of each.
    pub workloads: BTreeMap<WorkloadId, String>,
    /// A pass scoped to some nodes (see [`Desired::gather`]): those
    /// nodes; `containers` holds only their rows, and the planner plans
    /// for no other node.
    pub scope: Option<BTreeSet<NodeId>>,
    /// A scoped pass: ids reported on its nodes whose rows are on other
    /// nodes. They have rows, so they are not adopted.
    pub rows_elsewhere: BTreeSet<ContainerId>,
}

impl Desired {
    /// The rows a pass plans from, read from the pool index at one
    /// instant: every row, or with `scope` the rows on those nodes only.
    ///
    /// A scoped pass is how a node's first report is reconciled without
    /// planning over every row of the fleet (after a restart, 1,000
    /// agents reporting again each waited for whole passes of ~0.3 s).
    /// Its plan for the nodes in `scope` is the whole pass's for them:
    /// the only rows of other nodes the planner looks at are those of
    /// containers the scope's nodes report (which it then does not
    /// adopt), and [`Desired::find_rows_elsewhere`] notes them once the
    /// reports are read. Rows are read before reports: a container leaves
    /// its node's report before its row is deleted, so in that order a
    /// removal in between is never a container without a row.
    pub fn gather(
        index: &crate::pool::index::Index,
        workloads: BTreeMap<WorkloadId, String>,
        scope: Option<&BTreeSet<NodeId>>,
    ) -> Self {
        let Some(scope) = scope else {
            return Self {
                containers: index.containers_shared().cloned().collect(),
                workloads,
                scope: None,
                rows_elsewhere: BTreeSet::new(),
            };
        };
        let mut containers: Vec<_> = scope
            .iter()
            .flat_map(|n| index.containers_on_shared(n))
            .cloned()
            .collect();
        // In id order, as a pass over every row lists them.
        containers.sort_by_key(|c| c.id);
        Self {
            containers,
            workloads,
            scope: Some(scope.clone()),
            rows_elsewhere: BTreeSet::new(),
        }
    }

    /// A scoped pass: notes which containers its nodes report have rows
    /// on nodes outside it (nothing for a pass over every row).
    pub fn find_rows_elsewhere(
        &mut self,
        index: &crate::pool::index::Index,
        observed: &BTreeMap<NodeId, Evidence>,
    ) {
        let Some(scope) = &self.scope else {
            return;
        };
        self.rows_elsewhere = observed
            .iter()
            .filter(|(n, _)| scope.contains(*n))
            .flat_map(|(_, e)| match e {
                Evidence::Known { containers, .. } => containers.as_slice(),
                Evidence::Unknown => &[],
            })
            .filter_map(|o| o.container_id())
            .filter(|id| {
                index
                    .container(id)
                    .is_some_and(|row| !scope.contains(&row.node_id))
            })
            .collect();
    }
}

/// Grace periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanConfig {
    /// How long a row may lack its container in fresh reports before it is
    /// declared lost (covers creates in flight and reports racing them).
    pub lost_grace: Duration,
    /// How old an unknown managed container must be before it is destroyed
    /// (covers a create whose row has not been read yet).
    pub creation_grace: Duration,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionKind {
    /// The row's container is gone from its node: forget the row, mark its
    /// claim LOST, and let the pool refill.
    MarkLost {
        /// The row.
        container_id: ContainerId,
    },
    /// A managed container with no row, of a configured workload with the
    /// current spec: take it in (its tenant comes from its state file).
    Adopt {
        /// What Docker reports.
        observed: Box<ObservedContainer>,
    },
    /// A managed container with no row whose workload is unknown or whose
    /// spec is stale: remove it.
    Destroy {
        /// Docker's id.
        docker_id: String,
        /// Its container id label, when valid.
        container_id: Option<ContainerId>,
    },
    /// An unclaimed container of a workload that is no longer configured.
    Drain {
        /// The row.
        container_id: ContainerId,
    },
    /// A container of a lost node is running again: give it back to its
    /// tenant, unless the tenant claimed elsewhere meanwhile.
    Resume {
        /// The row.
        container_id: ContainerId,
    },
    /// A row the database calls unused (idle or warming) whose container's
    /// state file says a tenant held it: the database is older than the
    /// container (a backup restored over a newer one). It is set aside for
    /// that tenant (Lost, so `Resume` gives it back to them or destroys
    /// it), never offered to anyone else.
    Reclaim {
        /// The row.
        container_id: ContainerId,
        /// Who held it, by its state file.
        state: crate::container::StateFile,
    },
}

/// One planned action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// What.
    pub kind: ActionKind,
    /// Where.
    pub node_id: NodeId,
    /// Why, in a sentence.
    pub reason: String,
    /// Not to be applied before this; `None` means now.
    pub not_before: Option<Timestamp>,
}

impl Action {
    /// Whether the action may be applied at `now`.
    pub fn is_due(&self, now: Timestamp) -> bool {
        self.not_before.is_none_or(|t| t <= now)
    }

    /// The container row or container the action is about.
    pub fn container_id(&self) -> Option<ContainerId> {
        match &self.kind {
            ActionKind::MarkLost { container_id }
            | ActionKind::Drain { container_id }
            | ActionKind::Resume { container_id } => Some(*container_id),
            ActionKind::Adopt { observed } => observed.container_id(),
            ActionKind::Destroy { container_id, .. } => *container_id,
            ActionKind::Reclaim { container_id, .. } => Some(*container_id),
        }
    }
}

/// The state file of `c`'s container when it names a tenant although the
/// row says no tenant ever held it. The state file is written only after a
/// claim commits and a row never goes back to unused, so this means the
/// database lost what the container remembers.
fn held_by_a_tenant<'a>(
    c: &ContainerRecord,
    observed: Option<&&'a ObservedContainer>,
) -> Option<&'a crate::container::StateFile> {
    if !matches!(c.state, ContainerState::Idle | ContainerState::Warming) || c.used() {
        return None;
    }
    observed
        .and_then(|o| o.state_file.as_ref())
        .filter(|s| s.tenant_id.is_some() || s.last_tenant_id.is_some())
}

fn after(t: Timestamp, grace: Duration, now: Timestamp) -> Option<Timestamp> {
    let due = t.saturating_add(grace);
    (due > now).then_some(due)
}

/// The actions that make observation match intent. See the module
/// documentation for the rules.
pub fn plan(
    desired: &Desired,
    observed: &BTreeMap<NodeId, Evidence>,
    now: Timestamp,
    config: &PlanConfig,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let rows: BTreeMap<ContainerId, &ContainerRecord> = desired
        .containers
        .iter()
        .map(|c| (c.id, c.as_ref()))
        .collect();
    // Rows by node and reports by container id, each built once: looking
    // them up by scanning made a pass over 100,000 containers on 1,000
    // nodes take seconds.
    let mut rows_by_node: BTreeMap<&NodeId, Vec<&ContainerRecord>> = BTreeMap::new();
    for c in &desired.containers {
        rows_by_node.entry(&c.node_id).or_default().push(c.as_ref());
    }

    // Workloads that are no longer configured: drain what no tenant holds.
    for c in &desired.containers {
        if desired.workloads.contains_key(&c.workload_id) {
            continue;
        }
        if matches!(c.state, ContainerState::Idle | ContainerState::Warming) {
            actions.push(Action {
                kind: ActionKind::Drain { container_id: c.id },
                node_id: c.node_id.clone(),
                reason: format!("workload {} is no longer configured", c.workload_id),
                not_before: None,
            });
        }
    }

    let in_scope = |n: &NodeId| desired.scope.as_ref().is_none_or(|s| s.contains(n));
    for (node, evidence) in observed.iter().filter(|(n, _)| in_scope(n)) {
        let Evidence::Known { containers, .. } = evidence else {
            // Missing evidence: nothing destructive, nothing at all.
            continue;
        };
        // The first report of each container id, as a scan would find it,
        // and the ids reported stopped.
        let mut by_id: BTreeMap<ContainerId, &ObservedContainer> = BTreeMap::new();
        let mut stopped_ids: BTreeSet<ContainerId> = BTreeSet::new();
        for o in containers.iter().map(|o| o.as_ref()) {
            if let Some(id) = o.container_id() {
                by_id.entry(id).or_insert(o);
                if matches!(o.docker_state.as_str(), "exited" | "dead") {
                    stopped_ids.insert(id);
                }
            }
        }

        // Rows whose container is gone.
        let node_rows = rows_by_node
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for c in node_rows.iter().copied() {
            if let Some(state) = held_by_a_tenant(c, by_id.get(&c.id)) {
                actions.push(Action {
                    kind: ActionKind::Reclaim {
                        container_id: c.id,
                        state: state.clone(),
                    },
                    node_id: node.clone(),
                    reason: format!(
                        "container {} is {} and unused in the database, but its state file says tenant {} held it (generation {}): the database is older than the container",
                        c.id,
                        c.state,
                        state
                            .tenant_id
                            .as_ref()
                            .or(state.last_tenant_id.as_ref())
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        state.claim_generation
                    ),
                    not_before: None,
                });
                continue;
            }
            if by_id.contains_key(&c.id) {
                // A claim kept through its node's absence, on a container
                // that came back stopped (the host rebooted): the claim
                // ends as LOST, and `Resume` then drains the container, so
                // its tenant's next claim lands on a running one.
                let stopped = stopped_ids.contains(&c.id);
                if c.state == ContainerState::Claimed && stopped {
                    actions.push(Action {
                        kind: ActionKind::MarkLost { container_id: c.id },
                        node_id: node.clone(),
                        reason: format!(
                            "claimed container {} on node {node} is stopped (its host restarted, or its process ended)",
                            c.id
                        ),
                        not_before: after(c.updated_at, config.lost_grace, now),
                    });
                    continue;
                }
                if c.state == ContainerState::Lost {
                    let configured = desired.workloads.contains_key(&c.workload_id);
                    // Back unclaimed for a workload that is gone: it would
                    // only be drained next round, so drain it now.
                    let (kind, reason) = if !configured && c.tenant_id.is_none() {
                        (
                            ActionKind::Drain { container_id: c.id },
                            format!(
                                "container {} is back but workload {} is no longer configured",
                                c.id, c.workload_id
                            ),
                        )
                    } else {
                        (
                            ActionKind::Resume { container_id: c.id },
                            format!(
                                "container {} is running again on node {node}, which was lost",
                                c.id
                            ),
                        )
                    };
                    actions.push(Action {
                        kind,
                        node_id: node.clone(),
                        reason,
                        not_before: None,
                    });
                }
                continue;
            }
            actions.push(Action {
                kind: ActionKind::MarkLost { container_id: c.id },
                node_id: node.clone(),
                reason: format!(
                    "container {} ({}, {}) is missing from node {node}'s full report",
                    c.id, c.workload_id, c.state
                ),
                not_before: after(c.updated_at, config.lost_grace, now),
            });
        }

        // Managed containers with no row.
        for o in containers.iter().map(|o| o.as_ref()) {
            if o.node_id() != Some(node.as_str()) {
                continue;
            }
            let id = o.container_id();
            if id.is_some_and(|id| rows.contains_key(&id) || desired.rows_elsewhere.contains(&id)) {
                continue;
            }
            let created = o
                .labels
                .get(labels::CREATED_AT)
                .and_then(|t| t.parse::<i64>().ok())
                .map(Timestamp::from_millis)
                .unwrap_or(Timestamp::EPOCH);
            let workload = o.workload_id();
            let current_hash = workload.as_ref().and_then(|w| desired.workloads.get(w));
            let spec_hash = o.labels.get(labels::SPEC_HASH);
            match (id, current_hash) {
                // Created but never started (a create cut short, or one in
                // flight from elsewhere): left alone until it starts or its
                // grace passes, as Nomad's dangling-container reaper does.
                (Some(_), Some(hash)) if spec_hash == Some(hash) && o.docker_state == "created" => {
                    actions.push(Action {
                        kind: ActionKind::Destroy { docker_id: o.docker_id.clone(), container_id: id },
                        node_id: node.clone(),
                        reason: format!(
                            "managed container {} has no row and was created but never started",
                            o.name
                        ),
                        not_before: after(created, config.creation_grace, now),
                    });
                }
                (Some(_), Some(hash)) if spec_hash == Some(hash) => actions.push(Action {
                    kind: ActionKind::Adopt { observed: Box::new(o.clone()) },
                    node_id: node.clone(),
                    reason: format!(
                        "managed container {} of {} has no row; its labels name a configured pool with the current spec",
                        o.name,
                        workload.as_ref().map(ToString::to_string).unwrap_or_default()
                    ),
                    not_before: None,
                }),
                _ => {
                    let why = match (&workload, current_hash) {
                        (None, _) => "its labels name no valid workload".to_owned(),
                        (Some(w), None) => format!("its pool {w} is not configured"),
                        (Some(w), Some(_)) if id.is_none() => format!("it has no valid container id (pool {w})"),
                        (Some(w), Some(_)) => format!("it was built from a stale spec of {w}"),
                    };
                    actions.push(Action {
                        kind: ActionKind::Destroy { docker_id: o.docker_id.clone(), container_id: id },
                        node_id: node.clone(),
                        reason: format!("managed container {} has no row and {why}", o.name),
                        not_before: after(created, config.creation_grace, now),
                    });
                }
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests;
