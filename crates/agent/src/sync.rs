//! Tenant state sync on the host: between a container's state directory
//! and a sink, through `object_store`.
//!
//! The decisions (which paths are safe, what moves) are `core::sync`'s;
//! this module does the I/O. Three things matter here:
//! - A tenant controls its state directory and may plant symlinks in it.
//!   Nothing here follows one: listings skip them, a mapping whose path
//!   passes through one is refused, and downloads write to a temporary
//!   file and rename it over the destination, which replaces a link rather
//!   than writing through it.
//! - Files are streamed both ways in bounded chunks; a large file is never
//!   held in memory.
//! - The sink keeps a manifest of what it holds (size and the source
//!   file's modification time), written after the objects, so unchanged
//!   files are skipped and an interrupted sync only repeats work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use boilerhouse_core::TenantId;
use boilerhouse_core::sync::{FileMeta, Listing, MANIFEST_KEY, Transfer, plan, safe_relative};
use boilerhouse_core::workload::{SyncDirection, SyncSink, SyncSpec};

/// Files up to this size go up in one request; larger ones as multipart
/// uploads of this part size.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Read buffer for streaming a file to the sink.
const READ_CHUNK: usize = 1024 * 1024;
/// Multipart parts in flight per file.
const PARTS_IN_FLIGHT: usize = 4;
/// Errors kept per mapping in a report.
const MAX_ERRORS: usize = 16;
/// Prefix of the agent's temporary files; never synced.
const TEMP_PREFIX: &str = ".boilerhouse-";

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
}

/// What one mapping's sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingReport {
    /// The mapping's path.
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
}

impl MappingReport {
    fn error(&mut self, message: String) {
        tracing::warn!(mapping = %self.path, error = %message, "sync error");
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(message);
        }
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

/// The sink's record of what it holds, by path relative to the state
/// directory.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    files: Listing,
}

/// Opens sinks, caching one client per sink configuration.
#[derive(Clone, Default)]
pub struct Sinks {
    stores: Arc<Mutex<HashMap<String, Arc<dyn ObjectStore>>>>,
    credentials_file: Option<PathBuf>,
}

impl Sinks {
    fn open(&self, sink: &SyncSink) -> Result<Arc<dyn ObjectStore>, SyncError> {
        let key = serde_json::to_string(sink).map_err(|e| SyncError::Sink(e.to_string()))?;
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = stores.get(&key) {
            return Ok(store.clone());
        }
        let store: Arc<dyn ObjectStore> = match sink {
            SyncSink::Local { path, .. } => {
                std::fs::create_dir_all(path).map_err(|e| {
                    SyncError::Sink(format!("cannot create local sink directory {path}: {e}"))
                })?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(path)
                        .map_err(|e| SyncError::Sink(e.to_string()))?,
                )
            }
            SyncSink::S3 {
                bucket,
                region,
                endpoint,
                ..
            } => Arc::new(s3(
                bucket,
                region.as_deref(),
                endpoint.as_deref(),
                self.credentials_file.as_deref(),
            )?),
        };
        stores.insert(key, store.clone());
        Ok(store)
    }
}

/// An S3 client. Credentials come from the agent's credentials file when
/// one is configured, else from the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the container/instance
/// metadata services object_store knows), else from the shared credentials
/// file (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`,
/// profile `AWS_PROFILE` or `default`), the way the AWS tools look.
fn s3(
    bucket: &str,
    region: Option<&str>,
    endpoint: Option<&str>,
    credentials_file: Option<&Path>,
) -> Result<object_store::aws::AmazonS3, SyncError> {
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(region.unwrap_or("us-east-1"));
    if let Some(endpoint) = endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    let from_file = match credentials_file {
        Some(path) => credentials_from_file(Some(path.to_path_buf()))?,
        None if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() => credentials_from_file(None)?,
        None => None,
    };
    if let Some((key, secret, token)) = from_file {
        builder = builder
            .with_access_key_id(key)
            .with_secret_access_key(secret);
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
    }
    builder
        .build()
        .map_err(|e| SyncError::Sink(format!("cannot configure s3 bucket {bucket}: {e}")))
}

type Credentials = (String, String, Option<String>);

