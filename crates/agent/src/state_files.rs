//! State files, made durable in groups through one log.
//!
//! Every claim and release sends the agent a state file to write, and each
//! must be durable before the agent answers. Written one by one, atomically,
//! that was two fsyncs a file (the temp file, then its directory after the
//! rename): at 1,000 claims/s, 2,000 journal commits a second on the disk
//! the server's WAL often shares, and the WAL's fsyncs waited behind them
//! (with them gone, a warm claim's p50 in `claim_bench` halved).
//!
//! Here one thread writes them, in groups: the writes that queue while it
//! works (groups begin at most every [`GROUP_SPACING`]) are appended to
//! one log, `<state-root>/state-files.log`, which is synced once for the
//! group; then each container's file is replaced (temp file and rename,
//! not synced). The log is what is durable; the files are what reports
//! read. When the agent starts it replays the log over the files, so a
//! file a power cut left stale or torn is put right before the first
//! report. The log is rewritten with only each live container's last
//! state when it has grown ([`Log::compact`]), so it stays about as big as
//! the node's containers.
//!
//! Nothing is lost by the wait: the server keeps each command pending
//! until the agent answers it, and the claim itself is already durable in
//! the server's database; the state file is what survives that database
//! being restored from an older backup.

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use boilerhouse_core::ContainerId;
use boilerhouse_core::container::StateFile;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::volumes::VolumeLayout;

/// The shortest time between the starts of two groups.
pub const GROUP_SPACING: Duration = Duration::from_millis(10);

/// At most this many writes share a group.
const GROUP_MAX: usize = 1024;

/// Beside the state file, in its directory, so the rename is atomic.
const TEMP_FILE: &str = ".boilerhouse-state.json.tmp";

const LOG_FILE: &str = "state-files.log";

/// The log is rewritten once it is this big, or four times what it was
/// after the last rewrite, whichever is more.
const COMPACT_AT_LEAST: u64 = 1 << 20;

/// The agent's state-file writer: a thread that writes what is queued to
/// it in groups. Cheap to clone; the thread ends when the last clone is
/// dropped.
#[derive(Clone)]
pub struct StateFiles {
    queue: mpsc::Sender<Job>,
}

struct Job {
    id: ContainerId,
    state: StateFile,
    done: oneshot::Sender<std::io::Result<()>>,
}

impl StateFiles {
    /// Replays the log under `layout` over its state files, then starts
    /// the writer.
    pub fn start(layout: VolumeLayout) -> std::io::Result<Self> {
        let mut writer = GroupWriter::open(layout)?;
        let (queue, jobs) = mpsc::channel();
        std::thread::Builder::new()
            .name("state-files".into())
            .spawn(move || writer.run(&jobs))?;
        Ok(Self { queue })
    }

    /// Writes `state` as the state file of `id` and returns once it is
    /// durable (or was skipped as older than the file).
    pub async fn write(&self, id: ContainerId, state: StateFile) -> std::io::Result<()> {
        let stopped = || std::io::Error::other("the state-file writer has stopped");
        let (done, written) = oneshot::channel();
        self.queue
            .send(Job { id, state, done })
            .map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())?
    }
}

/// Writes groups of state files: the log, then the files.
pub struct GroupWriter {
    layout: VolumeLayout,
    log: Log,
}

impl GroupWriter {
    /// Opens the log under `layout` (creating it), replays it over the
    /// state files and compacts it.
    pub fn open(layout: VolumeLayout) -> std::io::Result<Self> {
        let log = Log::open(&layout)?;
        Ok(Self { layout, log })
    }

