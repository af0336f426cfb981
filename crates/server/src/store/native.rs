//! The SQLite write connection, run on the writer's own thread.
//!
//! Why: sqlx runs each SQLite connection on a worker thread of its own,
//! and every statement's results come back through a channel: a thread
//! hand-off each way, and a wake-up of the writer for every result. At
//! 1,000 claims/s with one claim a batch, a claim's run (five statements)
//! took 129 µs p50 in the writer and its COMMIT 299 µs, most of both
//! spent in those hand-offs rather than in SQLite (measured by timing
//! each batch, 2026-12-04). The writer is the only user of its
//! connection and already has a thread of its own, so here it calls
//! SQLite itself (through rusqlite, on the same SQLite library sqlx
//! links) and the hand-offs are gone.
//!
//! Every write operation is written against sqlx's `Any` driver, and
//! stays so: [`NativeSqlite::run`] takes sqlx's query text and arguments
//! and gives back what sqlx's SQLite driver gives through `Any` (one
//! result per statement, one row per row, the same value kinds, the same
//! error codes), so an operation cannot tell the two apart and
//! PostgreSQL keeps sqlx. It builds sqlx's row and result types from
//! their documented-hidden fields, which sqlx leaves to drivers; sqlx-core
//! is pinned to the exact version this was written against.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use rusqlite::fallible_iterator::FallibleIterator as _;
use rusqlite::types::ValueRef;
use sqlx::Either;
use sqlx_core::any::{
    AnyArguments, AnyColumn, AnyQueryResult, AnyRow, AnyTypeInfo, AnyTypeInfoKind, AnyValue,
    AnyValueKind,
};
use sqlx_core::ext::ustr::UStr;

use super::statements::Param;

/// What one statement or row gave, as sqlx's `Any` driver gives it.
pub(super) type Item = Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>;

/// As many prepared statements as sqlx keeps for a connection.
const STATEMENT_CACHE: usize = 100;

/// The writer's SQLite connection.
pub struct NativeSqlite {
    conn: rusqlite::Connection,
}

impl std::fmt::Debug for NativeSqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeSqlite").finish_non_exhaustive()
    }
}

impl NativeSqlite {
    /// Opens (creating if missing) the database at `path` for reading and
    /// writing, as sqlx opens it: one thread at a time (no mutex of
    /// SQLite's own), extended result codes, a 5 s busy timeout and
    /// foreign keys on. The caller's session settings follow.
    pub(super) fn open(path: &Path) -> Result<Self, sqlx::Error> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(error)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(error)?;
        let mut native = Self { conn };
        native.run("PRAGMA foreign_keys = ON", None, false, None);
        Ok(native)
    }

    /// Runs `sql` (one statement or several) with `arguments` bound to
    /// its placeholders in order, and gives each statement's rows and then
    /// its result, stopping at the first failure (given last) or, with
    /// `limit`, after that many rows. `persistent` keeps the statement
    /// prepared for the next time (a text of one statement only).
    pub(super) fn run(
        &mut self,
        sql: &str,
        arguments: Option<AnyArguments>,
        persistent: bool,
        limit: Option<usize>,
    ) -> Vec<Item> {
        let values = arguments.map(|a| a.values.0).unwrap_or_default();
        let mut out = Vec::new();
        let mut run = Run {
            conn: &self.conn,
            values: Values::Any(&values),
            next: 0,
            rows: 0,
            limit,
            out: &mut out,
        };
        if sql.trim().is_empty() {
            // sqlx runs nothing for it either.
        } else if !sql.contains(';') {
            let prepared = if persistent {
                self.conn.prepare_cached(sql).map(Prepared::Cached)
            } else {
                self.conn.prepare(sql).map(Prepared::Once)
            };
            match prepared {
                Ok(mut statement) => {
                    run.statement(&mut statement);
                }
                Err(e) => run.out.push(Err(error(e))),
            }
        } else {
            // Several statements (or one in a text that holds a `;`):
            // SQLite finds where each ends.
            let mut batch = rusqlite::Batch::new(&self.conn, sql);
            loop {
                match batch.next() {
                    Ok(Some(mut statement)) => {
                        if !run.statement(&mut statement) {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        run.out.push(Err(error(e)));
                        break;
                    }
                }
            }
        }
        out
    }

    /// Runs statements one after another, each prepared once and kept,
    /// with its own parameters; as [`NativeSqlite::run`] of their text
    /// joined with `;` would, without finding where each ends again.
    pub(super) fn run_each<'a>(
        &mut self,
        statements: impl IntoIterator<Item = (&'a str, &'a [Param])>,
    ) -> Vec<Item> {
        let mut out = Vec::new();
        for (sql, params) in statements {
            let mut run = Run {
                conn: &self.conn,
                values: Values::Params(params),
                next: 0,
                rows: 0,
                limit: None,
                out: &mut out,
            };
            let carry_on = match self.conn.prepare_cached(sql) {
                Ok(statement) => run.statement(&mut Prepared::Cached(statement)),
                Err(e) => {
                    run.out.push(Err(error(e)));
                    false
                }
            };
            if !carry_on {
                break;
            }
        }
        out
    }
}

