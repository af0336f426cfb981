//! Opening connections to either backend, configured the same way every
//! time: the writer reopens its connection after the database server went
//! away, and must get exactly what it had.

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Executor};

use super::StoreError;
use super::native::NativeSqlite;
use super::sql::{Backend, DatabaseLocation};
use super::writer::WriteConn;

/// Makes write connections (and the read pool) for one database.
#[derive(Clone)]
pub(super) struct Connector {
    location: DatabaseLocation,
    synchronous_full: bool,
    /// PostgreSQL: how long a write connection may sit idle inside a
    /// transaction before the server ends its session (see
    /// [`super::Fence::lease`]).
    idle_transaction_limit: Option<Duration>,
}

impl Connector {
    pub(super) fn new(location: DatabaseLocation, synchronous_full: bool) -> Self {
        sqlx::any::install_default_drivers();
        Self {
            location,
            synchronous_full,
            idle_transaction_limit: None,
        }
    }

    /// Write connections to PostgreSQL get ended by the server when idle
    /// inside a transaction for `limit` (none: never).
    pub(super) fn idle_transaction_limit(mut self, limit: Option<Duration>) -> Self {
        self.idle_transaction_limit = limit;
        self
    }

    pub(super) fn backend(&self) -> Backend {
        self.location.backend()
    }

    /// The URL sqlx's `Any` driver opens. `mode` is SQLite's open mode.
    fn url(&self, sqlite_mode: &str) -> Result<AnyConnectOptions, StoreError> {
        let url = match &self.location {
            DatabaseLocation::Sqlite(path) => {
                // Percent-encoded, so a path with '?', '#' or '%' in it
                // opens the file it names.
                let mut url = url::Url::parse("sqlite://localhost/")
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                let absolute = std::path::absolute(path).map_err(|e| {
                    StoreError::Unavailable(format!("database path {}: {e}", path.display()))
                })?;
                url.set_path(&absolute.to_string_lossy());
                format!("sqlite://{}?mode={sqlite_mode}", url.path())
            }
            DatabaseLocation::Postgres(url) => url.clone(),
        };
        let options: AnyConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StoreError::Unavailable(format!("database {}: {e}", self.location))
        })?;
        Ok(options.log_statements(tracing::log::LevelFilter::Trace))
    }

    /// The write connection. SQLite: WAL, `synchronous` as configured, no
    /// automatic checkpoints (a background task checkpoints, so no commit
    /// stalls behind one). PostgreSQL: `synchronous_commit` likewise, and
    /// the idle-in-transaction limit if there is one.
    pub(super) async fn connect(&self) -> Result<AnyConnection, StoreError> {
        let mut conn = self
            .url("rwc")?
            .connect()
            .await
            .map_err(|e| unavailable(&self.location, e))?;
        for statement in self.session_settings(true) {
            conn.execute(statement)
                .await
                .map_err(|e| unavailable(&self.location, e))?;
        }
        if let (Backend::Postgres, Some(limit)) = (self.backend(), self.idle_transaction_limit) {
            // At least 1 ms: 0 would turn the limit off.
            let statement = format!(
                "SET idle_in_transaction_session_timeout = {}",
                limit.as_millis().max(1)
            );
            conn.execute(sqlx::AssertSqlSafe(statement))
                .await
                .map_err(|e| unavailable(&self.location, e))?;
        }
        Ok(conn)
    }

    /// The writer's connection: SQLite run on the caller's thread (see
    /// [`NativeSqlite`]), or sqlx's to PostgreSQL; configured as
    /// [`Connector::connect`]'s.
    pub(super) async fn connect_writer(&self) -> Result<WriteConn, StoreError> {
        let DatabaseLocation::Sqlite(path) = &self.location else {
            return Ok(WriteConn::Sqlx(self.connect().await?));
        };
        let path = std::path::absolute(path).map_err(|e| {
            StoreError::Unavailable(format!("database path {}: {e}", path.display()))
        })?;
        let settings = self.session_settings(true);
        let location = self.location.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let mut native = NativeSqlite::open(&path)?;
            for statement in settings {
                if let Some(Err(e)) = native
                    .run(statement, None, false, None)
                    .into_iter()
                    .find(Result::is_err)
                {
                    return Err(e);
                }
            }
            Ok(native)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("opening the write connection: {e}")))?;
        opened
            .map(WriteConn::Sqlite)
            .map_err(|e| unavailable(&location, e))
    }

    /// A connection for maintenance (checkpoints): as the writer's, but
    /// never the writer's.
    pub(super) async fn connect_maintenance(&self) -> Result<AnyConnection, StoreError> {
        self.connect().await
    }

    /// The read pool. SQLite: read-only connections, which never take the
    /// write lock. PostgreSQL: ordinary connections, which reconnect by
    /// themselves after the server restarts.
    pub(super) async fn read_pool(&self, connections: u32) -> Result<AnyPool, StoreError> {
        let settings: Vec<&'static str> = self.session_settings(false);
        AnyPoolOptions::new()
            .max_connections(connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| {
                let settings = settings.clone();
                Box::pin(async move {
                    for statement in settings {
                        conn.execute(statement).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(self.url("ro")?)
            .await
            .map_err(|e| unavailable(&self.location, e))
    }

    fn session_settings(&self, writer: bool) -> Vec<&'static str> {
        match (self.backend(), writer) {
            (Backend::Sqlite, true) => vec![
                "PRAGMA busy_timeout = 5000",
                "PRAGMA journal_mode = WAL",
                if self.synchronous_full {
                    "PRAGMA synchronous = FULL"
                } else {
                    "PRAGMA synchronous = NORMAL"
                },
                "PRAGMA wal_autocheckpoint = 0",
                // The WAL file keeps the size of its busiest moment (a
                // pool of 100,000 filling left 400 MiB of it) unless it is
                // cut back when the log restarts after a full checkpoint.
                "PRAGMA journal_size_limit = 67108864",
                "PRAGMA foreign_keys = ON",
                // Each operation of a batch runs in a savepoint, and SQLite
                // copies every page an operation changes first into a
                // statement journal: a temporary file (a write system call
                // a page) unless it is kept in memory. It holds one
                // operation's pages and is gone at its release.
                "PRAGMA temp_store = MEMORY",
            ],
            (Backend::Sqlite, false) => vec!["PRAGMA busy_timeout = 5000"],
            // Set either way: a database or role configured with
            // `synchronous_commit = off` must not make acknowledged writes
            // lossy behind the server's back.
            (Backend::Postgres, true) => vec![if self.synchronous_full {
                "SET synchronous_commit = on"
            } else {
                "SET synchronous_commit = off"
            }],
            (Backend::Postgres, false) => vec![],
        }
    }
}

fn unavailable(location: &DatabaseLocation, e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("database {location}: {e}"))
}
