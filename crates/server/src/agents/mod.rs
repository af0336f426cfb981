//! Agent sessions: who is connected, what each node last reported, and the
//! commands in flight to each node.
//!
//! Pending commands belong to the node, not to the session: when an agent
//! reconnects, everything it has not acknowledged is sent again. The agent
//! answers a command id it already handled from memory, and every command
//! is idempotent, so a resend never acts twice. State files go their own
//! way, in batches per node (`state_files`).

pub mod liveness;
mod report;
pub mod service;
mod state_files;
pub use report::ReportedContainers;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use boilerhouse_core::container::{ContainerEvent, ContainerEventKind, ObservedContainer};
use boilerhouse_core::node::Resources;
use boilerhouse_core::{ContainerId, NodeId, Timestamp};
use boilerhouse_proto::pb;

/// The outbound half of a session. Boxed: a channel allocates its slots
/// in blocks of 32 whatever it holds, and a message inline made each
/// session's first block 18 KB, 18 MB for 1,000 idle agents.
pub(crate) type Outbound = mpsc::Sender<Box<pb::ConnectResponse>>;

/// What the server knows of one node's containers, from its agent.
#[derive(Debug, Clone, Default)]
pub struct NodeReport {
    /// When the last full report was taken; None until the first one.
    pub observed_at: Option<Timestamp>,
    /// The `observed_at` of the last report a reconciliation pass planned
    /// on: until there is one, what the node runs is not in the index
    /// (adoption has not happened) and the refiller must not count.
    pub reconciled_at: Option<Timestamp>,
    /// The containers, by Docker id, kept current by incremental events;
    /// each shared with the reconciliation passes that plan on it.
    pub containers: ReportedContainers,
}

struct Session {
    session_id: String,
    outbound: Outbound,
    cancel: CancellationToken,
    last_heartbeat: Timestamp,
    usage: Resources,
    container_count: u32,
    /// When this session began.
    attached: std::time::Instant,
    /// Its agent takes many state files in one command.
    state_file_batches: bool,
}

/// How long the refiller waits for a new session's first reconciled
/// report before it counts without it: a node that never reports must not
/// stop every pool from filling.
const FIRST_REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

struct PendingCommand {
    command: pb::Command,
    reply: Option<oneshot::Sender<pb::CommandResult>>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<NodeId, Session>,
    /// Shared with readers (reconciliation, boost enforcement) without a
    /// copy; a change while one is read copies it (`Arc::make_mut`).
    reports: HashMap<NodeId, Arc<NodeReport>>,
    pending: HashMap<NodeId, BTreeMap<String, PendingCommand>>,
    /// Nodes attached since their last reconciled report, a superset of
    /// what [`Registry::unreconciled`] answers: every claim asks, and
    /// asking the whole fleet each time cost a pass over every session.
    awaiting: std::collections::HashSet<NodeId>,
    /// State files not yet acknowledged, by node; kept across sessions.
    state_files: HashMap<NodeId, state_files::StateFileQueue>,
}

/// Why a command could not be delivered or answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No agent session for the node.
    #[error("node {0} has no connected agent")]
    NotConnected(NodeId),
    /// No result in time; the command stays pending and is resent on
    /// reconnect.
    #[error("node {0} did not answer within {1:?}")]
    Timeout(NodeId, Duration),
    /// The agent ran it and it failed.
    #[error("{0}")]
    Failed(String),
}

/// What agent sessions and node liveness tell the rest of the server.
/// They publish; whoever cares subscribes. The agents module sits below
/// the pools and never calls into them.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeSignal {
    /// Files changed in a container's state directory: tenant activity.
    Activity {
        /// The node whose agent saw it: the activity counts only if the
        /// container is that node's.
        node: NodeId,
        /// The container.
        container: ContainerId,
        /// When.
        at: Timestamp,
    },
    /// The engine destroyed a container that a node's agent watches: the
    /// engine's word is evidence enough to act at once.
    ContainerGone {
        /// The node.
        node: NodeId,
        /// Docker's id.
        docker_id: String,
        /// Its container id label, when valid.
        container: Option<ContainerId>,
    },
    /// A node was declared lost.
    NodeLost {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
}

