//! The node liveness task: applies `core::liveness` to every node once a
//! second, persists heartbeats, records each status change as an event,
//! and publishes node loss for the pools.

use std::collections::{HashMap, HashSet};

use futures::future::BoxFuture;

use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_core::liveness::{LivenessConfig, NodeLiveness, losses_allowed, next_status};
use boilerhouse_core::node::{Node, NodeStatus};
use boilerhouse_core::{NodeId, Timestamp};

use super::Registry;
use crate::store::Store;
use crate::tasks::BackgroundTask;

/// The liveness background task.
pub struct LivenessTask {
    /// The database.
    pub store: Store,
    /// Live sessions.
    pub registry: Registry,
    /// Windows.
    pub config: LivenessConfig,
    /// When this server process started.
    pub started_at: Timestamp,
    /// Heartbeats already written, so unchanged ones cost nothing.
    pub persisted: HashMap<NodeId, Timestamp>,
    /// Whether losses are being held back (too much of the fleet is
    /// silent at once), so the event is recorded once per episode.
    pub holding: bool,
    /// When the last hold ended. Silence is measured from it, as from a
    /// restart: as a partition heals, agents reconnect one by one (each
    /// after its own backoff), and the first to return must not make the
    /// rest Lost in the next second.
    pub hold_ended_at: Timestamp,
    /// The nodes silent during the current hold.
    pub held: HashSet<NodeId>,
    /// Nodes held in the last hold, and until when they are spared: a
    /// node may be heard once as the partition heals (its old connection's
    /// queued heartbeat) and go quiet again while its agent reconnects.
    pub spared: HashMap<NodeId, Timestamp>,
}

impl BackgroundTask for LivenessTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(self.step(crate::clock::now()))
    }
}

impl LivenessTask {
    /// One pass at `now`.
    async fn step(&mut self, now: Timestamp) -> anyhow::Result<serde_json::Value> {
        let live: HashMap<NodeId, Timestamp> = self.registry.heartbeats().into_iter().collect();
        let fresh: Vec<(NodeId, Timestamp)> = live
            .iter()
            .filter(|(node, at)| self.persisted.get(*node) != Some(*at))
            .map(|(n, t)| (n.clone(), *t))
            .collect();
        self.store.record_heartbeats(fresh.clone()).await?;
        self.persisted.extend(fresh);

        let mut counts = [0u32; 3];
        let nodes = self.store.list_nodes().await?;
        self.spared.retain(|_, until| now < *until);
        let mut next = self.evaluate(nodes, &live, now);
        let up: Vec<_> = next
            .iter()
            .filter(|(node, _, _)| node.status != NodeStatus::Lost)
            .collect();
        let silent = up
            .iter()
            .filter(|(_, _, status)| *status != NodeStatus::Ready)
            .count();
        let allowed = losses_allowed(up.len(), silent, &self.config);
        let due = up
            .iter()
            .filter(|(_, _, status)| *status == NodeStatus::Lost)
            .count();
        let up_count = up.len();
        if !allowed {
            for (node, _, status) in &mut next {
                if node.status == NodeStatus::Lost {
                    continue;
                }
                if *status == NodeStatus::Lost {
                    *status = NodeStatus::Suspect;
                }
                // Every silent node, not only those due: one spared by
                // an earlier hold, or not yet silent long enough, is as
                // much on its way back when this one ends.
                if *status != NodeStatus::Ready {
                    self.held.insert(node.id.clone());
                }
            }
        }
        if !allowed && due > 0 && !self.holding {
            let message = format!(
                "{silent} of {up_count} nodes went silent together: more than the partition_threshold ({}), so none is declared lost (this server may be the one cut off); their claims are kept until they return",
                self.config.partition_threshold
            );
            tracing::error!(silent, up = up_count, "{message}");
            // Before the event: if recording it fails, the hold has still
            // begun, and must end (moving the floor) when enough return.
            self.holding = true;
            self.store
                .append_event(NewEvent::new(now, EventKind::NodeLossHeld, message))
                .await?;
        } else if allowed && self.holding {
            self.holding = false;
            self.hold_ended_at = now;
            let until = now.saturating_add(self.config.restart_grace);
            for node in std::mem::take(&mut self.held) {
                self.spared.insert(node, until);
            }
            // Again, with the floor moved to now: the first node back ends
            // the hold, and the others, still on their way, must not be
            // Lost in the very pass that ends it.
            let nodes = next.into_iter().map(|(node, _, _)| node).collect();
            next = self.evaluate(nodes, &live, now);
        }
        for (node, last, status) in next {
            if status != node.status {
                let silent = now.saturating_since(last);
                let reason = match status {
                    NodeStatus::Ready => "heartbeats resumed".to_owned(),
                    _ => format!("no heartbeat for {}s", silent.as_secs()),
                };
                tracing::warn!(node = %node.id, from = %node.status, to = %status, %reason, "node liveness changed");
                self.store
                    .set_node_status(node.id.clone(), status, reason.clone(), now)
                    .await?;
                if status == NodeStatus::Lost {
                    // The pools end the node's claims; they also find
                    // lost nodes on their own, so a missed signal (or
                    // a crash right here) only delays that.
                    self.registry.publish(super::NodeSignal::NodeLost {
                        node: node.id.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            counts[match status {
                NodeStatus::Ready => 0,
                NodeStatus::Suspect => 1,
                NodeStatus::Lost => 2,
            }] += 1;
        }
        Ok(serde_json::json!({
            "ready": counts[0],
            "suspect": counts[1],
            "lost": counts[2],
            "connected": live.len(),
            "losses_held": !allowed,
        }))
    }

    /// Each node, its last heartbeat, and the status it should have now.
    fn evaluate(
        &self,
        nodes: Vec<Node>,
        live: &HashMap<NodeId, Timestamp>,
        now: Timestamp,
    ) -> Vec<(Node, Timestamp, NodeStatus)> {
        let floor = self.started_at.max(self.hold_ended_at);
        nodes
            .into_iter()
            .map(|node| {
                let last = live
                    .get(&node.id)
                    .copied()
                    .unwrap_or(node.last_heartbeat_at)
                    .max(node.last_heartbeat_at);
                let status = next_status(
                    NodeLiveness {
                        status: node.status,
                        last_heartbeat_at: last,
                        spared_until: self.spared.get(&node.id).copied(),
                    },
                    now,
                    floor,
                    &self.config,
                );
                (node, last, status)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
