//! The single writer: one task owns the only write connection and commits
//! every write that is waiting as one transaction (group commit).
//!
//! Why: with `synchronous=FULL` each commit costs an fsync, which is the
//! price of "an acknowledged claim survives power loss". Batching all
//! waiting writes into one commit pays that fsync once for the whole batch,
//! so throughput grows with concurrency instead of collapsing. SQLite allows
//! one writer at a time anyway; a queue in front of it is fairer and
//! cheaper than connections fighting over the lock with busy retries.
//!
//! Each operation runs inside its own SAVEPOINT, so one failing operation
//! (a constraint violation, say) is rolled back alone and the rest of the
//! batch still commits. No caller hears "ok" before the COMMIT returns.
//!
//! Writes a caller waits on (an RPC's) go ahead of the server's own
//! (refills, agents' results, housekeeping), and a batch carries at most
//! [`ROUTINE_PER_BATCH`] of the latter: a claim that arrives while a fill
//! commits its results waits for a short batch, not for sixty-four
//! container updates. Neither starves: every batch leaves room for
//! routine writes when any wait, and after a batch that took none (one
//! write per batch) the next begins with one.
//!
//! An operation may carry a commit hook. Hooks run here, in commit order,
//! right after the COMMIT and before any caller is answered, and only for
//! operations that committed. That is how in-memory mirrors follow the
//! database: the pool index is changed by the same task that commits, in
//! the same order, whether or not the caller is still waiting.

use std::any::Any;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{AnyConnection, Connection};
use tokio::sync::{broadcast, mpsc, oneshot};

use boilerhouse_core::event::Event;

use super::connect::Connector;
use super::sql::Backend;
use super::{Fence, StoreError};

/// What a write operation sees: the write connection, inside a transaction,
/// and the events it recorded (published to watchers only after commit).
pub struct WriteTx {
    pub(super) conn: AnyConnection,
    pub(super) new_events: Vec<Event>,
    /// Who caused the operation running now: one transaction carries the
    /// operations of many callers, so each sets this before it runs.
    pub(super) caused_by: Option<boilerhouse_core::auth::Principal>,
}

impl WriteTx {
    /// The connection, for queries.
    pub fn conn(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

type AnyResult = Result<Box<dyn Any + Send>, StoreError>;
type WriteOp = Box<dyn for<'c> FnOnce(&'c mut WriteTx) -> BoxFuture<'c, AnyResult> + Send>;

/// Runs after its operation committed.
type CommitHook = Box<dyn FnOnce() + Send>;

struct WriteRequest {
    op: WriteOp,
    on_commit: Option<CommitHook>,
    reply: oneshot::Sender<AnyResult>,
}

/// At most this many routine writes (no caller waits on them) share a
/// batch: they are what a waiting claim may find ahead of it.
pub const ROUTINE_PER_BATCH: usize = 16;

/// A handle for queuing writes. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    /// Writes an RPC's caller waits on.
    urgent: mpsc::Sender<WriteRequest>,
    /// The server's own writes.
    routine: mpsc::Sender<WriteRequest>,
}

/// Figures about the writer, for metrics and the benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: u64,
    /// Operations committed.
    pub operations: u64,
}

impl Writer {
    /// Starts the writer task. `max_batch` caps how many operations share a
    /// commit; 1 turns group commit off (one transaction per write), which
    /// the benchmark uses as its baseline.
    pub(super) fn spawn(
        conn: AnyConnection,
        connector: Connector,
        fence: Option<Fence>,
        max_batch: usize,
        events: broadcast::Sender<Event>,
        stats: std::sync::Arc<std::sync::Mutex<WriterStats>>,
    ) -> Self {
        let (urgent, urgent_rx) = mpsc::channel(4096);
        let (routine, routine_rx) = mpsc::channel(4096);
        tokio::spawn(run(
            conn,
            connector,
            fence,
            Queues {
                urgent: urgent_rx,
                routine: routine_rx,
                routine_owed: false,
            },
            max_batch.max(1),
            events,
            stats,
        ));
        Self { urgent, routine }
    }

