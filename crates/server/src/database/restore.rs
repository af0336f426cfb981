//! `boilerhoused restore --from <backup>`: installs a backup as the
//! database, offline. The backup is checked before anything is touched;
//! the database's lock proves no server runs on it; the current file is
//! moved aside (never deleted) and the backup installed by a rename, so a
//! crash at any point leaves either the old database or the new one (or,
//! between the two renames, none: the marker then makes the next start
//! refuse and say what to do, rather than start empty).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::files;
use crate::store::integrity::{self, Verdict};

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The database now in place.
    pub database: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Where the files it replaced went.
    pub moved_aside: Vec<PathBuf>,
}

/// Installs `backup` as the database `db`.
pub async fn restore(backup: &Path, db: &Path) -> anyhow::Result<Restored> {
    anyhow::ensure!(
        backup.is_file(),
        "the backup {} does not exist (or is not a file)",
        backup.display()
    );
    if let (Ok(a), Ok(b)) = (backup.canonicalize(), db.canonicalize()) {
        anyhow::ensure!(a != b, "{} is the database itself", backup.display());
    }
    let dir = db
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    anyhow::ensure!(
        dir.is_dir(),
        "{} does not exist: pass the server's --data-dir (or --database) so the backup goes where the server reads it",
        dir.display()
    );
    match integrity::check_file(backup, integrity::Depth::Full)
        .await
        .with_context(|| format!("checking {}", backup.display()))?
    {
        Verdict::Sound => {}
        Verdict::Damaged { summary, detail } => anyhow::bail!(
            "the backup {} is damaged ({summary}: {detail}); nothing was changed",
            backup.display()
        ),
        Verdict::Empty | Verdict::Foreign => anyhow::bail!(
            "{} is not a Boilerhouse database; nothing was changed",
            backup.display()
        ),
    }
    let made_by = integrity::migration_version(backup)
        .await
        .with_context(|| format!("reading the migrations of {}", backup.display()))?
        .unwrap_or(0);
    let known = integrity::known_migration_version();
    anyhow::ensure!(
        made_by <= known,
        "the backup {} was made by a newer boilerhoused (migration {made_by}; this one knows up to {known}): restore it with that version",
        backup.display()
    );

    let _lock = match files::lock(db) {
        Ok(lock) => lock,
        Err(files::LockError::Held { pid }) => anyhow::bail!(
            "a boilerhoused (pid {pid}) is running on {}: stop it first; nothing was changed",
            db.display()
        ),
        Err(files::LockError::Io(e)) => {
            return Err(e).with_context(|| format!("locking {}", db.display()));
        }
    };

    // The copy is made and made durable beside the database first, so the
    // swap is two renames in one directory.
    let staged = files::sidecar(db, ".restoring");
    let _ = std::fs::remove_file(&staged);
    let bytes = std::fs::copy(backup, &staged)
        .with_context(|| format!("copying {} to {}", backup.display(), staged.display()))?;
    {
        let file = std::fs::File::open(&staged)?;
        // The server's own user must be able to write it: take the owner
        // and mode of the file it replaces, when there is one.
        if let Ok(meta) = std::fs::metadata(db) {
            use std::os::unix::fs::MetadataExt as _;
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
            file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
        file.sync_all()?;
    }
    let moved_aside = files::move_aside(db, "before-restore")
        .with_context(|| format!("moving {} aside", db.display()))?;
    std::fs::rename(&staged, db)
        .with_context(|| format!("renaming {} to {}", staged.display(), db.display()))?;
    files::fsync_dir(dir)?;
    files::write_marker(db, &format!("restored from {}", backup.display()))?;
    // The backup passed the whole check above; a mark about the file it
    // replaces no longer applies.
    let _ = std::fs::remove_file(files::check_whole_marker(db));
    Ok(Restored {
        database: db.to_owned(),
        bytes,
        moved_aside,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreOptions};

    async fn database(path: &Path, marker: &str) {
        let location = crate::store::DatabaseLocation::Sqlite(path.to_owned());
        let (store, _guard) = super::super::open(&location, false, StoreOptions::default())
            .await
            .unwrap();
        store
            .append_event(boilerhouse_core::event::NewEvent::new(
                boilerhouse_core::Timestamp::from_millis(1),
                boilerhouse_core::event::EventKind::NodeJoined,
                marker,
            ))
            .await
            .unwrap();
        store.close().await;
    }

    async fn messages(path: &Path) -> Vec<String> {
        let store = Store::open(path, StoreOptions::default()).await.unwrap();
        let query = crate::store::EventQuery {
            limit: 100,
            ..Default::default()
        };
        let events = store.list_events(&query).await.unwrap();
        store.close().await;
        events.into_iter().map(|e| e.event.message).collect()
    }

    #[tokio::test]
    async fn a_backup_replaces_the_database_which_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (db, backup) = (dir.path().join("b.db"), dir.path().join("backup.db"));
        database(&backup, "in the backup").await;
        database(&db, "in the current one").await;
        let restored = restore(&backup, &db).await.unwrap();
        assert!(restored.bytes > 0);
        assert!(messages(&db).await.contains(&"in the backup".to_owned()));
        let aside = &restored.moved_aside[0];
        assert!(
            messages(aside)
                .await
                .contains(&"in the current one".to_owned())
        );
        let marker = std::fs::read_to_string(files::marker(&db)).unwrap();
        assert!(marker.contains("restored from"), "{marker}");
    }

    #[tokio::test]
    async fn a_damaged_backup_or_a_running_server_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (db, backup) = (dir.path().join("b.db"), dir.path().join("backup.db"));
        database(&db, "current").await;
        std::fs::write(&backup, "not a database").unwrap();
        let err = restore(&backup, &db).await.unwrap_err().to_string();
        assert!(
            err.contains("damaged") && err.contains("nothing was changed"),
            "{err}"
        );

        std::fs::remove_file(&backup).unwrap();
        database(&backup, "backup").await;
        let _running = files::lock(&db).unwrap();
        let err = restore(&backup, &db).await.unwrap_err().to_string();
        assert!(
            err.contains("is running on") && err.contains("stop it first"),
            "{err}"
        );
        assert!(messages(&db).await.contains(&"current".to_owned()));
    }
}
