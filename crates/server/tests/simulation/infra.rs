//! What happens around the claims: pool reconfiguration, the refiller,
//! removals, node loss and return, engine destroys, reports, state-file
//! delivery and reconciliation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use boilerhouse_core::pool::decide::{self, DrainScope};
use boilerhouse_core::pool::{ContainerRecord, ContainerState};
use boilerhouse_core::reconcile::{ActionKind, Desired, Evidence, PlanConfig, plan};
use boilerhouse_core::{ContainerId, NodeId};
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::world::{CREATION_GRACE, Intent, LOST_GRACE, World};

impl World {
    /// Scale, drain or restore a pool; remove or re-add a workload, or
    /// change its spec.
    pub async fn reconfigure(&mut self) {
        let id = self.pick_workload();
        let roll = self.rng.random_range(0..5);
        let max = self.rng.random_range(1..=4);
        let w = self.workloads.get_mut(&id).unwrap();
        match roll {
            0 => {
                w.max = max;
                w.min = w.min.min(max);
                w.drained = false;
            }
            1 => w.drained = !w.drained,
            2 => w.configured = !w.configured,
            3 => w.hash = format!("h{}", w.hash.len()),
            _ => w.reuse = !w.reuse,
        }
        let w = w.clone();
        self.note(format!("reconfigure {w:?}"));
    }

    /// The refiller: drains idle containers of drained or removed pools,
    /// promotes ready ones, removes draining ones, fills to min_size.
    pub async fn refill(&mut self) {
        let now = self.now;
        let workloads = self.workloads.clone();
        let orphans: Vec<ContainerId> = self.read(|i| {
            i.containers()
                .filter(|c| matches!(c.state, ContainerState::Idle | ContainerState::Warming))
                .filter(|c| {
                    workloads
                        .get(&c.workload_id)
                        .is_none_or(|w| !w.configured || w.drained)
                })
                .map(|c| c.id)
                .collect()
        });
        for id in orphans {
            if self.warming_for.contains_key(&id) {
                continue;
            }
            if let Ok(Some(w)) =
                self.read(|i| decide::drain(i, &id, DrainScope::Unowned, "pool drained", now))
            {
                self.submit(w, Intent::Other("drain orphan")).await;
            }
        }
        // Promote: warming, created, reported running, owned by no claim.
        let ready: Vec<ContainerId> = self.read(|i| {
            i.containers()
                .filter(|c| c.state == ContainerState::Warming && c.docker_id.is_some())
                .map(|c| c.id)
                .collect()
        });
        for id in ready {
            if self.warming_for.contains_key(&id) {
                continue;
            }
            if let Some(w) = self.read(|i| decide::promote(i, &id, now)) {
                self.submit(w, Intent::Other("promote")).await;
            }
        }
        // Creates that were committed but never made (lost with a
        // restart): made now, as the refiller resends them.
        let unmade: Vec<ContainerRecord> = self.read(|i| {
            i.containers()
                .filter(|c| c.state == ContainerState::Warming && c.docker_id.is_none())
                .cloned()
                .collect()
        });
        for c in unmade {
            if self.warming_for.contains_key(&c.id)
                || !self.live(&c.node_id)
                || self.rng.random_bool(0.5)
            {
                continue;
            }
            let docker_id = match self.hosts[&c.node_id].containers.get(&c.id) {
                Some(h) => h.docker_id.clone(),
                None => self.host_create(&c),
            };
            if let Some(w) = self.read(|i| decide::set_docker_id(i, &c.id, &docker_id, now)) {
                self.submit(w, Intent::Other("create done")).await;
            }
        }
        self.remove_draining().await;
        for w in workloads.values().filter(|w| w.configured && !w.drained) {
            // As the server's refiller: a changed spec is rolled out,
            // current containers first, stale idle ones drained after.
            let counts = self.read(|i| i.counts(&w.id));
            let (stale_idle, stale_warming): (Vec<ContainerId>, u32) = self.read(|i| {
                (
                    i.idle(&w.id)
                        .filter(|c| c.spec_hash != w.hash)
                        .map(|c| c.id)
                        .collect(),
                    i.containers()
                        .filter(|c| {
                            c.workload_id == w.id
                                && c.state == ContainerState::Warming
                                && c.spec_hash != w.hash
                        })
                        .count() as u32,
                )
            });
            let stale = boilerhouse_core::pool::Stale {
                idle: stale_idle.len() as u32,
                warming: stale_warming,
            };
            let (wanted, drain) = boilerhouse_core::pool::roll(&counts, stale, w.min, w.max, 2);
            for id in stale_idle.into_iter().take(drain as usize) {
                if self.warming_for.contains_key(&id) {
                    continue;
                }
                if let Ok(Some(write)) =
                    self.read(|i| decide::drain(i, &id, DrainScope::Unowned, "stale spec", now))
                {
                    self.submit(write, Intent::Other("drain stale")).await;
                }
            }
            for _ in 0..wanted {
                let live: Vec<NodeId> = self
                    .hosts
                    .iter()
                    .filter(|(_, h)| h.up)
                    .map(|(n, _)| n.clone())
                    .collect();
                let Some(node) = live.choose(&mut self.rng).cloned() else {
                    break;
                };
                let row = self.new_row(&w.id, &node);
                if self.commit(decide::insert(row.clone())).await.is_err() || self.skip(0.3) {
                    // The create is lost (a restart, a dropped session):
                    // the row stays warming until it is resent.
                    continue;
                }
                let docker_id = self.host_create(&row);
                if let Some(w) = self.read(|i| decide::set_docker_id(i, &row.id, &docker_id, now)) {
                    self.submit(w, Intent::Other("create done")).await;
                }
            }
        }
    }

