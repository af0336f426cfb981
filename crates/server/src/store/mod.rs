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
mod changes;
mod connect;
#[doc(hidden)]
pub mod damage;
mod events;
mod idempotency;
pub mod integrity;
mod lenient;
pub mod maintenance;
mod native;
mod nodes;
mod pools;
pub mod retention;
pub mod sql;
mod statements;
mod sync;
mod workloads;
pub mod writer;

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool, Connection};
use tokio::sync::broadcast;

use boilerhouse_core::event::Event;

pub use boosts::BoostWrite;
pub use changes::{Refreshed, TOMBSTONE_RETENTION, WarmPool};
pub use events::EventQuery;
pub use idempotency::{IdempotencyLookup, IdempotentRecord};
pub use lenient::{Lenient, Unreadable};
pub use nodes::{Arrival, NodeHello};
pub use pools::{PoolOverride, PoolSnapshot};
pub use sql::{Backend, DatabaseLocation};
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
    /// This server is not the leader (any more): another replica took the
    /// lease. Nothing of the refused transaction was committed.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// A bug: a state that should be impossible.
    #[error("internal store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether the database was out of reach: its server gone or
    /// restarting, the connection lost, no connection to be had in time.
    /// A read that failed so may succeed a moment later; writes fail as
    /// [`StoreError::Unavailable`] already (see [`writer`]).
    pub fn is_database_unreachable(&self) -> bool {
        let StoreError::Database(e) = self else {
            return false;
        };
        match &**e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // PostgreSQL's connection exceptions (08), insufficient
            // resources such as too many connections (53), and a server
            // shutting down, crashed or starting (57P01-57P03).
            sqlx::Error::Database(db) => db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    ["08", "53", "57P"]
                        .iter()
                        .any(|class| pg.code().starts_with(class))
                }),
            _ => false,
        }
    }
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
    /// SQLite: `synchronous=FULL` (the default) fsyncs every commit;
    /// `false` uses NORMAL, which in WAL mode can lose the last commits on
    /// power loss but never corrupts the database. PostgreSQL:
    /// `synchronous_commit` on (the default, set explicitly whatever the
    /// database's own setting) or off, which loses the last commits if
    /// PostgreSQL itself crashes, not only on power loss: a weaker trade.
    pub synchronous_full: bool,
    /// Operations that may share one commit. 1 disables group commit.
    pub max_batch: usize,
    /// Read connections.
    pub read_connections: u32,
    /// PostgreSQL: the leader's lease epoch, checked by every write
    /// transaction (see [`writer`]). `None`: no check (SQLite, tools).
    pub fence: Option<Fence>,
    /// SQLite: once the WAL holds this many frames, the writer is asked to
    /// let it start over (see [`Store::checkpoint`]). Default 16,384 (64
    /// MiB of 4 KiB pages, the WAL's `journal_size_limit`).
    pub restart_log_after_frames: i64,
}

/// What every write transaction of a leader checks, and what it raises
/// when it can no longer trust its memory.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The epoch this server's lease was taken at.
    pub epoch: i64,
    /// The lease's length. The fence's share lock on the lease row lasts
    /// as long as its transaction, so a leader that stalls (SIGSTOP, a
    /// stall, a cut to the database) with a write transaction open would
    /// keep every standby from taking the lease even once it has run out.
    /// PostgreSQL therefore ends a write session left idle inside a
    /// transaction this long (`idle_in_transaction_session_timeout`),
    /// which rolls it back and frees the row.
    pub lease: Duration,
    /// Cancelled when a write finds another epoch (this server was
    /// deposed), or when a COMMIT's outcome is unknown (the connection
    /// broke while committing): either way the in-memory state may differ
    /// from the database, and the server must stop and restore from it.
    pub lost: tokio_util::sync::CancellationToken,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            synchronous_full: true,
            max_batch: 512,
            read_connections: 4,
            fence: None,
            restart_log_after_frames: 16_384,
        }
    }
}

/// SQLite: the writer is asked to let a long WAL start over only when the
/// checkpointer left at most this many frames uncopied: what the writer
/// then copies, between two batches, is a few commits' worth.
const RESTART_LOG_BEHIND_FRAMES: i64 = 2_048;

/// The database: a writer handle, a read pool, and the event feed.
#[derive(Clone)]
pub struct Store {
    writer: Writer,
    reads: AnyPool,
    events: broadcast::Sender<Event>,
    location: DatabaseLocation,
    stats: Arc<Mutex<WriterStats>>,
    /// SQLite only: the connection that checkpoints the WAL.
    /// Taken (None) once the store is closed.
    checkpointer: Option<Arc<tokio::sync::Mutex<Option<AnyConnection>>>>,
    /// Set by [`Store::checkpoint`] when the WAL is long and all but its
    /// last frames are copied: the writer copies those between two
    /// batches, so that the WAL starts over.
    restart_log: Arc<std::sync::atomic::AtomicBool>,
    restart_log_after_frames: i64,
    /// The last read of every node (see [`nodes::NodeListCache`]).
    node_list: Arc<nodes::NodeListCache>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database: a SQLite file
    /// or a PostgreSQL database, as `location` says.
    pub async fn open(
        location: impl Into<DatabaseLocation>,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let location = location.into();
        if let Some(parent) = location
            .sqlite_path()
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let connector = connect::Connector::new(location.clone(), options.synchronous_full)
            .idle_transaction_limit(options.fence.as_ref().map(|f| f.lease));
        let mut migrating = connector.connect().await?;
        migrate(&mut migrating, location.backend()).await?;
        let write_conn = match location.backend() {
            // The writer calls SQLite itself (store/native.rs). Opened
            // before the migration's connection closes: the last
            // connection to close checkpoints the whole WAL, which after a
            // kill -9 holds whatever the checkpointer had not copied yet,
            // and the restart would wait for it.
            Backend::Sqlite => {
                let native = connector.connect_writer().await?;
                let _ = migrating.close().await;
                native
            }
            Backend::Postgres => writer::WriteConn::Sqlx(migrating),
        };

        let reads = connector.read_pool(options.read_connections).await?;
        let checkpointer = match location.backend() {
            Backend::Sqlite => Some(Arc::new(tokio::sync::Mutex::new(Some(
                connector.connect_maintenance().await?,
            )))),
            Backend::Postgres => None,
        };
        let (events, _) = broadcast::channel(4096);
        let stats = Arc::new(Mutex::new(WriterStats::default()));
        let restart_log = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = Writer::spawn(
            write_conn,
            connector,
            options.fence.clone(),
            options.max_batch,
            events.clone(),
            stats.clone(),
            restart_log.clone(),
        )?;
        Ok(Self {
            writer,
            reads,
            events,
            location,
            stats,
            checkpointer,
            restart_log,
            restart_log_after_frames: options.restart_log_after_frames,
            node_list: Arc::default(),
        })
    }

