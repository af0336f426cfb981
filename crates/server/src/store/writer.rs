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
//! On SQLite, writes that are short lists of statements of one shape
//! (claims, most often) travel up to eight at a time in one round trip to
//! SQLite's thread, in one savepoint; when one fails, the run is rolled
//! back, the writes before it run again without it, and it alone
//! (`batch`, `transaction::run_together`).
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
use tokio::sync::{broadcast, mpsc, oneshot};

use boilerhouse_core::event::Event;

use super::connect::Connector;
use super::sql::Backend;
use super::{Fence, StoreError};

mod batch;
mod conn;
mod transaction;
use batch::{Outcome, Published, commit_batch, fail_all};
pub use conn::WriteConn;

use super::statements::Statements;

/// What a write operation sees: the write connection, inside a transaction,
/// and the events it recorded (published to watchers only after commit).
pub struct WriteTx {
    pub(super) conn: WriteConn,
    pub(super) new_events: Vec<Event>,
    /// Who caused the operation running now: one transaction carries the
    /// operations of many callers, so each sets this before it runs.
    pub(super) caused_by: Option<boilerhouse_core::auth::Principal>,
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
    pub fn conn(&mut self) -> &mut WriteConn {
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

/// What an operation does once its statements have run: the values of
/// their [`Returns`](super::statements::Expect::Returns) in, its result out.
type Finish = Box<dyn FnOnce(&mut WriteTx, Vec<i64>) -> AnyResult + Send>;

/// What a write runs.
enum Body {
    /// Any work on the connection.
    Op(WriteOp),
    /// A list of statements, then a step that touches nothing. Writes of
    /// one shape that follow each other in a batch travel to SQLite
    /// together (see [`transaction::run_together`]).
    Statements(Statements, Finish),
}

struct WriteRequest {
    body: Body,
    on_commit: Option<CommitHook>,
    reply: oneshot::Sender<AnyResult>,
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
    /// Writes that travelled to SQLite in the same round trip as the
    /// write before them (whether or not they committed).
    pub shared_trips: u64,
    /// Runs of writes sent together that were rolled back whole because
    /// a write after the first failed (its predecessors went again).
    pub undone_runs: u64,
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
        conn: WriteConn,
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
            // SQLite runs on this thread (store/native.rs): no sockets,
            // so the thread parks on a futex between batches, which is
            // cheaper to wake than the I/O driver's epoll.
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

    /// Like [`Writer::write_then`], for a write that is a list of
    /// statements: `finish` gets the values of their
    /// [`Returns`](super::statements::Expect::Returns) and gives the
    /// result. On SQLite its savepoint is entered in the same round trip as
    /// its statements, and writes of the same shape queued together share
    /// one.
    pub(super) async fn write_statements_then<T, F, H>(
        &self,
        statements: Statements,
        finish: F,
        on_commit: H,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteTx, Vec<i64>) -> Result<T, StoreError> + Send + 'static,
        H: FnOnce() + Send + 'static,
    {
        let finish: Finish =
            Box::new(move |tx, ids| finish(tx, ids).map(|v| Box::new(v) as Box<dyn Any + Send>));
        self.send(
            Body::Statements(statements, finish),
            Some(Box::new(on_commit)),
        )
        .await
    }

    async fn submit<T, F>(&self, op: F, on_commit: Option<CommitHook>) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriteTx) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        // Read here, on the caller's task: the writer task has no caller.
        let caused_by = crate::auth::current();
        let op: WriteOp = Box::new(move |tx| {
            tx.caused_by = caused_by;
            Box::pin(async move { op(tx).await.map(|v| Box::new(v) as Box<dyn Any + Send>) })
        });
        self.send(Body::Op(op), on_commit).await
    }

    async fn send<T: Send + 'static>(
        &self,
        body: Body,
        on_commit: Option<CommitHook>,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        // An RPC has a caller; the server's own tasks have none.
        let queue = if crate::auth::current().is_some() {
            &self.urgent
        } else {
            &self.routine
        };
        queue
            .send(WriteRequest {
                body,
                on_commit,
                reply,
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
            body: Body::Op(Box::new(|_tx| {
                Box::pin(async { Ok(Box::new(()) as Box<dyn Any + Send>) })
            })),
            on_commit: None,
            reply,
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
    conn: WriteConn,
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
            match connector.connect_writer().await {
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
async fn checkpoint_the_rest(conn: &mut WriteConn) {
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

#[cfg(test)]
mod tests;
