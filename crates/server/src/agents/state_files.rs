//! State files on their way to the agents, a node's sent together.
//!
//! Every claim and release rewrites its container's state file on the
//! node (the record that survives the database being restored from an
//! older backup). Sent one command each, that was a task, a message and
//! an answer per claim, on the server and the agent alike: sending none
//! at all gave about a fifth more claims a second at the limit.
//!
//! Here a node's writes queue while its last batch is in flight and go as
//! the next batch when it is answered, so a batch holds what arrived in
//! one round trip, as a group commit holds what arrived in one fsync. At
//! a low rate nothing waits: a write with nothing in flight goes at once.
//! A container queued twice is sent once, with its newer state (the same
//! rule the agent applies, [`StateFile::supersedes`]).
//!
//! Nothing is lost on the way. A write for a node with no session waits
//! for its next one; a session's start sends again what the last one left
//! unanswered, as new commands (so an agent that answers a command id
//! from memory cannot answer for files it never wrote); and a batch left
//! unanswered for `stalled_after` is sent again with the next write or
//! heartbeat. Writes may therefore arrive twice or out of order, which the
//! agent's rule makes harmless. A file the agent answers it could not
//! write (its container removed since, a full disk) is not sent again:
//! the container's next claim or release writes it anew.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boilerhouse_core::container::StateFile;
use boilerhouse_core::{ContainerId, NodeId};
use boilerhouse_proto::pb;
use tokio::sync::mpsc::error::TrySendError;

use super::{Inner, Outbound, Registry};

/// At most this many files in one command: a message the size of the
/// largest one stays in the stream's buffers (see `boilerhouse_proto::codec`),
/// and 128 files is about 16 KiB.
pub(super) const BATCH_MAX: usize = 128;

/// One node's state files not yet acknowledged.
#[derive(Debug, Default)]
pub(super) struct StateFileQueue {
    /// Not sent yet, by container.
    waiting: HashMap<ContainerId, StateFile>,
    /// Sent and unanswered, by command id.
    in_flight: HashMap<String, Files>,
    /// When what is in flight was sent.
    sent_at: Option<Instant>,
    /// How long an answer may take before what is in flight goes again.
    stalled_after: Duration,
}

/// The files of one command, shared by the queue (until answered) and
/// whoever encodes the command.
type Files = Arc<[(ContainerId, StateFile)]>;

impl StateFileQueue {
    /// Queues `state` unless what waits for the container is newer.
    fn put(&mut self, container: ContainerId, state: StateFile) {
        match self.waiting.entry(container) {
            std::collections::hash_map::Entry::Occupied(mut queued) => {
                if !queued.get().supersedes(&state) {
                    queued.insert(state);
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(state);
            }
        }
    }

    /// Puts what is in flight back in the queue, under anything queued
    /// since (which is newer), to be sent again as new commands.
    fn take_back(&mut self) {
        let newer = std::mem::take(&mut self.waiting);
        for files in std::mem::take(&mut self.in_flight).into_values() {
            for (container, state) in files.iter() {
                self.put(*container, state.clone());
            }
        }
        for (container, state) in newer {
            self.put(container, state);
        }
        self.sent_at = None;
    }

    /// Whether what is in flight has waited longer than it should.
    fn stalled(&self) -> Option<Duration> {
        self.sent_at
            .map(|at| at.elapsed())
            .filter(|waited| *waited >= self.stalled_after)
    }

    /// How many files wait or are in flight.
    pub(super) fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.values().map(|f| f.len()).sum::<usize>()
    }
}

/// Commands for one session's outbound channel, encoded by
/// [`deliver`] once the registry's lock is released.
pub(super) type Sends = Option<(Outbound, Vec<Outgoing>)>;

/// One state-file command to send.
pub(super) struct Outgoing {
    command_id: String,
    /// A `WriteStateFiles`; else a `WriteStateFile` of its one file.
    batch: bool,
    files: Files,
}

impl Outgoing {
    fn encode(self) -> Box<pb::ConnectResponse> {
        let mut wire = self
            .files
            .iter()
            .map(|(container, state)| pb::WriteStateFile {
                container_id: container.to_string(),
                state: Some(pb::ContainerStateFile::from(state)),
            });
        let command = match self.batch {
            true => pb::command::Command::WriteStateFiles(pb::WriteStateFiles {
                files: wire.collect(),
            }),
            false => pb::command::Command::WriteStateFile(
                wire.next().expect("a command's files are never empty"),
            ),
        };
        Box::new(pb::ConnectResponse {
            message: Some(pb::connect_response::Message::Command(pb::Command {
                command_id: self.command_id,
                generation: self
                    .files
                    .iter()
                    .map(|(_, s)| s.claim_generation)
                    .max()
                    .unwrap_or(0),
                command: Some(command),
            })),
        })
    }
}