fn credentials_from_file(explicit: Option<PathBuf>) -> Result<Option<Credentials>, SyncError> {
    let required = explicit.is_some();
    let path = match explicit
        .or_else(|| std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from))
    {
        Some(p) => p,
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => {
            return Err(SyncError::Sink(format!(
                "cannot read credentials file {}: {e}",
                path.display()
            )));
        }
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_owned());
    parse_credentials(&text, &profile)
        .map(Some)
        .ok_or_else(|| {
            SyncError::Sink(format!(
                "credentials file {} has no aws_access_key_id and aws_secret_access_key for profile {profile}",
                path.display()
            ))
        })
}

/// Reads one profile of an AWS shared credentials file (INI).
fn parse_credentials(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_profile = false;
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some((key?, secret?, token))
}

fn object_path(prefix: &ObjectPath, relative: &str) -> ObjectPath {
    let mut parts: Vec<PathPart<'static>> = prefix
        .parts()
        .map(|p| p.as_ref().to_owned().into())
        .collect();
    parts.extend(relative.split('/').map(|p| PathPart::from(p.to_owned())));
    ObjectPath::from_iter(parts)
}

fn millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn meta_of(m: &std::fs::Metadata) -> FileMeta {
    FileMeta {
        size: m.len(),
        modified_ms: m.modified().map(millis).unwrap_or(0),
    }
}

/// Resolves a mapping under `state_dir`, refusing a path that passes
/// through a symlink. Missing components are fine (nothing there yet).
fn mapping_dir(state_dir: &Path, mapping: &str) -> Result<(PathBuf, String), String> {
    let parts = safe_relative(mapping)?;
    let mut dir = state_dir.to_path_buf();
    for part in &parts {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "mapping {mapping:?} passes through a symlink ({part}); refusing to follow it out of the state directory"
                ));
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!("mapping {mapping:?}: {part} is not a directory"));
            }
            _ => {}
        }
    }
    Ok((dir, parts.join("/")))
}

/// Regular files under `dir`, keyed by path relative to the state
/// directory (`key_prefix` is `dir`'s). Symlinks and special files are
/// never followed or synced.
fn list_local(dir: &Path, key_prefix: &str) -> std::io::Result<(Listing, u32)> {
    let mut listing = Listing::new();
    let mut skipped = 0;
    let mut stack = vec![(dir.to_path_buf(), key_prefix.to_owned())];
    while let Some((dir, key)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                skipped += 1;
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let child_key = if key.is_empty() {
                name.to_owned()
            } else {
                format!("{key}/{name}")
            };
            let m = std::fs::symlink_metadata(entry.path())?;
            if m.is_dir() {
                stack.push((entry.path(), child_key));
            } else if m.is_file() {
                listing.insert(child_key, meta_of(&m));
            } else {
                skipped += 1;
            }
        }
    }
    Ok((listing, skipped))
}

fn under(key: &str, prefix: &str) -> bool {
    prefix.is_empty() || key == prefix || key.starts_with(&format!("{prefix}/"))
}

/// Runs sync jobs against the host's container directories.
#[derive(Clone, Default)]
pub struct SyncRunner {
    sinks: Sinks,
}

impl SyncRunner {
    /// A runner whose S3 sinks take credentials from `path` (an AWS shared
    /// credentials file) before the environment.
    pub fn with_credentials_file(path: Option<PathBuf>) -> Self {
        Self {
            sinks: Sinks {
                credentials_file: path,
                ..Default::default()
            },
        }
    }

    /// Syncs `job` for the state directory `state_dir`. A mapping that
    /// fails is reported and the others still run; only a sink that cannot
    /// be opened at all is an error.
    pub async fn run(
        &self,
        state_dir: &Path,
        job: &SyncJob,
    ) -> Result<Vec<MappingReport>, SyncError> {
        if !state_dir.is_dir() {
            return Err(SyncError::Host(format!(
                "state directory {} does not exist",
                state_dir.display()
            )));
        }
        let store = self.sinks.open(&job.spec.sink)?;
        let template = match &job.spec.sink {
            SyncSink::Local { prefix, .. } | SyncSink::S3 { prefix, .. } => prefix,
        };
        let prefix = ObjectPath::from_iter(
            boilerhouse_core::sync::tenant_prefix(template, &job.tenant)
                .split('/')
                .filter(|p| !p.is_empty())
                .map(|p| PathPart::from(p.to_owned())),
        );
        let manifest_path = object_path(&prefix, MANIFEST_KEY);
        let mut manifest = read_manifest(&*store, &manifest_path).await?;
        let mut reports = Vec::new();
        let mut changed = false;
        for mapping in job
            .spec
            .mappings
            .iter()
            .filter(|m| job.force.is_some() || job.phase.selects(m.direction))
        {
            let mut report = MappingReport {
                path: mapping.path.clone(),
                ..Default::default()
            };
            let direction = job.force.unwrap_or(mapping.direction);
            match mapping_dir(state_dir, &mapping.path) {
                Err(why) => report.error(why),
                Ok((dir, key_prefix)) => {
                    let moved = self
                        .sync_mapping(
                            &*store,
                            &prefix,
                            state_dir,
                            &dir,
                            &key_prefix,
                            direction,
                            mapping.mode,
                            &mut manifest,
                            &mut report,
                        )
                        .await;
                    changed |= moved;
                }
            }
            reports.push(report);
        }
        if changed {
            write_manifest(&*store, &manifest_path, &manifest).await?;
        }
        Ok(reports)
    }

