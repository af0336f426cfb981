//! Sinks: where tenants' files are kept. S3 through `object_store`; a
//! local directory through [`Beneath`], so that a sink directory, too, is
//! only ever written beneath its root and never through a symlink.
//!
//! Keys are `/`-separated paths below the sink's root: the tenant's
//! prefix, then the mapping's key prefix, then the file's path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use boilerhouse_core::workload::SyncSink;

use super::{SyncError, TEMP_PREFIX, blocking};
use crate::beneath::Beneath;

/// Files up to this size go up in one request; larger ones as multipart
/// uploads of this part size.
pub(super) const PART_SIZE: usize = 8 * 1024 * 1024;
/// Read buffer for streaming a file to the sink.
const READ_CHUNK: usize = 1024 * 1024;
/// Multipart parts in flight per file.
const PARTS_IN_FLIGHT: usize = 4;

/// Opens sinks, caching one S3 client per sink configuration.
#[derive(Clone, Default)]
pub struct Sinks {
    stores: Arc<Mutex<HashMap<String, Arc<dyn ObjectStore>>>>,
    credentials_file: Option<PathBuf>,
}

/// One opened sink.
pub enum Sink {
    /// An object store (S3).
    Object(Arc<dyn ObjectStore>),
    /// A directory on this host, opened for this sync: reopened each time
    /// so a directory replaced meanwhile is the one written.
    Local(Arc<Beneath>),
}

/// Bytes streamed from a sink.
pub type ByteStream = BoxStream<'static, Result<Bytes, String>>;

impl Sinks {
    /// Sinks whose S3 clients take credentials from `path` first.
    pub fn with_credentials_file(path: Option<PathBuf>) -> Self {
        Self {
            credentials_file: path,
            ..Default::default()
        }
    }

    /// Opens `sink`.
    pub fn open(&self, sink: &SyncSink) -> Result<Sink, SyncError> {
        match sink {
            SyncSink::Local { path, .. } => Beneath::create(Path::new(path))
                .map(|root| Sink::Local(Arc::new(root)))
                .map_err(|e| SyncError::Sink(format!("cannot open the local sink {path}: {e}"))),
            SyncSink::S3 {
                bucket,
                region,
                endpoint,
                ..
            } => {
                let key =
                    serde_json::to_string(sink).map_err(|e| SyncError::Sink(e.to_string()))?;
                let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(store) = stores.get(&key) {
                    return Ok(Sink::Object(store.clone()));
                }
                let store: Arc<dyn ObjectStore> = Arc::new(s3(
                    bucket,
                    region.as_deref(),
                    endpoint.as_deref(),
                    self.credentials_file.as_deref(),
                )?);
                stores.insert(key, store.clone());
                Ok(Sink::Object(store))
            }
        }
    }
}

fn object_path(key: &str) -> ObjectPath {
    ObjectPath::from_iter(
        key.split('/')
            .filter(|p| !p.is_empty())
            .map(|p| PathPart::from(p.to_owned())),
    )
}

/// A key's components for the local sink. Keys are made by the agent from
/// validated prefixes and listed file names, so anything odd here is a bug
/// or an attack, refused either way.
fn key_parts(key: &str) -> Result<(Vec<String>, String), String> {
    let mut parts: Vec<String> = Vec::new();
    for part in key.split('/') {
        match part {
            "" => {}
            "." | ".." => return Err(format!("key {key:?} has a {part:?} component")),
            p => parts.push(p.to_owned()),
        }
    }
    let name = parts.pop().ok_or_else(|| format!("key {key:?} is empty"))?;
    Ok((parts, name))
}

