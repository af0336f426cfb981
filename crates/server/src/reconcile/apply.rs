//! Carrying out reconciliation actions. Each one is a pool transition
//! decided by `core::pool::decide` on the committed state and committed
//! conditionally, so an action planned on a view that has since changed
//! is decided again or dropped, never applied over what happened.

use boilerhouse_core::boost::limits_match;
use boilerhouse_core::container::ObservedContainer;
use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::pool::decide;
use boilerhouse_core::pool::{ContainerRecord, ContainerState};
use boilerhouse_core::reconcile::{Action, ActionKind};
use boilerhouse_core::workload::Limits;
use boilerhouse_core::{NodeId, Timestamp};
use boilerhouse_proto::pb;

use super::{Outcome, Reconciler};
use crate::pools::{PoolError, Pools};

impl Reconciler {
    /// Carries out one reconciliation action, recording it as an event.
    pub async fn apply_action(&self, action: &Action) -> Result<Outcome, PoolError> {
        let now = crate::clock::now();
        match &action.kind {
            ActionKind::MarkLost { container_id } => self
                .pools
                .mark_lost(container_id, &action.reason)
                .await
                .map(Outcome::of_changed),
            ActionKind::Reclaim {
                container_id,
                state,
            } => {
                let running = self.running(&action.node_id, container_id);
                self.pools
                    .reclaim(container_id, state, running, &action.reason)
                    .await
                    .map(Outcome::of_changed)
            }
            ActionKind::Drain { container_id } => self
                .pools
                .drain_unclaimed(container_id, &action.reason)
                .await
                .map(Outcome::of_changed),
            ActionKind::Destroy {
                docker_id,
                container_id,
            } => {
                let Some(id) = container_id else {
                    return Err(PoolError::Unavailable(format!(
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
                self.agents
                    .send(&action.node_id, command, self.command_timeout)
                    .await
                    .map_err(|e| PoolError::Unavailable(e.to_string()))?;
                let event = NewEvent::new(
                    now,
                    EventKind::ReconcileDestroyed,
                    format!(
                        "destroyed container {id} on {}: {}",
                        action.node_id, action.reason
                    ),
                )
                .with_subject(EventSubject {
                    container_id: Some(id.to_string()),
                    node_id: Some(action.node_id.to_string()),
                    ..Default::default()
                });
                self.store.append_event(event).await?;
                Ok(Outcome::Done)
            }
            ActionKind::Adopt { observed } => {
                self.adopt(observed, &action.node_id, &action.reason, now)
                    .await
            }
            ActionKind::Resume { container_id } => {
                let running = self.running(&action.node_id, container_id);
                self.pools
                    .resume(container_id, running, &action.reason)
                    .await
                    .map(Outcome::of_changed)
            }
        }
    }

    /// Whether `node`'s report shows `container` running.
    fn running(&self, node: &NodeId, container: &boilerhouse_core::ContainerId) -> bool {
        self.agents.report(node).is_some_and(|r| {
            r.containers
                .values()
                .any(|o| o.container_id() == Some(*container) && o.is_running())
        })
    }

    /// A managed container with no row: take it in. Who it served comes
    /// from its state file and from the claims table, whichever says more,
    /// so a used container whose state file was lost or never written is
    /// still never offered to another tenant.
    async fn adopt(
        &self,
        o: &ObservedContainer,
        node: &NodeId,
        reason: &str,
        now: Timestamp,
    ) -> Result<Outcome, PoolError> {
        let (Some(id), Some(workload_id)) = (o.container_id(), o.workload_id()) else {
            return Err(PoolError::Unavailable(
                "adoption needs valid container and workload labels".into(),
            ));
        };
        let workload = self.pools.workload_record(&workload_id).await?;
        let state = o.state_file.clone().unwrap_or_default();
        let created_at = o
            .labels
            .get(boilerhouse_core::container::labels::CREATED_AT)
            .and_then(|t| t.parse::<i64>().ok())
            .map(Timestamp::from_millis)
            .unwrap_or(now);
        let state_root = self
            .store
            .get_node(node)
            .await?
            .map(|n| n.state_root)
            .unwrap_or_default();
        let mut record = Pools::new_container(
            &workload.spec,
            &workload.spec_hash,
            id,
            (node.clone(), state_root),
            created_at,
        );
        record.docker_id = Some(o.docker_id.clone());
        // The row's limits are the workload's (its spec hash, which names
        // them, matched to get here), never what the container runs with:
        // limits above them are a boost, and a boost the database does not
        // hold would otherwise become the container's base for good.
        let prior = self.store.claim_history(&id).await?;
        let running = o.is_running();
        let adopted = self
            .pools
            .commit_decided(|index| {
                let claim_id = boilerhouse_core::ids::Uuid::now_v7().to_string();
                Ok(decide::adopt(
                    index,
                    record.clone(),
                    running,
                    &state,
                    prior.as_ref().map(|(t, g)| (t, *g)),
                    claim_id,
                    reason,
                    now,
                ))
            })
            .await?;
        if let Some(Some(_claim)) = &adopted
            && let Some(c) = self.pools.container(&id)
        {
            self.pools.write_state_file(&c, now);
        }
        if adopted.is_some()
            && running
            && !limits_match(&o.limits, &record.limits)
            && let Some(c) = self.pools.container(&id)
            // One being drained goes altogether.
            && matches!(c.state, ContainerState::Idle | ContainerState::Claimed)
        {
            self.limits_reverted(&c, &o.limits, now).await?;
        }
        self.pools.refill_notify().notify_one();
        Ok(Outcome::of(adopted))
    }

    /// Says that an adopted container runs with limits the database holds
    /// no boost for. The boost task's enforcement pass (every second) then
    /// sets them back to the workload's: the agents report limits, not the
    /// boosts behind them (who asked, priority, expiry), so a boost cannot
    /// be recorded again from what they say.
    async fn limits_reverted(
        &self,
        record: &ContainerRecord,
        running_with: &Limits,
        now: Timestamp,
    ) -> Result<(), PoolError> {
        let message = format!(
            "container {} on {} runs with {}, not its workload's {}, and the database holds no boost for it (rebuilt or restored): its limits go back to the workload's",
            record.id,
            record.node_id,
            crate::boosts::describe_limits(running_with),
            crate::boosts::describe_limits(&record.limits),
        );
        tracing::warn!(container = %record.id, "{message}");
        let event = NewEvent::new(now, EventKind::ContainerLimitsReverted, message).with_subject(
            EventSubject {
                container_id: Some(record.id.to_string()),
                node_id: Some(record.node_id.to_string()),
                workload_id: Some(record.workload_id.to_string()),
                tenant_id: record.tenant_id.as_ref().map(ToString::to_string),
                ..Default::default()
            },
        );
        self.store.append_event(event).await?;
        Ok(())
    }
}
