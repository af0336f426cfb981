//! The single writer: one task, on a thread of its own, owns the only
//! write connection and commits every write that is waiting as one
//! transaction (group commit).
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
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use sqlx::{AnyConnection, Connection};
use tokio::sync::{broadcast, mpsc, oneshot};

use boilerhouse_core::event::Event;

use super::connect::Connector;
use super::sql::Backend;
use super::{Fence, StoreError};

mod transaction;
use transaction::{Savepoint, begin, check_fence, is_fatal, run_in_savepoint};

/// What a write operation sees: the write connection, inside a transaction,
/// and the events it recorded (published to watchers only after commit).
pub struct WriteTx {
    pub(super) conn: AnyConnection,
    pub(super) new_events: Vec<Event>,
    /// Who caused the operation running now: one transaction carries the
    /// operations of many callers, so each sets this before it runs.
    pub(super) caused_by: Option<boilerhouse_core::auth::Principal>,
    pub(super) backend: Backend,
    /// The statements that enter the operation's savepoint, when the
    /// writer left them to the operation: its [`Statements`](super::statements::Statements) send them
    /// with its own, in one round trip.
    pub(super) enter: Option<&'static str>,
    /// Entering the savepoint failed partway: the previous operation's
    /// savepoint may be open or gone, so only the whole transaction can
    /// be rolled back.
    pub(super) savepoint_lost: bool,
}

impl WriteTx {
    /// The connection, for queries.
    pub fn conn(&mut self) -> &mut AnyConnection {
        debug_assert!(
            self.enter.is_none(),
            "an operation that defers its savepoint runs its statements first"
        );
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
    /// The operation's first database work is [`Statements::run`](super::statements::Statements::run), which
    /// enters the savepoint itself.
    defers_entry: bool,
    /// Set on the request [`Writer::close`] sends: once its batch is done
    /// the writer closes the connection, says so here, and stops.
    closing: Option<oneshot::Sender<()>>,
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
    /// Starts the writer on a thread of its own. `max_batch` caps how
    /// many operations share a commit; 1 turns group commit off (one
    /// transaction per write), which the benchmark uses as its baseline.
    ///
    /// Why a thread: each statement is a trip to the database's thread (or
    /// socket) and back, and a task on the server's runtime that wakes
    /// from one waits behind every RPC ready to run (at 256 claims in
    /// flight, some 100 µs a trip, most of a claim's cost). On its own
    /// thread the writer runs the moment its answer comes.
    pub(super) fn spawn(
        conn: AnyConnection,
        connector: Connector,
        fence: Option<Fence>,
        max_batch: usize,
        events: broadcast::Sender<Event>,
        stats: std::sync::Arc<std::sync::Mutex<WriterStats>>,
        restart_log: std::sync::Arc<AtomicBool>,
    ) -> Result<Self, StoreError> {
        let (urgent, urgent_rx) = mpsc::channel(4096);
        let (routine, routine_rx) = mpsc::channel(4096);
        let mut runtime = tokio::runtime::Builder::new_current_thread();
        match connector.backend() {
            // SQLite answers through a channel from its own thread: no
            // sockets, so the thread parks on a futex, which is cheaper to
            // wake than the I/O driver's epoll (4 % of the SQLite thread's
            // time went to waking this one).
            Backend::Sqlite => runtime.enable_time(),
            Backend::Postgres => runtime.enable_all(),
        };
        let runtime = runtime
            .build()
            .map_err(|e| StoreError::Internal(format!("writer runtime: {e}")))?;
        let queues = Queues {
            urgent: urgent_rx,
            routine: routine_rx,
            routine_owed: false,
            restart_log,
        };
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                runtime.block_on(run(
                    conn,
                    connector,
                    fence,
                    queues,
                    max_batch.max(1),
                    events,
                    stats,
                ));
            })
            .map_err(|e| StoreError::Internal(format!("writer thread: {e}")))?;
        Ok(Self { urgent, routine })
    }

    /// Runs `op` in the next transaction and returns its result once that
    /// transaction has committed.
    pub async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriteTx) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        self.submit(op, None, false).await
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
        self.submit(op, Some(Box::new(on_commit)), false).await
    }

    /// Like [`Writer::write_then`], for an operation whose first database
    /// work is one [`Statements::run`](super::statements::Statements::run): the savepoint is entered in the
    /// same round trip as its statements.
    pub(super) async fn write_statements_then<T, F, H>(
        &self,
        op: F,
        on_commit: H,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriteTx) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
        H: FnOnce() + Send + 'static,
    {
        self.submit(op, Some(Box::new(on_commit)), true).await
    }

    async fn submit<T, F>(
        &self,
        op: F,
        on_commit: Option<CommitHook>,
        defers_entry: bool,
    ) -> Result<T, StoreError>
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
                defers_entry,
                closing: None,
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

