//! Store benchmark: acknowledged durable writes per second with group
//! commit against one transaction per write, side by side in one run, at
//! 1, 16 and 256 concurrent writers, on SQLite and, when given a server,
//! on PostgreSQL in the same run. Every write is an activity-log insert
//! acknowledged only after its COMMIT returned with the server's default
//! durability: SQLite `synchronous=FULL` (the WAL is fsynced), PostgreSQL
//! `synchronous_commit=on` (the WAL is flushed to disk).
//!
//! cargo run --release -p boilerhouse-server --example store_bench -- \
//!     [seconds-per-case] [--database LOCATION] [--postgres URL]
//!
//! - `--database`: where the cases run. By default a fresh temporary
//!   SQLite file per case. A SQLite path chooses the directory, so the
//!   disk: the per-case files go in a temporary directory beside it (the
//!   file it names is never touched). A `postgres://` URL: a fresh schema
//!   per case in that database, dropped after the case.
//! - `--postgres URL`, or `BOILERHOUSE_POSTGRES_URL`: the same cases on
//!   PostgreSQL too, as a second column group of the same table. Give it a
//!   database of its own (`CREATE DATABASE bench`), not a shared one.
//!
//! On PostgreSQL every write transaction also takes the leader's fence (the
//! lease row read `FOR SHARE`, see `store::writer`), as in the server; the
//! benchmark holds the epoch the migration starts the lease at instead of
//! campaigning for it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use boilerhouse_core::Timestamp;
use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_server::store::{Backend, DatabaseLocation, Fence, Store, StoreOptions, sql};
use boilerhouse_testkit::database::TestDatabase;

/// Where a benchmark's cases run: each case gets a fresh database there.
enum Target {
    /// SQLite files in a temporary directory (under this one, if given).
    Sqlite(Option<PathBuf>),
    /// Schemas in this PostgreSQL database.
    Postgres(String),
}

/// One case's database, removed when dropped.
struct Fresh {
    location: DatabaseLocation,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<TestDatabase>,
}

impl Target {
    fn from_location(location: DatabaseLocation) -> Self {
        match location {
            DatabaseLocation::Sqlite(path) => {
                // A directory names itself; a file, the one it is in.
                let dir = if path.is_dir() {
                    path
                } else {
                    path.parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .map_or_else(|| PathBuf::from("."), PathBuf::from)
                };
                Target::Sqlite(Some(dir))
            }
            DatabaseLocation::Postgres(url) => Target::Postgres(url),
        }
    }

    fn backend(&self) -> Backend {
        match self {
            Target::Sqlite(_) => Backend::Sqlite,
            Target::Postgres(_) => Backend::Postgres,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Target::Sqlite(_) => "SQLite",
            Target::Postgres(_) => "PostgreSQL",
        }
    }

    async fn fresh(&self) -> anyhow::Result<Fresh> {
        Ok(match self {
            Target::Sqlite(dir) => {
                let dir = match dir {
                    Some(parent) => tempfile::tempdir_in(parent)?,
                    None => tempfile::tempdir()?,
                };
                Fresh {
                    location: DatabaseLocation::Sqlite(dir.path().join("bench.db")),
                    _dir: Some(dir),
                    _schema: None,
                }
            }
            Target::Postgres(url) => {
                let schema = TestDatabase::postgres_schema_in(url).await?;
                Fresh {
                    location: DatabaseLocation::parse(schema.value())
                        .map_err(anyhow::Error::msg)?,
                    _dir: None,
                    _schema: Some(schema),
                }
            }
        })
    }
}

