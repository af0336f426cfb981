//! The writer's transaction: beginning it, the leader's fence, each
//! operation's savepoint, and which errors break the transaction.

use std::time::Duration;

use super::super::sql::Backend;
use super::super::statements::{Statements, Verdict, run_writes_together};
use super::super::{Fence, StoreError};
use super::{AnyResult, WriteConn, WriteOp, WriteTx};

/// Whether the operation before left its savepoint open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Savepoint {
    /// No transaction yet: on SQLite the first operation that touches the
    /// database begins it, in the same round trip as its savepoint (a run
    /// sent together has none: undoing it is a ROLLBACK) and (when it
    /// defers its entry) its statements. With ~1 write a batch,
    /// BEGIN alone was a fifth of a claim's time in the writer.
    Unbegun,
    /// None open: the batch's first operation, or one after a rollback.
    None,
    /// The previous operation succeeded and its savepoint is still open:
    /// the next one releases it in the same round trip as it opens its
    /// own, and COMMIT releases the last. Each statement is a round trip
    /// to the database's thread or socket, which at thousands of writes a
    /// second costs more than the statement.
    Open,
}

/// The statements that enter the next operation's savepoint, "op".
fn entry(open: Savepoint) -> &'static str {
    match open {
        Savepoint::Unbegun => "BEGIN IMMEDIATE; SAVEPOINT op",
        Savepoint::None => "SAVEPOINT op",
        Savepoint::Open => "RELEASE op; SAVEPOINT op",
    }
}

/// At most this many writes travel in one round trip.
pub(super) const MAX_WRITES_TOGETHER: usize = 8;

/// How a run of writes sent together ended.
#[derive(Debug)]
pub(super) enum Together {
    /// The results of the writes it settled, from the run's first: every
    /// one, or the first alone if it failed (the run undone, to its
    /// savepoint or, first in the batch, the transaction's beginning; the
    /// writes after it go again), or a failure that breaks the
    /// transaction, as the first's.
    Settled(Vec<Result<Vec<i64>, StoreError>>),
    /// The write at this position failed after the ones before it ran,
    /// and the run was rolled back whole: one savepoint covers it. The
    /// writes before it go again without it, then it alone.
    Undone { failed: usize },
}

/// SQLite: runs a run of writes of one shape in one round trip, inside
/// one savepoint (or, first in the batch, the transaction itself). At
/// thousands of claims a second the round trip to SQLite's thread per
/// write was most of the writer's time per claim; and a savepoint per
/// write made SQLite copy every page each write touched into the
/// savepoint's journal again (7 % of the server's time at P2). A write
/// that fails after others in the run is rare (its decision was made on
/// a stale view): the run is undone and the writes before it sent again,
/// one round trip more, so each write still stands or falls as it would
/// one by one.
pub(super) async fn run_together(
    tx: &mut WriteTx,
    open: &mut Savepoint,
    writes: &[&Statements],
) -> Together {
    debug_assert!((1..=MAX_WRITES_TOGETHER).contains(&writes.len()));
    let before = *open;
    let (enter, undo) = match before {
        // Nothing else in the transaction: rolling it back undoes the run.
        Savepoint::Unbegun => ("BEGIN IMMEDIATE", "ROLLBACK"),
        Savepoint::None => ("SAVEPOINT op", "ROLLBACK TO op; RELEASE op"),
        Savepoint::Open => ("RELEASE op; SAVEPOINT op", "ROLLBACK TO op; RELEASE op"),
    };
    let Some(native) = tx.conn.native() else {
        // Runs are formed on SQLite only (batch.rs `together`).
        return Together::Settled(vec![Err(StoreError::Internal(
            "writes are sent together on SQLite only".into(),
        ))]);
    };
    let verdicts = run_writes_together(native, enter, writes);
    // Whatever happens below, "op" is open only if every write stood.
    *open = Savepoint::None;
    let mut settled = Vec::with_capacity(verdicts.len());
    for (i, verdict) in verdicts.into_iter().enumerate() {
        match verdict {
            Verdict::Done(Ok(ids)) => settled.push(Ok(ids)),
            Verdict::Done(Err(e)) if breaks_transaction(&e, Backend::Sqlite) => {
                // Wherever in the run it landed, the whole batch fails, as
                // it would one by one; given as the run's first result,
                // the batch sees it first. Running the writes before it
                // again could commit on a transaction that cannot be
                // trusted.
                return Together::Settled(vec![Err(e)]);
            }
            Verdict::Done(Err(e)) => {
                if let Err(undo_failed) = sqlx::raw_sql(undo).execute(&mut tx.conn).await {
                    // What the run left may still be in the transaction:
                    // only all of it can go.
                    tx.savepoint_lost = true;
                    return Together::Settled(vec![Err(undo_failed.into())]);
                }
                if before == Savepoint::Unbegun {
                    *open = Savepoint::Unbegun;
                }
                return if i == 0 {
                    Together::Settled(vec![Err(e)])
                } else {
                    Together::Undone { failed: i }
                };
            }
            Verdict::EnterFailed(e) => {
                // Which of its statements failed is unknown: only the
                // whole transaction can be rolled back.
                tx.savepoint_lost = true;
                return Together::Settled(vec![Err(e)]);
            }
            Verdict::NotRun => {
                // Execution stops only at a failure, given to the write
                // it stopped in, which returned above.
                tx.savepoint_lost = true;
                return Together::Settled(vec![Err(StoreError::Internal(
                    "a write sent together did not run".into(),
                ))]);
            }
        }
    }
    *open = match before {
        Savepoint::Unbegun => Savepoint::None,
        Savepoint::None | Savepoint::Open => Savepoint::Open,
    };
    Together::Settled(settled)
}

