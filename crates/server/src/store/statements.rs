//! A write as a list of statements, each with what it must find.
//!
//! Why: a claim is four or five statements plus its savepoint, and at
//! thousands of claims a second how they reach the database was the
//! writer's cost. As a list, a write's checks are made on what each
//! statement reports (changed rows, returned rows), so on SQLite, where
//! the writer calls SQLite itself (`store::native`), writes of the same
//! shape queued one behind another run together, up to eight, in one
//! savepoint (`writer::transaction::run_together`): a savepoint per write
//! made SQLite copy every page each write touched into the savepoint's
//! journal again. On PostgreSQL, and for long writes, the statements run
//! one by one in their own savepoint with the same checks.
//!
//! Sequential meaning is kept: when writes run together, a failed check
//! or error reports the first statement that failed, as running them one
//! by one would have; the writer rolls back the savepoint that holds it,
//! which undoes the other writes of the run (which it runs again).

use futures::TryStreamExt as _;
use sqlx::Either;
use sqlx::any::AnyArguments;
use sqlx::query::Query;

use super::native::NativeSqlite;
use super::sql;
use super::{StoreError, WriteTx};

/// Writes with more statements than this run on their own, in their own
/// savepoint: the rare long write (a fill's batch, say) is not worth
/// holding others' savepoint for.
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

    /// How many statements.
    pub(super) fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether `other` has the same statement texts, so that a run of
    /// such writes makes one text, prepared once and reused.
    pub(super) fn same_shape(&self, other: &Statements) -> bool {
        self.list.len() == other.list.len()
            && self
                .list
                .iter()
                .zip(&other.list)
                .all(|(a, b)| a.sql == b.sql)
    }

    /// Runs the statements one at a time inside the operation's savepoint
    /// (entering it first if the writer left that to this write), checks
    /// each, and returns the values of the [`Expect::Returns`] statements
    /// in order. Short writes on SQLite go together instead
    /// ([`run_writes_together`]).
    pub(super) async fn run(self, tx: &mut WriteTx) -> Result<Vec<i64>, StoreError> {
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
}

/// What became of one write of a run sent together
/// ([`run_writes_together`]).
#[derive(Debug)]
pub(super) enum Verdict {
    /// Its statements ran (or one failed): the ids its
    /// [`Expect::Returns`] statements gave, or why it fails.
    Done(Result<Vec<i64>, StoreError>),
    /// Entering the savepoint the writes share failed (the first write's
    /// verdict): the transaction's savepoints are in an unknown state.
    EnterFailed(StoreError),
    /// Execution stopped before it.
    NotRun,
}

/// SQLite: runs several writes one after another, led by `enter` (the
/// statements that enter the savepoint, or begin the transaction, they
/// share), and gives each write's verdict in order. Execution stops at
/// the first statement that fails; the writes after it are
/// [`Verdict::NotRun`]. A failed check does not stop execution (it is
/// found afterwards): the caller rolls back the savepoint (or
/// transaction), which undoes the other writes of the text too, and runs
/// again those that must.
pub(super) fn run_writes_together(
    native: &mut NativeSqlite,
    enter: &'static str,
    writes: &[&Statements],
) -> Vec<Verdict> {
    // Each statement prepared once and kept, run with its own parameters;
    // `enter` is one of the writer's fixed texts, split where it joins
    // statements.
    let statements = enter
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| (s, &[][..]))
        .chain(
            writes
                .iter()
                .flat_map(|s| &s.list)
                .map(|s| (s.sql, s.params.as_slice())),
        );
    // One outcome per statement that finished, savepoints' included.
    let mut outcomes = Vec::new();
    let mut failure: Option<StoreError> = None;
    let mut current = Outcome::default();
    for item in native.run_each(statements) {
        match item {
            Ok(item) => {
                let finished = matches!(item, Either::Left(_));
                if let Err(e) = record(&mut current, item) {
                    failure = Some(e);
                    break;
                }
                if finished {
                    outcomes.push(std::mem::take(&mut current));
                }
            }
            Err(e) => {
                failure = Some(e.into());
                break;
            }
        }
    }
    let mut verdicts = Vec::with_capacity(writes.len());
    let mut finished = outcomes.into_iter();
    let mut failure = failure.map(Some);
    let leading = enter.matches(';').count() + 1;
    if finished.len() < leading {
        verdicts.push(Verdict::EnterFailed(failure.flatten().unwrap_or_else(
            || StoreError::Internal("entering the writes' savepoint gave no result".into()),
        )));
        verdicts.resize_with(writes.len(), || Verdict::NotRun);
        return verdicts;
    }
    finished.nth(leading - 1);
    for list in writes.iter().map(|s| &s.list) {
        // A failure has been given to the write it stopped in.
        if failure.as_ref().is_some_and(Option::is_none) {
            verdicts.push(Verdict::NotRun);
            continue;
        }
        let mut returned = Vec::new();
        let mut result = Ok(());
        for expect in list.iter().map(|s| &s.expect) {
            let Some(outcome) = finished.next() else {
                // Stopped inside this write: its checks so far come first,
                // as they would one statement at a time.
                result = result.and(Err(failure.as_mut().and_then(Option::take).unwrap_or_else(
                    || StoreError::Internal("a statement gave no result".into()),
                )));
                break;
            };
            if result.is_ok() {
                result = check(expect, outcome, &mut returned);
            }
        }
        verdicts.push(Verdict::Done(result.map(|()| returned)));
    }
    verdicts
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
