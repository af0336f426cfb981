//! Is a SQLite file a sound Boilerhouse database? Asked at startup before
//! the store opens it, by `boilerhoused restore` of a backup, and of every
//! copy `bh admin backup` takes.
//!
//! Two depths ([`Depth`]). `PRAGMA quick_check` reads every page and
//! checks each b-tree's structure, but not that every index matches its
//! table; `PRAGMA integrity_check` does that too, and the partial unique
//! indexes are what keep one active claim per tenant and per container:
//! an index that disagrees with its table would let a second claim
//! through. Both read the whole file, and the file is mostly history:
//! after a day of 300,000 claims (582 MiB), `quick_check` took 0.67 s
//! warm and 11.6 s cold, `integrity_check(claims)` 0.44 s and
//! `integrity_check(idempotency_keys)` 0.59 s, and a restart's claims
//! waited for all of it.
//!
//! So before it serves, startup checks what serving relies on, and reads
//! the history only where serving writes through it
//! ([`Depth::Startup`]): the whole check of every small table; the pages
//! of the container rows (read through their table alone; no second
//! claim can pass through them: a container holds one tenant in one
//! column); the claims' guards entry for entry against the claims table
//! ([`CLAIM_GUARDS`]); and the entries of every whole index of the claims
//! and of the request ids' records counted against their tables, as
//! `quick_check` counts them. On the day's 582 MiB that is 0.4 s, against
//! 2.1 s. Not checked before serving: the events and sync errors
//! ([`HISTORY`]), which a serving server only lists; whether an index
//! entry of the claims or request ids points at the right row; SQLite's
//! freelist and whether a page belongs to two b-trees. The whole file
//! follows once the server serves, and again every day while it runs
//! (`database::Opened::full_check`): damage arises while a server runs
//! as much as while it is down, and a check at restarts alone would pass
//! over the first and make every restart pay for the history. A server
//! whose database fails it stops. A backup and its restore get the whole
//! check before anything relies on them.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _};

/// How thoroughly [`check_file`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// What serving rests on: `integrity_check` of each small table;
    /// `quick_check` of the container rows; the claims and the request
    /// ids' records counted index by index against their tables, and the
    /// [`CLAIM_GUARDS`] entry for entry; the [`HISTORY`] not at all.
    Startup,
    /// `PRAGMA integrity_check`: every index against its table, everywhere.
    Full,
}

/// The history a serving server only lists for people (events, and the
/// sync errors of a tenant's status): kept for the retention windows,
/// not bounded by the fleet, and read at startup only by whole-table
/// scans, where a malformed page is an error and not a wrong answer.
/// Checked once the server serves; until then the history trim, which
/// deletes through these tables' indexes and the container rows', waits.
pub const HISTORY: &[&str] = &["events", "sync_errors"];

/// Checked page by page before serving, index against table after: the
/// container rows, most of the live state (the restore reads them
/// through the table, never an index).
const PAGES_BEFORE_SERVING: &[&str] = &["containers"];

/// Tables that grow with the history but that serving writes through
/// their indexes: a claim is found by its id and a container's claims
/// by container (the generation a claim is fenced at, the tenant a
/// reported container last served), a request id's answer by its id.
/// Before serving, each whole index's entries are counted against the
/// table's rows, as `quick_check` counts them (an index that lost
/// entries is found; one whose entry points at the wrong row is left
/// to the whole check), which reads each index and the table once.
const COUNTED_BEFORE_SERVING: &[&str] = &["claims", "idempotency_keys"];

/// The claims' guards: the partial unique indexes that keep one active
/// claim per tenant and workload and one per container, each with the
/// columns that find a claim's entry in it. Before serving they are
/// compared with the claims table entry for entry.
pub const CLAIM_GUARDS: &[(&str, &str)] = &[
    (
        "claims_one_per_tenant",
        "i.tenant_id = t.tenant_id AND i.workload_id = t.workload_id",
    ),
    (
        "claims_one_per_container",
        "i.container_id = t.container_id",
    ),
];

/// What a database file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A database with our migrations, and the check says "ok".
    Sound,
    /// Zero bytes, or a database with no table at all: nothing was ever
    /// written into it (SQLite itself would take it for a new database).
    Empty,
    /// Not usable.
    Damaged {
        /// What is wrong, in a few plain words ("it was truncated").
        summary: &'static str,
        /// The particulars, SQLite's own words where it has them.
        detail: String,
    },
    /// A sound SQLite database, but not one Boilerhouse made: it has
    /// tables and no migration history.
    Foreign,
}