enum Prepared<'c> {
    Cached(rusqlite::CachedStatement<'c>),
    Once(rusqlite::Statement<'c>),
}

impl<'c> std::ops::Deref for Prepared<'c> {
    type Target = rusqlite::Statement<'c>;
    fn deref(&self) -> &Self::Target {
        match self {
            Prepared::Cached(s) => s,
            Prepared::Once(s) => s,
        }
    }
}

impl std::ops::DerefMut for Prepared<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Prepared::Cached(s) => s,
            Prepared::Once(s) => s,
        }
    }
}

/// What is bound to a call's placeholders, in order.
#[derive(Clone, Copy)]
enum Values<'v> {
    /// sqlx's arguments.
    Any(&'v [AnyValueKind]),
    /// A [`Statements`](super::statements::Statements) list's.
    Params(&'v [Param]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::Any(v) => v.len(),
            Values::Params(v) => v.len(),
        }
    }

    /// Binds the value at `position` to placeholder `index`.
    fn bind(
        &self,
        statement: &mut rusqlite::Statement<'_>,
        index: usize,
        position: usize,
    ) -> rusqlite::Result<()> {
        match self {
            Values::Any(v) => bind_any(statement, index, &v[position]),
            Values::Params(v) => bind_param(statement, index, &v[position]),
        }
    }
}

/// One call's progress through its statements.
struct Run<'r> {
    conn: &'r rusqlite::Connection,
    values: Values<'r>,
    /// The next argument to bind.
    next: usize,
    rows: usize,
    limit: Option<usize>,
    out: &'r mut Vec<Item>,
}

