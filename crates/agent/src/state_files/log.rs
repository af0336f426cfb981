//! The state files' log: one JSON line per write, appended and synced once
//! a group, and each container's last state in memory.

use super::*;

pub(super) const LOG_FILE: &str = "state-files.log";

/// The log is rewritten once it is this big, or four times what it was
/// after the last rewrite, whichever is more.
pub(super) const COMPACT_AT_LEAST: u64 = 1 << 20;

/// Where a test makes the log fail.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Fault {
    /// An append writes half its lines, then fails.
    Append,
    /// A rewrite fails before its rename.
    RewriteWrite,
    /// A rewrite's directory sync fails, after its rename.
    RewriteDirSync,
    /// The sync of a group's removals fails.
    RemovalSync,
}

pub(super) struct Log {
    path: PathBuf,
    /// Each container's last logged state, once the log has been read:
    /// what a write is judged against, and what a rewrite writes.
    latest: Option<HashMap<ContainerId, StateFile>>,
    /// The log, open for appending; `None` when it must be rewritten
    /// before the next append (an append failed and may have left part of
    /// a line, or a rewrite's rename may not be durable yet).
    file: Option<std::fs::File>,
    /// Its length: where the next group's lines begin.
    pub(super) bytes: u64,
    pub(super) compact_at: u64,
    /// The next failure a test asked for.
    #[cfg(test)]
    pub(super) fault: Option<Fault>,
}

impl Log {
    /// Reads the log, replays it over the files and rewrites it. What
    /// fails is logged and tried again on the next append.
    pub(super) fn open(layout: &VolumeLayout) -> Self {
        let mut log = Self {
            path: layout.root().join(LOG_FILE),
            latest: None,
            file: None,
            bytes: 0,
            compact_at: 0,
            #[cfg(test)]
            fault: None,
        };
        if let Err(e) = log.ready(layout) {
            tracing::error!(path = %log.path.display(), error = %e, "the state-file log is not usable yet; state writes fail until it is");
        }
        log
    }

    /// Whether a test asked for a failure at `at` (once).
    #[cfg(test)]
    pub(super) fn take_fault(&mut self, at: Fault) -> bool {
        let take = self.fault == Some(at);
        if take {
            self.fault = None;
        }
        take
    }

    #[cfg(not(test))]
    pub(super) fn take_fault(&mut self, _at: Fault) -> bool {
        false
    }

    /// What a write to `id` is judged against, once the log is
    /// [ready](Log::ready).
    pub(super) fn current(&self, layout: &VolumeLayout, id: &ContainerId) -> Option<StateFile> {
        match self.logged(id) {
            Some(state) => Some(state.clone()),
            // Written before the log existed.
            None => read_state(layout, id),
        }
    }

    /// The last state logged for `id`.
    pub(super) fn logged(&self, id: &ContainerId) -> Option<&StateFile> {
        self.latest.as_ref()?.get(id)
    }

    /// Forgets a removed container.
    pub(super) fn forget(&mut self, id: &ContainerId) {
        if let Some(latest) = &mut self.latest {
            latest.remove(id);
        }
    }

    /// Reads the log if it is not yet, and rewrites it if it must be.
    pub(super) fn ready(&mut self, layout: &VolumeLayout) -> std::io::Result<()> {
        if self.latest.is_none() {
            let latest = read_latest(&self.path)?;
            let replayed = replay(layout, &latest);
            if replayed > 0 {
                tracing::info!(files = replayed, "state files put right from their log");
            }
            self.latest = Some(latest);
            self.file = None;
        }
        if self.file.is_none() {
            self.compact(layout)?;
        }
        Ok(())
    }

    pub(super) fn append(
        &mut self,
        layout: &VolumeLayout,
        records: &[(ContainerId, &StateFile)],
    ) -> std::io::Result<()> {
        self.ready(layout)?;
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
        let torn = self.take_fault(Fault::Append);
        let file = self.file.as_mut().expect("ready opens the log");
        let appended = if torn {
            // Half the group on disk, then a failure.
            file.write_all(&lines[..lines.len() / 2])
                .and_then(|()| Err(std::io::Error::other("injected: the append failed")))
        } else {
            file.write_all(&lines).and_then(|()| file.sync_data())
        };
        match &appended {
            Ok(()) => {
                self.bytes += lines.len() as u64;
                let latest = self.latest.as_mut().expect("ready reads the log");
                for (container, state) in records {
                    latest.insert(*container, (*state).clone());
                }
            }
            // It may have left part of this group on disk, and a cut
            // would not be durable without a sync of its own: the log is
            // rewritten from memory (which has none of this group) before
            // the next append.
            Err(_) => self.file = None,
        }
        appended
    }