impl Inner {
    /// Sends what waits for `node`, when it has a session: in batches if
    /// its agent takes them, else a command per file as older agents
    /// expect. Call only with nothing in flight.
    pub(super) fn flush_state_files(&mut self, node: &NodeId) -> Sends {
        let session = self.sessions.get(node)?;
        let queue = self.state_files.get_mut(node)?;
        if queue.waiting.is_empty() {
            return None;
        }
        debug_assert!(queue.in_flight.is_empty());
        // Taken, not drained: an idle node keeps no room for its last burst.
        let files: Vec<(ContainerId, StateFile)> =
            std::mem::take(&mut queue.waiting).into_iter().collect();
        let batch = session.state_file_batches;
        let per_command = if batch { BATCH_MAX } else { 1 };
        let mut commands = Vec::with_capacity(files.len().div_ceil(per_command));
        for chunk in files.chunks(per_command) {
            let command_id = format!("state-{}", boilerhouse_core::ids::Uuid::now_v7());
            let files: Files = chunk.into();
            queue.in_flight.insert(command_id.clone(), files.clone());
            commands.push(Outgoing {
                command_id,
                batch,
                files,
            });
        }
        queue.sent_at = Some(Instant::now());
        Some((session.outbound.clone(), commands))
    }

    /// What is in flight to `node` goes again, with what waits, when its
    /// answer is overdue: the heartbeat's check, for a node no write
    /// comes to.
    pub(super) fn resend_stalled_state_files(&mut self, node: &NodeId) -> Sends {
        let queue = self.state_files.get_mut(node)?;
        let waited = queue.stalled()?;
        tracing::warn!(node = %node, ?waited, "state files unanswered; sending them again");
        queue.take_back();
        self.flush_state_files(node)
    }

    /// A new session for `node`: what the last one left unanswered goes
    /// again, with what waits.
    pub(super) fn resend_state_files(&mut self, node: &NodeId) -> Sends {
        self.state_files.get_mut(node)?.take_back();
        self.flush_state_files(node)
    }

    /// `result` answers a state-file command of `node`'s: when it was the
    /// last in flight, what waits goes next.
    pub(super) fn state_files_answered(
        &mut self,
        node: &NodeId,
        result: &pb::CommandResult,
    ) -> Sends {
        let queue = self.state_files.get_mut(node)?;
        let files = queue.in_flight.remove(&result.command_id)?;
        if !result.ok {
            // The agent could not write them (a container removed since,
            // a full disk): the next claim or release of each writes it
            // again; until then the file is behind the database.
            tracing::warn!(node = %node, sent = files.len(), error = %result.error, "state files not written");
        }
        if !queue.in_flight.is_empty() {
            return None;
        }
        queue.sent_at = None;
        self.flush_state_files(node)
    }
}

impl Registry {
    /// Queues `state` as `container`'s state file on `node`, for the
    /// node's next batch (at once when none is in flight). Never waits:
    /// the change it records is already durable and acknowledged. A batch
    /// unanswered for `stalled_after` is sent again with this one.
    pub fn write_state_file(
        &self,
        node: &NodeId,
        container: ContainerId,
        state: StateFile,
        stalled_after: Duration,
    ) {
        let mut inner = self.lock();
        // Looked up before it is made: this runs for every claim, and the
        // entry exists for every node but a new one's first write.
        if !inner.state_files.contains_key(node) {
            inner
                .state_files
                .insert(node.clone(), StateFileQueue::default());
        }
        let queue = inner
            .state_files
            .get_mut(node)
            .expect("the queue was just made if it was missing");
        queue.put(container, state);
        queue.stalled_after = stalled_after;
        let sends = match queue.sent_at {
            None => inner.flush_state_files(node),
            Some(_) => inner.resend_stalled_state_files(node),
        };
        drop(inner);
        deliver(sends);
    }

    /// How many of `node`'s state files are not yet acknowledged.
    pub fn state_files_unacknowledged(&self, node: &NodeId) -> usize {
        self.lock()
            .state_files
            .get(node)
            .map_or(0, StateFileQueue::len)
    }
}

/// Hands `sends` to the session without waiting: a full channel (an agent
/// reading slowly) gets the rest from a task, so neither a claim nor the
/// session's read loop waits on it. A closed one loses nothing: the files
/// stay in flight and the next session sends them again.
pub(super) fn deliver(sends: Sends) {
    let Some((outbound, commands)) = sends else {
        return;
    };
    let mut messages = commands.into_iter().map(Outgoing::encode);
    while let Some(message) = messages.next() {
        match outbound.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) => {
                let rest: Vec<_> = std::iter::once(message).chain(messages).collect();
                tokio::spawn(async move {
                    for message in rest {
                        if outbound.send(message).await.is_err() {
                            break;
                        }
                    }
                });
                return;
            }
            Err(TrySendError::Closed(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests;
