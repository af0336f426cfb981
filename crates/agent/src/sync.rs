//! Tenant state sync on the host: between a container's state directory
//! and a sink.
//!
//! The decisions (where a mapping's files are, which match, what moves,
//! what must not happen silently) are `core::sync`'s; this module does the
//! I/O. Three things matter here:
//! - A tenant controls its state directory and may plant symlinks in it,
//!   or swap a directory for one while a sync runs. Every open, list,
//!   create, rename and delete goes through [`Beneath`]: resolved beneath
//!   the state directory, never through a symlink at any depth. Symlinks
//!   and special files are left alone and reported.
//! - Files are streamed both ways in bounded chunks; a large file is never
//!   held in memory.
//! - The sink keeps a manifest of what it holds (size and the source
//!   file's modification time), written after the objects, so unchanged
//!   files are skipped and an interrupted sync only repeats work.

mod sink;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;

use boilerhouse_core::TenantId;
use boilerhouse_core::sync::{
    FileMeta, Listing, MANIFEST_KEY, MappingLayout, Transfer, plan_mapping,
};
use boilerhouse_core::workload::{SyncDirection, SyncMapping, SyncSink, SyncSpec};

use crate::beneath::{Beneath, BeneathError, SkippedKind, set_modified};
use sink::Sink;
pub use sink::Sinks;

/// Errors kept per mapping in a report.
const MAX_ERRORS: usize = 16;
/// Skipped entries named per mapping in a report.
const MAX_SKIPPED: usize = 16;
/// Prefix of the agent's temporary files; never synced.
pub(crate) const TEMP_PREFIX: &str = ".boilerhouse-";

pub use boilerhouse_core::sync::SyncPhase as Phase;

/// One sync to run.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncJob {
    /// Whose files.
    pub tenant: TenantId,
    /// The workload's sync section.
    pub spec: SyncSpec,
    /// Which mappings.
    pub phase: Phase,
    /// Overrides each mapping's direction.
    pub force: Option<SyncDirection>,
    /// Pause the container around the sync (release, drain, shutdown).
    pub pause: bool,
}

/// What one mapping's sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingReport {
    /// The mapping's id (its path, and its pattern when it has one).
    pub path: String,
    /// Files sent to the sink.
    pub uploaded: u32,
    /// Files fetched from the sink.
    pub downloaded: u32,
    /// Files deleted on either side (sync mode).
    pub deleted: u32,
    /// Files skipped because they had not changed.
    pub unchanged: u32,
    /// Bytes moved.
    pub bytes: u64,
    /// Files that should have moved and did not.
    pub pending: u32,
    /// What went wrong.
    pub errors: Vec<String>,
    /// Why the sync did not save what it was there to save.
    pub warning: Option<String>,
    /// Entries left alone (symlinks, special files), the first few.
    pub skipped: Vec<String>,
    /// All entries left alone.
    pub skipped_count: u32,
    /// Whether the container was paused for the sync.
    pub paused: bool,
    /// Why it was not, when it was asked to be.
    pub pause_error: Option<String>,
}

impl MappingReport {
    fn error(&mut self, message: String) {
        tracing::warn!(mapping = %self.path, error = %message, "sync error");
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(message);
        }
    }

    fn warn(&mut self, message: String) {
        tracing::warn!(mapping = %self.path, warning = %message, "sync warning");
        self.warning = Some(match self.warning.take() {
            Some(earlier) => format!("{earlier}; {message}"),
            None => message,
        });
    }
}

/// Why a sync could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The sink cannot be opened or reached.
    #[error("sink: {0}")]
    Sink(String),
    /// The host side is unusable.
    #[error("{0}")]
    Host(String),
}

/// The sink's record of what it holds, by key below the tenant's prefix.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    files: Listing,
}

/// Joins key parts, leaving out empty ones.
fn join_key(prefix: &str, key: &str) -> String {
    match (prefix.is_empty(), key.is_empty()) {
        (true, _) => key.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}/{key}"),
    }
}

/// A path's components below a directory, split at its last one.
fn split_rel(rel: &str) -> (Vec<String>, String) {
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    let name = parts.pop().unwrap_or_default();
    (parts, name)
}

/// Runs file I/O on the blocking pool, its panic or error as a message.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// Runs sync jobs against the host's container directories.
#[derive(Clone, Default)]
pub struct SyncRunner {
    sinks: Sinks,
}

