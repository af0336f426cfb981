//! The writer's transaction: beginning it, the leader's fence, each
//! operation's savepoint, and which errors break the transaction.

use std::time::Duration;

use sqlx::AnyConnection;

use super::super::sql::Backend;
use super::super::statements::{Statements, Verdict, run_writes_together};
use super::super::{Fence, StoreError};
use super::{AnyResult, WriteOp, WriteTx};

/// Whether the operation before left its savepoint open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Savepoint {
    /// No transaction yet: on SQLite the first operation that touches the
    /// database begins it, in the same round trip as its savepoint and
    /// (when it defers its entry) its statements. With ~1 write a batch,
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

/// The savepoints of the writes after the first in a run sent together,
/// each nested in the one before, so that rolling back to one undoes its
/// write and every write after it. As many as a run may hold.
const NESTED: [(&str, &str); MAX_WRITES_TOGETHER - 1] = [
    ("SAVEPOINT w1", "ROLLBACK TO w1; RELEASE w1"),
    ("SAVEPOINT w2", "ROLLBACK TO w2; RELEASE w2"),
    ("SAVEPOINT w3", "ROLLBACK TO w3; RELEASE w3"),
    ("SAVEPOINT w4", "ROLLBACK TO w4; RELEASE w4"),
    ("SAVEPOINT w5", "ROLLBACK TO w5; RELEASE w5"),
    ("SAVEPOINT w6", "ROLLBACK TO w6; RELEASE w6"),
    ("SAVEPOINT w7", "ROLLBACK TO w7; RELEASE w7"),
];

/// At most this many writes travel in one round trip.
pub(super) const MAX_WRITES_TOGETHER: usize = 8;

/// SQLite: runs a run of writes of one shape in one round trip, each in a
/// savepoint of its own, and returns the results of the writes it
/// settled, in order: every one, or those up to and including the first
/// that failed. That one is rolled back to its savepoint, which undoes
/// the writes after it too; they are the caller's to run again. At
/// thousands of claims a second, the round trip to SQLite's thread per
/// write, not the statements, was most of the writer's time per claim.
pub(super) async fn run_together_in_savepoints(
    tx: &mut WriteTx,
    open: &mut Savepoint,
    writes: &[&Statements],
) -> Vec<Result<Vec<i64>, StoreError>> {
    debug_assert!((1..=MAX_WRITES_TOGETHER).contains(&writes.len()));
    let entries = std::iter::once(entry(*open)).chain(NESTED.iter().map(|(enter, _)| *enter));
    let verdicts =
        run_writes_together(&mut tx.conn, entries.zip(writes.iter().copied()).collect()).await;
    // Whatever happens below, "op" is open only if the first write stood.
    *open = Savepoint::None;
    let mut settled = Vec::with_capacity(verdicts.len());
    for (i, verdict) in verdicts.into_iter().enumerate() {
        match verdict {
            Verdict::Done(Ok(ids)) => {
                if i == 0 {
                    *open = Savepoint::Open;
                }
                settled.push(Ok(ids));
            }
            Verdict::Done(Err(e)) => {
                let undo = if i == 0 {
                    "ROLLBACK TO op; RELEASE op"
                } else {
                    NESTED[i - 1].1
                };
                if let Err(undo_failed) = sqlx::raw_sql(undo).execute(&mut tx.conn).await {
                    // What this write left, and the writes after it, may
                    // still be in the transaction: only all of it can go.
                    tx.savepoint_lost = true;
                    settled.push(Err(undo_failed.into()));
                } else {
                    settled.push(Err(e));
                }
                break;
            }
            Verdict::EnterFailed(e) => {
                // Which of its statements failed is unknown: only the
                // whole transaction can be rolled back.
                tx.savepoint_lost = true;
                settled.push(Err(e));
                break;
            }
            Verdict::NotRun => break,
        }
    }
    settled
}

pub(super) async fn run_in_savepoint(
    tx: &mut WriteTx,
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
        Err(e) if tx.savepoint_lost => Err(e),
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
pub(super) async fn check_fence(
    conn: &mut AnyConnection,
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
    conn: &mut AnyConnection,
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