impl Writer {
    /// Stops the writer once what was queued before is done, and returns
    /// once its connection is closed (its WAL checkpointed and removed on
    /// SQLite, when it was the last). Writes queued after fail as
    /// [`StoreError::Closed`].
    pub(super) async fn close(&self) {
        let (closing, closed) = oneshot::channel();
        let (reply, _) = oneshot::channel();
        let request = WriteRequest {
            op: Box::new(|_tx| Box::pin(async { Ok(Box::new(()) as Box<dyn Any + Send>) })),
            on_commit: None,
            reply,
            defers_entry: false,
            closing: Some(closing),
        };
        // Behind every routine write, and after the urgent ones.
        if self.routine.send(request).await.is_ok() {
            let _ = closed.await;
        }
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
    /// Set by the checkpointer: copy the WAL's last frames between two
    /// batches ([`checkpoint_the_rest`]).
    restart_log: std::sync::Arc<AtomicBool>,
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
        backend: connector.backend(),
        enter: None,
        savepoint_lost: false,
    };
    // Set when the connection broke: the next batch opens a new one.
    let mut broken = false;
    let mut batch: Vec<WriteRequest> = Vec::with_capacity(max_batch);
    // Ends once the store is closed, or every Writer handle is gone (the
    // store was dropped), so there is nothing left to write.
    let mut closing = Vec::new();
    while closing.is_empty() && queues.next_batch(&mut batch, max_batch).await {
        closing.extend(batch.iter_mut().filter_map(|r| r.closing.take()));
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
        let outcome = commit_batch(
            &mut tx,
            connector.backend(),
            fence.as_ref(),
            &Published {
                events: &events,
                stats: &stats,
            },
            &mut batch,
        )
        .await;
        broken = outcome == Outcome::Broken;
        tx.new_events.clear();
        if !broken && queues.restart_log.swap(false, Ordering::Relaxed) {
            checkpoint_the_rest(&mut tx.conn).await;
        }
    }
    let _ = tx.conn.close().await;
    for closed in closing {
        let _ = closed.send(());
    }
}

/// SQLite: copies into the database what the last commits added to a
/// WAL the checkpointer has otherwise copied (see
/// [`Store::checkpoint`](super::Store::checkpoint)), between two batches:
/// with every frame copied, the next transaction starts the WAL over from
/// its beginning (and cuts the file back to `journal_size_limit`).
/// Under steady writes the checkpointer alone never sees every frame
/// copied, since commits land while it works, and the WAL grew without
/// bound (2 GiB in 90 s of churn at 100,000 containers). Only the writer
/// can copy with no commit landing meanwhile. A failure changes nothing
/// and is tried again when the checkpointer next asks.
async fn checkpoint_the_rest(conn: &mut AnyConnection) {
    let outcome: Result<(i64, i64, i64), sqlx::Error> =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(conn)
            .await;
    match outcome {
        Ok((busy, log, copied)) => {
            tracing::debug!(busy, log, copied, "store: WAL copied for a restart")
        }
        Err(e) => tracing::warn!(error = %e, "store: copying the WAL's last frames failed"),
    }
}

/// Where a committed batch is announced before its callers hear of it.
struct Published<'a> {
    events: &'a broadcast::Sender<Event>,
    stats: &'a std::sync::Mutex<WriterStats>,
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
    published: &Published<'_>,
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
    // On SQLite without a fence, the first operation that touches the
    // database begins the transaction in its own round trip; BEGIN
    // IMMEDIATE waits out another process's write lock for the
    // connection's busy timeout (5 s), where begin() would retry for
    // 0.3 s more.
    let begun_by_first = backend == Backend::Sqlite && fence.is_none();
    if !begun_by_first && let Err((e, broken)) = begin(&mut tx.conn, backend).await {
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
    let mut savepoint = if begun_by_first {
        Savepoint::Unbegun
    } else {
        Savepoint::None
    };
    while let Some(request) = pending.next() {
        let events_before = tx.new_events.len();
        let result = run_in_savepoint(tx, &mut savepoint, request.op, request.defers_entry).await;
        if result.is_err() {
            tx.new_events.truncate(events_before);
        }
        let result = match result {
            Err(e) if std::mem::take(&mut tx.savepoint_lost) => {
                // Not a statement of this operation failed but the
                // transaction's bookkeeping: the whole batch is rolled
                // back, as after any fatal error (a protocol error is one).
                Err(StoreError::Database(std::sync::Arc::new(
                    sqlx::Error::Protocol(format!("entering a savepoint failed: {e}")),
                )))
            }
            other => other,
        };
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
    let committed = if savepoint == Savepoint::Unbegun {
        // No operation touched the database: nothing to commit.
        Ok(Default::default())
    } else {
        sqlx::query("COMMIT").execute(&mut tx.conn).await
    };
    match committed {
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
            // Then the figures and the events: a caller that hears "ok"
            // finds its write counted, and if it then starts watching it
            // sees only what comes after its write.
            if let Ok(mut stats) = published.stats.lock() {
                stats.commits += 1;
                stats.operations += replies.len() as u64;
            }
            for event in tx.new_events.drain(..) {
                // No receivers is normal: nobody is watching.
                let _ = published.events.send(event);
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

fn fail_all(batch: &mut Vec<WriteRequest>, err: &StoreError) {
    for request in batch.drain(..) {
        let _ = request.reply.send(Err(err.clone()));
    }
}
