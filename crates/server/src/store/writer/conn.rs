//! The writer's connection: SQLite called on the writer's own thread
//! ([`NativeSqlite`]), or sqlx's connection to PostgreSQL. Write
//! operations run sqlx queries on either through one executor.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt as _, StreamExt as _};
use sqlx::any::{Any, AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo};
use sqlx::{AnyConnection, Connection as _, Either, Execute, SqlStr};

use super::super::native::{Item, NativeSqlite};

/// The writer's connection.
#[derive(Debug)]
pub enum WriteConn {
    /// SQLite, run on the writer's thread.
    Sqlite(NativeSqlite),
    /// PostgreSQL, through sqlx.
    Sqlx(AnyConnection),
}

impl WriteConn {
    /// Closes it: on SQLite, the last connection's close checkpoints the
    /// WAL and removes it.
    pub(in crate::store) async fn close(self) -> Result<(), sqlx::Error> {
        match self {
            WriteConn::Sqlite(native) => {
                drop(native);
                Ok(())
            }
            WriteConn::Sqlx(conn) => conn.close().await,
        }
    }

    /// The SQLite connection, when it is one.
    pub(in crate::store) fn native(&mut self) -> Option<&mut NativeSqlite> {
        match self {
            WriteConn::Sqlite(native) => Some(native),
            WriteConn::Sqlx(_) => None,
        }
    }
}

/// Runs `query` on SQLite now (the writer's thread is the connection's).
fn run_native<'q>(
    native: &mut NativeSqlite,
    mut query: impl Execute<'q, Any>,
    limit: Option<usize>,
) -> Vec<Item> {
    let arguments = match query.take_arguments() {
        Ok(arguments) => arguments,
        Err(e) => return vec![Err(sqlx::Error::Encode(e))],
    };
    let persistent = query.persistent() && arguments.is_some();
    let sql = query.sql();
    native.run(sql.as_str(), arguments, persistent, limit)
}

impl<'c> sqlx::Executor<'c> for &'c mut WriteConn {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match self {
            WriteConn::Sqlite(native) => {
                futures::stream::iter(run_native(native, query, None)).boxed()
            }
            WriteConn::Sqlx(conn) => conn.fetch_many(query),
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        match self {
            WriteConn::Sqlite(native) => {
                // As sqlx's: the first thing the text gives decides, a row
                // or (a statement that returned none) nothing.
                let first = run_native(native, query, Some(1)).into_iter().next();
                let row = match first {
                    Some(Ok(Either::Right(row))) => Ok(Some(row)),
                    Some(Ok(Either::Left(_))) | None => Ok(None),
                    Some(Err(e)) => Err(e),
                };
                futures::future::ready(row).boxed()
            }
            WriteConn::Sqlx(conn) => conn.fetch_optional(query),
        }
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<AnyStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        match self {
            WriteConn::Sqlite(_) => futures::future::ready(Err(sqlx::Error::AnyDriverError(
                "the SQLite writer prepares statements as it runs them".into(),
            )))
            .boxed(),
            WriteConn::Sqlx(conn) => conn.prepare_with(sql, parameters),
        }
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<sqlx::Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        match self {
            WriteConn::Sqlite(_) => futures::future::ready(Err(sqlx::Error::AnyDriverError(
                "the SQLite writer describes no statements".into(),
            )))
            .boxed(),
            WriteConn::Sqlx(conn) => conn.describe(sql),
        }
    }
}