/// SQLite's first 16 bytes.
const HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Whether a SQLite error means the file is damaged or not a database
/// (SQLITE_CORRUPT, SQLITE_NOTADB, with any extended code), as opposed
/// to a busy or unreachable one.
pub fn is_damage(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 11 | 26)),
        _ => false,
    }
}

/// The same, for an error that reached us only as text (the migrator's).
pub fn is_damage_message(message: &str) -> bool {
    ["database disk image is malformed", "file is not a database"]
        .iter()
        .any(|m| message.contains(m))
}

/// Examines the file at `path`, which exists. Opens it read-write (never
/// creating it): a read-only connection cannot open a WAL database whose
/// `-shm` is missing, and recovering the WAL is what the server's own
/// open would do first anyway.
pub async fn check_file(path: &Path, depth: Depth) -> std::io::Result<Verdict> {
    let len = std::fs::metadata(path)?.len();
    if len == 0 {
        return Ok(Verdict::Empty);
    }
    let mut head = [0u8; 100];
    let read = std::fs::File::open(path)?.read(&mut head)?;
    if read < HEADER.len() || &head[..HEADER.len()] != HEADER {
        return Ok(Verdict::Damaged {
            summary: "it is not a SQLite database",
            detail: "it does not begin with SQLite's header: it is another kind of file, or its first page was overwritten".into(),
        });
    }
    if let Some(detail) = truncated(path, &head, len) {
        return Ok(Verdict::Damaged {
            summary: "it was truncated",
            detail,
        });
    }
    Ok(match query(path, depth).await {
        Ok(v) => v,
        Err(e) if is_damage(&e) => damaged(&e),
        Err(e) => {
            return Err(std::io::Error::other(format!(
                "cannot examine {}: {e}",
                path.display()
            )));
        }
    })
}

/// A file shorter than the pages its header records has lost its end.
/// Only without a WAL: a checkpoint interrupted by a crash can leave the
/// header ahead of the file, and the WAL it came from puts that right.
fn truncated(path: &Path, head: &[u8; 100], len: u64) -> Option<String> {
    if wal_has_frames(path) {
        return None;
    }
    let page_size = match u16::from_be_bytes([head[16], head[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let change_counter = &head[24..28];
    let valid_for = &head[92..96];
    let pages = u64::from(u32::from_be_bytes([head[28], head[29], head[30], head[31]]));
    // The in-header size is only meaningful when written by a version that
    // keeps it (valid-for equals the change counter).
    (change_counter == valid_for && pages > 0 && len < pages * page_size).then(|| {
        format!(
            "it is {len} bytes, shorter than the {pages} pages of {page_size} bytes its header records: it was truncated"
        )
    })
}

fn wal_has_frames(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    // A WAL header alone is 32 bytes; frames follow.
    std::fs::metadata(wal).is_ok_and(|m| m.len() > 32)
}

/// A connection to the file at `path`, never creating it; by file name,
/// not URL, so that no character of the path is taken for URL syntax.
async fn connect(path: &Path, read_only: bool) -> Result<sqlx::SqliteConnection, sqlx::Error> {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .read_only(read_only)
        .busy_timeout(Duration::from_secs(5))
        .log_statements(tracing::log::LevelFilter::Trace)
        .connect()
        .await
}

async fn query(path: &Path, depth: Depth) -> Result<Verdict, sqlx::Error> {
    let mut conn = connect(path, false).await?;
    let verdict = examine(&mut conn, depth).await;
    let _ = conn.close().await;
    verdict
}

/// The whole check of a database the server has open: read-only, so it
/// runs beside the writer (WAL: it reads one snapshot, writes go on).
/// `None` when it is sound, the damage when not.
///
/// It runs on a thread of its own at a nice value 10 above the server's
/// ([`crate::background::run_alone`]): on a day's database it is seconds
/// of a core, and it starts as the server starts serving, when a
/// restarted fleet's agents reconnect and their first reports wait to be
/// reconciled (a node's containers are offered only then), then comes
/// back every day whatever the load. The claim path gets the cores first.
/// On a busy machine it runs longer, and its read snapshot keeps the WAL
/// from starting over as long.
pub async fn full_check_open(path: &Path) -> Result<Option<Verdict>, sqlx::Error> {
    use rusqlite::OpenFlags;
    // Opening reads nothing yet (SQLite opens lazily): done here, so the
    // check can be stopped from here.
    let opened = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|conn| {
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    });
    let conn = match opened.map_err(super::native::error) {
        Ok(conn) => conn,
        Err(e) if is_damage(&e) => return Ok(Some(damaged(&e))),
        Err(e) => return Err(e),
    };
    // Dropped with this future (the server stopping), the check stops at
    // its next step rather than hold its read snapshot, and so the WAL,
    // to its end. Harmless once the check is over.
    let _stop = InterruptOnDrop(conn.get_interrupt_handle());
    crate::background::run_alone("whole-check", move || whole_check_native(&conn))
        .await
        .unwrap_or_else(|| {
            Err(sqlx::Error::Protocol(
                "the whole check's thread panicked or could not start".into(),
            ))
        })
}

/// Interrupts a connection's statement when dropped.
struct InterruptOnDrop(rusqlite::InterruptHandle);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        self.0.interrupt();
    }
}

