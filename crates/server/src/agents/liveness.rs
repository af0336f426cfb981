//! The node liveness task: applies `core::liveness` to every node once a
//! second, persists heartbeats, records each status change as an event,
//! and publishes node loss for the pools.

use std::collections::HashMap;

use futures::future::BoxFuture;

use boilerhouse_core::liveness::{LivenessConfig, NodeLiveness, next_status};
use boilerhouse_core::node::NodeStatus;
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
}

impl BackgroundTask for LivenessTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let now = crate::clock::now();
            let live: HashMap<NodeId, Timestamp> = self.registry.heartbeats().into_iter().collect();
            let fresh: Vec<(NodeId, Timestamp)> = live
                .iter()
                .filter(|(node, at)| self.persisted.get(*node) != Some(*at))
                .map(|(n, t)| (n.clone(), *t))
                .collect();
            self.store.record_heartbeats(fresh.clone()).await?;
            self.persisted.extend(fresh);

            let mut counts = [0u32; 3];
            for node in self.store.list_nodes().await? {
                let last = live
                    .get(&node.id)
                    .copied()
                    .unwrap_or(node.last_heartbeat_at)
                    .max(node.last_heartbeat_at);
                let status = next_status(
                    NodeLiveness {
                        status: node.status,
                        last_heartbeat_at: last,
                    },
                    now,
                    self.started_at,
                    &self.config,
                );
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
            }))
        })
    }
}
