//! State files, made durable in groups through one log.
//!
//! Every claim and release sends the agent a state file to write, and each
//! must be durable before the agent answers. Written one by one, atomically,
//! that was two fsyncs a file (the temp file, then its directory after the
//! rename): at 1,000 claims/s, 2,000 journal commits a second on the disk
//! the server's WAL often shares, and the WAL's fsyncs waited behind them.
//!
//! Here one thread writes them, in groups: the writes that queue while it
//! works (groups begin at most every [`GROUP_SPACING`]) are appended to
//! one log, `<state-root>/state-files.log`, which is synced once for the
//! group; then each container's file is replaced (temp file and rename,
//! not synced). The log is what is durable, and what a write is judged
//! against (a copy in memory); the files are what reports read. When the
//! agent starts it replays the log over the files, so a file a power cut
//! left stale or torn is put right before the first report. The log is
//! rewritten with only each live container's last state when it has grown
//! ([`Log::compact`]), so it stays about as big as the node's containers.
//!
//! The same thread deletes a removed container's directories, so a write
//! still queued for it can never make them again: a state file is only
//! ever written into a directory that exists.
//!
//! Nothing is lost by the wait: the server keeps each command pending
//! until the agent answers it, and the claim itself is already durable in
//! the server's database; the state file is what survives that database
//! being restored from an older backup.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use boilerhouse_core::ContainerId;
use boilerhouse_core::container::StateFile;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::volumes::VolumeLayout;

mod log;
use log::Log;

/// The shortest time between the starts of two groups.
pub const GROUP_SPACING: Duration = Duration::from_millis(10);

/// At most this many writes share a group.
const GROUP_MAX: usize = 1024;

/// Beside the state file, in its directory, so the rename is atomic.
const TEMP_FILE: &str = ".boilerhouse-state.json.tmp";

/// The agent's state-file writer: a thread that writes what is queued to
/// it in groups. Cheap to clone; the thread ends when the last clone is
/// dropped.
#[derive(Clone)]
pub struct StateFiles {
    queue: mpsc::Sender<Job>,
}

enum Job {
    Write {
        id: ContainerId,
        state: StateFile,
        done: oneshot::Sender<std::io::Result<()>>,
    },
    /// Delete a container's directories.
    Remove {
        id: ContainerId,
        done: oneshot::Sender<std::io::Result<()>>,
    },
}

impl StateFiles {
    /// Replays the log under `layout` over its state files, then starts
    /// the writer. It blocks on the disk: call it off the runtime.
    pub fn start(layout: VolumeLayout) -> std::io::Result<Self> {
        let writer = GroupWriter::open(layout);
        let (queue, jobs) = mpsc::channel();
        std::thread::Builder::new()
            .name("state-files".into())
            .spawn(move || writer.run(&jobs))?;
        Ok(Self { queue })
    }

