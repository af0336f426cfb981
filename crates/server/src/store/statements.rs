//! A write as a list of statements, each with what it must find, sent to
//! SQLite in one round trip.
//!
//! Why: sqlx runs SQLite on a thread of its own, and every statement is a
//! round trip to it (a channel send, a thread wake-up, a reply). A claim
//! is four or five statements plus its savepoint; at thousands of claims a
//! second the trips, not the statements, were the writer's cost. SQLite
//! (through sqlx) runs a text of several statements in one call and
//! reports each one's changed rows and returned rows, so a short write
//! travels once, savepoint included, and its checks are made on what
//! comes back. PostgreSQL takes no parameters in a multi-statement text:
//! there, and for long writes (whose text would be prepared once and
//! never reused), the statements run one by one with the same checks.
//!
//! sqlx marks several statements in one prepared text as a SQLite-only
//! behaviour it may drop (launchbadge/sqlx#3108); if it does, setting
//! [`MAX_STATEMENTS_TOGETHER`] to 0 keeps everything working at the old
//! cost.
//!
//! Sequential meaning is kept: when statements run together, a failed
//! check or error reports the first statement that failed, as running
//! them one by one would have; the writer rolls back the operation's
//! savepoint either way, so what ran after it leaves nothing.

use futures::TryStreamExt as _;
use sqlx::Either;
use sqlx::any::AnyArguments;
use sqlx::query::Query;

use super::sql::{self, Backend};
use super::{StoreError, WriteTx};

/// Writes with more statements than this run one statement at a time:
/// their text would fill the statement cache and never be used again.
pub(super) const MAX_STATEMENTS_TOGETHER: usize = 8;

/// A value bound to a `?`, owned so the list can be run either way.
#[derive(Debug, Clone)]
pub(super) enum Param {
    Text(Option<String>),
    Int(Option<i64>),
    Real(Option<f64>),
    Bool(bool),
    Blob(Vec<u8>),
}

impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Param::Text(Some(v.to_owned()))
    }
}

impl From<String> for Param {
    fn from(v: String) -> Self {
        Param::Text(Some(v))
    }
}

impl From<&String> for Param {
    fn from(v: &String) -> Self {
        Param::Text(Some(v.clone()))
    }
}

impl From<Option<&str>> for Param {
    fn from(v: Option<&str>) -> Self {
        Param::Text(v.map(str::to_owned))
    }
}

impl From<&Option<String>> for Param {
    fn from(v: &Option<String>) -> Self {
        Param::Text(v.clone())
    }
}

impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::Int(Some(v))
    }
}

impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Self {
        Param::Int(v)
    }
}

impl From<Option<f64>> for Param {
    fn from(v: Option<f64>) -> Self {
        Param::Real(v)
    }
}

impl From<bool> for Param {
    fn from(v: bool) -> Self {
        Param::Bool(v)
    }
}

impl From<&Vec<u8>> for Param {
    fn from(v: &Vec<u8>) -> Self {
        Param::Blob(v.clone())
    }
}

fn bind(
    query: Query<'_, sqlx::Any, AnyArguments>,
    param: Param,
) -> Query<'_, sqlx::Any, AnyArguments> {
    match param {
        Param::Text(v) => query.bind(v),
        Param::Int(v) => query.bind(v),
        Param::Real(v) => query.bind(v),
        Param::Bool(v) => query.bind(v),
        Param::Blob(v) => query.bind(v),
    }
}

/// What a statement must find for the write to stand.
#[derive(Debug)]
pub(super) enum Expect {
    /// Whatever it changes.
    Anything,
    /// At least one changed row; none means the row was not as the
    /// decision saw it: the write conflicts, with this message.
    Changes(String),
    /// One returned row whose first column, an integer, is at most the
    /// bound; otherwise the write conflicts, with this message.
    AtMost(i64, String),
    /// One returned row whose first column is an integer the caller wants
    /// (the id of an inserted row).
    Returns,
}

/// One statement, written with plain `?` placeholders (never `?NNN`: the
/// numbers would be wrong once texts are joined).
#[derive(Debug)]
struct Statement {
    sql: &'static str,
    params: Vec<Param>,
    expect: Expect,
}

/// What a statement gave back.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    changed: u64,
    first: Option<i64>,
}

/// A write's statements, in order.
#[derive(Debug, Default)]
pub(super) struct Statements {
    list: Vec<Statement>,
}

impl Statements {
    /// Adds a statement; `params` in the order of its `?`s.
    pub(super) fn push(&mut self, sql: &'static str, params: Vec<Param>, expect: Expect) {
        debug_assert!(
            !sql.contains(';'),
            "one statement per push, so results map to statements"
        );
        debug_assert_eq!(
            sql.matches('?').count(),
            params.len(),
            "one parameter per placeholder: {sql}"
        );
        self.list.push(Statement {
            sql,
            params,
            expect,
        });
    }

