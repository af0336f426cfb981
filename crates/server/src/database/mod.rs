//! The database file, before the store opens it: a database is never
//! silently replaced.
//!
//! At startup ([`open`]), for SQLite:
//! - the server takes the database's lock (`<db>.lock`, flock), so a
//!   second server, or a restore, cannot work on it at the same time;
//! - an existing file must pass [`integrity::check_file`] (SQLite's
//!   header, its recorded length, and what serving relies on: the
//!   claims' guards entry for entry, the claims' and request ids' other
//!   indexes counted, the container rows' pages, the whole check of every
//!   small table; our migration history); a damaged one is refused in
//!   one sentence naming the file and the way out. The whole file's
//!   `integrity_check` (every page, every index against its table) runs
//!   once the server serves, and every day after
//!   ([`Opened::full_check`]): it reads the history too, which a restart
//!   should not wait for (on a day's 582 MiB, the startup check took
//!   2.1 s when it read the whole file, 0.4 s now). A database that
//!   fails it stops the server with the same refusal, and is marked
//!   (`<db>.check-whole`) to be checked whole before the next start
//!   serves;
//! - a missing file is created only on a fresh install: when nothing of
//!   ours lies beside it (the marker `<db>.created`, the lock, SQLite's
//!   `-wal`, `-shm` or `-journal`). `pki/` and `tokens.toml` are not
//!   evidence: `pki init` and `token create` make them before the first
//!   start. Anything else is refused;
//! - `--rebuild-from-agents` replaces a missing or damaged database with an
//!   empty one on purpose (the damaged file moved aside, never deleted);
//!   reconciliation then adopts what the agents report.
//!
//! The restore of a backup, offline, is in [`restore`]; the backup itself
//! is `AdminService.BackupDatabase` (`api::admin`).

pub mod files;
pub mod postgres;
pub mod restore;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;

use boilerhouse_core::event::{EventKind, NewEvent};

use crate::store::integrity::{self, Verdict};
use crate::store::{DatabaseLocation, Store, StoreError, StoreOptions};

/// How to back up and restore a PostgreSQL database: its own tools do it
/// better than a copy streamed through the server could.
pub const PG_DUMP_RECIPE: &str = "the database is PostgreSQL: back it up with its own tools, e.g. `pg_dump --format=custom --file=boilerhouse.dump \"$DATABASE_URL\"`, and restore it with `pg_restore --clean --if-exists --dbname=\"$DATABASE_URL\" boilerhouse.dump` while every boilerhoused is stopped (docs/OPERATIONS.md, \"Back up\")";

/// The way out of a missing or damaged database, for refusals.
const WAY_OUT: &str = "restore the last backup with `boilerhoused restore --from <backup-file>` (`bh admin backup` makes them), or rebuild it from the agents on purpose with `boilerhoused --rebuild-from-agents`";

/// How often a running server checks its whole SQLite file again:
/// damage (a disk that lies about its writes, a bit that rots, another
/// program's write) arises while the server runs, not only across
/// restarts.
pub const WHOLE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// The server will not start on this database: one sentence naming the
/// file and the way out, and what lies beneath it.
#[derive(Debug, thiserror::Error)]
#[error("{sentence}")]
pub struct Refused {
    /// What is wrong and what to do, for people.
    pub sentence: String,
    /// The underlying error, if any (SQLite's words).
    pub detail: Option<String>,
}

/// The exit status of a server that refused its database: distinct from
/// a bad configuration (2) and a failure (1), so that a supervisor can be
/// told not to restart it (`RestartPreventExitStatus=3` under systemd).
pub const REFUSED_EXIT: u8 = 3;

/// How the database came to be what the store opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// It was there and sound.
    Existing,
    /// A fresh install: created empty.
    Created,
    /// `--rebuild-from-agents`: created empty in place of a missing or
    /// damaged one, which was moved aside.
    Rebuilt {
        /// What was wrong with the one it replaces.
        was: String,
        /// Where its files went.
        moved_aside: Vec<PathBuf>,
    },
}

/// The database, checked and locked. Keep it alive as long as the server
/// runs: dropping it releases the lock.
#[derive(Debug)]
pub struct Guard {
    db: PathBuf,
    /// How the database came to be.
    pub origin: Origin,
    /// Whether the whole file has passed `PRAGMA integrity_check` (at
    /// startup, or since, by [`Opened::full_check`]): until it has,
    /// nothing deletes history through indexes not yet checked.
    whole_checked: Arc<AtomicBool>,
    _lock: files::DbLock,
}

