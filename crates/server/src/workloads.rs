//! The workload directory: the source of truth for workload specs.
//!
//! The loader reads every `*.yaml`/`*.yml` file, validates it and stores
//! the valid ones. A file that fails keeps its workload's last valid
//! version in force, is reported once per distinct content (a log line and
//! a `workload.invalid` event) and is listed by ListWorkloads until fixed.
//! Apply and Delete edit files in the directory under the same lock as the
//! loader, so the directory, the database and the answers agree.
//!
//! A workload the admission policy refuses is handled like an invalid one,
//! with one difference: a stored version the policy refuses is removed
//! rather than kept in force, so a workload stored before its policy (or
//! under an allowance since withdrawn) does not keep getting containers.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use boilerhouse_core::admission::{AdmissionPolicy, Refusal};
use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::workload::{WorkloadError, WorkloadRecord, WorkloadSpec, parse_workload};
use boilerhouse_core::{Timestamp, WorkloadId};

use crate::store::{Store, StoreError, WorkloadChange};
use crate::tasks::BackgroundTask;

/// A file that failed to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The error, naming file, field and reason.
    pub error: WorkloadError,
    /// When it was first seen with this content.
    pub observed_at: Timestamp,
}

/// What a reload did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReloadSummary {
    /// Files read.
    pub files: usize,
    /// Valid workloads.
    pub valid: usize,
    /// Files that failed.
    pub invalid: usize,
    /// Workloads created or changed.
    pub changed: usize,
    /// Workloads removed.
    pub removed: usize,
}

/// The workload directory and what was learned from it.
#[derive(Clone)]
pub struct WorkloadDir {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    store: Store,
    /// Held by reloads, Apply and Delete, so they never interleave.
    lock: Mutex<LoaderState>,
    errors: RwLock<BTreeMap<PathBuf, LoadError>>,
    /// What workloads may ask for.
    policy: AdmissionPolicy,
}

#[derive(Default)]
struct LoaderState {
    /// Content hash of each invalid file when it was last reported, so a
    /// broken file is reported once, not on every rescan.
    reported: HashMap<PathBuf, String>,
}

/// Why Apply or Delete failed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The YAML is invalid.
    #[error(transparent)]
    Invalid(WorkloadError),
    /// The YAML is valid but the admission policy refuses these fields.
    #[error("refused by the admission policy: {}", .0.iter().map(Refusal::to_string).collect::<Vec<_>>().join("; "))]
    Refused(Vec<Refusal>),
    /// No such workload.
    #[error("workload {0} not found")]
    NotFound(WorkloadId),
    /// The file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The target file belongs to another workload.
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn is_workload_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // Hidden files include editors' swap files and our own temp files.
    !name.starts_with('.')
        && path.extension().is_some_and(|e| e == "yaml" || e == "yml")
        && path.is_file()
}

fn content_hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