    /// Runs `op` in the next transaction and returns its result once that
    /// transaction has committed.
    pub async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriteTx) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        self.submit(op, None).await
    }

    /// Like [`Writer::write`], and runs `on_commit` once `op` has committed,
    /// on the writer task, in commit order, before any reply is sent. It
    /// runs even if the caller stopped waiting; it never runs if `op` or
    /// its transaction failed.
    pub async fn write_then<T, F, H>(&self, op: F, on_commit: H) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriteTx) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
        H: FnOnce() + Send + 'static,
    {
        self.submit(op, Some(Box::new(on_commit))).await
    }

    async fn submit<T, F>(&self, op: F, on_commit: Option<CommitHook>) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriteTx) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        // Read here, on the caller's task: the writer task has no caller.
        let caused_by = crate::auth::current();
        // An RPC has a caller; the server's own tasks have none.
        let queue = if caused_by.is_some() {
            &self.urgent
        } else {
            &self.routine
        };
        let op: WriteOp = Box::new(move |tx| {
            tx.caused_by = caused_by;
            Box::pin(async move { op(tx).await.map(|v| Box::new(v) as Box<dyn Any + Send>) })
        });
        queue
            .send(WriteRequest {
                op,
                on_commit,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        let value = answer.await.map_err(|_| StoreError::Closed)??;
        value
            .downcast::<T>()
            .map(|v| *v)
            .map_err(|_| StoreError::Internal("write result had an unexpected type".into()))
    }
}

/// The writer's two queues; see the module documentation.
struct Queues {
    urgent: mpsc::Receiver<WriteRequest>,
    routine: mpsc::Receiver<WriteRequest>,
    /// The last batch took no routine write while some waited: the next
    /// begins with one, so a flood of callers' writes (or one write per
    /// batch) never stalls the server's own.
    routine_owed: bool,
}