    /// The engine reports a warming container unhealthy: the refiller
    /// drains it (and backs its pool off), as the server does.
    pub async fn unhealthy(&mut self) {
        let now = self.now;
        let warming: Vec<ContainerId> = self.read(|i| {
            i.containers()
                .filter(|c| c.state == ContainerState::Warming && c.docker_id.is_some())
                .map(|c| c.id)
                .collect()
        });
        let Some(id) = warming.choose(&mut self.rng).copied() else {
            return;
        };
        if self.warming_for.contains_key(&id) {
            return;
        }
        self.note(format!("unhealthy {id}"));
        if let Ok(Some(w)) =
            self.read(|i| decide::drain(i, &id, DrainScope::Unowned, "never became healthy", now))
        {
            self.submit(w, Intent::Other("drain unhealthy")).await;
        }
    }

    /// Removes draining containers from live hosts, then forgets the rows.
    pub async fn remove_draining(&mut self) {
        let now = self.now;
        let draining: Vec<ContainerRecord> = self.read(|i| {
            i.containers()
                .filter(|c| c.state == ContainerState::Draining)
                .cloned()
                .collect()
        });
        for c in draining {
            if !self.live(&c.node_id) || self.skip(0.3) {
                continue;
            }
            self.hosts
                .get_mut(&c.node_id)
                .unwrap()
                .containers
                .remove(&c.id);
            if let Some(w) = self.read(|i| decide::removed(i, &c.id, now)) {
                self.submit(w, Intent::Other("removed")).await;
            }
        }
    }

    /// A node's agent stops heartbeating (the host keeps running), or
    /// comes back with a fresh report.
    pub async fn flip_node(&mut self) {
        let node = self.pick_node();
        let host = self.hosts.get_mut(&node).unwrap();
        host.up = !host.up;
        if host.up {
            // Sometimes the host rebooted meanwhile: its containers are
            // there but stopped.
            if self.rng.random_bool(0.2) {
                let host = self.hosts.get_mut(&node).unwrap();
                for c in host.containers.values_mut() {
                    c.running = false;
                }
                self.note(format!("node {node} rebooted"));
            }
            self.note(format!("node {node} is back"));
            self.report(&node, false);
        } else {
            host.report = None;
            self.note(format!("node {node} lost"));
            self.stats.node_losses += 1;
            let now = self.now;
            // Both `disconnect` policies: claims kept until the node
            // returns, or given up so their tenants claim elsewhere.
            let replace = self.rng.random_bool(0.5);
            self.note(format!(
                "its claims are {}",
                if replace { "given up" } else { "kept" }
            ));
            if let Some(w) = self
                .read(|i| decide::node_lost(i, &node, "no heartbeat", |_| false, |_| replace, now))
            {
                self.submit(w, Intent::Other("node lost")).await;
            }
        }
    }

    /// `docker rm -f` on a host. The agent's destroy event makes the
    /// server act at once, when the node is connected.
    pub async fn engine_destroy(&mut self) {
        let node = self.pick_node();
        let ids: Vec<ContainerId> = self.hosts[&node].containers.keys().copied().collect();
        let Some(id) = ids.choose(&mut self.rng).copied() else {
            return;
        };
        let gone = self
            .hosts
            .get_mut(&node)
            .unwrap()
            .containers
            .remove(&id)
            .unwrap();
        self.note(format!("engine destroyed {id} on {node}"));
        if !self.live(&node) {
            return;
        }
        let now = self.now;
        let decided = self.read(|i| {
            let c = i
                .container(&id)
                .filter(|c| c.docker_id.as_deref() == Some(gone.docker_id.as_str()))?;
            if c.state == ContainerState::Draining {
                decide::removed(i, &id, now)
            } else {
                decide::destroyed(i, &id, "engine destroyed it", now)
            }
        });
        if let Some(w) = decided {
            self.submit(w, Intent::Other("container gone")).await;
        }
    }

    /// A connected agent sends a full report: up to date, or missing a
    /// container the engine did not list this time.
    pub fn send_report(&mut self) {
        let node = self.pick_node();
        if self.live(&node) {
            let omit = self.rng.random_bool(0.2);
            self.report(&node, omit);
        }
    }