    pub(super) fn compact_if_due(&mut self, layout: &VolumeLayout) {
        if self.bytes < self.compact_at || self.latest.is_none() {
            return;
        }
        if let Err(e) = self.compact(layout) {
            // Not again until it has grown as much once more.
            self.compact_at = self.bytes.saturating_mul(2);
            tracing::warn!(error = %e, "cannot rewrite the state-file log; it grows until it can");
        }
    }

    /// Rewrites the log with the last state of each container whose
    /// directory is still there: a temp file, synced, renamed over the
    /// log, the directory synced. The temp file's handle, open for
    /// appending, is the log's from the rename on.
    fn compact(&mut self, layout: &VolumeLayout) -> std::io::Result<()> {
        let latest = self
            .latest
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the log has not been read"))?;
        // A container is gone when its directory is; one that cannot be
        // looked at now is kept, and so is every one while `containers/`
        // itself is missing (a mount not up yet, say).
        if exists(&layout.containers_dir()).unwrap_or(false) {
            latest.retain(|container, _| exists(&layout.container_dir(container)).unwrap_or(true));
        }
        let mut lines = Vec::new();
        for (container, state) in latest.iter() {
            serde_json::to_writer(
                &mut lines,
                &Record {
                    container: *container,
                    state: state.clone(),
                },
            )
            .map_err(std::io::Error::other)?;
            lines.push(b'\n');
        }
        std::fs::create_dir_all(layout.root())?;
        let temp = self.path.with_extension("log.tmp");
        let fail_write = self.take_fault(Fault::RewriteWrite);
        let written = open_append(&temp).and_then(|mut file| {
            file.set_len(0)?;
            file.write_all(&lines)?;
            if fail_write {
                return Err(std::io::Error::other("injected: the rewrite failed"));
            }
            file.sync_all()?;
            Ok(file)
        });
        let file = match written.and_then(|file| std::fs::rename(&temp, &self.path).map(|()| file))
        {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
        };
        self.file = Some(file);
        self.bytes = lines.len() as u64;
        self.compact_at = COMPACT_AT_LEAST.max(4 * self.bytes);
        let dir_synced = if self.take_fault(Fault::RewriteDirSync) {
            Err(std::io::Error::other(
                "injected: the directory's sync failed",
            ))
        } else {
            std::fs::File::open(layout.root()).and_then(|dir| dir.sync_all())
        };
        if let Err(e) = dir_synced {
            // The rename may not be durable: rewrite before the next append.
            self.file = None;
            return Err(e);
        }
        Ok(())
    }
}

pub(super) fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// The last state each container of the log was given. Only the last line
/// may fail to parse, and only when it has no newline: the tail of an
/// append a crash cut short, which was never answered. Any other line that
/// does not parse is damage, and the log is not used (nor rewritten)
/// until someone looks: skipping it could take a file back past a write
/// that was answered.
pub(super) fn read_latest(path: &Path) -> std::io::Result<HashMap<ContainerId, StateFile>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    let mut latest = HashMap::new();
    let mut lines = bytes.split(|b| *b == b'\n').enumerate().peekable();
    while let Some((number, line)) = lines.next() {
        let last = lines.peek().is_none();
        if line.is_empty() && last {
            break;
        }
        // Each line is what the file became (a write older than the file
        // is never logged), so the last one is the file; judging the lines
        // against each other again would not be: whether a write is newer
        // depends on the file it met.
        match serde_json::from_slice::<Record>(line) {
            Ok(record) => {
                latest.insert(record.container, record.state);
            }
            Err(_) if last => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("line {} of {} is damaged: {e}", number + 1, path.display()),
                ));
            }
        }
    }
    Ok(latest)
}

/// Puts every state file of a live container right from the log; returns
/// how many it changed. A removed container's directory is not made
/// again. The log wins over the file: every change to a file is logged
/// first, so a file that differs is one a power cut left behind.
fn replay(layout: &VolumeLayout, latest: &HashMap<ContainerId, StateFile>) -> usize {
    let mut replayed = 0;
    for (id, state) in latest {
        if !exists(&layout.container_dir(id)).unwrap_or(false) {
            continue;
        }
        if read_state(layout, id).as_ref() == Some(state) {
            continue;
        }
        match replace_file(layout, id, state) {
            Ok(()) => replayed += 1,
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "cannot put the state file right from its log")
            }
        }
    }
    replayed
}