/// A damage error as a verdict.
fn damaged(e: &sqlx::Error) -> Verdict {
    Verdict::Damaged {
        summary: damage_summary(&e.to_string()),
        detail: sqlite_words(e),
    }
}

/// [`full_check_open`]'s work, on the calling thread: `PRAGMA
/// integrity_check` through a read-only connection of SQLite's own (the
/// library sqlx links), whose errors read as sqlx's would.
fn whole_check_native(conn: &rusqlite::Connection) -> Result<Option<Verdict>, sqlx::Error> {
    let lines = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut statement| {
            statement
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .map_err(super::native::error);
    match lines {
        Ok(lines) => Ok(verdict_of("integrity_check", &lines)),
        Err(e) if is_damage(&e) => Ok(Some(damaged(&e))),
        Err(e) => Err(e),
    }
}

async fn examine(conn: &mut sqlx::SqliteConnection, depth: Depth) -> Result<Verdict, sqlx::Error> {
    match depth {
        Depth::Full => {
            if let Some(damaged) = pragma_check(conn, "integrity_check", None).await? {
                return Ok(damaged);
            }
        }
        Depth::Startup => {
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name",
            )
            .fetch_all(&mut *conn)
            .await?;
            for table in &tables {
                let found = match table.as_str() {
                    t if HISTORY.contains(&t) => None,
                    t if PAGES_BEFORE_SERVING.contains(&t) => {
                        pragma_check(conn, "quick_check", Some(t)).await?
                    }
                    "claims" => match claim_guards(conn).await? {
                        Ok(rows) => whole_index_counts(conn, "claims", rows).await?,
                        Err(damaged) => Some(damaged),
                    },
                    t if COUNTED_BEFORE_SERVING.contains(&t) => {
                        let rows = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                            "SELECT count(*) FROM {} NOT INDEXED",
                            quoted(t)
                        )))
                        .fetch_one(&mut *conn)
                        .await?;
                        whole_index_counts(conn, t, rows).await?
                    }
                    t => pragma_check(conn, "integrity_check", Some(t)).await?,
                };
                if let Some(damaged) = found {
                    return Ok(damaged);
                }
            }
        }
    }
    let (tables, migrations): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(name = '_sqlx_migrations'), 0) FROM sqlite_schema WHERE type = 'table'",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(match (tables, migrations) {
        (0, _) => Verdict::Empty,
        (_, 0) => Verdict::Foreign,
        _ => Verdict::Sound,
    })
}

/// Runs `PRAGMA <pragma>`, of one table when given; the damage it names,
/// or `None` for "ok".
async fn pragma_check(
    conn: &mut sqlx::SqliteConnection,
    pragma: &'static str,
    table: Option<&str>,
) -> Result<Option<Verdict>, sqlx::Error> {
    // The table's name comes from the file's own schema: quoted as an
    // identifier, whatever it holds.
    let statement = match table {
        Some(t) => format!("PRAGMA {pragma}({})", quoted(t)),
        None => format!("PRAGMA {pragma}"),
    };
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
        .fetch_all(&mut *conn)
        .await?;
    Ok(verdict_of(pragma, &lines))
}

