//! Reconciliation: build the plan from live state and apply it.
//!
//! The plan comes from the pure planner in `core::reconcile`; this module
//! gathers its inputs (the pool index, the configured workloads, each
//! node's evidence) and carries out the due actions, recording each one in
//! the activity log. It runs every few seconds as a background task and
//! on demand through `ReconcileService.ApplyReconcile`. How each action
//! changes pool state is decided in `core::pool::decide`, like every
//! other pool transition; [`apply`] carries it out.

mod apply;

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;

use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_core::reconcile::{Action, ActionKind, Desired, Evidence, PlanConfig, plan};
use boilerhouse_core::{NodeId, Timestamp};

use crate::agents::Registry;
use crate::pools::Pools;
use crate::store::{Store, StoreError};
use crate::tasks::BackgroundTask;

/// Everything reconciliation needs.
#[derive(Clone)]
pub struct Reconciler {
    /// The database.
    pub store: Store,
    /// The pool index.
    pub pools: Pools,
    /// Live sessions and reports.
    pub agents: Registry,
    /// Grace periods.
    pub config: PlanConfig,
    /// How long to wait for an agent to answer a command.
    pub command_timeout: std::time::Duration,
}

/// What one pass cost, for the task's status and the benchmarks: the
/// planner alone (pure, in memory) apart from gathering its inputs and
/// carrying out its actions.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PassCost {
    /// Container rows the plan compared.
    pub rows: usize,
    /// Containers in the fresh reports it compared them with.
    pub observed: usize,
    /// Reading the index, the workloads, the nodes and their reports.
    pub gather_ms: f64,
    /// The planner.
    pub plan_ms: f64,
    /// Carrying out the due actions.
    pub apply_ms: f64,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One applied action and how it went.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The action.
    pub action: Action,
    /// `Err` with a reason when it could not be carried out.
    pub result: Result<Outcome, String>,
}

/// What a carried-out action did. A plan is made on a view of the index
/// and the reports taken a moment apart, and each action is decided again
/// on the committed state: a container the server created meanwhile is
/// not adopted, one claimed meanwhile is not reclaimed. Such an action is
/// moot, and is not counted or reported as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It changed what it was planned to change.
    Done,
    /// The state had moved on; nothing was left to do.
    Moot,
}

impl Outcome {
    /// Done when the decision made a write (`Some`).
    fn of<T>(decided: Option<T>) -> Self {
        Self::of_changed(decided.is_some())
    }

    fn of_changed(changed: bool) -> Self {
        if changed { Self::Done } else { Self::Moot }
    }
}

impl Reconciler {
    /// The current plan, optionally for some nodes only.
    pub async fn plan(
        &self,
        only: Option<&BTreeSet<NodeId>>,
        now: Timestamp,
    ) -> Result<(Vec<Action>, Desired), StoreError> {
        let (actions, desired, _) = self
            .plan_with_evidence(only, now, &mut PassCost::default())
            .await?;
        Ok((actions, desired))
    }