/// Live agent sessions and their nodes' reports.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    on_change: Arc<tokio::sync::Notify>,
    /// Wakes whoever waits for a report to change (a cold start waiting
    /// for its container to be ready).
    reports_changed: Arc<tokio::sync::Notify>,
    /// Wakes the reconciler when a node's first report arrives, so the
    /// node's containers are adopted before the refiller counts.
    first_report: Arc<tokio::sync::Notify>,
    signals: broadcast::Sender<NodeSignal>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            on_change: Arc::default(),
            reports_changed: Arc::default(),
            first_report: Arc::default(),
            // Signals are hints: a subscriber that falls behind by this
            // many loses the oldest, and its periodic pass covers them.
            signals: broadcast::channel(4096).0,
        }
    }
}

/// What an agent said, in its Hello, that it takes beyond the oldest
/// agents' protocol. The default is none of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentFeatures {
    /// `WriteStateFiles`, many state files in one command.
    pub state_file_batches: bool,
}

/// A live session's view, for NodeService and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// Its id.
    pub session_id: String,
    /// Last heartbeat received.
    pub last_heartbeat: Timestamp,
    /// Reported usage.
    pub usage: Resources,
    /// Running containers.
    pub container_count: u32,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells subscribers. Nobody listening is fine.
    pub fn publish(&self, signal: NodeSignal) {
        let _ = self.signals.send(signal);
    }

    /// Every signal from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeSignal> {
        self.signals.subscribe()
    }

    /// Registers a new session for `node`, replacing (and ending) any
    /// older one, and resends the node's unacknowledged commands.
    pub fn attach(
        &self,
        node: &NodeId,
        session_id: String,
        outbound: Outbound,
        now: Timestamp,
    ) -> CancellationToken {
        self.attach_agent(node, session_id, outbound, now, AgentFeatures::default())
    }

    /// [`Registry::attach`], for an agent that has said what it takes.
    pub fn attach_agent(
        &self,
        node: &NodeId,
        session_id: String,
        outbound: Outbound,
        now: Timestamp,
        features: AgentFeatures,
    ) -> CancellationToken {
        let cancel = CancellationToken::new();
        let mut inner = self.lock();
        let pending: Vec<pb::Command> = inner
            .pending
            .get(node)
            .map(|p| p.values().map(|c| c.command.clone()).collect())
            .unwrap_or_default();
        for command in pending {
            let message = pb::ConnectResponse {
                message: Some(pb::connect_response::Message::Command(command)),
            };
            // A full buffer on a fresh session means the agent is not
            // reading; the command stays pending for the next session.
            let _ = outbound.try_send(Box::new(message));
        }
        // The last session's report describes the past (the node may have
        // rebooted, or been cut off, since): a new session has no
        // evidence until its own first full report.
        inner.reports.remove(node);
        inner.awaiting.insert(node.clone());
        let old = inner.sessions.insert(
            node.clone(),
            Session {
                session_id,
                outbound,
                cancel: cancel.clone(),
                last_heartbeat: now,
                usage: Resources::default(),
                container_count: 0,
                attached: std::time::Instant::now(),
                state_file_batches: features.state_file_batches,
            },
        );
        let state_files = inner.resend_state_files(node);
        drop(inner);
        state_files::deliver(state_files);
        if let Some(old) = old {
            tracing::info!(node = %node, old_session = %old.session_id, "a new session replaces the old one");
            old.cancel.cancel();
        }
        self.on_change.notify_waiters();
        cancel
    }

    /// Removes the session if it is still the current one.
    pub fn detach(&self, node: &NodeId, session_id: &str) {
        let mut inner = self.lock();
        if inner
            .sessions
            .get(node)
            .is_some_and(|s| s.session_id == session_id)
        {
            inner.sessions.remove(node);
        }
        drop(inner);
        self.on_change.notify_waiters();
    }

    /// Records a heartbeat.
    pub fn heartbeat(&self, node: &NodeId, at: Timestamp, usage: Resources, container_count: u32) {
        let mut inner = self.lock();
        if let Some(s) = inner.sessions.get_mut(node) {
            s.last_heartbeat = s.last_heartbeat.max(at);
            s.usage = usage;
            s.container_count = container_count;
        }
        let stalled = inner.resend_stalled_state_files(node);
        drop(inner);
        state_files::deliver(stalled);
    }

    /// Replaces a node's report.
    pub fn full_report(
        &self,
        node: &NodeId,
        observed_at: Timestamp,
        containers: Vec<ObservedContainer>,
    ) {
        // Built, and the old report dropped, outside the registry's lock,
        // which every claim takes: a report of 6,000 containers (and a
        // copy of the old one, when a pass still shared it) kept claims
        // waiting for milliseconds every full report (P3's tail).
        let containers: ReportedContainers = containers.into_iter().collect();
        let mut inner = self.lock();
        let slot = inner.reports.entry(node.clone()).or_default();
        let reconciled_at = slot.reconciled_at;
        let old = std::mem::replace(
            slot,
            Arc::new(NodeReport {
                observed_at: Some(observed_at),
                reconciled_at,
                containers,
            }),
        );
        drop(inner);
        drop(old);
        let first = reconciled_at.is_none();
        self.reports_changed.notify_waiters();
        if first {
            self.first_report.notify_one();
        }
    }

    /// Notified when a node with no reconciled report sends one.
    pub fn first_report(&self) -> tokio::sync::futures::Notified<'_> {
        self.first_report.notified()
    }

    /// Records that a reconciliation pass planned on `node`'s report taken
    /// at `observed_at`. Only that report is marked: one that replaced it
    /// meanwhile (a new session's first report above all) was not planned
    /// on, and waits for the next pass.
    pub fn mark_reconciled(&self, node: &NodeId, observed_at: Timestamp) {
        let mut inner = self.lock();
        if let Some(report) = inner
            .reports
            .get_mut(node)
            .filter(|r| r.observed_at == Some(observed_at))
            .map(Arc::make_mut)
        {
            report.reconciled_at = Some(
                report
                    .reconciled_at
                    .map_or(observed_at, |t| t.max(observed_at)),
            );
        }
    }

    /// Connected nodes whose containers no reconciliation pass has seen
    /// yet: the refiller waits for them, or it would create containers
    /// beside ones about to be adopted.
    pub fn unreconciled(&self) -> Vec<NodeId> {
        let mut inner = self.lock();
        let Inner {
            sessions,
            reports,
            awaiting,
            ..
        } = &mut *inner;
        awaiting.retain(|n| {
            sessions
                .get(n)
                .is_some_and(|s| s.attached.elapsed() < FIRST_REPORT_WAIT)
                && reports.get(n).is_none_or(|r| r.reconciled_at.is_none())
        });
        awaiting.iter().cloned().collect()
    }

    /// Notified whenever any node's report changes. Create (and enable)
    /// the future before reading the report, so no change is missed.
    pub fn report_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.reports_changed.notified()
    }

    /// Applies an incremental event to the node's report.
    pub fn container_event(&self, node: &NodeId, event: &ContainerEvent) {
        let mut inner = self.lock();
        let Some(report) = inner.reports.get_mut(node).map(Arc::make_mut) else {
            return;
        };
        match event.kind {
            ContainerEventKind::Destroy => {
                report.containers.remove(&event.docker_id);
            }
            ContainerEventKind::Start => {
                report.containers.update(&event.docker_id, |c| {
                    c.docker_state = "running".into();
                    c.started_at = Some(event.at);
                });
            }
            ContainerEventKind::Die => {
                report.containers.update(&event.docker_id, |c| {
                    c.docker_state = "exited".into();
                    c.exit_code = event.exit_code.unwrap_or(c.exit_code);
                });
            }
            ContainerEventKind::Oom => {
                report.containers.update(&event.docker_id, |c| {
                    c.oom_killed = true;
                });
            }
            ContainerEventKind::Health => {
                report.containers.update(&event.docker_id, |c| {
                    c.health = event.health.clone();
                    c.health_output = event.health_output.clone();
                });
            }
            ContainerEventKind::Activity => return,
        }
        drop(inner);
        self.reports_changed.notify_waiters();
    }

    /// A command result arrived. Returns the docker id of a container the
    /// result describes that is labelled with another node: it is kept out
    /// of this node's report (NodeRestriction), and the caller records it.
    pub fn complete(&self, node: &NodeId, result: pb::CommandResult) -> Option<String> {
        let mut inner = self.lock();
        let next_state_files = inner.state_files_answered(node, &result);
        let done = inner
            .pending
            .get_mut(node)
            .and_then(|p| p.remove(&result.command_id));
        let mut foreign = None;
        // A container the agent says it removed leaves the report now,
        // before its row goes (the caller deletes the row once it hears
        // this): the engine's destroy event can come later, and a reconcile
        // pass in between would find a managed container with no row and
        // adopt it, an unused one back into the pool though it is gone.
        if result.ok
            && let Some(pb::command::Command::Remove(remove)) =
                done.as_ref().and_then(|p| p.command.command.as_ref())
            && let Some(report) = inner.reports.get_mut(node).map(Arc::make_mut)
        {
            // By name, as the agent removes it (`bh-<id>`).
            if let Ok(id) = remove.container_id.parse::<ContainerId>() {
                let name = id.docker_name();
                report.containers.retain(|c| c.name != name);
            }
        }
        // Keep the report current with what the command produced.
        if let Some(container) = result
            .container
            .as_ref()
            .and_then(|c| ObservedContainer::try_from(c).ok())
        {
            if container.node_id() != Some(node.as_str()) {
                foreign = Some(container.docker_id.clone());
            } else if let Some(report) = inner.reports.get_mut(node).map(Arc::make_mut) {
                report.containers.insert(Arc::new(container));
            }
        }
        drop(inner);
        state_files::deliver(next_state_files);
        self.reports_changed.notify_waiters();
        if let Some(PendingCommand {
            reply: Some(reply), ..
        }) = done
        {
            let _ = reply.send(result);
        }
        foreign
    }

    /// Sends `command` to `node` and waits for its result. The command
    /// stays pending across reconnects until answered, even after a timeout.
    pub async fn send(
        &self,
        node: &NodeId,
        command: pb::Command,
        timeout: Duration,
    ) -> Result<pb::CommandResult, CommandError> {
        let answer = self.dispatch(node, command).await?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) if result.ok => Ok(result),
            Ok(Ok(result)) => Err(CommandError::Failed(result.error)),
            Ok(Err(_)) | Err(_) => Err(CommandError::Timeout(node.clone(), timeout)),
        }
    }

    /// Records `command` as pending for `node` and sends it; the receiver
    /// gets the agent's answer.
    async fn dispatch(
        &self,
        node: &NodeId,
        command: pb::Command,
    ) -> Result<oneshot::Receiver<pb::CommandResult>, CommandError> {
        let (reply, answer) = oneshot::channel();
        let outbound = {
            let mut inner = self.lock();
            let Some(session) = inner.sessions.get(node) else {
                return Err(CommandError::NotConnected(node.clone()));
            };
            let outbound = session.outbound.clone();
            inner.pending.entry(node.clone()).or_default().insert(
                command.command_id.clone(),
                PendingCommand {
                    command: command.clone(),
                    reply: Some(reply),
                },
            );
            outbound
        };
        let message = pb::ConnectResponse {
            message: Some(pb::connect_response::Message::Command(command)),
        };
        // A closed session is fine: the command is pending and goes out on
        // reconnect. The sender is dropped here: holding it while waiting
        // would keep the session's stream open after the session ends, and
        // stall shutdown.
        let _ = outbound.send(Box::new(message)).await;
        Ok(answer)
    }

    /// Sends `command` and returns the agent's answer, failed or not.
    /// Unlike [`Registry::send`], a command unanswered within `timeout` is
    /// forgotten, not resent on reconnect: for syncs, a late run of an old
    /// request could move files the caller already gave up on.
    pub async fn send_once(
        &self,
        node: &NodeId,
        command: pb::Command,
        timeout: Duration,
    ) -> Result<pb::CommandResult, CommandError> {
        let id = command.command_id.clone();
        let answer = self.dispatch(node, command).await?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) | Err(_) => {
                if let Some(pending) = self.lock().pending.get_mut(node) {
                    pending.remove(&id);
                }
                Err(CommandError::Timeout(node.clone(), timeout))
            }
        }
    }

    /// The live session of `node`, if any.
    pub fn session(&self, node: &NodeId) -> Option<SessionInfo> {
        self.lock().sessions.get(node).map(|s| SessionInfo {
            session_id: s.session_id.clone(),
            last_heartbeat: s.last_heartbeat,
            usage: s.usage,
            container_count: s.container_count,
        })
    }

    /// Every node with a live session, and its last heartbeat.
    pub fn heartbeats(&self) -> Vec<(NodeId, Timestamp)> {
        self.lock()
            .sessions
            .iter()
            .map(|(n, s)| (n.clone(), s.last_heartbeat))
            .collect()
    }

    /// The nodes with a session now.
    pub fn connected_nodes(&self) -> std::collections::HashSet<NodeId> {
        self.lock().sessions.keys().cloned().collect()
    }

    /// How many agents are connected.
    pub fn connected(&self) -> usize {
        self.lock().sessions.len()
    }

    /// A node's last report.
    pub fn report(&self, node: &NodeId) -> Option<Arc<NodeReport>> {
        self.lock().reports.get(node).cloned()
    }
}

#[cfg(test)]
mod tests;