impl Queues {
    /// Waits for a write and fills `batch` with it and what else waits:
    /// urgent writes first, leaving room for up to [`ROUTINE_PER_BATCH`]
    /// routine ones. False once every [`Writer`] handle is gone.
    async fn next_batch(&mut self, batch: &mut Vec<WriteRequest>, max_batch: usize) -> bool {
        let owed = if self.routine_owed {
            self.routine.try_recv().ok()
        } else {
            None
        };
        let mut routine = usize::from(owed.is_some());
        let first = match owed {
            Some(first) => first,
            None => tokio::select! {
                biased;
                Some(first) = self.urgent.recv() => first,
                Some(first) = self.routine.recv() => {
                    routine += 1;
                    first
                }
                else => return false,
            },
        };
        batch.push(first);
        let room_for_routine = ROUTINE_PER_BATCH.min(self.routine.len());
        let urgent_cap = max_batch.saturating_sub(room_for_routine).max(batch.len());
        while batch.len() < urgent_cap {
            match self.urgent.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        while routine < ROUTINE_PER_BATCH && batch.len() < max_batch {
            match self.routine.try_recv() {
                Ok(next) => {
                    batch.push(next);
                    routine += 1;
                }
                Err(_) => break,
            }
        }
        self.routine_owed = routine == 0 && !self.routine.is_empty();
        true
    }
}

async fn run(
    conn: AnyConnection,
    connector: Connector,
    fence: Option<Fence>,
    mut queues: Queues,
    max_batch: usize,
    events: broadcast::Sender<Event>,
    stats: std::sync::Arc<std::sync::Mutex<WriterStats>>,
) {
    let mut tx = WriteTx {
        conn,
        new_events: Vec::new(),
        caused_by: None,
    };
    // Set when the connection broke: the next batch opens a new one.
    let mut broken = false;
    let mut batch: Vec<WriteRequest> = Vec::with_capacity(max_batch);
    // Ends only once every Writer handle is gone: the store was dropped,
    // so there is nothing left to write.
    while queues.next_batch(&mut batch, max_batch).await {
        let count = batch.len() as u64;
        if broken {
            match connector.connect().await {
                Ok(conn) => {
                    tracing::info!(
                        backend = connector.backend().as_str(),
                        "store: write connection reopened"
                    );
                    // The old connection is dead or poisoned.
                    drop(std::mem::replace(&mut tx.conn, conn));
                }
                Err(e) => {
                    fail_all(&mut batch, &e);
                    continue;
                }
            }
        }
        let outcome = commit_batch(&mut tx, connector.backend(), fence.as_ref(), &mut batch).await;
        broken = outcome == Outcome::Broken;
        let committed = outcome == Outcome::Committed;
        if committed {
            if let Ok(mut s) = stats.lock() {
                s.commits += 1;
                s.operations += count;
            }
            for event in tx.new_events.drain(..) {
                // No receivers is normal: nobody is watching.
                let _ = events.send(event);
            }
        } else {
            tx.new_events.clear();
        }
    }
    let _ = tx.conn.close().await;
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Committed: every operation that succeeded is durable.
    Committed,
    /// Rolled back; the connection is fine.
    RolledBack,
    /// Rolled back, or never begun, and the connection cannot be trusted
    /// (I/O error, the database server went away): open a new one.
    Broken,
}

/// Runs one batch as one transaction and answers every request in it.
async fn commit_batch(
    tx: &mut WriteTx,
    backend: Backend,
    fence: Option<&Fence>,
    batch: &mut Vec<WriteRequest>,
) -> Outcome {
    if let Some(fence) = fence
        && fence.lost.is_cancelled()
    {
        // Stepping down: memory may differ from the database, so nothing
        // decided from it may be written.
        fail_all(
            batch,
            &StoreError::NotLeader("this server is stepping down".into()),
        );
        return Outcome::RolledBack;
    }
    if let Err((e, broken)) = begin(&mut tx.conn, backend).await {
        tracing::error!(error = %e, "store: could not begin a write transaction");
        fail_all(batch, &e);
        return if broken {
            Outcome::Broken
        } else {
            Outcome::RolledBack
        };
    }
    if let Some(fence) = fence
        && let Err((e, broken)) = check_fence(&mut tx.conn, fence).await
    {
        let _ = sqlx::query("ROLLBACK").execute(&mut tx.conn).await;
        fail_all(batch, &e);
        return if broken {
            Outcome::Broken
        } else {
            Outcome::RolledBack
        };
    }
    type Answer = (oneshot::Sender<AnyResult>, AnyResult, Option<CommitHook>);
    let mut results: Vec<Answer> = Vec::with_capacity(batch.len());
    let mut pending = std::mem::take(batch).into_iter();
    let mut savepoint = Savepoint::None;
    while let Some(request) = pending.next() {
        let events_before = tx.new_events.len();
        let result = run_in_savepoint(tx, &mut savepoint, request.op).await;
        if result.is_err() {
            tx.new_events.truncate(events_before);
        }
        match result {
            Err(StoreError::Database(e)) if is_fatal(&e, backend) => {
                // The transaction itself is broken (I/O error, disk full):
                // nothing in it can commit.
                let message = e.to_string();
                let _ = sqlx::query("ROLLBACK").execute(&mut tx.conn).await;
                let err = StoreError::Unavailable(message);
                let _ = request.reply.send(Err(err.clone()));
                for (reply, _, _) in results {
                    let _ = reply.send(Err(err.clone()));
                }
                for rest in pending {
                    let _ = rest.reply.send(Err(err.clone()));
                }
                return Outcome::Broken;
            }
            other => {
                let hook = request.on_commit.filter(|_| other.is_ok());
                results.push((request.reply, other, hook));
            }
        }
    }
    match sqlx::query("COMMIT").execute(&mut tx.conn).await {
        Ok(_) => {
            // Every hook first, in commit order: a caller that hears "ok"
            // finds every mirror already up to date.
            let mut replies = Vec::with_capacity(results.len());
            for (reply, result, hook) in results {
                if let Some(hook) = hook
                    && std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)).is_err()
                {
                    // A bug in a mirror must not take the database with it.
                    tracing::error!("store: a commit hook panicked");
                }
                replies.push((reply, result));
            }
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
            Outcome::Committed
        }
        Err(e) => {
            let broken = is_fatal(&e, backend);
            if broken && let Some(fence) = fence {
                // The connection broke while committing: the database may
                // or may not have the batch, and the mirrors (which follow
                // commits) cannot know which. The server must restore
                // from the database before it decides anything again.
                tracing::error!(error = %e, "store: the outcome of a commit is unknown; this server must restore from the database");
                fence.lost.cancel();
            } else {
                tracing::error!(error = %e, "store: commit failed; the batch is rolled back");
            }
            let _ = sqlx::query("ROLLBACK").execute(&mut tx.conn).await;
            let err = StoreError::Unavailable(e.to_string());
            for (reply, _, _) in results {
                let _ = reply.send(Err(err.clone()));
            }
            if broken {
                Outcome::Broken
            } else {
                Outcome::RolledBack
            }
        }
    }
}

/// Whether the operation before left its savepoint open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoint {
    /// None open: the batch's first operation, or one after a rollback.
    None,
    /// The previous operation succeeded and its savepoint is still open:
    /// the next one releases it in the same round trip as it opens its
    /// own, and COMMIT releases the last. Each statement is a round trip
    /// to the database's thread or socket, which at thousands of writes a
    /// second costs more than the statement.
    Open,
}