/// Writes acknowledged and transactions committed by `writers` tasks
/// writing for `duration` to a fresh database of `target`.
async fn run_case(
    target: &Target,
    writers: usize,
    max_batch: usize,
    duration: Duration,
) -> anyhow::Result<(u64, u64)> {
    let fresh = target.fresh().await?;
    let lost = CancellationToken::new();
    let store = Store::open(
        fresh.location.clone(),
        StoreOptions {
            max_batch,
            fence: (target.backend() == Backend::Postgres).then(|| Fence {
                epoch: 0,
                // The server's default lease; the bench never stalls.
                lease: Duration::from_secs(6),
                lost: lost.clone(),
            }),
            ..StoreOptions::default()
        },
    )
    .await?;
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = 0u64;
            while Instant::now() < deadline {
                let e = NewEvent::new(
                    Timestamp::from_millis(1),
                    EventKind::NodeJoined,
                    format!("writer {w}"),
                );
                store.append_event(e).await?;
                acknowledged += 1;
            }
            anyhow::Ok(acknowledged)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    anyhow::ensure!(!lost.is_cancelled(), "the store lost its fence");
    let commits = store.writer_stats().commits;
    // Closed before the schema is dropped, so nothing holds it open.
    store.close().await;
    drop(store);
    drop(fresh);
    Ok((total, commits))
}

/// The durability settings a PostgreSQL server gives a session that does
/// not change them, which is what the store's writer does by default.
async fn postgres_settings(url: &str) -> anyhow::Result<String> {
    let location = DatabaseLocation::parse(url).map_err(anyhow::Error::msg)?;
    let mut conn = boilerhouse_server::store::open_inspector(&location).await?;
    let mut shown = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "commit_delay",
    ] {
        let value: String = sql::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut conn)
            .await?;
        shown.push(format!("{name}={value}"));
    }
    Ok(shown.join(", "))
}

fn parse_args() -> anyhow::Result<(f64, Vec<Target>)> {
    let mut seconds = 3.0;
    let mut database = None;
    let mut postgres = std::env::var("BOILERHOUSE_POSTGRES_URL")
        .ok()
        .filter(|v| !v.is_empty());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--database" => {
                let value = args.next().context("--database needs a location")?;
                database = Some(DatabaseLocation::parse(&value).map_err(anyhow::Error::msg)?);
            }
            "--postgres" => postgres = Some(args.next().context("--postgres needs a URL")?),
            other => {
                seconds = other
                    .parse()
                    .with_context(|| format!("{other:?}: expected seconds per case"))?;
            }
        }
    }
    let mut targets = vec![database.map_or(Target::Sqlite(None), Target::from_location)];
    if let Some(url) = postgres
        && targets[0].backend() != Backend::Postgres
    {
        DatabaseLocation::parse(&url).map_err(anyhow::Error::msg)?;
        targets.push(Target::Postgres(url));
    }
    Ok((seconds, targets))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (seconds, targets) = parse_args()?;
    let duration = Duration::from_secs_f64(seconds);
    for target in &targets {
        match target {
            Target::Sqlite(_) => {
                println!("SQLite: WAL, synchronous=FULL, one write connection")
            }
            Target::Postgres(url) => println!(
                "PostgreSQL: {}, one write connection, fenced",
                postgres_settings(url).await?
            ),
        }
    }
    println!("{seconds} s per case; writes/s are acknowledged writes");
    println!();
    let mut header = String::from("| writers |");
    let mut rule = String::from("|---:|");
    for target in &targets {
        let b = target.title();
        header.push_str(&format!(
            " {b}: one txn per write | {b}: group commit | {b}: writes per commit | {b}: speed-up |"
        ));
        rule.push_str("---:|---:|---:|---:|");
    }
    println!("{header}");
    println!("{rule}");
    for writers in [1usize, 16, 256] {
        let mut row = format!("| {writers} |");
        // Backends alternate within each writer count, so a drift of the
        // machine over the run touches both alike.
        for target in &targets {
            let (single, _) = run_case(target, writers, 1, duration).await?;
            let (group, commits) = run_case(target, writers, 512, duration).await?;
            let single_rate = single as f64 / seconds;
            let group_rate = group as f64 / seconds;
            row.push_str(&format!(
                " {single_rate:.0} | {group_rate:.0} | {:.1} | {:.1}x |",
                group as f64 / commits.max(1) as f64,
                group_rate / single_rate.max(1.0)
            ));
        }
        println!("{row}");
    }
    Ok(())
}