    pub fn deliver(&mut self) {
        let node = self.pick_node();
        if self.live(&node) {
            let n = self.rng.random_range(1..=3);
            self.deliver_state_files(&node, n);
        }
    }

    /// Reconciliation: the planner on the index and the reports, each due
    /// action decided on the current state.
    pub async fn reconcile(&mut self) {
        let now = self.now;
        let workloads = self
            .workloads
            .values()
            .filter(|w| w.configured)
            .map(|w| (w.id.clone(), w.hash.clone()))
            .collect();
        // Half the passes cover some nodes only, as the server's pass over
        // nodes whose first report is waiting does (never while settling,
        // which needs every node covered).
        let scope: Option<BTreeSet<NodeId>> =
            if self.scoped_passes && !self.settling && self.scope_rng.random_bool(0.5) {
                let nodes: Vec<NodeId> = self.hosts.keys().cloned().collect();
                let scope: BTreeSet<NodeId> = nodes
                    .into_iter()
                    .filter(|_| self.scope_rng.random_bool(0.5))
                    .collect();
                self.note(format!("reconcile pass over {scope:?}"));
                Some(scope)
            } else {
                None
            };
        let mut desired = self.read(|i| Desired::gather(i, workloads, scope.as_ref()));
        let observed: BTreeMap<NodeId, Evidence> = self
            .hosts
            .iter()
            .map(|(n, h)| {
                let e = match (&h.report, h.up) {
                    (Some((at, containers)), true) => Evidence::Known {
                        observed_at: *at,
                        containers: containers.iter().cloned().map(Arc::new).collect(),
                    },
                    _ => Evidence::Unknown,
                };
                (n.clone(), e)
            })
            .collect();
        self.read(|i| desired.find_rows_elsewhere(i, &observed));
        let config = PlanConfig {
            lost_grace: LOST_GRACE,
            creation_grace: CREATION_GRACE,
        };
        for action in plan(&desired, &observed, now, &config)
            .into_iter()
            .filter(|a| a.is_due(now))
        {
            self.note(format!(
                "reconcile {:?} on {}: {}",
                action.container_id(),
                action.node_id,
                action.reason
            ));
            let claim_id = self.uuid().to_string();
            let decided = match &action.kind {
                ActionKind::MarkLost { container_id } => {
                    self.read(|i| decide::mark_lost(i, container_id, &action.reason, now))
                }
                ActionKind::Reclaim {
                    container_id,
                    state,
                } => {
                    let running =
                        self.hosts[&action.node_id]
                            .report
                            .as_ref()
                            .is_some_and(|(_, seen)| {
                                seen.iter().any(|o| {
                                    o.container_id() == Some(*container_id) && o.is_running()
                                })
                            });
                    self.read(|i| {
                        decide::reclaim(
                            i,
                            container_id,
                            state,
                            running,
                            claim_id,
                            &action.reason,
                            now,
                        )
                    })
                    .map(|(w, _)| w)
                }
                ActionKind::Drain { container_id } => self
                    .read(|i| {
                        decide::drain(i, container_id, DrainScope::Unclaimed, &action.reason, now)
                    })
                    .ok()
                    .flatten(),
                ActionKind::Resume { container_id } => {
                    self.stats.resumes += 1;
                    let running =
                        self.hosts[&action.node_id]
                            .report
                            .as_ref()
                            .is_some_and(|(_, seen)| {
                                seen.iter().any(|o| {
                                    o.container_id() == Some(*container_id) && o.is_running()
                                })
                            });
                    self.read(|i| {
                        decide::resume(i, container_id, running, &action.reason, claim_id, now)
                    })
                    .map(|(w, _)| w)
                }
                ActionKind::Destroy { container_id, .. } => {
                    if let Some(id) = container_id {
                        self.hosts
                            .get_mut(&action.node_id)
                            .unwrap()
                            .containers
                            .remove(id);
                    }
                    None
                }
                ActionKind::Adopt { observed } => {
                    self.stats.adoptions += 1;
                    let id = observed.container_id().unwrap();
                    let prior = self.store.claim_history(&id).await.expect("claim history");
                    let wl = observed.workload_id().unwrap();
                    let mut row = self.new_row(&wl, &action.node_id);
                    row.id = id;
                    row.docker_id = Some(observed.docker_id.clone());
                    row.spec_hash =
                        observed.labels[boilerhouse_core::container::labels::SPEC_HASH].to_owned();
                    let state = observed.state_file.clone().unwrap_or_default();
                    self.read(|i| {
                        decide::adopt(
                            i,
                            row,
                            observed.is_running(),
                            &state,
                            prior.as_ref().map(|(t, g)| (t, *g)),
                            claim_id,
                            &action.reason,
                            now,
                        )
                    })
                    .map(|(w, _)| w)
                }
            };
            if let Some(w) = decided {
                self.submit(w, Intent::Other("reconcile")).await;
            }
        }
    }
}