async fn run_in_savepoint(tx: &mut WriteTx, open: &mut Savepoint, op: WriteOp) -> AnyResult {
    let enter = match open {
        Savepoint::None => "SAVEPOINT op",
        Savepoint::Open => "RELEASE op; SAVEPOINT op",
    };
    *open = Savepoint::None;
    sqlx::raw_sql(enter).execute(&mut tx.conn).await?;
    match op(tx).await {
        Ok(value) => {
            *open = Savepoint::Open;
            Ok(value)
        }
        Err(e) => {
            sqlx::raw_sql("ROLLBACK TO op; RELEASE op")
                .execute(&mut tx.conn)
                .await?;
            Err(e)
        }
    }
}

/// The leader's fence, first in every write transaction: the lease row's
/// epoch, read under a share lock held until COMMIT, must be this
/// server's. Another epoch means another replica took the lease; the
/// share lock means no replica can take it while this transaction is open.
async fn check_fence(conn: &mut AnyConnection, fence: &Fence) -> Result<(), (StoreError, bool)> {
    let row: Result<(i64, String), sqlx::Error> =
        sqlx::query_as("SELECT epoch, address FROM leadership WHERE id = 1 FOR SHARE")
            .fetch_one(&mut *conn)
            .await;
    match row {
        Ok((epoch, _)) if epoch == fence.epoch => Ok(()),
        Ok((epoch, address)) => {
            tracing::error!(
                ours = fence.epoch,
                current = epoch,
                leader = %address,
                "store: fenced: another server holds the lease; this one commits nothing more"
            );
            fence.lost.cancel();
            Err((
                StoreError::NotLeader(format!("the leader is {address} (epoch {epoch})")),
                false,
            ))
        }
        Err(e) => {
            let broken = is_fatal(&e, Backend::Postgres);
            Err((StoreError::Unavailable(e.to_string()), broken))
        }
    }
}

/// Begins the batch's transaction. On SQLite, BEGIN IMMEDIATE takes the
/// write lock up front; another process (an operator's sqlite3 shell) may
/// hold it, so retry with backoff on top of the connection's busy timeout
/// rather than failing the whole batch. On PostgreSQL a plain BEGIN: this
/// task is the only writer of its server. The error says whether the
/// connection is broken.
async fn begin(conn: &mut AnyConnection, backend: Backend) -> Result<(), (StoreError, bool)> {
    let statement = match backend {
        Backend::Sqlite => "BEGIN IMMEDIATE",
        Backend::Postgres => "BEGIN",
    };
    let mut delay = Duration::from_millis(10);
    let mut attempt = 0;
    loop {
        match sqlx::query(statement).execute(&mut *conn).await {
            Ok(_) => return Ok(()),
            Err(e) if backend == Backend::Sqlite && is_busy(&e) && attempt < 5 => {
                attempt += 1;
                tracing::warn!(attempt, "store: database is busy, retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                let broken = is_fatal(&e, backend);
                return Err((StoreError::Unavailable(e.to_string()), broken));
            }
        }
    }
}

fn fail_all(batch: &mut Vec<WriteRequest>, err: &StoreError) {
    for request in batch.drain(..) {
        let _ = request.reply.send(Err(err.clone()));
    }
}

fn sqlite_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse::<i32>().ok()),
        _ => None,
    }
}

fn is_busy(e: &sqlx::Error) -> bool {
    // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with extended codes.
    matches!(sqlite_code(e).map(|c| c & 0xff), Some(5 | 6))
}

/// Errors after which the open transaction, or the connection, cannot be
/// trusted. SQLite: SQLITE_IOERR (10), SQLITE_CORRUPT (11), SQLITE_FULL
/// (13), SQLITE_NOTADB (26). PostgreSQL: the SQLSTATE classes for a lost
/// connection (08), insufficient resources such as a full disk (53), an
/// operator intervention such as a server shutting down (57), a system
/// error (58) and an internal error (XX), and a session ended for idling in
/// its transaction (25P03). Either: the connection itself
/// failing.
pub(super) fn is_fatal(e: &sqlx::Error, backend: Backend) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => match backend {
            Backend::Sqlite => matches!(sqlite_code(e).map(|c| c & 0xff), Some(10 | 11 | 13 | 26)),
            Backend::Postgres => db.code().is_some_and(|code| {
                // 25P03: the server ended a session left idle inside its
                // transaction (idle_in_transaction_session_timeout); the
                // error is the last thing it sends before closing.
                code == "25P03"
                    || ["08", "53", "57", "58", "XX"]
                        .iter()
                        .any(|class| code.starts_with(class))
            }),
        },
        _ => false,
    }
}