    /// The plan, and the reports (node, observed_at) it was made from.
    /// With `only`, a pass over those nodes' rows and reports alone (see
    /// [`Desired::gather`]).
    async fn plan_with_evidence(
        &self,
        only: Option<&BTreeSet<NodeId>>,
        now: Timestamp,
        cost: &mut PassCost,
    ) -> Result<(Vec<Action>, Desired, Vec<(NodeId, Timestamp)>), StoreError> {
        let began = std::time::Instant::now();
        let workloads = self
            .store
            .list_workloads()
            .await?
            .iter()
            .map(|w| (w.spec.id.clone(), w.spec_hash.clone()))
            .collect();
        // The rows before the reports (see `Desired::gather`).
        let mut desired = self
            .pools
            .read(|index| Desired::gather(index, workloads, only));
        let mut observed = BTreeMap::new();
        let mut known = Vec::new();
        for node in self.store.list_nodes().await? {
            if only.is_some_and(|nodes| !nodes.contains(&node.id)) {
                continue;
            }
            // Evidence only from a connected, heartbeating agent that has
            // sent a full report: anything else is missing evidence. A
            // session whose link went silent still holds its last report,
            // which says nothing of the present.
            let evidence = match (self.agents.session(&node.id), self.agents.report(&node.id)) {
                (Some(_), Some(report)) if self.pools.node_is_live(&node.id) => {
                    match report.observed_at {
                        Some(observed_at) => {
                            known.push((node.id.clone(), observed_at));
                            Evidence::Known {
                                observed_at,
                                // A container whose row could not be read is
                                // neither adopted nor destroyed: its row is
                                // the evidence that is missing.
                                containers: report
                                    .containers
                                    .values()
                                    .filter(|o| {
                                        !o.container_id()
                                            .is_some_and(|id| self.pools.row_unreadable(&id))
                                    })
                                    .cloned()
                                    .collect(),
                            }
                        }
                        None => Evidence::Unknown,
                    }
                }
                _ => Evidence::Unknown,
            };
            observed.insert(node.id, evidence);
        }
        if only.is_some() {
            self.pools
                .read(|index| desired.find_rows_elsewhere(index, &observed));
        }
        cost.rows = desired.containers.len();
        cost.observed = observed
            .values()
            .map(|e| match e {
                Evidence::Known { containers, .. } => containers.len(),
                Evidence::Unknown => 0,
            })
            .sum();
        cost.gather_ms = ms(began.elapsed());
        // 100 ms and more of CPU at 60,000 containers: behind the claim
        // path (see `background`), where the reports' shares are dropped
        // too.
        let config = self.config;
        let (actions, desired, plan_ms) = crate::background::run(move || {
            let planning = std::time::Instant::now();
            let actions = plan(&desired, &observed, now, &config);
            let plan_ms = ms(planning.elapsed());
            drop(observed);
            (actions, desired, plan_ms)
        })
        .await;
        cost.plan_ms = plan_ms;
        Ok((actions, desired, known))
    }

    /// Plans and applies every due action.
    pub async fn apply(&self, only: Option<&BTreeSet<NodeId>>) -> Result<Vec<Applied>, StoreError> {
        Ok(self.apply_measured(only).await?.0)
    }

    /// [`Reconciler::apply`], and what the pass cost.
    pub async fn apply_measured(
        &self,
        only: Option<&BTreeSet<NodeId>>,
    ) -> Result<(Vec<Applied>, PassCost), StoreError> {
        let now = crate::clock::now();
        let mut cost = PassCost::default();
        let (actions, _, known) = self.plan_with_evidence(only, now, &mut cost).await?;
        let applying = std::time::Instant::now();
        let mut applied = Vec::new();
        for action in actions.into_iter().filter(|a| a.is_due(now)) {
            let result = self.apply_action(&action).await.map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::warn!(node = %action.node_id, reason = %action.reason, error = %e, "reconcile action failed");
            }
            applied.push(Applied { action, result });
        }
        // These nodes' containers are now in the index (adopted) or on
        // their way out: the refiller may count them.
        for (node, observed_at) in known {
            self.agents.mark_reconciled(&node, observed_at);
        }
        // After a database loss, adoption is how state comes back: say in
        // one event what was rebuilt from the agents' labels and state files.
        if let Some((adopted, with_tenant, message)) = rebuilt(&applied) {
            tracing::warn!(adopted, claims = with_tenant, "{message}");
            self.store
                .append_event(NewEvent::new(now, EventKind::ReconcileRebuilt, message))
                .await?;
        }
        cost.apply_ms = ms(applying.elapsed());
        Ok((applied, cost))
    }
}

/// What a pass rebuilt from the labels and state files: the containers
/// adopted, those of them given back to a tenant, and the sentence that
/// says so. Adoptions that were moot (the server made the row meanwhile)
/// rebuilt nothing and are not counted.
fn rebuilt(applied: &[Applied]) -> Option<(usize, usize, String)> {
    let adopted: Vec<_> = applied
        .iter()
        .filter(|a| a.result == Ok(Outcome::Done))
        .filter_map(|a| match &a.action.kind {
            ActionKind::Adopt { observed } => Some((observed, &a.action.node_id)),
            _ => None,
        })
        .collect();
    if adopted.is_empty() {
        return None;
    }
    let with_tenant = adopted
        .iter()
        .filter(|(o, _)| o.state_file.as_ref().is_some_and(|s| s.tenant_id.is_some()))
        .count();
    let nodes: std::collections::BTreeSet<_> =
        adopted.iter().map(|(_, node)| node.to_string()).collect();
    let message = format!(
        "rebuilt {} containers and {with_tenant} tenant claims from the labels and state files on {}",
        adopted.len(),
        nodes.into_iter().collect::<Vec<_>>().join(", ")
    );
    Some((adopted.len(), with_tenant, message))
}