/// One mapping while it syncs.
struct MappingRun<'a> {
    sink: &'a Sink,
    /// The tenant's prefix in the sink.
    prefix: &'a str,
    /// The state directory.
    root: &'a Arc<Beneath>,
    layout: MappingLayout,
    /// The mapping's directory, once it exists.
    dir: Option<Arc<Beneath>>,
}

impl SyncRunner {
    /// A runner whose S3 sinks take credentials from `path` (an AWS shared
    /// credentials file) before the environment.
    pub fn with_credentials_file(path: Option<PathBuf>) -> Self {
        Self {
            sinks: Sinks::with_credentials_file(path),
        }
    }

    /// Syncs `job` for the state directory `state_dir`. A mapping that
    /// fails is reported and the others still run; only a state directory
    /// or a sink that cannot be opened at all is an error.
    pub async fn run(
        &self,
        state_dir: &Path,
        job: &SyncJob,
    ) -> Result<Vec<MappingReport>, SyncError> {
        let root = Arc::new(
            Beneath::open(state_dir)
                .map_err(|e| SyncError::Host(format!("cannot open the state directory: {e}")))?,
        );
        let sink = self.sinks.open(&job.spec.sink)?;
        let template = match &job.spec.sink {
            SyncSink::Local { prefix, .. } | SyncSink::S3 { prefix, .. } => prefix,
        };
        let prefix = boilerhouse_core::sync::tenant_prefix(template, &job.tenant);
        let manifest_key = join_key(&prefix, MANIFEST_KEY);
        let mut manifest = read_manifest(&sink, &manifest_key).await?;
        let mut reports = Vec::new();
        let mut changed = false;
        for mapping in job
            .spec
            .mappings
            .iter()
            .filter(|m| job.force.is_some() || job.phase.selects(m.direction))
        {
            let mut report = MappingReport {
                path: mapping.id(),
                ..Default::default()
            };
            match MappingLayout::new(mapping) {
                Err(why) => report.error(format!("invalid mapping: {why}")),
                Ok(layout) => {
                    let mut run = MappingRun {
                        sink: &sink,
                        prefix: &prefix,
                        root: &root,
                        layout,
                        dir: None,
                    };
                    changed |= run.sync(job, mapping, &mut manifest, &mut report).await;
                }
            }
            reports.push(report);
        }
        if changed {
            write_manifest(&sink, &manifest_key, &manifest).await?;
        }
        Ok(reports)
    }
}

