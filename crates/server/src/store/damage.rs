//! Damage made on purpose, for tests of the checks that must find it:
//! not used by the server.

use std::path::Path;

/// Empties the index `name` of the SQLite file at `path` while keeping
/// every page well formed and its schema text as it was: an index that
/// disagrees with its table. Of a partial index, only `PRAGMA
/// integrity_check` (index against table) finds that; `quick_check` finds
/// a whole index with too few entries. The file is checkpointed, so the
/// damage is in it and not only in its WAL.
pub async fn empty_index(path: &Path, name: &str) {
    let mut conn = super::open_raw(path).await.expect("opening the database");
    let (sql,): (String,) = sqlx::query_as("SELECT sql FROM sqlite_schema WHERE name = ?")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("the index's schema");
    // A partial index keeps its columns; `WHERE 0` leaves it empty.
    let (columns, _) = sql.split_once(" WHERE ").unwrap_or((&sql, ""));
    for statement in [
        format!("DROP INDEX \"{name}\""),
        format!("{columns} WHERE 0"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .expect("remaking the index empty");
    }
    for (statement, bind) in [
        ("PRAGMA writable_schema = ON", None),
        (
            "UPDATE sqlite_schema SET sql = ? WHERE name = ?",
            Some((sql.as_str(), name)),
        ),
        ("PRAGMA wal_checkpoint(TRUNCATE)", None),
    ] {
        let query = sqlx::query(statement);
        let query = match bind {
            Some((sql, name)) => query.bind(sql).bind(name),
            None => query,
        };
        query
            .execute(&mut conn)
            .await
            .expect("restoring the schema text");
    }
    sqlx::Connection::close(conn).await.expect("closing");
}

/// Overwrites the first page of `table`'s b-tree in the SQLite file at
/// `path` with garbage: damage where SQLite's own reading finds it (the
/// page is not a b-tree page any more). The file must be checkpointed
/// (no WAL holding a newer copy of that page).
pub async fn overwrite_root_page(path: &Path, table: &str) {
    use std::io::{Seek as _, SeekFrom, Write as _};
    let mut conn = super::open_raw(path).await.expect("opening the database");
    let (root, page_size): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT rootpage FROM sqlite_schema WHERE type = 'table' AND name = ?), \
                (SELECT page_size FROM pragma_page_size)",
    )
    .bind(table)
    .fetch_one(&mut conn)
    .await
    .expect("the table's first page");
    sqlx::Connection::close(conn).await.expect("closing");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening the file");
    file.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
        .expect("seeking");
    file.write_all(&vec![0x5A; page_size as usize])
        .expect("writing");
    file.sync_all().expect("syncing");
}
