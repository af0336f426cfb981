//! State files on their way to the agents, a node's sent together.
//!
//! Every claim and release rewrites its container's state file on the
//! node (the record that survives the database being restored from an
//! older backup). Sent one command each, that was a task, a message and
//! an answer per claim, on the server and the agent alike: at the limit
//! of claims a second, a fifth of what the machine did.
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
//! unanswered for `stalled_after` is sent again with the next write.
//! Writes may therefore arrive twice or out of order, which the agent's
//! rule makes harmless.

use std::collections::HashMap;
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
    in_flight: HashMap<String, Vec<(ContainerId, StateFile)>>,
    /// When what is in flight was sent.
    sent_at: Option<Instant>,
}

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
        for (container, state) in std::mem::take(&mut self.in_flight).into_values().flatten() {
            self.put(container, state);
        }
        for (container, state) in newer {
            self.put(container, state);
        }
        self.sent_at = None;
    }

    /// How many files wait or are in flight.
    pub(super) fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.values().map(Vec::len).sum::<usize>()
    }
}

/// Messages for one session's outbound channel.
pub(super) type Sends = Option<(Outbound, Vec<Box<pb::ConnectResponse>>)>;

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
        let per_command = if session.state_file_batches {
            BATCH_MAX
        } else {
            1
        };
        let mut messages = Vec::with_capacity(files.len().div_ceil(per_command));
        for chunk in files.chunks(per_command) {
            let wire = chunk.iter().map(|(container, state)| pb::WriteStateFile {
                container_id: container.to_string(),
                state: Some(pb::ContainerStateFile::from(state)),
            });
            let command = match session.state_file_batches {
                true => pb::command::Command::WriteStateFiles(pb::WriteStateFiles {
                    files: wire.collect(),
                }),
                false => pb::command::Command::WriteStateFile(
                    wire.into_iter().next().expect("a chunk is never empty"),
                ),
            };
            let command_id = format!("state-{}", boilerhouse_core::ids::Uuid::now_v7());
            queue.in_flight.insert(command_id.clone(), chunk.to_vec());
            messages.push(Box::new(pb::ConnectResponse {
                message: Some(pb::connect_response::Message::Command(pb::Command {
                    command_id,
                    generation: chunk
                        .iter()
                        .map(|(_, s)| s.claim_generation)
                        .max()
                        .unwrap_or(0),
                    command: Some(command),
                })),
            }));
        }
        queue.sent_at = Some(Instant::now());
        Some((session.outbound.clone(), messages))
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
            tracing::warn!(node = %node, files = files.len(), error = %result.error, "state files not written");
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
        let queue = inner.state_files.entry(node.clone()).or_default();
        queue.put(container, state);
        if let Some(sent_at) = queue.sent_at {
            if sent_at.elapsed() < stalled_after {
                return;
            }
            tracing::warn!(node = %node, after = ?sent_at.elapsed(), "state files unanswered; sending them again");
            queue.take_back();
        }
        let sends = inner.flush_state_files(node);
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
    let Some((outbound, messages)) = sends else {
        return;
    };
    let mut messages = messages.into_iter();
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