impl Run<'_> {
    /// Binds and steps one statement; false once the call must stop (it
    /// failed, or the row limit was reached).
    fn statement(&mut self, statement: &mut rusqlite::Statement<'_>) -> bool {
        // As sqlx binds: `?NNN` and `$NNN` name an argument by its number
        // in the whole call's list, a plain `?` takes the next one, and a
        // placeholder past the last argument stays unbound (NULL).
        for index in 1..=statement.parameter_count() {
            let number = match statement.parameter_name(index) {
                None => {
                    self.next += 1;
                    self.next
                }
                Some(name) => {
                    let number = name
                        .strip_prefix('?')
                        .or_else(|| name.strip_prefix('$'))
                        .and_then(|n| n.parse::<usize>().ok());
                    match number {
                        Some(number) => number,
                        None => {
                            self.out.push(Err(sqlx::Error::AnyDriverError(
                                format!("unsupported SQL parameter: {name}").into(),
                            )));
                            return false;
                        }
                    }
                }
            };
            if number == 0 || number > self.values.len() {
                break;
            }
            if let Err(e) = self.values.bind(statement, index, number - 1) {
                self.out.push(Err(error(e)));
                return false;
            }
        }
        let columns: Option<Arc<sqlx_core::HashMap<UStr, usize>>> = (statement.column_count() > 0)
            .then(|| {
                Arc::new(
                    statement
                        .column_names()
                        .into_iter()
                        .enumerate()
                        .map(|(i, name)| (UStr::new(name), i))
                        .collect(),
                )
            });
        let mut rows = statement.raw_query();
        loop {
            if self.limit.is_some_and(|limit| self.rows >= limit) {
                return false;
            }
            match rows.next() {
                Ok(Some(row)) => {
                    self.rows += 1;
                    let names = columns.clone().unwrap_or_default();
                    match any_row(row, names) {
                        Ok(row) => self.out.push(Ok(Either::Right(row))),
                        Err(e) => {
                            self.out.push(Err(e));
                            return false;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.out.push(Err(error(e)));
                    return false;
                }
            }
        }
        // As sqlx reports it: the changes of the last INSERT, UPDATE or
        // DELETE, whichever statement this was.
        self.out.push(Ok(Either::Left(AnyQueryResult {
            rows_affected: self.conn.changes(),
            last_insert_id: None,
        })));
        true
    }
}

fn bind_param(
    statement: &mut rusqlite::Statement<'_>,
    index: usize,
    param: &Param,
) -> rusqlite::Result<()> {
    match param {
        Param::Text(v) => statement.raw_bind_parameter(index, v.as_deref()),
        Param::Int(v) => statement.raw_bind_parameter(index, *v),
        Param::Real(v) => statement.raw_bind_parameter(index, *v),
        Param::Bool(v) => statement.raw_bind_parameter(index, i64::from(*v)),
        Param::Blob(v) => statement.raw_bind_parameter(index, v.as_slice()),
    }
}

fn bind_any(
    statement: &mut rusqlite::Statement<'_>,
    index: usize,
    value: &AnyValueKind,
) -> rusqlite::Result<()> {
    use rusqlite::types::Null;
    match value {
        AnyValueKind::Null(_) => statement.raw_bind_parameter(index, Null),
        AnyValueKind::Bool(b) => statement.raw_bind_parameter(index, i64::from(*b)),
        AnyValueKind::SmallInt(i) => statement.raw_bind_parameter(index, i64::from(*i)),
        AnyValueKind::Integer(i) => statement.raw_bind_parameter(index, i64::from(*i)),
        AnyValueKind::BigInt(i) => statement.raw_bind_parameter(index, *i),
        AnyValueKind::Real(r) => statement.raw_bind_parameter(index, f64::from(*r)),
        AnyValueKind::Double(d) => statement.raw_bind_parameter(index, *d),
        AnyValueKind::Text(t) => statement.raw_bind_parameter(index, t.as_str()),
        AnyValueKind::TextSlice(t) => statement.raw_bind_parameter(index, &**t),
        AnyValueKind::Blob(b) => statement.raw_bind_parameter(index, b.as_slice()),
        other => Err(rusqlite::Error::ToSqlConversionFailure(
            format!("no SQLite value for {other:?}").into(),
        )),
    }
}

/// A row as sqlx's SQLite driver maps it into `Any`: by each value's own
/// type (SQLite's columns do not bind it), integers as 64 bits, reals as
/// doubles.
fn any_row(
    row: &rusqlite::Row<'_>,
    column_names: Arc<sqlx_core::HashMap<UStr, usize>>,
) -> Result<AnyRow, sqlx::Error> {
    let count = row.as_ref().column_count();
    let mut columns = Vec::with_capacity(count);
    let mut values = Vec::with_capacity(count);
    for ordinal in 0..count {
        let value = row.get_ref(ordinal).map_err(error)?;
        let kind = match value {
            ValueRef::Null => AnyValueKind::Null(AnyTypeInfoKind::Null),
            ValueRef::Integer(i) => AnyValueKind::BigInt(i),
            ValueRef::Real(r) => AnyValueKind::Double(r),
            ValueRef::Text(t) => AnyValueKind::Text(Arc::new(
                String::from_utf8(t.to_vec()).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            )),
            ValueRef::Blob(b) => AnyValueKind::Blob(Arc::new(b.to_vec())),
        };
        let type_kind = match &kind {
            AnyValueKind::BigInt(_) => AnyTypeInfoKind::BigInt,
            AnyValueKind::Double(_) => AnyTypeInfoKind::Double,
            AnyValueKind::Text(_) => AnyTypeInfoKind::Text,
            AnyValueKind::Blob(_) => AnyTypeInfoKind::Blob,
            _ => AnyTypeInfoKind::Null,
        };
        let name = row
            .as_ref()
            .column_name(ordinal)
            .map(UStr::new)
            .unwrap_or_else(|_| UStr::new(""));
        columns.push(AnyColumn {
            ordinal,
            name,
            type_info: AnyTypeInfo { kind: type_kind },
        });
        values.push(AnyValue { kind });
    }
    Ok(AnyRow {
        column_names,
        columns,
        values,
    })
}

/// A SQLite error as sqlx's driver reports it: a database error whose
/// code is the extended result code, so what classifies sqlx's errors
/// (busy, a full disk, a broken connection, a unique violation)
/// classifies these the same way. Anything else rusqlite refuses (a
/// value it cannot bind or read) is the driver's.
pub(super) fn error(e: rusqlite::Error) -> sqlx::Error {
    match e {
        rusqlite::Error::SqliteFailure(failure, message) => {
            sqlx::Error::Database(Box::new(SqliteFailure {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }))
        }
        other => sqlx::Error::AnyDriverError(Box::new(other)),
    }
}

/// An error SQLite returned.
#[derive(Debug)]
struct SqliteFailure {
    /// The extended result code.
    code: i32,
    message: String,
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteFailure {}

impl sqlx::error::DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use rusqlite::ffi;
        use sqlx::error::ErrorKind;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests;
