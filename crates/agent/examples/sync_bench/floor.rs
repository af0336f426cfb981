//! The floors: the least any sync of the same files to the same sink
//! costs, done the plainest way, with the durability and the concurrency
//! the agent has.
//!
//! - Local upload: `std::fs::copy` of each file, then `sync_all` on the
//!   copy: the one fsync per file the local sink does (it writes a
//!   temporary file, `sync_all`s it, and renames it into place; no
//!   directory fsync). No temporary file, no rename, no manifest.
//! - Local restore: `std::fs::copy` of each file, no fsync (the agent's
//!   restore does not fsync either: the container's copy is not the only
//!   one).
//! - S3 upload: one `put` per file, one after another; a file larger than
//!   the agent's part size as a multipart upload with the agent's part
//!   size and parts in flight.
//! - S3 restore: one `get` per object, one after another, streamed into
//!   the file.
//! - Unchanged: a recursive `read_dir` + `lstat` of the state directory
//!   and one read of the manifest object, which is what a sync that moves
//!   nothing must at least do.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt as _;

use crate::data::{Dataset, listing};

/// `sink.rs`: files up to this size go up in one request, larger ones as
/// multipart uploads of this part size.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// `sink.rs`: read buffer for streaming a file to the sink.
const READ_CHUNK: usize = 1024 * 1024;
/// `sink.rs`: multipart parts in flight per file.
const PARTS_IN_FLIGHT: usize = 4;

/// Creates `path`'s parent unless it was created already.
fn parent_once(path: &Path, made: &mut HashSet<PathBuf>) -> std::io::Result<()> {
    if let Some(parent) = path.parent()
        && made.insert(parent.to_owned())
    {
        std::fs::create_dir_all(parent)?;
    }
    Ok(())
}

/// Copies every file of `files` from `from` to `to`, with `fsync` on each
/// copy when asked.
pub fn copy_files(from: &Path, to: &Path, files: &[String], fsync: bool) -> anyhow::Result<()> {
    let mut made = HashSet::new();
    for rel in files {
        let dest = to.join(rel);
        parent_once(&dest, &mut made)?;
        std::fs::copy(from.join(rel), &dest)?;
        if fsync {
            std::fs::File::open(&dest)?.sync_all()?;
        }
    }
    Ok(())
}

/// The local floor of an unchanged sync: walk and `lstat` the state
/// directory, read the manifest file.
pub fn local_unchanged(state: &Path, manifest: &Path) -> anyhow::Result<usize> {
    let files = listing(state)?.len();
    let bytes = std::fs::read(manifest)?;
    anyhow::ensure!(!bytes.is_empty(), "an empty manifest");
    Ok(files)
}

/// The S3 floor of an unchanged sync: walk and `lstat` the state
/// directory, get the manifest object.
pub async fn s3_unchanged(
    store: &Arc<dyn ObjectStore>,
    state: &Path,
    manifest: &str,
) -> anyhow::Result<usize> {
    let files = listing(state)?.len();
    let bytes = store
        .get(&ObjectPath::from(manifest))
        .await?
        .bytes()
        .await?;
    anyhow::ensure!(!bytes.is_empty(), "an empty manifest");
    Ok(files)
}

/// Puts every file of `set` under `prefix`, one after another.
pub async fn s3_upload(
    store: &Arc<dyn ObjectStore>,
    set: &Dataset,
    prefix: &str,
) -> anyhow::Result<()> {
    for rel in &set.files {
        let to = ObjectPath::from(format!("{prefix}/{rel}"));
        let mut file = tokio::fs::File::open(set.dir.join(rel)).await?;
        let size = file.metadata().await?.len();
        if size <= PART_SIZE as u64 {
            let mut buf = Vec::with_capacity(usize::try_from(size)?);
            file.read_to_end(&mut buf).await?;
            store.put(&to, PutPayload::from(buf)).await?;
            continue;
        }
        let upload = store.put_multipart(&to).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        loop {
            let mut buf = Vec::with_capacity(PART_SIZE);
            (&mut file)
                .take(PART_SIZE as u64)
                .read_to_end(&mut buf)
                .await?;
            if buf.is_empty() {
                break;
            }
            writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
            writer.put(Bytes::from(buf));
        }
        writer.finish().await?;
    }
    Ok(())
}

/// Gets every object of `set` from under `prefix` into `to`, one after
/// another, each streamed into its file.
pub async fn s3_restore(
    store: &Arc<dyn ObjectStore>,
    set: &Dataset,
    prefix: &str,
    to: &Path,
) -> anyhow::Result<()> {
    let mut made = HashSet::new();
    for rel in &set.files {
        let dest = to.join(rel);
        parent_once(&dest, &mut made)?;
        let mut stream = store
            .get(&ObjectPath::from(format!("{prefix}/{rel}")))
            .await?
            .into_stream();
        // Chunks arrive in tens of KiB; written through a buffer of the
        // size the agent reads local files in.
        let mut file = std::io::BufWriter::with_capacity(READ_CHUNK, std::fs::File::create(&dest)?);
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?)?;
        }
        file.flush()?;
    }
    Ok(())
}

/// Deletes every object under `prefix` (between cases, not timed), so
/// moto does not hold gigabytes it no longer needs.
pub async fn s3_delete_prefix(store: &Arc<dyn ObjectStore>, prefix: &str) -> anyhow::Result<()> {
    let prefix = ObjectPath::from(prefix);
    let keys: Vec<ObjectPath> = store
        .list(Some(&prefix))
        .map(|m| m.map(|m| m.location))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    for key in keys {
        store.delete(&key).await?;
    }
    Ok(())
}