/// What [`open`] holds while the server runs: the SQLite file's guard,
/// or nothing for PostgreSQL, whose server guards its own data and whose
/// replicas share it on purpose (the leader lease decides who writes).
#[derive(Debug)]
pub enum Opened {
    /// A SQLite file, checked and locked.
    Sqlite(Guard),
    /// A PostgreSQL database.
    Postgres,
}

impl Opened {
    /// The part of the startup check left for after serving, and the
    /// same again every day ([`WHOLE_CHECK_EVERY`]): the whole `PRAGMA
    /// integrity_check` of the SQLite file. Resolves to the refusal when
    /// the database fails it (and marks it to be checked whole before the
    /// next start serves), and never otherwise; a check that cannot run
    /// is retried. Never resolves for PostgreSQL. A file checked whole
    /// before serving, or created by this start, waits a day for its
    /// first.
    pub fn full_check(&self) -> futures::future::BoxFuture<'static, Refused> {
        self.full_check_every(WHOLE_CHECK_EVERY)
    }

    /// [`Self::full_check`], every `every`.
    pub fn full_check_every(
        &self,
        every: std::time::Duration,
    ) -> futures::future::BoxFuture<'static, Refused> {
        let (db, whole_checked) = match self {
            Opened::Sqlite(guard) => (guard.db.clone(), guard.whole_checked.clone()),
            Opened::Postgres => return Box::pin(std::future::pending()),
        };
        Box::pin(async move {
            // A check that cannot run (the file busy, an I/O error) is
            // tried again, and said each time: never skipped in silence.
            let mut retry_in = std::time::Duration::from_secs(1);
            let mut wait = whole_checked.load(Ordering::Acquire).then_some(every);
            loop {
                if let Some(wait) = wait.take() {
                    tokio::time::sleep(wait).await;
                }
                let started = std::time::Instant::now();
                match integrity::full_check_open(&db).await {
                    Ok(None) => {
                        tracing::info!(
                            path = %db.display(),
                            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                            "database passed the full integrity check"
                        );
                        whole_checked.store(true, Ordering::Release);
                        wait = Some(every);
                        retry_in = std::time::Duration::from_secs(1);
                        continue;
                    }
                    Ok(Some(Verdict::Damaged { summary, detail })) => {
                        let marker = files::check_whole_marker(&db);
                        if let Err(e) = std::fs::write(&marker, format!("{summary}: {detail}\n")) {
                            tracing::error!(path = %marker.display(), error = %e, "cannot mark the database for a whole check at the next start");
                        }
                        return Damage {
                            summary,
                            detail: Some(detail),
                        }
                        .refusal(&db);
                    }
                    Ok(Some(other)) => {
                        tracing::error!(path = %db.display(), verdict = ?other, "the full integrity check gave no verdict on damage");
                        return std::future::pending().await;
                    }
                    Err(e) => {
                        tracing::warn!(path = %db.display(), error = %e, ?retry_in, "the full integrity check could not run; trying again");
                    }
                }
                tokio::time::sleep(retry_in).await;
                retry_in = (retry_in * 2).min(std::time::Duration::from_secs(60));
            }
        })
    }

    /// Whether the whole database has passed its integrity check: true
    /// from the start for PostgreSQL (its server checks its own pages) and
    /// for a SQLite file this start created or checked whole.
    pub fn whole_checked(&self) -> Arc<AtomicBool> {
        match self {
            Opened::Sqlite(guard) => guard.whole_checked.clone(),
            Opened::Postgres => Arc::new(AtomicBool::new(true)),
        }
    }

    /// How a SQLite database came to be; PostgreSQL: existing.
    pub fn origin(&self) -> Origin {
        match self {
            Opened::Sqlite(guard) => guard.origin.clone(),
            Opened::Postgres => Origin::Existing,
        }
    }
}

/// Checks the database and opens the store on it, or refuses (the error
/// is then a [`Refused`]).
///
/// PostgreSQL is opened as it is: its own server detects damage, a
/// missing database is a connection error naming it, and an emptied one
/// was refused by [`postgres::check`] unless rebuilt on purpose.
pub async fn open(
    location: &DatabaseLocation,
    rebuild: bool,
    options: StoreOptions,
) -> anyhow::Result<(Store, Opened)> {
    let (store, opened) = match location {
        DatabaseLocation::Sqlite(db) => {
            let guard = prepare(db, rebuild).await?;
            let store = Store::open(location.clone(), options)
                .await
                .map_err(|e| refuse_open_error(db, e))
                .with_context(|| format!("opening database {}", db.display()))?;
            guard.opened(&store).await?;
            (store, Opened::Sqlite(guard))
        }
        // Checked by `postgres::check` before the leader election
        // migrated it.
        DatabaseLocation::Postgres(_) => {
            let store = Store::open(location.clone(), options)
                .await
                .with_context(|| format!("opening database {location}"))?;
            if rebuild && store_is_new(&store).await? {
                let message = format!(
                    "database {location} was empty: started to rebuild from the agents' reports (--rebuild-from-agents); nodes return with their agents, claims with adoption"
                );
                store
                    .append_event(NewEvent::new(
                        crate::clock::now(),
                        EventKind::DatabaseReplaced,
                        message,
                    ))
                    .await?;
            }
            (store, Opened::Postgres)
        }
    };
    report_unreadable_rows(&store).await?;
    Ok((store, opened))
}

