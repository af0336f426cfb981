//! The data sets: files of pseudo-random bytes in a temporary directory,
//! and the few file-system helpers the measurements share.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Subdirectories a many-file data set is spread over.
const SUBDIRS: usize = 10;
/// Chunk in which a large file is written.
const CHUNK: usize = 1024 * 1024;

/// One data set: a state directory full of files.
pub struct Dataset {
    /// Short name, used in tables and sink keys (`1x4KiB`, ...).
    pub name: String,
    /// The state directory.
    pub dir: PathBuf,
    /// Every file, by path relative to `dir` with `/` separators.
    pub files: Vec<String>,
    /// Their total size.
    pub bytes: u64,
}

/// Fills a buffer with bytes no compressor or deduplication would help
/// with (xorshift64*), different for every `seed`.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// `count` files of `size` bytes under `root/<name>`: one file at the top
/// when `count` is 1, else spread evenly over [`SUBDIRS`] subdirectories.
pub fn many(root: &Path, name: &str, count: usize, size: usize) -> anyhow::Result<Dataset> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut files = Vec::with_capacity(count);
    let mut buf = vec![0u8; size];
    for i in 0..count {
        let rel = if count == 1 {
            format!("f{i:05}.bin")
        } else {
            format!("d{}/f{i:05}.bin", i % SUBDIRS)
        };
        let path = dir.join(&rel);
        if i < SUBDIRS
            && let Some(parent) = path.parent()
        {
            std::fs::create_dir_all(parent)?;
        }
        fill(&mut buf, i as u64 + 1);
        std::fs::write(&path, &buf)?;
        files.push(rel);
    }
    Ok(Dataset {
        name: name.to_owned(),
        dir,
        files,
        bytes: (count * size) as u64,
    })
}

/// One file of `mib` MiB under `root/<name>`.
pub fn big(root: &Path, name: &str, mib: usize) -> anyhow::Result<Dataset> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let rel = "big.bin".to_owned();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(&rel))?);
    let mut buf = vec![0u8; CHUNK];
    for i in 0..mib {
        fill(&mut buf, i as u64 + 1);
        file.write_all(&buf)?;
    }
    file.into_inner()?.sync_all()?;
    Ok(Dataset {
        name: name.to_owned(),
        dir,
        files: vec![rel],
        bytes: (mib * CHUNK) as u64,
    })
}

/// Every regular file below `dir` with its size, by relative path, sorted;
/// for checking that a restore brought back what was saved.
pub fn listing(dir: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(entry.path())?;
            if meta.is_dir() {
                pending.push((entry.path(), rel));
            } else if meta.is_file() {
                out.push((rel, meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Checks that `restored` holds exactly the data set's files, at their
/// sizes (the agent's manifest lives in the sink, never in the state
/// directory).
pub fn check_restored(set: &Dataset, restored: &Path) -> anyhow::Result<()> {
    let got = listing(restored)?;
    let mut want: Vec<(String, u64)> = set
        .files
        .iter()
        .map(|f| (f.clone(), set.bytes / set.files.len() as u64))
        .collect();
    want.sort();
    if got != want {
        anyhow::bail!(
            "{}: restored {} files into {}, expected {}",
            set.name,
            got.len(),
            restored.display(),
            want.len()
        );
    }
    Ok(())
}

/// Flushes every dirty page in the system, so that one measurement does
/// not pay for the writeback of the one before (a restore does not fsync,
/// and its pages would otherwise reach the disk during the next upload).
pub fn settle() {
    rustix::fs::sync();
}
