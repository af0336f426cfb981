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
//! left stale or torn is put right before the first report (if the log
//! cannot be read then, writes fail and the replay waits until it can). The log is
//! rewritten with only each live container's last state when it has grown
//! ([`Log::compact`]), so it stays about as big as the node's containers.
//!
//! The same thread takes a removed container's directories away (moved
//! aside, deleted by another thread), so a write still queued for it can
//! never make them again: a state file is only ever written into a
//! directory that exists.
//!
//! Nothing is lost by the wait: the server keeps each node's state files
//! queued until the agent answers for them (sending them again to a new
//! session), and the claim itself is already durable in the server's
//! database; the state file is what survives that database being
//! restored from an older backup.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
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
    layout: VolumeLayout,
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
        let mut writer = GroupWriter::open(layout.clone());
        let (trash, moved) = mpsc::channel();
        let trash_layout = layout.clone();
        std::thread::Builder::new()
            .name("state-files-trash".into())
            .spawn(move || empty_trash(&trash_layout, &moved))?;
        writer.trash = Some(trash);
        let (queue, jobs) = mpsc::channel();
        std::thread::Builder::new()
            .name("state-files".into())
            .spawn(move || writer.run(&jobs))?;
        Ok(Self { queue, layout })
    }

    /// [`StateFiles::start`], on the runtime's blocking threads.
    pub async fn spawn(layout: VolumeLayout) -> std::io::Result<Self> {
        tokio::task::spawn_blocking(move || Self::start(layout))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Where its state files are.
    pub fn layout(&self) -> &VolumeLayout {
        &self.layout
    }

    /// Writes `state` as the state file of `id` and returns once it is
    /// durable (or was skipped as older than the container's last state).
    /// The container's directory must exist.
    pub async fn write(&self, id: ContainerId, state: StateFile) -> std::io::Result<()> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Write { id, state, done }, answer).await
    }

    /// Writes each of `files`, as [`StateFiles::write`] does, queued
    /// together so they share a group (one sync of the log); one result
    /// each, in order.
    pub async fn write_all(
        &self,
        files: Vec<(ContainerId, StateFile)>,
    ) -> Vec<std::io::Result<()>> {
        let answers: Vec<_> = files
            .into_iter()
            .map(|(id, state)| {
                let (done, answer) = oneshot::channel();
                let queued = self.queue.send(Job::Write { id, state, done }).is_ok();
                (queued, answer)
            })
            .collect();
        let mut results = Vec::with_capacity(answers.len());
        for (queued, answer) in answers {
            let stopped = || std::io::Error::other("the state-file writer has stopped");
            results.push(match queued {
                true => answer.await.unwrap_or_else(|_| Err(stopped())),
                false => Err(stopped()),
            });
        }
        results
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
    /// Files whose line is logged but not yet in the file, and how often
    /// replacing them failed: tried again with every group until it works
    /// or the container goes.
    unreplaced: HashMap<ContainerId, u32>,
    /// Where removed directories are deleted, off this thread; `None`
    /// deletes them here.
    trash: Option<mpsc::Sender<PathBuf>>,
}

/// What one job of a group does.
pub enum Op<'a> {
    /// Write a state file.
    Write(ContainerId, &'a StateFile),
    /// Delete a container's directories.
    Remove(ContainerId),
}