    /// SQLite: copies committed pages from the WAL into the database file
    /// without blocking writers (PASSIVE), and returns the WAL pages that
    /// remain to be checkpointed. Copying alone does not shorten the WAL:
    /// it starts over only at a transaction that finds every frame copied,
    /// which under steady writes never happens; so once it is long and
    /// nearly all copied, the writer is asked to copy the rest between two
    /// batches. PostgreSQL checkpoints by itself: 0.
    pub async fn checkpoint(&self) -> Result<i64, StoreError> {
        let Some(checkpointer) = &self.checkpointer else {
            return Ok(0);
        };
        let mut conn = checkpointer.lock().await;
        let Some(conn) = conn.as_mut() else {
            return Err(StoreError::Closed);
        };
        let (_busy, log, checkpointed): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(conn)
                .await?;
        let remaining = (log - checkpointed).max(0);
        if log >= self.restart_log_after_frames && remaining <= RESTART_LOG_BEHIND_FRAMES {
            self.restart_log
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(remaining)
    }

    /// Which backend this store runs on.
    pub fn backend(&self) -> Backend {
        self.location.backend()
    }

    /// Where the database is.
    pub fn location(&self) -> &DatabaseLocation {
        &self.location
    }

    /// The SQLite file. Panics on PostgreSQL: callers that need a file
    /// (tools, tests that damage it on purpose) are SQLite-only.
    pub fn path(&self) -> &Path {
        self.location
            .sqlite_path()
            .expect("Store::path is for SQLite databases")
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

    /// SQLite's `PRAGMA integrity_check`: "ok" when the file is sound.
    /// PostgreSQL checks its own pages (and a damaged page fails the query
    /// that reads it): "ok" once the server answers.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        if self.backend() == Backend::Postgres {
            let (one,): (i32,) = sqlx::query_as("SELECT 1").fetch_one(&self.reads).await?;
            return Ok(if one == 1 {
                "ok".into()
            } else {
                format!("SELECT 1 gave {one}")
            });
        }
        let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
            .fetch_all(&self.reads)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(line,)| line)
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Closes the read pool, the checkpointer and then the writer: writes
    /// queued before finish first, later ones fail as
    /// [`StoreError::Closed`]. Returns once every connection is closed, so
    /// the files are left as a clean close leaves them (on SQLite, the
    /// WAL folded into the database and removed): a connection dropped
    /// instead closes on its own thread, some time later.
    pub async fn close(&self) {
        self.reads.close().await;
        if let Some(checkpointer) = &self.checkpointer
            && let Some(conn) = checkpointer.lock().await.take()
        {
            let _ = conn.close().await;
        }
        self.writer.close().await;
    }
}

/// Brings the schema up to date. Replicas starting together on
/// PostgreSQL: the migrator holds an advisory lock, so one migrates and
/// the others wait.
async fn migrate(conn: &mut AnyConnection, backend: Backend) -> Result<(), StoreError> {
    // run_direct: `run` is generic over `Acquire`, which a spawned
    // task's future cannot prove `Send` for.
    let migrated = match backend {
        Backend::Sqlite => {
            sqlx::migrate!("../../migrations/sqlite")
                .run_direct(None, conn, false)
                .await
        }
        Backend::Postgres => {
            sqlx::migrate!("../../migrations/postgres")
                .run_direct(None, conn, false)
                .await
        }
    };
    migrated.map_err(|e| StoreError::Unavailable(format!("migration failed: {e}")))
}

/// Opens a migrated database's connection for the leader election, which
/// runs before (and beside) the store.
pub fn open_for_leadership(
    location: DatabaseLocation,
) -> futures::future::BoxFuture<'static, Result<AnyConnection, StoreError>> {
    Box::pin(async move {
        let mut conn = connect::Connector::new(location.clone(), true)
            .connect()
            .await?;
        migrate(&mut conn, location.backend()).await?;
        Ok(conn)
    })
}

/// Opens a single connection, on either backend, for tools and tests that
/// inspect a database directly, without the writer task. Statements go
/// through [`sql`] so that one text serves both.
pub async fn open_inspector(location: &DatabaseLocation) -> Result<AnyConnection, StoreError> {
    connect::Connector::new(location.clone(), true)
        .connect()
        .await
}

/// Opens a single connection for tools and tests that inspect a database
/// file directly, without the writer task.
pub async fn open_raw(path: &Path) -> Result<sqlx::SqliteConnection, StoreError> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .busy_timeout(Duration::from_secs(5));
    Ok(sqlx::SqliteConnection::connect_with(&options).await?)
}