/// The periodic reconciliation, and the reconciliation of nodes whose
/// first report is waiting (woken by its arrival): a pass over those
/// nodes alone, so that their containers are offered as soon as they are
/// reconciled rather than after a pass over every row of the fleet.
pub struct ReconcileTask {
    reconciler: Reconciler,
    /// The task's period. Woken by first reports more often than this, it
    /// passes over their nodes alone; the pass over every row waits while
    /// agents are coming back, for half a period at most.
    interval: std::time::Duration,
    /// When the task began: until its first whole pass, that pass is
    /// counted as due from here.
    created: std::time::Instant,
    /// When the last whole pass started, and its summary (the status
    /// shows it while scoped passes run in between).
    last_whole: Option<(std::time::Instant, serde_json::Value)>,
}

impl ReconcileTask {
    /// The task for `reconciler`, run every `interval`.
    pub fn new(reconciler: Reconciler, interval: std::time::Duration) -> Self {
        Self {
            reconciler,
            interval,
            created: std::time::Instant::now(),
            last_whole: None,
        }
    }
}

fn summary(applied: &[Applied], cost: PassCost) -> serde_json::Value {
    let failed = applied.iter().filter(|a| a.result.is_err()).count();
    let moot = applied
        .iter()
        .filter(|a| a.result == Ok(Outcome::Moot))
        .count();
    serde_json::json!({
        "applied": applied.len() - failed - moot,
        "moot": moot,
        "failed": failed,
        "cost": cost,
    })
}

impl BackgroundTask for ReconcileTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            // Nodes whose first report has arrived (not those still
            // connecting, whose rows the pass would read for nothing).
            let agents = &self.reconciler.agents;
            let waiting: BTreeSet<NodeId> = agents
                .unreconciled()
                .into_iter()
                .filter(|n| agents.report(n).is_some_and(|r| r.observed_at.is_some()))
                .collect();
            let first = if waiting.is_empty() {
                None
            } else {
                let (applied, cost) = self.reconciler.apply_measured(Some(&waiting)).await?;
                let mut s = summary(&applied, cost);
                s["nodes"] = waiting.len().into();
                Some(s)
            };
            // While agents are coming back (a restarted server's 1,000
            // return over a second or two), their first reports' scoped
            // passes go first: a whole pass (0.3-0.4 s at 100,000 rows)
            // would hold up every node reporting behind it, and would plan
            // nothing new for the nodes already reconciled nor for those
            // not yet back. So it waits while any connected node is not
            // reconciled yet, or none is connected (the task's first run,
            // as the server starts), for half a period at most since the
            // last whole pass or the task's start.
            let since_whole = self
                .last_whole
                .as_ref()
                .map_or(self.created, |(t, _)| *t)
                .elapsed();
            let returning = agents.connected() == 0 || !agents.unreconciled().is_empty();
            let whole_due = since_whole >= self.interval / 2 || (first.is_none() && !returning);
            let mut status = if whole_due {
                let started = std::time::Instant::now();
                let (applied, cost) = self.reconciler.apply_measured(None).await?;
                let status = summary(&applied, cost);
                self.last_whole = Some((started, status.clone()));
                status
            } else {
                match &self.last_whole {
                    Some((started, status)) => {
                        let mut status = status.clone();
                        status["whole_pass_age_ms"] = u64::try_from(started.elapsed().as_millis())
                            .unwrap_or(u64::MAX)
                            .into();
                        status
                    }
                    None => serde_json::json!({ "whole_pass": "none yet" }),
                }
            };
            if let Some(first) = first {
                status["first_reports"] = first;
            }
            Ok(status)
        })
    }
}

#[cfg(test)]
mod tests;