impl GroupWriter {
    /// Opens the log under `layout`, replays it over the state files and
    /// compacts it. Never fails: what goes wrong is logged, and the writes
    /// fail until the log can be used.
    pub fn open(layout: VolumeLayout) -> Self {
        let log = Log::open(&layout);
        Self {
            layout,
            log,
            unreplaced: HashMap::new(),
            trash: None,
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
        while let Ok(first) = jobs.recv() {
            // A deliberate pause, not a wait for a condition: it is what
            // lets the writes of the next few milliseconds share a sync.
            if let Some(wait) =
                last_start.and_then(|s| (s + GROUP_SPACING).checked_duration_since(Instant::now()))
            {
                std::thread::sleep(wait);
            }
            last_start = Some(Instant::now());
            let mut group = vec![first];
            group.extend(jobs.try_iter().take(GROUP_MAX - 1));
            let ops: Vec<Op<'_>> = group
                .iter()
                .map(|job| match job {
                    Job::Write { id, state, .. } => Op::Write(*id, state),
                    Job::Remove { id, .. } => Op::Remove(*id),
                })
                .collect();
            let results = self.apply_group(&ops);
            for (job, result) in group.into_iter().zip(results) {
                let (Job::Write { done, .. } | Job::Remove { done, .. }) = job;
                let _ = done.send(result);
            }
        }
    }

    /// [`GroupWriter::apply_group`] of writes alone.
    pub fn write_group(
        &mut self,
        writes: &[(ContainerId, &StateFile)],
    ) -> Vec<std::io::Result<()>> {
        let ops: Vec<Op<'_>> = writes
            .iter()
            .map(|(id, state)| Op::Write(*id, state))
            .collect();
        self.apply_group(&ops)
    }

    /// Applies a group, all its writes durable together, and returns one
    /// result per job, in order. Jobs for one container apply in order. A
    /// write older than the container's last logged state (commands
    /// resent after a reconnect may arrive out of order) is skipped: the
    /// file only moves forward. A write after its container's removal
    /// fails.
    pub fn apply_group(&mut self, ops: &[Op<'_>]) -> Vec<std::io::Result<()>> {
        let ready = self.log.ready(&self.layout);
        // Each container's file after the group, and which writes it answers.
        let mut files: Vec<File> = Vec::new();
        let mut by_container: HashMap<ContainerId, usize> = HashMap::new();
        let mut results: Vec<Option<std::io::Result<()>>> = ops.iter().map(|_| None).collect();
        let mut removals: Vec<(usize, ContainerId)> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let (id, incoming) = match op {
                Op::Remove(id) => {
                    removals.push((index, *id));
                    continue;
                }
                Op::Write(id, incoming) => (*id, *incoming),
            };
            if removals.iter().any(|(_, removed)| *removed == id) {
                results[index] = Some(Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the container was removed",
                )));
                continue;
            }
            if let Err(e) = &ready {
                results[index] = Some(Err(copy_error(e)));
                continue;
            }
            let file = *by_container.entry(id).or_insert_with(|| {
                files.push(File {
                    id,
                    state: self.log.current(&self.layout, &id),
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
                .is_some_and(|current| current.supersedes(incoming))
            {
                tracing::debug!(container = %id, "state file already newer; write skipped");
                continue;
            }
            file.state = Some(incoming.clone());
            file.changed = true;
        }
        // Into a directory that exists only: a removed container's is
        // never made again.
        for file in files.iter_mut().filter(|f| f.changed) {
            file.outcome = match exists(&self.layout.container_dir(&file.id)) {
                Ok(true) => Ok(()),
                Ok(false) => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the container's directory is gone (removed, or never prepared)",
                )),
                Err(e) => Err(e),
            };
        }

        let changed: Vec<(ContainerId, &StateFile)> = files
            .iter()
            .filter(|f| f.changed && f.outcome.is_ok())
            .filter_map(|f| Some((f.id, f.state.as_ref()?)))
            .collect();
        if !changed.is_empty() {
            if let Err(e) = self.log.append(&self.layout, &changed) {
                for file in files.iter_mut().filter(|f| f.changed && f.outcome.is_ok()) {
                    file.outcome = Err(copy_error(&e));
                }
            }
            // Logged is durable, and the log is what a write is judged
            // against and what a start replays: a file that cannot be
            // replaced now is tried again with the next groups.
            for file in files.iter().filter(|f| f.changed && f.outcome.is_ok()) {
                self.unreplaced.entry(file.id).or_insert(0);
            }
            self.log.compact_if_due(&self.layout);
        }
        self.replace_files();

        for file in files {
            for index in file.answers {
                results[index] = Some(file.outcome.as_ref().map_err(copy_error).copied());
            }
        }
        for (index, id) in &removals {
            results[*index] = Some(self.remove(id));
        }
        // The moves, durable before any removal is answered: a power cut
        // must not bring a removed container's directory (and the log's
        // line for it) back. A removal whose moves may not be durable
        // fails; the server sends it again, and that group syncs them
        // again (the directory, already moved, is not found).
        if !removals.is_empty()
            && let Err(e) = self.sync_removals()
        {
            for (index, _) in &removals {
                if matches!(results[*index], Some(Ok(()))) {
                    results[*index] = Some(Err(copy_error(&e)));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every job is answered"))
            .collect()
    }

    /// Replaces the files whose lines are logged with what they say.
    fn replace_files(&mut self) {
        let layout = &self.layout;
        let log = &self.log;
        self.unreplaced.retain(|id, failures| {
            let Some(state) = log.logged(id) else {
                return false;
            };
            match replace_file(layout, id, state) {
                Ok(()) => false,
                Err(_) if !layout.container_dir(id).exists() => false,
                Err(e) => {
                    *failures += 1;
                    // At the first failure, the second, the fourth...
                    if failures.is_power_of_two() {
                        tracing::warn!(container = %id, error = %e, failures = *failures, "state file logged but not replaced yet; tried again with the next writes");
                    }
                    true
                }
            }
        });
    }

    /// Syncs the directories a group's removals moved entries out of and
    /// into. One that is not there had nothing moved.
    fn sync_removals(&mut self) -> std::io::Result<()> {
        if self.log.take_fault(log::Fault::RemovalSync) {
            return Err(std::io::Error::other("injected: a removal's sync failed"));
        }
        for dir in [self.layout.containers_dir(), trash_dir(&self.layout)] {
            match std::fs::File::open(&dir).and_then(|d| d.sync_all()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot sync a removal; it fails and is tried again");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Moves the directories of `id` out of the way, to be deleted off this
    /// thread, and forgets its state.
    fn remove(&mut self, id: &ContainerId) -> std::io::Result<()> {
        let dir = self.layout.container_dir(id);
        if !exists(&dir)? {
            self.log.forget(id);
            return Ok(());
        }
        let bin = trash_dir(&self.layout);
        let moved = bin.join(format!("{id}.{}", uuid_suffix()));
        match &self.trash {
            // Deleted here when it cannot be moved (the trash on another
            // filesystem, say).
            Some(trash)
                if std::fs::create_dir_all(&bin)
                    .and_then(|()| std::fs::rename(&dir, &moved))
                    .is_ok() =>
            {
                let _ = trash.send(moved);
            }
            _ => self.layout.remove(id)?,
        }
        self.log.forget(id);
        self.unreplaced.remove(id);
        Ok(())
    }
}

/// Where removed container directories wait to be deleted: beside
/// `containers/`, on the same filesystem (a rename), outside what the
/// activity watcher watches.
fn trash_dir(layout: &VolumeLayout) -> PathBuf {
    layout.root().join("removed")
}

fn uuid_suffix() -> String {
    boilerhouse_core::ids::Uuid::now_v7().simple().to_string()
}

/// Deletes what is put in the trash, and what a previous run left there
/// (only names this writer gives: `<container id>.<uuid>`).
fn empty_trash(layout: &VolumeLayout, moved: &mpsc::Receiver<PathBuf>) {
    if let Ok(left) = std::fs::read_dir(trash_dir(layout)) {
        for entry in left.flatten() {
            let name = entry.file_name();
            let ours = name
                .to_str()
                .and_then(|n| n.split_once('.'))
                .is_some_and(|(id, n)| {
                    id.parse::<ContainerId>().is_ok()
                        && n.parse::<boilerhouse_core::ids::Uuid>().is_ok()
                });
            if ours {
                delete_tree(&entry.path());
            }
        }
    }
    for path in moved {
        delete_tree(&path);
    }
}

fn delete_tree(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete a removed container's directories")
        }
    }
}

/// Whether `path` exists; an error other than its absence is an error.
fn exists(path: &Path) -> std::io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
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

#[cfg(test)]
mod tests;
