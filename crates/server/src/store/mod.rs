//! The store: everything the server decides, in one SQLite database.
//!
//! # What we store, and why
//!
//! The database is the source of truth for *intent*; Docker is the source
//! of truth for what actually runs, and reconciliation makes them agree.
//! Every fact below is here because losing it on a crash would hurt a
//! tenant or an operator:
//!
//! - **nodes**: which Docker hosts exist, their capacity, labels, liveness
//!   and cordon flag. Cordons are operator decisions; they must outlive a
//!   restart.
//! - **workloads**: the last *valid* version of each workload file. When a
//!   file turns invalid the old row stays, so a typo never drains a pool.
//! - **pools**: operator overrides (Scale, Drain) that no file records.
//! - **containers**: every managed container we intend to exist, its node,
//!   state and tenant. The single `tenant_id` column makes "one tenant per
//!   container" a property of the schema.
//! - **claims**: who holds what, with a fencing generation. A claim is
//!   committed before Claim answers; partial unique indexes enforce one
//!   active claim per (tenant, workload) and per container.
//! - **affinity_reservations**: released containers kept for their tenant,
//!   with expiry. In memory they were lost on every restart.
//! - **boosts**: requested, active and ended resource boosts. Keeping them
//!   here is what lets `bh boost request`, `status` and `release` run as
//!   separate processes, the bug the original tool had.
//! - **sync_status / sync_errors**: last sync and upload time per tenant
//!   and mapping (catch-up after a restart needs it) and recent errors.
//! - **sync_release_pending**: containers whose upload on release failed.
//!   They hold the tenant's only up-to-date copy, so they must never be
//!   destroyed before the retried upload succeeds, even across restarts.
//! - **events**: the activity log, with ids that double as resume tokens.
//! - **idempotency_keys**: the first answer to each mutating request_id.
//!
//! Not stored: what Docker reports (agents re-report it on connect) and
//! in-memory indexes (rebuilt from these tables at startup).
//!
//! # How
//!
//! WAL mode; `synchronous=FULL` by default so an acknowledged write survives
//! power loss. One writer task owns the only write connection and commits
//! everything waiting as one transaction ([`writer`]); reads go through a
//! separate read-only pool and never wait for the writer.

mod backup;
mod boosts;
mod events;
mod idempotency;
pub mod integrity;
mod lenient;
pub mod maintenance;
mod nodes;
mod pools;
mod sync;
mod workloads;
pub mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::broadcast;

use boilerhouse_core::event::Event;

pub use boosts::BoostWrite;
pub use events::EventQuery;
pub use idempotency::{IdempotencyLookup, IdempotentRecord};
pub use lenient::{Lenient, Unreadable};
pub use nodes::{Arrival, NodeHello};
pub use pools::{PoolOverride, PoolSnapshot};
pub use sync::PendingReleaseUpload;
pub use workloads::WorkloadChange;
pub use writer::{WriteTx, Writer, WriterStats};

/// Errors from the store. Messages are for operators and logs; the API
/// layer decides what a client sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed the operation.
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
    /// The database cannot take writes right now (disk full, I/O error).
    /// Nothing of the failed transaction was committed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The writer task is gone; the store is shutting down.
    #[error("the store is closed")]
    Closed,
    /// A row could not be turned back into a domain value.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// A uniqueness rule was violated.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A bug: a state that should be impossible.
    #[error("internal store error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return StoreError::Conflict(db.message().to_owned());
        }
        StoreError::Database(Arc::new(e))
    }
}

/// How the database is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `synchronous=FULL` (the default) fsyncs every commit; `false` uses
    /// NORMAL, which in WAL mode can lose the last commits on power loss
    /// but never corrupts the database.
    pub synchronous_full: bool,
    /// Operations that may share one commit. 1 disables group commit.
    pub max_batch: usize,
    /// Read connections.
    pub read_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            synchronous_full: true,
            max_batch: 512,
            read_connections: 4,
        }
    }
}

/// The database: a writer handle, a read pool, and the event feed.
#[derive(Clone)]
pub struct Store {
    writer: Writer,
    reads: SqlitePool,
    events: broadcast::Sender<Event>,
    path: PathBuf,
    stats: Arc<Mutex<WriterStats>>,
    checkpointer: Arc<tokio::sync::Mutex<sqlx::SqliteConnection>>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub async fn open(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let synchronous = if options.synchronous_full {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        };
        let base = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            .log_statements(tracing::log::LevelFilter::Trace);

        // The writer never checkpoints inside a commit: SQLite's automatic
        // checkpoint would stall every write queued behind that commit.
        // A background task checkpoints instead (see `checkpoint`).
        let mut write_conn = base
            .clone()
            .create_if_missing(true)
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await?;
        sqlx::migrate!("../../migrations/sqlite")
            .run(&mut write_conn)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))?;

        let reads = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .connect_with(base.clone().read_only(true))
            .await?;

        let checkpointer = base
            .clone()
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await?;
        let (events, _) = broadcast::channel(4096);
        let stats = Arc::new(Mutex::new(WriterStats::default()));
        let writer = Writer::spawn(write_conn, options.max_batch, events.clone(), stats.clone());
        Ok(Self {
            writer,
            reads,
            events,
            path: path.to_owned(),
            stats,
            checkpointer: Arc::new(tokio::sync::Mutex::new(checkpointer)),
        })
    }

    /// Copies committed pages from the WAL into the database file without
    /// blocking writers (PASSIVE), so the WAL stays small. Returns the WAL
    /// pages that remain to be checkpointed.
    pub async fn checkpoint(&self) -> Result<i64, StoreError> {
        let mut conn = self.checkpointer.lock().await;
        let (_busy, log, checkpointed): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut *conn)
                .await?;
        Ok((log - checkpointed).max(0))
    }

    /// Where the database file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer, for operations defined outside this module.
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Commits and operations so far.
    pub fn writer_stats(&self) -> WriterStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// A feed of events as they commit. A receiver that falls behind by
    /// more than the channel holds gets `Lagged` and must re-read from the
    /// database.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// `PRAGMA integrity_check`: "ok" when the file is sound.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
            .fetch_all(&self.reads)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(line,)| line)
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Closes the read pool. Queued writes finish first because the writer
    /// drains its queue before it stops.
    pub async fn close(&self) {
        self.reads.close().await;
    }
}

/// Opens a single connection for tools and tests that inspect a database
/// file directly, without the writer task.
pub async fn open_raw(path: &Path) -> Result<sqlx::SqliteConnection, StoreError> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .busy_timeout(Duration::from_secs(5));
    Ok(sqlx::SqliteConnection::connect_with(&options).await?)
}