/// Whether `e` breaks the transaction: the batch is rolled back whole.
/// Nothing is undone first: SQLite may already have rolled the
/// transaction back itself (it can on SQLITE_FULL and SQLITE_IOERR), and
/// a failed undo would hide why the batch failed.
pub(super) fn breaks_transaction(e: &StoreError, backend: Backend) -> bool {
    matches!(e, StoreError::Database(d) if is_fatal(d, backend))
}

pub(super) async fn run_in_savepoint(
    tx: &mut WriteTx,
    backend: Backend,
    open: &mut Savepoint,
    op: WriteOp,
    defers_entry: bool,
) -> AnyResult {
    let enter = entry(*open);
    if defers_entry {
        tx.enter = Some(enter);
    } else {
        *open = Savepoint::None;
        if let Err(e) = sqlx::raw_sql(enter).execute(&mut tx.conn).await {
            // Which of its statements failed is unknown: only the whole
            // transaction can be rolled back.
            tx.savepoint_lost = true;
            return Err(e.into());
        }
    }
    let result = op(tx).await;
    // Still pending: the operation touched nothing, and the savepoint
    // state is as before it.
    let entered = tx.enter.take().is_none();
    if !entered {
        return result;
    }
    *open = Savepoint::None;
    match result {
        Ok(value) => {
            *open = Savepoint::Open;
            Ok(value)
        }
        Err(e) if tx.savepoint_lost || breaks_transaction(&e, backend) => Err(e),
        Err(e) => {
            if let Err(undo_failed) = sqlx::raw_sql("ROLLBACK TO op; RELEASE op")
                .execute(&mut tx.conn)
                .await
            {
                // What the operation left may still be in the
                // transaction: only all of it can go.
                tx.savepoint_lost = true;
                return Err(undo_failed.into());
            }
            Err(e)
        }
    }
}

/// The leader's fence, first in every write transaction: the lease row's
/// epoch, read under a share lock held until COMMIT, must be this
/// server's. Another epoch means another replica took the lease; the
/// share lock means no replica can take it while this transaction is open.
pub(super) async fn check_fence(
    conn: &mut WriteConn,
    fence: &Fence,
) -> Result<(), (StoreError, bool)> {
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
pub(super) async fn begin(
    conn: &mut WriteConn,
    backend: Backend,
) -> Result<(), (StoreError, bool)> {
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
pub(in crate::store) fn is_fatal(e: &sqlx::Error, backend: Backend) -> bool {
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
