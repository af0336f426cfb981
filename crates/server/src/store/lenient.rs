//! Reading rows one at a time, so that a row that cannot be read is
//! skipped and named instead of failing everything read with it.
//!
//! `PRAGMA integrity_check` at startup vouches for the file's structure,
//! not for what the rows say: a value written by a newer version, edited
//! by hand or flipped on disk inside a text column reads back as a row
//! that does not convert into its domain type. One such row used to stop
//! the server (the pool index, boosts or syncs could not be restored);
//! now the loaders keep every row they can read, and startup reports the
//! others (a log line and a `database.row_skipped` event each, naming
//! table, key and reason). The rows stay in the database untouched, for
//! whoever repairs them.

use sqlx::{ColumnIndex, Decode, FromRow, Row, Type};

use boilerhouse_core::Timestamp;
use boilerhouse_core::event::{EventKind, NewEvent};

use super::{Store, StoreError};

/// A row that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Its table.
    pub table: &'static str,
    /// Its key, as far as it could be read (`?` when not even that).
    pub key: String,
    /// Why it does not read.
    pub reason: String,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} row {}: {}", self.table, self.key, self.reason)
    }
}

/// Rows read so far and those that could not be.
pub type Lenient<T> = (Vec<T>, Vec<Unreadable>);

/// The text of column `name`, or `?`. Generic over the row type, like
/// [`decode`], so that it serves any sqlx driver.
pub(super) fn text<DbRow>(row: &DbRow, name: &str) -> String
where
    DbRow: Row,
    for<'n> &'n str: ColumnIndex<DbRow>,
    for<'r> String: Decode<'r, DbRow::Database> + Type<DbRow::Database>,
{
    row.try_get::<String, _>(name)
        .unwrap_or_else(|_| "?".to_owned())
}

/// Decodes each of `rows` into `R`, then converts it into `T`; what fails
/// either step is set aside with its key (`key` of the raw row).
pub(super) fn decode<DbRow, R, T>(
    rows: Vec<DbRow>,
    table: &'static str,
    key: impl Fn(&DbRow) -> String,
) -> Lenient<T>
where
    DbRow: Row,
    R: for<'r> FromRow<'r, DbRow>,
    T: TryFrom<R, Error = StoreError>,
{
    split(
        rows.iter()
            .map(|row| decode_one::<DbRow, R, T>(row, table, &key)),
    )
}

/// Splits rows into those read and those that could not be.
pub(super) fn split<T>(rows: impl Iterator<Item = Result<T, Unreadable>>) -> Lenient<T> {
    let mut read = Vec::with_capacity(rows.size_hint().0);
    let mut unreadable = Vec::new();
    for row in rows {
        match row {
            Ok(value) => read.push(value),
            Err(skipped) => unreadable.push(skipped),
        }
    }
    (read, unreadable)
}

/// Decodes one row as [`decode`] does.
pub(super) fn decode_one<DbRow, R, T>(
    row: &DbRow,
    table: &'static str,
    key: impl Fn(&DbRow) -> String,
) -> Result<T, Unreadable>
where
    DbRow: Row,
    R: for<'r> FromRow<'r, DbRow>,
    T: TryFrom<R, Error = StoreError>,
{
    R::from_row(row)
        .map_err(StoreError::from)
        .and_then(T::try_from)
        .map_err(|e| {
            let skipped = Unreadable {
                table,
                key: key(row),
                reason: e.to_string(),
            };
            // Debug only: startup reports each one once, and some of
            // these reads run every second.
            tracing::debug!(row = %skipped, "skipped a row that cannot be read");
            skipped
        })
}

/// Splits converted rows, each with its key, into those read and those
/// that could not be.
pub(super) fn partition<T>(
    table: &'static str,
    rows: impl IntoIterator<Item = (String, Result<T, StoreError>)>,
) -> Lenient<T> {
    let mut read = Vec::new();
    let mut unreadable = Vec::new();
    for (key, row) in rows {
        match row {
            Ok(value) => read.push(value),
            Err(e) => unreadable.push(Unreadable {
                table,
                key,
                reason: e.to_string(),
            }),
        }
    }
    (read, unreadable)
}

impl Store {
    /// Reports rows the loaders skipped: an error log line and a
    /// `database.row_skipped` event each.
    pub async fn report_unreadable(
        &self,
        rows: &[Unreadable],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        for row in rows {
            tracing::error!(
                table = row.table,
                key = %row.key,
                reason = %row.reason,
                "a row of the database cannot be read; it is skipped and left in place"
            );
            let event = NewEvent::new(
                now,
                EventKind::DatabaseRowSkipped,
                format!(
                    "{} row {} cannot be read and was skipped (left in the database, untouched): {}",
                    row.table, row.key, row.reason
                ),
            )
            .with_attribute("table", row.table)
            .with_attribute("key", row.key.clone());
            self.append_event(event).await?;
        }
        Ok(())
    }
}