impl Sink {
    /// The whole object at `key`; `None` when there is none.
    pub async fn get_all(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        match self {
            Sink::Object(store) => match store.get(&object_path(key)).await {
                Ok(got) => Ok(Some(got.bytes().await.map_err(|e| e.to_string())?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Sink::Local(_) => {
                let Some(mut stream) = self.get_stream(key).await? else {
                    return Ok(None);
                };
                let mut all = Vec::new();
                while let Some(chunk) = stream.next().await {
                    all.extend_from_slice(&chunk?);
                }
                Ok(Some(all))
            }
        }
    }

    /// The object at `key` as a stream; `None` when there is none.
    pub async fn get_stream(&self, key: &str) -> Result<Option<ByteStream>, String> {
        match self {
            Sink::Object(store) => match store.get(&object_path(key)).await {
                Ok(got) => Ok(Some(
                    got.into_stream()
                        .map(|c| c.map_err(|e| e.to_string()))
                        .boxed(),
                )),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Sink::Local(root) => {
                let (dirs, name) = key_parts(key)?;
                let root = root.clone();
                let opened = blocking(move || {
                    let mut path = dirs;
                    path.push(name);
                    match root.open_file_at(&path) {
                        Ok((file, _)) => Ok(Some(file)),
                        Err(e) if e.is_not_found() => Ok(None),
                        Err(e) => Err(e.to_string()),
                    }
                })
                .await?;
                Ok(opened.map(|file| {
                    // 1 MiB reads: the default 4 KiB buffer made a 1 GiB
                    // restore 30x slower than a copy (sync_bench).
                    tokio_util::io::ReaderStream::with_capacity(
                        tokio::fs::File::from_std(file),
                        READ_CHUNK,
                    )
                    .map(|c| c.map_err(|e| e.to_string()))
                    .boxed()
                }))
            }
        }
    }

    /// Stores `bytes` at `key`.
    pub async fn put_all(&self, key: &str, bytes: Vec<u8>) -> Result<(), String> {
        match self {
            Sink::Object(store) => store
                .put(&object_path(key), PutPayload::from(bytes))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Sink::Local(_) => {
                let stream = futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed();
                self.put_stream(key, stream).await.map(drop)
            }
        }
    }

    /// Streams `file` (`size` bytes when it was opened) to `key`.
    pub async fn put_file(&self, key: &str, file: std::fs::File, size: u64) -> Result<(), String> {
        let mut file = tokio::fs::File::from_std(file);
        match self {
            Sink::Object(store) => {
                put_object(store.as_ref(), &object_path(key), &mut file, size).await
            }
            Sink::Local(_) => {
                let stream = tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK)
                    .map(|c| c.map_err(|e| e.to_string()))
                    .boxed();
                self.put_stream(key, stream).await.map(drop)
            }
        }
    }

    /// Local sink: the stream into a temporary file beside the
    /// destination, flushed to disk, then renamed over it. Returns the
    /// bytes written.
    async fn put_stream(&self, key: &str, mut stream: ByteStream) -> Result<u64, String> {
        let Sink::Local(root) = self else {
            return Err("put_stream is for local sinks".into());
        };
        let (dirs, name) = key_parts(key)?;
        let root = root.clone();
        let (dir, tmp, file) = blocking(move || {
            let dir = root.create_dirs(&dirs, None).map_err(|e| e.to_string())?;
            let (tmp, file) = dir
                .create_temp(TEMP_PREFIX, None)
                .map_err(|e| e.to_string())?;
            Ok((dir, tmp, file))
        })
        .await?;
        let mut file = tokio::fs::File::from_std(file);
        let mut written = 0u64;
        let result: Result<(), String> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                written += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            // The sink's copy may be the only one left once the container
            // is gone: it is on disk before the sync says it is saved.
            file.sync_all().await.map_err(|e| e.to_string())
        }
        .await;
        drop(file);
        blocking(move || {
            let renamed = result.and_then(|()| dir.rename(&tmp, &name).map_err(|e| e.to_string()));
            if renamed.is_err() {
                dir.remove_temp(&tmp);
            }
            renamed
        })
        .await?;
        Ok(written)
    }

    /// Removes `key`; a missing object is fine.
    pub async fn delete(&self, key: &str) -> Result<(), String> {
        match self {
            Sink::Object(store) => match store.delete(&object_path(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            Sink::Local(root) => {
                let (dirs, name) = key_parts(key)?;
                let root = root.clone();
                blocking(move || {
                    let removed = root.dir(&dirs).and_then(|dir| dir.remove_file(&name));
                    match removed {
                        Ok(()) => Ok(()),
                        Err(e) if e.is_not_found() => Ok(()),
                        Err(e) => Err(e.to_string()),
                    }
                })
                .await
            }
        }
    }
}

/// Streams one host file to an object store: one request up to
/// [`PART_SIZE`], a bounded multipart upload beyond.
async fn put_object(
    store: &dyn ObjectStore,
    to: &ObjectPath,
    file: &mut tokio::fs::File,
    size: u64,
) -> Result<(), String> {
    let mut read_chunk = async |limit: usize| -> Result<Vec<u8>, String> {
        let mut buf = Vec::with_capacity(limit);
        (&mut *file)
            .take(limit as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok(buf)
    };
    if size <= PART_SIZE as u64 {
        let bytes = read_chunk(PART_SIZE).await?;
        store
            .put(to, PutPayload::from(bytes))
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
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
    Ok(())
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
pub(super) fn parse_credentials(text: &str, profile: &str) -> Option<Credentials> {
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