impl MappingRun<'_> {
    /// Syncs one mapping; returns whether the manifest changed.
    async fn sync(
        &mut self,
        job: &SyncJob,
        mapping: &SyncMapping,
        manifest: &mut Manifest,
        report: &mut MappingReport,
    ) -> bool {
        let direction = job.force.unwrap_or(mapping.direction);
        // Whether this sync is there to save the host's files.
        let uploading = direction == SyncDirection::Upload
            || (direction == SyncDirection::Bidirectional && job.phase == Phase::Upload);
        let dir = {
            let (root, parts) = (self.root.clone(), self.layout.dir().to_vec());
            tokio::task::spawn_blocking(move || root.dir(&parts)).await
        };
        self.dir = match dir {
            Ok(Ok(dir)) => Some(Arc::new(dir)),
            Ok(Err(e)) if e.is_not_found() => None,
            // The tenant put a symlink (or a file) where the mapping's
            // directory should be. Nothing is followed; a save has nothing
            // to save and says so, as for a missing directory, rather than
            // failing for ever and keeping the container; a restore cannot
            // restore and fails.
            Ok(Err(e @ (BeneathError::Symlink { .. } | BeneathError::NotADirectory { .. })))
                if uploading || self.layout.remote(&manifest.files).is_empty() =>
            {
                report.warn(if uploading {
                    format!("{e}; nothing was saved from it")
                } else {
                    format!("{e}; the sink holds nothing to restore into it")
                });
                return false;
            }
            Ok(Err(e)) => {
                report.error(refusal(&e));
                return false;
            }
            Err(e) => {
                report.error(e.to_string());
                return false;
            }
        };
        let local = match &self.dir {
            None => Listing::new(),
            Some(dir) => match self.list(dir.clone(), report).await {
                Ok(listing) => listing,
                Err(e) => {
                    report.error(e);
                    return false;
                }
            },
        };
        let remote = self.layout.remote(&manifest.files);
        let planned = plan_mapping(
            direction,
            mapping.mode,
            uploading,
            self.dir.is_some(),
            &local,
            &remote,
        );
        if let Some(warning) = planned.warning {
            report.warn(warning);
        }
        let touched: std::collections::BTreeSet<&String> = planned
            .steps
            .iter()
            .map(|s| match s {
                Transfer::Upload(p)
                | Transfer::Download(p)
                | Transfer::DeleteRemote(p)
                | Transfer::DeleteLocal(p) => p,
            })
            .collect();
        report.unchanged = u32::try_from(
            local
                .keys()
                .chain(remote.keys().filter(|k| !local.contains_key(*k)))
                .filter(|k| !touched.contains(k))
                .count(),
        )
        .unwrap_or(u32::MAX);
        let mut changed = false;
        let mut missing: Vec<String> = Vec::new();
        for step in planned.steps {
            let result = match &step {
                Transfer::Upload(rel) => match self.upload(rel).await {
                    Ok(meta) => {
                        report.uploaded += 1;
                        report.bytes += meta.size;
                        manifest.files.insert(self.layout.key(rel), meta);
                        changed = true;
                        Ok(())
                    }
                    Err(e) => Err(format!("upload {rel}: {e}")),
                },
                Transfer::Download(rel) => match self.download(rel, remote[rel]).await {
                    Ok(Some(bytes)) => {
                        report.downloaded += 1;
                        report.bytes += bytes;
                        Ok(())
                    }
                    Ok(None) => {
                        // Listed but gone (deleted by hand, a lifecycle
                        // rule): the manifest is repaired so the tenant is
                        // not locked out by it, and the loss is reported.
                        manifest.files.remove(&self.layout.key(rel));
                        changed = true;
                        missing.push(rel.clone());
                        Ok(())
                    }
                    Err(e) => Err(format!("download {rel}: {e}")),
                },
                Transfer::DeleteRemote(rel) => {
                    let key = self.layout.key(rel);
                    match self.sink.delete(&join_key(self.prefix, &key)).await {
                        Ok(()) => {
                            manifest.files.remove(&key);
                            report.deleted += 1;
                            changed = true;
                            Ok(())
                        }
                        Err(e) => Err(format!("delete {rel} from the sink: {e}")),
                    }
                }
                Transfer::DeleteLocal(rel) => match self.delete_local(rel).await {
                    Ok(()) => {
                        report.deleted += 1;
                        Ok(())
                    }
                    Err(e) => Err(format!("delete {rel}: {e}")),
                },
            };
            if let Err(e) = result {
                report.pending += 1;
                report.error(e);
            }
        }
        if !missing.is_empty() {
            let named: Vec<&str> = missing
                .iter()
                .take(MAX_SKIPPED)
                .map(String::as_str)
                .collect();
            let message = format!(
                "{} file(s) the sink's manifest lists are missing from the sink ({}); \
                 they are dropped from the manifest",
                missing.len(),
                named.join(", ")
            );
            if report.downloaded == 0 && report.uploaded == 0 {
                // Nothing of the tenant's could be restored: a failure, so
                // that a workload whose claims need their files refuses
                // this one; the repaired manifest lets the next one start
                // afresh.
                report.pending += u32::try_from(missing.len()).unwrap_or(u32::MAX);
                report.error(format!("nothing could be restored: {message}"));
            } else {
                report.warn(format!("restored what exists; {message}"));
            }
        }
        changed
    }

    /// The mapping's regular files that it selects, by path below its
    /// directory; what was left alone goes in the report, and is a warning
    /// when it could hold the mapping's files.
    async fn list(&self, dir: Arc<Beneath>, report: &mut MappingReport) -> Result<Listing, String> {
        let walk = blocking(move || dir.walk(TEMP_PREFIX).map_err(|e| e.to_string())).await?;
        let mut symlinks = Vec::new();
        for skipped in &walk.skipped {
            report.skipped_count += 1;
            if report.skipped.len() < MAX_SKIPPED {
                report.skipped.push(skipped.path.clone());
            }
            if matches!(skipped.kind, SkippedKind::Symlink) && symlinks.len() < MAX_SKIPPED {
                symlinks.push(skipped.path.clone());
            }
        }
        if report.skipped_count > 0 {
            report.warn(format!(
                "left {} entr{} that {} not regular files (symlinks are never followed): {}",
                report.skipped_count,
                if report.skipped_count == 1 {
                    "y"
                } else {
                    "ies"
                },
                if report.skipped_count == 1 {
                    "is"
                } else {
                    "are"
                },
                report.skipped.join(", ")
            ));
        }
        let listing = walk
            .files
            .into_iter()
            .map(|(rel, stat)| {
                (
                    rel,
                    FileMeta {
                        size: stat.size,
                        modified_ms: stat.modified_ms,
                    },
                )
            })
            .collect();
        Ok(self.layout.local(listing))
    }

    /// Streams one host file to the sink. Returns the metadata the file had
    /// when the upload began: if it changes meanwhile, the manifest records
    /// the older state and the next sync sends it again.
    async fn upload(&self, rel: &str) -> Result<FileMeta, String> {
        let dir = self.dir.clone().ok_or("the directory is gone")?;
        let parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
        let (file, stat) =
            blocking(move || dir.open_file_at(&parts).map_err(|e| e.to_string())).await?;
        let meta = FileMeta {
            size: stat.size,
            modified_ms: stat.modified_ms,
        };
        let key = join_key(self.prefix, &self.layout.key(rel));
        self.sink.put_file(&key, file, stat.size).await?;
        Ok(meta)
    }

    /// Streams one sink object into the mapping's directory: into a
    /// temporary file beside the destination, then renamed over it (a
    /// symlink there is replaced, never written through), with the
    /// source's modification time restored so the next sync sees it
    /// unchanged. Directories created on the way, and the file, belong to
    /// the state directory's owner, so a non-root tenant can use them.
    /// `None` when the sink does not hold the object.
    async fn download(&mut self, rel: &str, meta: FileMeta) -> Result<Option<u64>, String> {
        let key = join_key(self.prefix, &self.layout.key(rel));
        let Some(mut stream) = self.sink.get_stream(&key).await? else {
            return Ok(None);
        };
        let (root, mapping_dir) = (self.root.clone(), self.layout.dir().to_vec());
        let existing = self.dir.clone();
        let (parents, name) = split_rel(rel);
        let (dir, parent, tmp, file) = blocking(move || {
            let owner = root.owner().map_err(|e| e.to_string())?;
            let dir = match existing {
                Some(dir) => dir,
                None => Arc::new(
                    root.create_dirs(&mapping_dir, Some(owner))
                        .map_err(|e| e.to_string())?,
                ),
            };
            let parent = dir
                .create_dirs(&parents, Some(owner))
                .map_err(|e| e.to_string())?;
            let (tmp, file) = parent
                .create_temp(TEMP_PREFIX, Some(owner))
                .map_err(|e| e.to_string())?;
            Ok((dir, parent, tmp, file))
        })
        .await?;
        self.dir = Some(dir);
        let mut file = tokio::fs::File::from_std(file);
        let mut written = 0u64;
        let streamed: Result<(), String> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                written += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            file.flush().await.map_err(|e| e.to_string())
        }
        .await;
        let file = file.into_std().await;
        blocking(move || {
            let finished = streamed
                .and_then(|()| set_modified(&file, meta.modified_ms).map_err(|e| e.to_string()))
                .and_then(|()| {
                    drop(file);
                    parent.rename(&tmp, &name).map_err(|e| e.to_string())
                });
            if finished.is_err() {
                parent.remove_temp(&tmp);
            }
            finished
        })
        .await?;
        Ok(Some(written))
    }

    /// Removes one host file (or a symlink in its place, never what it
    /// points to).
    async fn delete_local(&self, rel: &str) -> Result<(), String> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let (parents, name) = split_rel(rel);
        blocking(
            move || match dir.dir(&parents).and_then(|d| d.remove_file(&name)) {
                Ok(()) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e.to_string()),
            },
        )
        .await
    }
}

/// What a mapping whose directory cannot be opened says.
fn refusal(e: &BeneathError) -> String {
    match e {
        BeneathError::Symlink { .. } => {
            format!("{e}; refusing to follow it out of the state directory")
        }
        _ => e.to_string(),
    }
}

async fn read_manifest(sink: &Sink, key: &str) -> Result<Manifest, SyncError> {
    match sink.get_all(key).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes)
            .map_err(|e| SyncError::Sink(format!("the manifest {key} is damaged: {e}"))),
        Ok(None) => Ok(Manifest {
            version: 1,
            files: Listing::new(),
        }),
        Err(e) => Err(SyncError::Sink(format!(
            "cannot read the manifest {key}: {e}"
        ))),
    }
}

async fn write_manifest(sink: &Sink, key: &str, manifest: &Manifest) -> Result<(), SyncError> {
    let bytes = serde_json::to_vec(manifest).map_err(|e| SyncError::Sink(e.to_string()))?;
    sink.put_all(key, bytes)
        .await
        .map_err(|e| SyncError::Sink(format!("cannot write the manifest {key}: {e}")))
}

#[cfg(test)]
mod tests;
