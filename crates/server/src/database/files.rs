//! The files beside a SQLite database: SQLite's own (`-wal`, `-shm`,
//! `-journal`), the marker that says this installation created the
//! database, and the lock a running server (or a restore) holds.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The files SQLite keeps beside a database, by suffix.
pub const SQLITE_SIDECARS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// `<db><suffix>`, e.g. `boilerhouse.db-wal`.
pub fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The marker: written beside the database once the server has created
/// (or first opened) it. While it exists, a missing database is refused
/// rather than created empty again.
pub fn marker(db: &Path) -> PathBuf {
    sidecar(db, ".created")
}

/// Written when the whole integrity check, after startup, found the
/// database damaged: while it is here, the next start checks the whole
/// file before it serves (and removes it once the file passes), so a
/// supervisor restarting the server does not serve the damage again.
pub fn check_whole_marker(db: &Path) -> PathBuf {
    sidecar(db, ".check-whole")
}

/// The lock file a running server holds (flock) for its whole life.
pub fn lock_path(db: &Path) -> PathBuf {
    sidecar(db, ".lock")
}

/// An exclusive lock on a database: released when dropped, or by the
/// kernel when the process dies, even by kill -9.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("held by process {pid}")]
    Held {
        /// The holder's pid as it wrote it, or "unknown".
        pid: String,
    },
    /// The lock file could not be opened or locked.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Takes the lock of `db` without waiting, and writes our pid into it.
pub fn lock(db: &Path) -> Result<DbLock, LockError> {
    let path = lock_path(db);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Held {
                pid: if pid.is_empty() { "unknown" } else { pid }.to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(DbLock { _file: file })
}

/// `20260425T022700Z`: sortable, and without the colons some tools choke
/// on in file names.
pub fn stamp(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace(['-', ':'], "")
}

/// Renames the database and its SQLite files to `<db>.<label>-<stamp>`
/// (and `…-wal`, `…-shm` beside it, so the pair still opens together).
/// Returns what was moved, where to; nothing is deleted.
pub fn move_aside(db: &Path, label: &str) -> std::io::Result<Vec<PathBuf>> {
    let base = unused(db, label);
    let mut moved = Vec::new();
    for suffix in std::iter::once("").chain(SQLITE_SIDECARS) {
        let from = sidecar(db, suffix);
        if from.exists() {
            let to = sidecar(&base, suffix);
            std::fs::rename(&from, &to)?;
            moved.push(to);
        }
    }
    if let Some(dir) = db.parent() {
        fsync_dir(dir)?;
    }
    Ok(moved)
}

/// `<db>.<label>-<stamp>`, with `-2`, `-3`… if that name is taken.
fn unused(db: &Path, label: &str) -> PathBuf {
    let stamp = stamp(SystemTime::now());
    let mut candidate = sidecar(db, &format!(".{label}-{stamp}"));
    let mut n = 2;
    while SQLITE_SIDECARS
        .iter()
        .chain(std::iter::once(&""))
        .any(|s| sidecar(&candidate, s).exists())
    {
        candidate = sidecar(db, &format!(".{label}-{stamp}-{n}"));
        n += 1;
    }
    candidate
}

/// Makes a rename or a new file in `dir` durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Writes `contents` to `path` atomically: a temporary file beside it,
/// fsynced, renamed over it, and the directory fsynced.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = sidecar(path, ".tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Records in the marker how the database came to be.
pub fn write_marker(db: &Path, origin: &str) -> std::io::Result<()> {
    let name = db.file_name().map_or_else(
        || db.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let text = format!(
        "# boilerhoused keeps its database beside this file ({name}).\n\
         # While this file is here, a missing {name} is refused rather than\n\
         # created empty again: see docs/OPERATIONS.md, \"A missing or damaged database\".\n\
         written_at = \"{}\"\n\
         origin = {:?}\n",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        origin
    );
    write_atomic(&marker(db), text.as_bytes())
}

/// Removes copies a backup left behind (`<db>.backup-*.tmp`) when the
/// server stopped in the middle of one; called with the lock held, so no
/// backup of this database is in progress.
pub fn remove_stale_copies(db: &Path) {
    let (Some(dir), Some(name)) = (db.parent(), db.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.backup-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&prefix) && file.ends_with(".tmp") {
            tracing::info!(path = %entry.path().display(), "removing the copy an interrupted backup left");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Which of our files beside `db` exist (not the database itself): what
/// shows that a server ran here before.
pub fn evidence(db: &Path) -> Vec<PathBuf> {
    [".created", ".lock"]
        .into_iter()
        .chain(SQLITE_SIDECARS)
        .map(|s| sidecar(db, s))
        .filter(|p| p.exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_holder_and_is_free_again_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        let held = lock(&db).unwrap();
        let Err(LockError::Held { pid }) = lock(&db) else {
            panic!("locked twice");
        };
        assert_eq!(pid, std::process::id().to_string());
        drop(held);
        lock(&db).unwrap();
    }

    #[test]
    fn moving_aside_keeps_the_wal_beside_its_database_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        for (suffix, body) in [("", "db"), ("-wal", "wal")] {
            std::fs::write(sidecar(&db, suffix), body).unwrap();
        }
        let moved = move_aside(&db, "damaged").unwrap();
        assert_eq!(moved.len(), 2, "{moved:?}");
        assert!(!db.exists());
        assert_eq!(std::fs::read_to_string(&moved[0]).unwrap(), "db");
        assert_eq!(moved[1], sidecar(&moved[0], "-wal"));
        let name = moved[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("b.db.damaged-20"), "{name}");

        std::fs::write(&db, "again").unwrap();
        let again = move_aside(&db, "damaged").unwrap();
        assert_ne!(again[0], moved[0], "a second move in the same second");
        assert_eq!(std::fs::read_to_string(&moved[0]).unwrap(), "db");
    }

    #[test]
    fn evidence_is_only_our_files_beside_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        std::fs::create_dir(dir.path().join("pki")).unwrap();
        std::fs::write(dir.path().join("tokens.toml"), "").unwrap();
        assert!(
            evidence(&db).is_empty(),
            "pki and tokens come before the first start"
        );
        write_marker(&db, "created empty").unwrap();
        assert_eq!(evidence(&db), [marker(&db)]);
        let text = std::fs::read_to_string(marker(&db)).unwrap();
        assert!(text.contains("origin = \"created empty\""), "{text}");
    }
}