    /// Runs the statements inside the operation's savepoint (entering it
    /// first if the writer left that to this write), checks each, and
    /// returns the values of the [`Expect::Returns`] statements in order.
    pub(super) async fn run(self, tx: &mut WriteTx) -> Result<Vec<i64>, StoreError> {
        if tx.backend == Backend::Sqlite && self.list.len() <= MAX_STATEMENTS_TOGETHER {
            self.run_together(tx).await
        } else {
            self.run_one_by_one(tx).await
        }
    }

    async fn run_one_by_one(self, tx: &mut WriteTx) -> Result<Vec<i64>, StoreError> {
        if let Some(enter) = tx.enter.take()
            && let Err(e) = sqlx::raw_sql(enter).execute(&mut tx.conn).await
        {
            tx.savepoint_lost = true;
            return Err(e.into());
        }
        let mut returned = Vec::new();
        for statement in self.list {
            let mut query = sql::query(statement.sql);
            for param in statement.params {
                query = bind(query, param);
            }
            let mut outcome = Outcome::default();
            let mut rows = sqlx::Executor::fetch_many(&mut tx.conn, query);
            while let Some(item) = rows.try_next().await? {
                record(&mut outcome, item)?;
            }
            check(&statement.expect, outcome, &mut returned)?;
        }
        Ok(returned)
    }

    async fn run_together(self, tx: &mut WriteTx) -> Result<Vec<i64>, StoreError> {
        // The savepoint's own statements lead, so the whole write is one
        // round trip; they change nothing and return nothing.
        let enter = tx.enter.take();
        let leading = enter.map_or(0, |e| e.matches(';').count() + 1);
        let mut text = String::with_capacity(512 * self.list.len());
        if let Some(enter) = enter {
            text.push_str(enter);
            text.push_str(";\n");
        }
        for (i, statement) in self.list.iter().enumerate() {
            if i > 0 {
                text.push_str(";\n");
            }
            text.push_str(statement.sql);
        }
        // Plain `?`s: sqlx binds SQLite's unnumbered parameters in order across
        // the statements of a text, so no numbering pass is needed.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(text));
        let mut expects = Vec::with_capacity(self.list.len());
        for statement in self.list {
            for param in statement.params {
                query = bind(query, param);
            }
            expects.push(statement.expect);
        }
        let mut outcomes = Vec::with_capacity(expects.len());
        let mut current = Outcome::default();
        let mut done = 0usize;
        let mut failure = None;
        {
            let mut results = sqlx::Executor::fetch_many(&mut tx.conn, query);
            loop {
                match results.try_next().await {
                    Ok(Some(item)) => {
                        let finished = matches!(item, Either::Left(_));
                        record(&mut current, item)?;
                        if finished {
                            if done >= leading {
                                outcomes.push(std::mem::take(&mut current));
                            } else {
                                current = Outcome::default();
                            }
                            done += 1;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failure {
            if done < leading {
                // The savepoint was not entered (or the previous one not
                // released): rolling back to "op" could undo an operation
                // that already succeeded. Only the whole batch can be.
                tx.savepoint_lost = true;
                return Err(e.into());
            }
            // The statements before the failing one ran; their checks come
            // first, as they would have one by one.
            let mut returned = Vec::new();
            for (expect, outcome) in expects.iter().zip(&outcomes) {
                check(expect, *outcome, &mut returned)?;
            }
            return Err(e.into());
        }
        if outcomes.len() != expects.len() {
            return Err(StoreError::Internal(format!(
                "{} statements gave {} results",
                expects.len(),
                outcomes.len()
            )));
        }
        let mut returned = Vec::new();
        for (expect, outcome) in expects.iter().zip(outcomes) {
            check(expect, outcome, &mut returned)?;
        }
        Ok(returned)
    }
}

fn record(
    outcome: &mut Outcome,
    item: Either<sqlx::any::AnyQueryResult, sqlx::any::AnyRow>,
) -> Result<(), StoreError> {
    use sqlx::Row as _;
    match item {
        Either::Left(done) => outcome.changed += done.rows_affected(),
        Either::Right(row) => {
            if outcome.first.is_none() {
                outcome.first = Some(row.try_get::<i64, _>(0)?);
            }
        }
    }
    Ok(())
}

fn check(expect: &Expect, outcome: Outcome, returned: &mut Vec<i64>) -> Result<(), StoreError> {
    match expect {
        Expect::Anything => Ok(()),
        Expect::Changes(what) if outcome.changed == 0 => Err(StoreError::Conflict(what.clone())),
        Expect::Changes(_) => Ok(()),
        Expect::AtMost(bound, what) => match outcome.first {
            Some(value) if value <= *bound => Ok(()),
            Some(_) => Err(StoreError::Conflict(what.clone())),
            None => Err(StoreError::Internal(format!("no row for a check: {what}"))),
        },
        Expect::Returns => match outcome.first {
            Some(value) => {
                returned.push(value);
                Ok(())
            }
            None => Err(StoreError::Internal("a statement returned no row".into())),
        },
    }
}