    fn run(&mut self, jobs: &mpsc::Receiver<Job>) {
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
            let writes: Vec<(ContainerId, &StateFile)> =
                group.iter().map(|j| (j.id, &j.state)).collect();
            let results = self.write_group(&writes);
            for (job, result) in group.into_iter().zip(results) {
                let _ = job.done.send(result);
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
        // Each container's file after the group, and which writes it answers.
        let mut files: Vec<File> = Vec::new();
        let mut by_container: HashMap<ContainerId, usize> = HashMap::new();
        for (index, (id, incoming)) in writes.iter().enumerate() {
            let file = *by_container.entry(*id).or_insert_with(|| {
                files.push(File {
                    id: *id,
                    state: read_state(&self.layout, id),
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

        let changed: Vec<(ContainerId, &StateFile)> = files
            .iter()
            .filter(|f| f.changed)
            .filter_map(|f| Some((f.id, f.state.as_ref()?)))
            .collect();
        if !changed.is_empty() {
            match self.log.append(&self.layout, &changed) {
                Ok(()) => {
                    for file in files.iter_mut().filter(|f| f.changed) {
                        if let Some(state) = &file.state {
                            file.outcome = replace_file(&self.layout, &file.id, state);
                        }
                    }
                }
                Err(e) => {
                    for file in files.iter_mut().filter(|f| f.changed) {
                        file.outcome = Err(std::io::Error::new(e.kind(), e.to_string()));
                    }
                }
            }
            if let Err(e) = self.log.compact_if_due(&self.layout) {
                tracing::warn!(error = %e, "cannot rewrite the state-file log; it goes on growing");
            }
        }

        let mut results: Vec<Option<std::io::Result<()>>> = writes.iter().map(|_| None).collect();
        for file in files {
            for index in file.answers {
                results[index] = Some(match &file.outcome {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every write belongs to one file"))
            .collect()
    }
}

/// One container's state file within a group.
struct File {
    id: ContainerId,
    /// What the file holds after the group (on disk before it, if no write
    /// of the group is newer).
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

/// The durable record of every state file written since the last
/// compaction: one JSON line per write, appended and synced per group.
struct Log {
    path: PathBuf,
    file: std::fs::File,
    /// Its length: where the next group's lines begin.
    bytes: u64,
    compact_at: u64,
    /// An append failed: it may have left part of a line, which the next
    /// group's first line would be glued to. It is rewritten first.
    damaged: bool,
}

impl Log {
    fn open(layout: &VolumeLayout) -> std::io::Result<Self> {
        std::fs::create_dir_all(layout.root())?;
        let path = layout.root().join(LOG_FILE);
        let replayed = Self::replay(layout, &path)?;
        if replayed > 0 {
            tracing::info!(files = replayed, "state files put right from their log");
        }
        let mut log = Self {
            file: open_append(&path)?,
            path,
            bytes: 0,
            compact_at: 0,
            damaged: false,
        };
        log.compact(layout)?;
        Ok(log)
    }

    /// The last state each container of the log was given, in the order
    /// first written. A line that does not parse (the tail of a write a
    /// crash cut short: it was never answered) is skipped.
    fn latest(path: &Path) -> std::io::Result<Vec<(ContainerId, StateFile)>> {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut latest: Vec<(ContainerId, StateFile)> = Vec::new();
        let mut index: HashMap<ContainerId, usize> = HashMap::new();
        for line in std::io::BufReader::new(file).split(b'\n') {
            let Ok(record) = serde_json::from_slice::<Record>(&line?) else {
                continue;
            };
            // Each line is what the file became (a write older than the
            // file was never logged), so the last one is the file; judging
            // the lines against each other again would not be: whether a
            // write is newer depends on the file it met.
            match index.get(&record.container) {
                Some(&i) => latest[i].1 = record.state,
                None => {
                    index.insert(record.container, latest.len());
                    latest.push((record.container, record.state));
                }
            }
        }
        Ok(latest)
    }

    /// Puts every state file of a live container right from the log;
    /// returns how many it changed. A removed container's directory is
    /// not made again.
    fn replay(layout: &VolumeLayout, path: &Path) -> std::io::Result<usize> {
        let mut replayed = 0;
        for (id, state) in Self::latest(path)? {
            if !layout.container_dir(&id).is_dir() {
                continue;
            }
            if read_state(layout, &id).as_ref() == Some(&state) {
                continue;
            }
            replace_file(layout, &id, &state)?;
            replayed += 1;
        }
        Ok(replayed)
    }

    fn append(
        &mut self,
        layout: &VolumeLayout,
        records: &[(ContainerId, &StateFile)],
    ) -> std::io::Result<()> {
        if self.damaged {
            self.compact(layout)?;
        }
        let mut lines = Vec::new();
        for (container, state) in records {
            serde_json::to_writer(
                &mut lines,
                &Record {
                    container: *container,
                    state: (*state).clone(),
                },
            )
            .map_err(std::io::Error::other)?;
            lines.push(b'\n');
        }
        let appended = self
            .file
            .write_all(&lines)
            .and_then(|()| self.file.sync_data());
        match appended {
            Ok(()) => self.bytes += lines.len() as u64,
            // Cut what it may have left; if that fails too, the whole log
            // is rewritten before the next append (whole lines only).
            Err(_) => self.damaged = self.file.set_len(self.bytes).is_err(),
        }
        appended
    }

    fn compact_if_due(&mut self, layout: &VolumeLayout) -> std::io::Result<()> {
        if self.bytes < self.compact_at {
            return Ok(());
        }
        self.compact(layout)
    }

    /// Rewrites the log with the last state of each container whose
    /// directory is still there, atomically: a temp file, synced, renamed
    /// over the log, the directory synced.
    fn compact(&mut self, layout: &VolumeLayout) -> std::io::Result<()> {
        let mut lines = Vec::new();
        for (container, state) in Self::latest(&self.path)? {
            if layout.container_dir(&container).is_dir() {
                serde_json::to_writer(&mut lines, &Record { container, state })
                    .map_err(std::io::Error::other)?;
                lines.push(b'\n');
            }
        }
        let temp = self.path.with_extension("log.tmp");
        {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&lines)?;
            file.sync_all()?;
        }
        std::fs::rename(&temp, &self.path)?;
        std::fs::File::open(layout.root())?.sync_all()?;
        self.file = open_append(&self.path)?;
        self.damaged = false;
        self.bytes = lines.len() as u64;
        self.compact_at = COMPACT_AT_LEAST.max(4 * self.bytes);
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Replaces the state file of `id` with `state`, atomically but not
/// durably (the log is what is durable): a reader sees the old file or
/// the new one.
fn replace_file(layout: &VolumeLayout, id: &ContainerId, state: &StateFile) -> std::io::Result<()> {
    let dir = layout.container_dir(id);
    std::fs::create_dir_all(&dir)?;
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let temp = dir.join(TEMP_FILE);
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
