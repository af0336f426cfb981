//! One batch as one transaction: each write in its savepoint, writes of
//! one shape sent to SQLite together, the commit, and the answers.

use std::collections::VecDeque;

use tokio::sync::{broadcast, oneshot};

use boilerhouse_core::event::Event;

use super::super::sql::Backend;
use super::super::statements::{MAX_STATEMENTS_TOGETHER, Statements};
use super::super::{Fence, StoreError};
use super::transaction::{
    MAX_WRITES_TOGETHER, Savepoint, Together, begin, check_fence, is_fatal, run_in_savepoint,
    run_together,
};
use super::{AnyResult, Body, CommitHook, WriteOp, WriteRequest, WriteTx, WriterStats};

/// Where a committed batch is announced before its callers hear of it.
pub(super) struct Published<'a> {
    pub(super) events: &'a broadcast::Sender<Event>,
    pub(super) stats: &'a std::sync::Mutex<WriterStats>,
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Committed: every operation that succeeded is durable.
    Committed,
    /// Rolled back; the connection is fine.
    RolledBack,
    /// Rolled back, or never begun, and the connection cannot be trusted
    /// (I/O error, the database server went away): open a new one.
    Broken,
}

/// Runs one batch as one transaction and answers every request in it.
pub(super) async fn commit_batch(
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
    type Settled = (oneshot::Sender<AnyResult>, Option<CommitHook>, AnyResult);
    let mut results: Vec<Answer> = Vec::with_capacity(batch.len());
    let mut pending: VecDeque<WriteRequest> = std::mem::take(batch).into();
    let mut savepoint = if begun_by_first {
        Savepoint::Unbegun
    } else {
        Savepoint::None
    };
    // After a run was undone: how many writes at the front of `pending`
    // ran before the one that failed, and go again without it.
    let mut before_failed: Option<usize> = None;
    while let Some(request) = pending.pop_front() {
        let most = match before_failed {
            Some(0) => 1,
            Some(n) => n,
            None => MAX_WRITES_TOGETHER,
        };
        let run = take_run(request, &mut pending, backend, most);
        before_failed = before_failed.and_then(|n| n.checked_sub(run.len()));
        let settled: Vec<Settled> = if run.len() == 1 && !together(&run[0], backend) {
            let mut run = run;
            let WriteRequest {
                body,
                on_commit,
                reply,
                ..
            } = run.remove(0);
            let events_before = tx.new_events.len();
            let result = match body {
                Body::Op(op) => run_in_savepoint(tx, backend, &mut savepoint, op, false).await,
                Body::Statements(statements, finish) => {
                    let op: WriteOp = Box::new(move |tx| {
                        Box::pin(async move {
                            let ids = statements.run(tx).await?;
                            finish(tx, ids)
                        })
                    });
                    run_in_savepoint(tx, backend, &mut savepoint, op, true).await
                }
            };
            if result.is_err() {
                tx.new_events.truncate(events_before);
            }
            vec![(reply, on_commit, result)]
        } else {
            let lists: Vec<&Statements> = run
                .iter()
                .map(|r| match &r.body {
                    Body::Statements(statements, _) => statements,
                    Body::Op(_) => unreachable!("a run holds statement writes only"),
                })
                .collect();
            let together = run_together(tx, &mut savepoint, &lists).await;
            drop(lists);
            if let Ok(mut stats) = published.stats.lock() {
                stats.shared_trips += run.len() as u64 - 1;
            }
            let mut run = run;
            let outcomes = match together {
                Together::Settled(outcomes) => outcomes,
                Together::Undone { failed } => {
                    if let Ok(mut stats) = published.stats.lock() {
                        stats.undone_runs += 1;
                    }
                    for again in run.into_iter().rev() {
                        pending.push_front(again);
                    }
                    before_failed = Some(failed);
                    continue;
                }
            };
            // The writes after the one that failed ran, and were rolled
            // back with it: they go again, first.
            for again in run.drain(outcomes.len()..).rev() {
                pending.push_front(again);
            }
            let mut settled = Vec::with_capacity(run.len());
            for (request, outcome) in run.into_iter().zip(outcomes) {
                let WriteRequest {
                    body,
                    on_commit,
                    reply,
                    ..
                } = request;
                let Body::Statements(_, finish) = body else {
                    unreachable!("a run holds statement writes only")
                };
                let result = outcome.and_then(|ids| {
                    finish(tx, ids).inspect_err(|_| {
                        // Its statements stand, in the savepoint it shares
                        // with the rest of its run: only the whole batch
                        // can be rolled back.
                        tx.savepoint_lost = true;
                    })
                });
                settled.push((reply, on_commit, result));
            }
            settled
        };
        let mut settled = settled.into_iter();
        while let Some((reply, on_commit, result)) = settled.next() {
            let result = match result {
                Err(e) if std::mem::take(&mut tx.savepoint_lost) => {
                    // Not a statement of this operation failed but the
                    // transaction's bookkeeping: the whole batch is rolled
                    // back, as after any fatal error (a protocol error is one).
                    Err(StoreError::Database(std::sync::Arc::new(
                        sqlx::Error::Protocol(format!(
                            "entering or undoing a savepoint failed: {e}"
                        )),
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
                    let _ = reply.send(Err(err.clone()));
                    let others = results
                        .into_iter()
                        .map(|(reply, _, _)| reply)
                        .chain(settled.map(|(reply, _, _)| reply));
                    for reply in others {
                        let _ = reply.send(Err(err.clone()));
                    }
                    for rest in pending {
                        let _ = rest.reply.send(Err(err.clone()));
                    }
                    return Outcome::Broken;
                }
                other => {
                    let hook = on_commit.filter(|_| other.is_ok());
                    results.push((reply, other, hook));
                }
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

/// Whether `request` may travel with others of its shape: a statement
/// write short enough to be one prepared text, on SQLite (PostgreSQL takes
/// no parameters in a text of several statements).
fn together(request: &WriteRequest, backend: Backend) -> bool {
    backend == Backend::Sqlite
        && matches!(&request.body, Body::Statements(s, _) if s.len() <= MAX_STATEMENTS_TOGETHER)
}

/// `first` and the writes of its shape right behind it in `pending`, at
/// most `most` and a power of two of them: each count makes a text of its
/// own, prepared once and kept in the connection's cache, so few counts
/// keep few texts.
fn take_run(
    first: WriteRequest,
    pending: &mut VecDeque<WriteRequest>,
    backend: Backend,
    most: usize,
) -> Vec<WriteRequest> {
    let mut run = vec![first];
    if !together(&run[0], backend) {
        return run;
    }
    while run.len() < most.min(MAX_WRITES_TOGETHER) {
        let same = match (shape_of(&run[0]), pending.front().and_then(shape_of)) {
            (Some(a), Some(b)) => a.same_shape(b),
            _ => false,
        };
        if !same {
            break;
        }
        run.extend(pending.pop_front());
    }
    let keep = 1 << run.len().ilog2();
    for extra in run.drain(keep..).rev() {
        pending.push_front(extra);
    }
    run
}

fn shape_of(request: &WriteRequest) -> Option<&Statements> {
    match &request.body {
        Body::Statements(statements, _) => Some(statements),
        Body::Op(_) => None,
    }
}

pub(super) fn fail_all(batch: &mut Vec<WriteRequest>, err: &StoreError) {
    for request in batch.drain(..) {
        let _ = request.reply.send(Err(err.clone()));
    }
}