    #[allow(clippy::too_many_arguments)]
    async fn sync_mapping(
        &self,
        store: &dyn ObjectStore,
        prefix: &ObjectPath,
        state_dir: &Path,
        dir: &Path,
        key_prefix: &str,
        direction: SyncDirection,
        mode: boilerhouse_core::workload::SyncMode,
        manifest: &mut Manifest,
        report: &mut MappingReport,
    ) -> bool {
        let listed = {
            let dir = dir.to_path_buf();
            let key_prefix = key_prefix.to_owned();
            tokio::task::spawn_blocking(move || list_local(&dir, &key_prefix)).await
        };
        let local = match listed {
            Ok(Ok((listing, _skipped))) => listing,
            Ok(Err(e)) => {
                report.error(format!("cannot list {}: {e}", dir.display()));
                return false;
            }
            Err(e) => {
                report.error(e.to_string());
                return false;
            }
        };
        let remote: Listing = manifest
            .files
            .iter()
            .filter(|(k, _)| under(k, key_prefix))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let steps = plan(direction, mode, &local, &remote);
        let touched: std::collections::BTreeSet<&String> = steps
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
        for step in steps {
            let result = match &step {
                Transfer::Upload(key) => {
                    match upload(store, &object_path(prefix, key), &state_dir.join(key)).await {
                        Ok(meta) => {
                            report.uploaded += 1;
                            report.bytes += meta.size;
                            manifest.files.insert(key.clone(), meta);
                            changed = true;
                            Ok(())
                        }
                        Err(e) => Err(format!("upload {key}: {e}")),
                    }
                }
                Transfer::Download(key) => {
                    let meta = remote[key];
                    match download(store, &object_path(prefix, key), state_dir, key, meta).await {
                        Ok(bytes) => {
                            report.downloaded += 1;
                            report.bytes += bytes;
                            Ok(())
                        }
                        Err(e) => Err(format!("download {key}: {e}")),
                    }
                }
                Transfer::DeleteRemote(key) => {
                    match store.delete(&object_path(prefix, key)).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                            manifest.files.remove(key);
                            report.deleted += 1;
                            changed = true;
                            Ok(())
                        }
                        Err(e) => Err(format!("delete {key} from the sink: {e}")),
                    }
                }
                Transfer::DeleteLocal(key) => match std::fs::remove_file(state_dir.join(key)) {
                    Ok(()) => {
                        report.deleted += 1;
                        Ok(())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(format!("delete {key}: {e}")),
                },
            };
            if let Err(e) = result {
                report.pending += 1;
                report.error(e);
            }
        }
        changed
    }
}

async fn read_manifest(store: &dyn ObjectStore, path: &ObjectPath) -> Result<Manifest, SyncError> {
    match store.get(path).await {
        Ok(got) => {
            let bytes = got
                .bytes()
                .await
                .map_err(|e| SyncError::Sink(format!("cannot read the manifest {path}: {e}")))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| SyncError::Sink(format!("the manifest {path} is damaged: {e}")))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(Manifest {
            version: 1,
            files: Listing::new(),
        }),
        Err(e) => Err(SyncError::Sink(format!(
            "cannot read the manifest {path}: {e}"
        ))),
    }
}

async fn write_manifest(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    manifest: &Manifest,
) -> Result<(), SyncError> {
    let bytes = serde_json::to_vec(manifest).map_err(|e| SyncError::Sink(e.to_string()))?;
    store
        .put(path, PutPayload::from(bytes))
        .await
        .map_err(|e| SyncError::Sink(format!("cannot write the manifest {path}: {e}")))?;
    Ok(())
}

