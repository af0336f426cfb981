//! Removing draining containers: the agent's removal, then the row.

use boilerhouse_core::pool::decide;
use boilerhouse_core::pool::{ContainerRecord, ContainerState};
use boilerhouse_proto::pb;

use super::Pools;

impl Pools {
    /// Starts removal of every draining container no operation owns on a
    /// node with an agent; the others wait for theirs (trying each pass
    /// warned 1.3 million times in 30 s while a fleet was away).
    /// Returns how many removals it started and how many draining
    /// containers wait for their node's agent (the refiller's status shows
    /// them: a lost node's draining rows stay until it comes back).
    pub(super) fn remove_draining(&self) -> (usize, usize) {
        let connected = self.inner.agents.connected_nodes();
        let (targets, waiting) = self.read(|index| {
            let mut targets: Vec<ContainerRecord> = Vec::new();
            let mut waiting = 0;
            for c in index.containers_in(ContainerState::Draining) {
                if connected.contains(&c.node_id) {
                    targets.push(c.clone());
                } else {
                    waiting += 1;
                }
            }
            (targets, waiting)
        });
        let mut started = 0;
        for c in targets {
            let Some(busy) = self.take_busy(c.id) else {
                continue;
            };
            started += 1;
            let pools = self.clone();
            tokio::spawn(async move {
                let command = pb::Command {
                    command_id: format!("remove-{}", c.id),
                    generation: 0,
                    command: Some(pb::command::Command::Remove(pb::RemoveContainer {
                        container_id: c.id.to_string(),
                        remove_volumes: true,
                    })),
                };
                let timeout = pools.inner.config.command_timeout;
                match pools.inner.agents.send(&c.node_id, command, timeout).await {
                    Ok(_) => {
                        let now = crate::clock::now();
                        let removed = pools
                            .commit_decided(|index| {
                                Ok(decide::removed(index, &c.id, now).map(|w| (w, ())))
                            })
                            .await;
                        if let Err(e) = removed {
                            tracing::warn!(container = %c.id, error = %e, "removed, but the row is not forgotten yet");
                        }
                        pools.inner.refill.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(container = %c.id, node = %c.node_id, error = %e, "removal not confirmed; will retry")
                    }
                }
                drop(busy);
            });
        }
        (started, waiting)
    }
}