/// What a check pragma's lines say: `None` for its one "ok", else the
/// damage, with its first few findings.
fn verdict_of(pragma: &str, lines: &[String]) -> Option<Verdict> {
    if lines.len() == 1 && lines[0] == "ok" {
        return None;
    }
    let shown = &lines[..lines.len().min(3)];
    let more = lines.len() - shown.len();
    let mut detail = format!("PRAGMA {pragma} found: {}", shown.join("; "));
    if more > 0 {
        detail.push_str(&format!(" (and {more} more)"));
    }
    Some(Verdict::Damaged {
        summary: "it fails SQLite's integrity check",
        detail,
    })
}

/// Each of [`CLAIM_GUARDS`] against the claims table: as many entries as
/// active claims, and every active claim's own entry in it. The table is
/// read whole once (every claim, active or not: a malformed page is an
/// error; 30 ms for the 300,000 of a day's churn), each guard whole. The
/// claims' rows, for [`whole_index_counts`], or the damage.
async fn claim_guards(
    conn: &mut sqlx::SqliteConnection,
) -> Result<Result<i64, Verdict>, sqlx::Error> {
    use sqlx::Row as _;
    // Names and columns are this file's constants. CASE, not AND: only
    // an active claim is looked up.
    let missing: Vec<String> = CLAIM_GUARDS
        .iter()
        .map(|(index, entry_of)| {
            format!(
                "coalesce(sum(CASE WHEN t.status = 'active' THEN NOT EXISTS (\
                 SELECT 1 FROM claims AS i INDEXED BY {index} \
                 WHERE i.status = 'active' AND {entry_of} AND i.rowid = t.rowid) END), 0)"
            )
        })
        .collect();
    let scan = format!(
        "SELECT count(*), coalesce(sum(t.status = 'active'), 0), {} FROM claims AS t NOT INDEXED",
        missing.join(", ")
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(scan))
        .fetch_one(&mut *conn)
        .await?;
    let rows: i64 = row.try_get(0)?;
    let active: i64 = row.try_get(1)?;
    for (n, (index, _)) in CLAIM_GUARDS.iter().enumerate() {
        let missing: i64 = row.try_get(n + 2)?;
        let entries: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM claims INDEXED BY {index} WHERE status = 'active'"
        )))
        .fetch_one(&mut *conn)
        .await?;
        if active != entries || missing != 0 {
            return Ok(Err(Verdict::Damaged {
                summary: "an index disagrees with its table",
                detail: format!(
                    "the index {index} holds {entries} entries for {active} active claims, {missing} of them missing from it"
                ),
            }));
        }
    }
    Ok(Ok(rows))
}

/// Each whole (not partial) index of `table` holds as many entries as
/// the table has `rows`.
async fn whole_index_counts(
    conn: &mut sqlx::SqliteConnection,
    table: &str,
    rows: i64,
) -> Result<Option<Verdict>, sqlx::Error> {
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_index_list(?) WHERE partial = 0 ORDER BY name")
            .bind(table)
            .fetch_all(&mut *conn)
            .await?;
    for index in indexes {
        let entries: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {} INDEXED BY {}",
            quoted(table),
            quoted(&index)
        )))
        .fetch_one(&mut *conn)
        .await?;
        if entries != rows {
            return Ok(Some(Verdict::Damaged {
                summary: "an index disagrees with its table",
                detail: format!(
                    "the index {index} holds {entries} entries for the {rows} rows of {table}"
                ),
            }));
        }
    }
    Ok(None)
}

/// `name` as an SQL identifier, whatever it holds.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A few plain words for a damage error's message.
pub fn damage_summary(message: &str) -> &'static str {
    if message.contains("file is not a database") {
        "it is not a SQLite database"
    } else {
        "SQLite finds it malformed"
    }
}

/// SQLite's message without sqlx's wrapping ("error returned from
/// database: (code: 11) ...").
fn sqlite_words(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!("SQLite says: {}", db.message()),
        other => other.to_string(),
    }
}

/// The highest migration version recorded in the database at `path`, for
/// telling a backup made by a newer server from one this server can run.
pub async fn migration_version(path: &Path) -> Result<Option<i64>, sqlx::Error> {
    let mut conn = connect(path, true).await?;
    let version: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut conn)
            .await?;
    let _ = conn.close().await;
    Ok(version)
}

/// The highest migration this server knows.
pub fn known_migration_version() -> i64 {
    sqlx::migrate!("../../migrations/sqlite")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