    /// Writes `state` as the state file of `id` and returns once it is
    /// durable (or was skipped as older than the file). The container's
    /// directory must exist.
    pub async fn write(&self, id: ContainerId, state: StateFile) -> std::io::Result<()> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Write { id, state, done }, answer).await
    }

    /// Deletes the directories of `id`, after every write queued before.
    pub async fn remove(&self, id: ContainerId) -> std::io::Result<()> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Remove { id, done }, answer).await
    }

    async fn send(
        &self,
        job: Job,
        answer: oneshot::Receiver<std::io::Result<()>>,
    ) -> std::io::Result<()> {
        let stopped = || std::io::Error::other("the state-file writer has stopped");
        self.queue.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Writes groups of state files: the log, then the files.
pub struct GroupWriter {
    layout: VolumeLayout,
    log: Log,
    /// Groups written, for tests.
    groups: u64,
}

impl GroupWriter {
    /// Opens the log under `layout`, replays it over the state files and
    /// compacts it. Never fails: what goes wrong is logged, and the writes
    /// fail until the log can be written.
    pub fn open(layout: VolumeLayout) -> Self {
        let log = Log::open(&layout);
        Self {
            layout,
            log,
            groups: 0,
        }
    }

    fn run(mut self, jobs: &mpsc::Receiver<Job>) {
        // A writer that panicked would fail every write while the agent
        // looked healthy; a restart replays the log and starts it again.
        struct AbortOnPanic;
        impl Drop for AbortOnPanic {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    eprintln!("boilerhouse-agent: the state-file writer panicked; aborting");
                    std::process::abort();
                }
            }
        }
        let _abort = AbortOnPanic;
        let mut last_start: Option<Instant> = None;
        let mut next = None;
        while let Some(first) = next.take().or_else(|| jobs.recv().ok()) {
            if let Job::Remove { id, done } = first {
                let _ = done.send(self.remove(&id));
                continue;
            }
            // A deliberate pause, not a wait for a condition: it is what
            // lets the writes of the next few milliseconds share a sync.
            if let Some(wait) =
                last_start.and_then(|s| (s + GROUP_SPACING).checked_duration_since(Instant::now()))
            {
                std::thread::sleep(wait);
            }
            last_start = Some(Instant::now());
            let mut group = vec![first];
            // A removal ends the group: it goes after the writes before it.
            while group.len() < GROUP_MAX {
                match jobs.try_recv() {
                    Ok(remove @ Job::Remove { .. }) => {
                        next = Some(remove);
                        break;
                    }
                    Ok(write) => group.push(write),
                    Err(_) => break,
                }
            }
            let writes: Vec<(ContainerId, &StateFile)> = group
                .iter()
                .filter_map(|job| match job {
                    Job::Write { id, state, .. } => Some((*id, state)),
                    Job::Remove { .. } => None,
                })
                .collect();
            let results = self.write_group(&writes);
            for (job, result) in group.into_iter().zip(results) {
                if let Job::Write { done, .. } = job {
                    let _ = done.send(result);
                }
            }
        }
    }

    /// Writes a group of state files, all durable together, and returns
    /// one result per write, in order. Writes for one container apply in
    /// order, and a write older than the file (commands resent after a
    /// reconnect may arrive out of order) is skipped: the file only moves
    /// forward.
    pub fn write_group(
        &mut self,
        writes: &[(ContainerId, &StateFile)],
    ) -> Vec<std::io::Result<()>> {
        self.groups += 1;
        // Each container's file after the group, and which writes it answers.
        let mut files: Vec<File> = Vec::new();
        let mut by_container: HashMap<ContainerId, usize> = HashMap::new();
        for (index, (id, incoming)) in writes.iter().enumerate() {
            let file = *by_container.entry(*id).or_insert_with(|| {
                files.push(File {
                    id: *id,
                    state: self.log.current(&self.layout, id),
                    changed: false,
                    answers: Vec::new(),
                    outcome: Ok(()),
                });
                files.len() - 1
            });
            let file = &mut files[file];
            file.answers.push(index);
            if file
                .state
                .as_ref()
                .is_some_and(|current| supersedes(current, incoming))
            {
                tracing::debug!(container = %id, "state file already newer; write skipped");
                continue;
            }
            file.state = Some((*incoming).clone());
            file.changed = true;
        }
        // Into a directory that exists only: a removed container's is
        // never made again.
        for file in files.iter_mut().filter(|f| f.changed) {
            if !self.layout.container_dir(&file.id).is_dir() {
                file.outcome = Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the container's directory is gone (removed, or never prepared)",
                ));
            }
        }

        let changed: Vec<(ContainerId, &StateFile)> = files
            .iter()
            .filter(|f| f.changed && f.outcome.is_ok())
            .filter_map(|f| Some((f.id, f.state.as_ref()?)))
            .collect();
        if !changed.is_empty() {
            match self.log.append(&self.layout, &changed) {
                // Logged is durable: a file that cannot be replaced now
                // fails its writes, and a resend (the server's) or the
                // next start puts it right.
                Ok(()) => {
                    for file in files.iter_mut().filter(|f| f.changed && f.outcome.is_ok()) {
                        if let Some(state) = &file.state {
                            file.outcome = replace_file(&self.layout, &file.id, state);
                        }
                    }
                }
                Err(e) => {
                    for file in files.iter_mut().filter(|f| f.changed && f.outcome.is_ok()) {
                        file.outcome = Err(copy_error(&e));
                    }
                }
            }
            self.log.compact_if_due(&self.layout);
        }

        let mut results: Vec<Option<std::io::Result<()>>> = writes.iter().map(|_| None).collect();
        for file in files {
            for index in file.answers {
                results[index] = Some(file.outcome.as_ref().map_err(copy_error).copied());
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every write belongs to one file"))
            .collect()
    }

    /// Deletes the directories of `id` and forgets its state.
    fn remove(&mut self, id: &ContainerId) -> std::io::Result<()> {
        self.log.forget(id);
        self.layout.remove(id)
    }
}

fn copy_error(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

/// One container's state file within a group.
struct File {
    id: ContainerId,
    /// What the file holds after the group (before it, if no write of the
    /// group is newer).
    state: Option<StateFile>,
    /// A write of the group changed it (then `state` is that write).
    changed: bool,
    /// The group's writes to it, by index.
    answers: Vec<usize>,
    outcome: std::io::Result<()>,
}

/// One line of the log.
#[derive(Serialize, Deserialize)]
struct Record {
    container: ContainerId,
    state: StateFile,
}

/// Replaces the state file of `id` with `state`, atomically but not
/// durably (the log is what is durable): a reader sees the old file or
/// the new one.
fn replace_file(layout: &VolumeLayout, id: &ContainerId, state: &StateFile) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let temp = layout.container_dir(id).join(TEMP_FILE);
    std::fs::File::create(&temp)?.write_all(&bytes)?;
    std::fs::rename(&temp, layout.state_file(id))
}

/// The state file of `id`; `None` when missing or unreadable (a report
/// must not fail because one file is damaged).
pub fn read_state(layout: &VolumeLayout, id: &ContainerId) -> Option<StateFile> {
    let path = layout.state_file(id);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(state) => Some(state),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable state file");
            None
        }
    }
}

/// Whether the state file `on_disk` is newer than `incoming`: a later
/// claim generation, or, within one generation, the release after the
/// claim.
fn supersedes(on_disk: &StateFile, incoming: &StateFile) -> bool {
    if on_disk.claim_generation != incoming.claim_generation {
        return on_disk.claim_generation > incoming.claim_generation;
    }
    let released = on_disk.tenant_id.is_none() && on_disk.last_tenant_id.is_some();
    released && incoming.tenant_id.is_some() && incoming.tenant_id == on_disk.last_tenant_id
}

#[cfg(test)]
mod tests;