impl WorkloadDir {
    /// A loader for `dir` that admits what `policy` allows. The directory
    /// is created if missing.
    pub fn new(dir: PathBuf, store: Store, policy: AdmissionPolicy) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                store,
                lock: Mutex::new(LoaderState::default()),
                errors: RwLock::default(),
                policy,
            }),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Files that currently fail to load.
    pub fn load_errors(&self) -> Vec<LoadError> {
        self.inner
            .errors
            .read()
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Reads the whole directory and brings the database in line with it.
    pub async fn reload(&self, now: Timestamp) -> anyhow::Result<ReloadSummary> {
        let mut state = self.inner.lock.lock().await;
        let mut summary = ReloadSummary::default();

        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.inner.dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| is_workload_file(p))
            .collect();
        paths.sort();
        summary.files = paths.len();

        // path -> the id that file now defines, for valid files.
        let mut defined_by_file: HashMap<PathBuf, WorkloadId> = HashMap::new();
        let mut owner_of_id: HashMap<WorkloadId, PathBuf> = HashMap::new();
        let mut valid: Vec<(PathBuf, WorkloadSpec, String)> = Vec::new();
        let mut errors: BTreeMap<PathBuf, LoadError> = BTreeMap::new();
        let previous_errors = self
            .inner
            .errors
            .read()
            .map(|e| e.clone())
            .unwrap_or_default();

        for path in paths {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    let error = WorkloadError {
                        file: display(&path),
                        field: String::new(),
                        reason: format!("cannot read the file: {e}"),
                    };
                    errors.insert(
                        path.clone(),
                        LoadError {
                            error,
                            observed_at: now,
                        },
                    );
                    continue;
                }
            };
            let hash = content_hash(&text);
            let parsed = parse_workload(&display(&path), &text).and_then(|spec| {
                if let Some(other) = owner_of_id.get(&spec.id) {
                    return Err(WorkloadError {
                        file: display(&path),
                        field: "id".into(),
                        reason: format!(
                            "workload id {} is already defined by {}",
                            spec.id,
                            display(other)
                        ),
                    });
                }
                let refusals = self.inner.policy.check(&spec);
                if !refusals.is_empty() {
                    return Err(crate::admission::refused_file(&display(&path), &refusals));
                }
                Ok(spec)
            });
            match parsed {
                Ok(spec) => {
                    state.reported.remove(&path);
                    owner_of_id.insert(spec.id.clone(), path.clone());
                    defined_by_file.insert(path.clone(), spec.id.clone());
                    valid.push((path, spec, text));
                }
                Err(error) => {
                    let observed_at = match previous_errors.get(&path) {
                        Some(old) if old.error == error => old.observed_at,
                        _ => now,
                    };
                    if state.reported.get(&path) != Some(&hash) {
                        state.reported.insert(path.clone(), hash);
                        self.report_invalid(&error, now).await?;
                    }
                    errors.insert(path, LoadError { error, observed_at });
                }
            }
        }
        summary.valid = valid.len();
        summary.invalid = errors.len();

        let stored: HashMap<WorkloadId, WorkloadRecord> = self
            .inner
            .store
            .list_workloads()
            .await?
            .into_iter()
            .map(|r| (r.spec.id.clone(), r))
            .collect();
        for (path, spec, text) in valid {
            // Most rescans change nothing; skip the write transaction then.
            let unchanged = stored.get(&spec.id).is_some_and(|r| {
                r.yaml == text && r.source_path == display(&path) && r.spec_hash == spec.spec_hash()
            });
            if unchanged {
                continue;
            }
            let (_, change) = self
                .inner
                .store
                .put_workload(spec, text, display(&path), now, false)
                .await?;
            if change != WorkloadChange::Unchanged {
                summary.changed += 1;
            }
        }

        // A stored workload goes when its file is gone, or when the file now
        // validly defines another id. A file that is merely invalid keeps
        // its workload: a typo must not drain a pool.
        for record in self.inner.store.list_workloads().await? {
            let source = PathBuf::from(&record.source_path);
            let reason = if !source.exists() {
                Some(format!("{} was deleted", record.source_path))
            } else {
                match defined_by_file.get(&source) {
                    Some(id) if *id != record.spec.id => {
                        Some(format!("{} now defines workload {id}", record.source_path))
                    }
                    _ => None,
                }
            };
            let reason = reason.or_else(|| {
                let refusals = self.inner.policy.check(&record.spec);
                refusals
                    .first()
                    .map(|first| format!("the admission policy refuses it ({first})"))
            });
            let owned_elsewhere = owner_of_id
                .get(&record.spec.id)
                .is_some_and(|p| *p != source);
            if let Some(reason) = reason
                && !owned_elsewhere
            {
                self.inner
                    .store
                    .remove_workload(record.spec.id.clone(), reason, now)
                    .await?;
                summary.removed += 1;
            }
        }

        if let Ok(mut slot) = self.inner.errors.write() {
            *slot = errors;
        }
        Ok(summary)
    }

    async fn report_invalid(
        &self,
        error: &WorkloadError,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        tracing::warn!(
            file = %error.file,
            field = %error.field,
            reason = %error.reason,
            "workload file skipped: {error}"
        );
        let event = NewEvent::new(now, EventKind::WorkloadInvalid, error.to_string())
            .with_attribute("path", error.file.clone())
            .with_attribute("field", error.field.clone())
            .with_attribute("reason", error.reason.clone());
        self.inner.store.append_event(event).await?;
        Ok(())
    }

    /// Validates `yaml` and, unless `dry_run`, writes it into the directory
    /// (over the file that defines the same id, or as `<id>.yaml`).
    pub async fn apply(
        &self,
        yaml: &str,
        dry_run: bool,
        now: Timestamp,
    ) -> Result<(WorkloadRecord, Option<WorkloadChange>), EditError> {
        let spec = parse_workload("<request>", yaml).map_err(EditError::Invalid)?;
        let refusals = self.inner.policy.check(&spec);
        if !refusals.is_empty() {
            return Err(EditError::Refused(refusals));
        }
        let _state = self.inner.lock.lock().await;
        let existing = self.inner.store.get_workload(&spec.id).await?;
        let path = match &existing {
            Some(record) if Path::new(&record.source_path).starts_with(&self.inner.dir) => {
                PathBuf::from(&record.source_path)
            }
            _ => self.inner.dir.join(format!("{}.yaml", spec.id)),
        };
        if existing.is_none() && path.exists() {
            return Err(EditError::Conflict(format!(
                "{} already exists and does not define workload {}; fix or remove that file first",
                display(&path),
                spec.id
            )));
        }
        if dry_run {
            let record = WorkloadRecord {
                spec_hash: spec.spec_hash(),
                spec,
                yaml: yaml.to_owned(),
                source_path: display(&path),
                created_at: now,
                updated_at: now,
            };
            return Ok((record, None));
        }
        write_atomically(&path, yaml).map_err(|source| EditError::Io {
            path: path.clone(),
            source,
        })?;
        let (record, change) = self
            .inner
            .store
            .put_workload(spec, yaml.to_owned(), display(&path), now, true)
            .await?;
        if let Ok(mut errors) = self.inner.errors.write() {
            errors.remove(&path);
        }
        Ok((record, Some(change)))
    }

    /// Deletes a workload's file and forgets it.
    pub async fn delete(
        &self,
        id: &WorkloadId,
        now: Timestamp,
    ) -> Result<WorkloadRecord, EditError> {
        let _state = self.inner.lock.lock().await;
        let record = self
            .inner
            .store
            .get_workload(id)
            .await?
            .ok_or_else(|| EditError::NotFound(id.clone()))?;
        let path = PathBuf::from(&record.source_path);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(EditError::Io { path, source }),
        }
        self.inner
            .store
            .remove_workload(id.clone(), "deleted through the API".into(), now)
            .await?;
        Ok(record)
    }
}

/// Temp file, fsync, rename, fsync the directory: a crash leaves either the
/// old file or the new one, never half of one.
fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("workload");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The loader as a background task: periodic rescans plus activations from
/// the file watcher and from Apply.
pub struct ReloadTask {
    /// The directory to load.
    pub dir: WorkloadDir,
}

impl BackgroundTask for ReloadTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let summary = self.dir.reload(crate::clock::now()).await?;
            Ok(serde_json::to_value(summary)?)
        })
    }
}

/// Subject helper for workload events.
pub fn workload_subject(id: &WorkloadId) -> EventSubject {
    EventSubject {
        workload_id: Some(id.to_string()),
        ..Default::default()
    }
}