/// No event was ever recorded: the schema was made by this start. (A
/// leader elected again later finds its own events, so a rebuild is
/// announced once.)
async fn store_is_new(store: &Store) -> Result<bool, StoreError> {
    let query = crate::store::EventQuery {
        limit: 1,
        ..Default::default()
    };
    Ok(store.list_events(&query).await?.is_empty())
}

/// Reports the node and workload rows that cannot be read, before the
/// workload loader and the agents' Hellos rewrite them. The loaders of
/// the pool index, boosts and syncs report their own.
async fn report_unreadable_rows(store: &Store) -> Result<(), StoreError> {
    let (_, mut unreadable) = store.list_nodes_lenient().await?;
    unreadable.extend(store.list_workloads_lenient().await?.1);
    store
        .report_unreadable(&unreadable, crate::clock::now())
        .await
}

/// Decides whether the server may open `db`, and prepares it for the
/// store: refuses, or moves a damaged one aside when asked to rebuild.
pub async fn prepare(db: &Path, rebuild: bool) -> anyhow::Result<Guard> {
    if let Some(dir) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Looked at before the lock file is created: that file is evidence
    // only when an earlier run left it.
    let evidence = files::evidence(db);
    let lock = match files::lock(db) {
        Ok(lock) => lock,
        Err(files::LockError::Held { pid }) => {
            return Err(Refused {
                sentence: format!(
                    "the database {} is in use by another boilerhoused (pid {pid}): stop that one first, or give this one a --data-dir of its own",
                    db.display()
                ),
                detail: None,
            }
            .into());
        }
        Err(files::LockError::Io(e)) => {
            return Err(e).with_context(|| format!("locking {}", files::lock_path(db).display()));
        }
    };
    files::remove_stale_copies(db);
    // Found damaged after a start: the whole file is checked before it
    // is served again.
    let check_whole = files::check_whole_marker(db);
    let depth = if check_whole.exists() {
        tracing::warn!(path = %db.display(), marker = %check_whole.display(), "the last start found this database damaged after it began to serve: checking the whole file before serving");
        integrity::Depth::Full
    } else {
        integrity::Depth::Startup
    };
    let found = if db.exists() {
        let started = std::time::Instant::now();
        let found = integrity::check_file(db, depth)
            .await
            .with_context(|| format!("checking {}", db.display()))?;
        tracing::info!(
            path = %db.display(),
            ?depth,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "database checked before serving"
        );
        found
    } else {
        Verdict::Empty
    };
    if depth == integrity::Depth::Full && found == Verdict::Sound {
        tracing::info!(path = %db.display(), "the whole database passed its integrity check");
        let _ = std::fs::remove_file(&check_whole);
    }
    let damage = match (db.exists(), found) {
        (true, Verdict::Sound) => {
            if rebuild {
                tracing::warn!(path = %db.display(), "--rebuild-from-agents ignored: the database is sound; remove the flag");
            }
            let guard = guard(db, Origin::Existing, lock);
            guard
                .whole_checked
                .store(depth == integrity::Depth::Full, Ordering::Release);
            return Ok(guard);
        }
        (true, Verdict::Foreign) => {
            return Err(Refused {
                sentence: format!(
                    "{} is a SQLite database that Boilerhouse did not make (it has tables but no migration history): point --database at Boilerhouse's own file, or at a new path",
                    db.display()
                ),
                detail: None,
            }
            .into());
        }
        // A file created and never written (a first start stopped before
        // its first write): what SQLite would make of a new file anyway.
        (true, Verdict::Empty) if !files::marker(db).exists() => {
            return Ok(guard(db, Origin::Created, lock));
        }
        (true, Verdict::Empty) => Damage {
            summary: "it is empty",
            detail: None,
        },
        (true, Verdict::Damaged { summary, detail }) => Damage {
            summary,
            detail: Some(detail),
        },
        (false, _) if evidence.is_empty() => return Ok(guard(db, Origin::Created, lock)),
        (false, _) => Damage {
            summary: "missing",
            detail: Some(format!(
                "found beside it: {}",
                evidence
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
    };
    if !rebuild {
        return Err(damage.refusal(db).into());
    }
    let moved_aside = files::move_aside(db, "damaged")
        .with_context(|| format!("moving {} aside", db.display()))?;
    // The mark was about the file just moved aside.
    let _ = std::fs::remove_file(&check_whole);
    let was = match &damage.detail {
        Some(detail) if damage.summary != "missing" => format!("{} ({detail})", damage.summary),
        _ => damage.summary.to_owned(),
    };
    tracing::warn!(path = %db.display(), was = %was, moved_aside = ?moved_aside, "--rebuild-from-agents: starting from an empty database");
    Ok(guard(db, Origin::Rebuilt { was, moved_aside }, lock))
}

fn guard(db: &Path, origin: Origin, lock: files::DbLock) -> Guard {
    Guard {
        db: db.to_owned(),
        whole_checked: Arc::new(AtomicBool::new(origin != Origin::Existing)),
        origin,
        _lock: lock,
    }
}

/// A start that failed after the database opened (a load, an expiry at
/// startup) may have failed on damage the checks before serving do not
/// look for. Asked once the server has stopped and let go of the file:
/// the whole check, and the refusal when the file fails it (marked to be
/// checked whole first next time), so that a supervisor's restarts end in
/// the refusal and its way out rather than the same failure. `None` for a
/// sound file, PostgreSQL, or a file that is not there.
pub async fn damage_behind_failure(location: &DatabaseLocation) -> Option<Refused> {
    let DatabaseLocation::Sqlite(db) = location else {
        return None;
    };
    if !db.exists() {
        return None;
    }
    match integrity::check_file(db, integrity::Depth::Full).await {
        Ok(Verdict::Damaged { summary, detail }) => {
            let _ = std::fs::write(
                files::check_whole_marker(db),
                format!("{summary}: {detail}\n"),
            );
            Some(
                Damage {
                    summary,
                    detail: Some(detail),
                }
                .refusal(db),
            )
        }
        _ => None,
    }
}

/// The whole check found the database damaged while the server served:
/// said loudly, and recorded where the database still takes it.
pub async fn record_damage(store: &Store, refused: &Refused) {
    tracing::error!(detail = ?refused.detail, "{}; the server stops", refused.sentence);
    let _ = store
        .append_event(NewEvent::new(
            crate::clock::now(),
            EventKind::DatabaseDamaged,
            format!("{}; the server stopped", refused.sentence),
        ))
        .await;
}

/// What is wrong with a database file.
struct Damage {
    summary: &'static str,
    detail: Option<String>,
}

impl Damage {
    fn refusal(self, db: &Path) -> Refused {
        let sentence = if self.summary == "missing" {
            format!(
                "the database {} is missing, though this installation ran here before: {WAY_OUT}",
                db.display()
            )
        } else {
            format!(
                "the database {} is damaged ({}): {WAY_OUT}, which moves the damaged file aside",
                db.display(),
                self.summary
            )
        };
        Refused {
            sentence,
            detail: self.detail,
        }
    }
}

/// Damage that only shows when the store opens or migrates the file.
fn refuse_open_error(db: &Path, e: StoreError) -> anyhow::Error {
    let damaged = match &e {
        StoreError::Database(inner) => integrity::is_damage(inner),
        StoreError::Unavailable(message) => integrity::is_damage_message(message),
        _ => false,
    };
    if !damaged {
        return e.into();
    }
    Damage {
        summary: integrity::damage_summary(&e.to_string()),
        detail: Some(e.to_string()),
    }
    .refusal(db)
    .into()
}

impl Guard {
    /// The store is open on the database: record how it came to be (the
    /// marker, and an event for a rebuild).
    async fn opened(&self, store: &Store) -> anyhow::Result<()> {
        let now = crate::clock::now();
        let origin = match &self.origin {
            Origin::Existing if files::marker(&self.db).exists() => return Ok(()),
            // Made before markers existed: from now on it is protected too.
            Origin::Existing => "found at startup".to_owned(),
            Origin::Created => "created empty (a fresh install)".to_owned(),
            Origin::Rebuilt { was, moved_aside } => {
                let aside = if moved_aside.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; moved aside to {}",
                        moved_aside
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let message = format!(
                    "database {} was {was}{aside}: started empty to rebuild from the agents' reports (--rebuild-from-agents); nodes return with their agents, claims with adoption, and history before now is in the file moved aside",
                    self.db.display()
                );
                store
                    .append_event(NewEvent::new(now, EventKind::DatabaseReplaced, message))
                    .await?;
                format!("created empty to rebuild from the agents (the previous one was {was})")
            }
        };
        files::write_marker(&self.db, &origin)
            .with_context(|| format!("writing {}", files::marker(&self.db).display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