/// Streams one host file to the sink. Returns the metadata the file had
/// when the upload began: if it changes meanwhile, the manifest records
/// the older state and the next sync sends it again.
async fn upload(store: &dyn ObjectStore, to: &ObjectPath, from: &Path) -> Result<FileMeta, String> {
    let (file, meta) = {
        let from = from.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            // O_NOFOLLOW: a file swapped for a symlink since the listing
            // must not be read through.
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&from)?;
            let meta = meta_of(&file.metadata()?);
            Ok((file, meta))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
    };
    let mut file = tokio::fs::File::from_std(file);
    let mut read_chunk = async |limit: usize| -> Result<Vec<u8>, String> {
        let mut buf = Vec::with_capacity(limit);
        (&mut file)
            .take(limit as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok(buf)
    };
    if meta.size <= PART_SIZE as u64 {
        let bytes = read_chunk(PART_SIZE).await?;
        store
            .put(to, PutPayload::from(bytes))
            .await
            .map_err(|e| e.to_string())?;
        return Ok(meta);
    }
    let upload = store.put_multipart(to).await.map_err(|e| e.to_string())?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    loop {
        let chunk = match read_chunk(READ_CHUNK).await {
            Ok(c) => c,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        };
        if chunk.is_empty() {
            break;
        }
        // Bounds memory: at most PARTS_IN_FLIGHT parts are buffered.
        if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            return Err(e.to_string());
        }
        writer.put(Bytes::from(chunk));
    }
    writer.finish().await.map_err(|e| e.to_string())?;
    Ok(meta)
}

/// Streams one sink object to the host: into a temporary file beside the
/// destination, then renamed over it, with the source's modification time
/// restored so the next sync sees it unchanged. Directories created on the
/// way, and the file, belong to the state directory's owner, so a non-root
/// tenant can use what was restored.
async fn download(
    store: &dyn ObjectStore,
    from: &ObjectPath,
    state_dir: &Path,
    key: &str,
    meta: FileMeta,
) -> Result<u64, String> {
    let parts = safe_relative(key)?;
    let Some((name, dirs)) = parts.split_last() else {
        return Err("empty path".into());
    };
    let (parent, tmp, mut file) = {
        let state_dir = state_dir.to_path_buf();
        let dirs = dirs.to_vec();
        tokio::task::spawn_blocking(move || -> Result<_, String> {
            let owner = std::fs::metadata(&state_dir).map_err(|e| e.to_string())?;
            let mut dir = state_dir.clone();
            for part in &dirs {
                dir.push(part);
                match std::fs::symlink_metadata(&dir) {
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(format!("{} is a symlink; not following it", dir.display()));
                    }
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(format!("{} is not a directory", dir.display())),
                    Err(_) => {
                        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
                        chown_like(&dir, &owner);
                    }
                }
            }
            let tmp = dir.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::now_v7()));
            let file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
            chown_like(&tmp, &owner);
            Ok((dir, tmp, tokio::fs::File::from_std(file)))
        })
        .await
        .map_err(|e| e.to_string())??
    };
    let cleanup = |tmp: PathBuf| {
        let _ = std::fs::remove_file(tmp);
    };
    let got = match store.get(from).await {
        Ok(g) => g,
        Err(e) => {
            cleanup(tmp);
            return Err(e.to_string());
        }
    };
    let mut stream = got.into_stream();
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                cleanup(tmp);
                return Err(e.to_string());
            }
        };
        written += chunk.len() as u64;
        if let Err(e) = file.write_all(&chunk).await {
            cleanup(tmp);
            return Err(e.to_string());
        }
    }
    if let Err(e) = file.flush().await {
        cleanup(tmp);
        return Err(e.to_string());
    }
    let file = file.into_std().await;
    let dest = parent.join(name);
    let finished = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mtime = if meta.modified_ms >= 0 {
            UNIX_EPOCH + Duration::from_millis(meta.modified_ms.unsigned_abs())
        } else {
            UNIX_EPOCH
        };
        file.set_modified(mtime)?;
        drop(file);
        if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            return Err(std::io::Error::other(format!(
                "{} is a directory",
                dest.display()
            )));
        }
        std::fs::rename(&tmp, &dest).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    })
    .await
    .map_err(|e| e.to_string())?;
    finished.map_err(|e| e.to_string())?;
    Ok(written)
}

fn chown_like(path: &Path, like: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt as _;
    // Best effort: an unprivileged agent (tests) cannot chown, and then the
    // files are its own anyway.
    let _ = std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid()));
}

#[cfg(test)]
mod tests;
