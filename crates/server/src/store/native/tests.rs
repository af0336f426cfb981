//! The writer's SQLite connection against sqlx's SQLite driver: the same
//! texts and arguments on two databases must give the same statements'
//! results, rows, values and errors through `Any`, since every write
//! operation is written against sqlx and cannot tell them apart.

use futures::TryStreamExt as _;
use sqlx::any::AnyArguments;
use sqlx::{Arguments as _, Connection as _};

use super::*;

/// One item as a comparable line: a statement's result, a row's values
/// (a NULL's kind aside: sqlx takes it from the column's declared type,
/// and decoding ignores it), or an error's code, kind and message.
fn line(item: &Item) -> String {
    match item {
        Ok(Either::Left(done)) => format!("done {}", done.rows_affected),
        Ok(Either::Right(row)) => {
            let values: Vec<String> = row
                .values
                .iter()
                .map(|v| match &v.kind {
                    AnyValueKind::Null(_) => "Null".to_owned(),
                    other => format!("{other:?}"),
                })
                .collect();
            let names: Vec<String> = row.columns.iter().map(|c| c.name.to_string()).collect();
            format!("row {names:?} {values:?}")
        }
        Err(sqlx::Error::Database(db)) => {
            format!("error {:?} {:?} {}", db.code(), db.kind(), db.message())
        }
        Err(other) => format!("other error {other}"),
    }
}

fn arguments(values: &[Value]) -> AnyArguments {
    let mut args = AnyArguments::default();
    for value in values {
        match value {
            Value::Null => args.add(Option::<i64>::None),
            Value::Int(i) => args.add(*i),
            Value::Real(r) => args.add(*r),
            Value::Text(t) => args.add(t.to_string()),
            Value::Blob(b) => args.add(b.to_vec()),
            Value::Bool(b) => args.add(*b),
        }
        .expect("a value binds");
    }
    args
}

#[derive(Clone, Copy)]
enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(&'static str),
    Blob(&'static [u8]),
    Bool(bool),
}

/// Texts that cover what the writer runs (columns declared as SQLite
/// types only: sqlx's `Any` refuses to read a column declared BOOLEAN or
/// DATETIME at all, where this connection reads its values): schema, several statements in
/// one text with their arguments in order, RETURNING, every value kind,
/// the changes a statement reports (a SELECT reports the last write's),
/// constraint failures first, in the middle and at the end of a text,
/// savepoints and their undoing.
fn script() -> Vec<(&'static str, Vec<Value>)> {
    use Value::*;
    vec![
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, \
             score REAL, data BLOB, flag INTEGER, parent INTEGER REFERENCES t(id))",
            vec![],
        ),
        ("PRAGMA foreign_keys", vec![]),
        ("BEGIN IMMEDIATE; SAVEPOINT op", vec![]),
        (
            "INSERT INTO t (name, score, data, flag) VALUES (?, ?, ?, ?) RETURNING id",
            vec![Text("a"), Real(1.5), Blob(b"\x00\x01"), Bool(true)],
        ),
        (
            "INSERT INTO t (name, score, data, flag) VALUES (?, ?, ?, ?);\n\
             UPDATE t SET score = ? WHERE name = ?;\n\
             SELECT id, name, score, data, flag, parent FROM t ORDER BY id",
            vec![Text("b"), Null, Null, Bool(false), Int(7), Text("a")],
        ),
        (
            "SELECT 1 AS one, 'x' AS text, 2.5 AS real, NULL AS nothing",
            vec![],
        ),
        ("UPDATE t SET score = score WHERE id > ?", vec![Int(0)]),
        ("SELECT count(*) FROM t", vec![]),
        ("RELEASE op; SAVEPOINT op", vec![]),
        (
            "INSERT INTO t (name) VALUES (?);\nINSERT INTO t (name) VALUES (?);\nINSERT INTO t (name) VALUES (?)",
            vec![Text("c"), Text("a"), Text("d")],
        ),
        ("ROLLBACK TO op; RELEASE op", vec![]),
        ("SELECT name FROM t ORDER BY id", vec![]),
        ("INSERT INTO t (name) VALUES (NULL)", vec![]),
        (
            "INSERT INTO t (name, parent) VALUES (?, ?)",
            vec![Text("e"), Int(99)],
        ),
        (
            "UPDATE t SET name = ? WHERE name = ? RETURNING id, name",
            vec![Text("z"), Text("nobody")],
        ),
        ("COMMIT", vec![]),
        ("SELECT name, flag FROM t ORDER BY id", vec![]),
        ("SELECT * FROM missing", vec![]),
        // Numbered placeholders name arguments of the whole text, plain
        // ones take the next; too few arguments leave the rest NULL.
        ("SELECT $2, $1, $2 AS again", vec![Int(1), Int(2)]),
        ("SELECT $1; SELECT $2 + $1", vec![Int(3), Int(4)]),
        ("SELECT ?; SELECT ?, ?", vec![Text("x"), Text("y")]),
        ("SELECT ?1, ?3", vec![Int(5), Int(6), Int(7)]),
    ]
}

#[tokio::test]
async fn gives_what_sqlx_gives_through_any() {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap();
    let mut native = NativeSqlite::open(&dir.path().join("native.db")).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("sqlx.db").display());
    let mut sqlx_conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    for (sql, values) in script() {
        let ours: Vec<String> = native
            .run(sql, Some(arguments(&values)), true, None)
            .iter()
            .map(line)
            .collect();
        let mut theirs = Vec::new();
        let mut stream = sqlx::Executor::fetch_many(
            &mut sqlx_conn,
            sqlx::query_with(sqlx::AssertSqlSafe(sql), arguments(&values)),
        );
        loop {
            match stream.try_next().await {
                Ok(Some(item)) => theirs.push(line(&Ok(item))),
                Ok(None) => break,
                Err(e) => {
                    theirs.push(line(&Err(e)));
                    break;
                }
            }
        }
        drop(stream);
        assert_eq!(ours, theirs, "for {sql:?}");
        assert!(!ours.is_empty(), "every text gives something: {sql:?}");
    }
}

#[test]
fn a_limit_stops_after_that_many_rows_and_the_rest_runs_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut native = NativeSqlite::open(&dir.path().join("db")).unwrap();
    native.run("CREATE TABLE t (n INTEGER)", None, false, None);
    native.run("INSERT INTO t VALUES (1), (2), (3)", None, false, None);
    let items = native.run("SELECT n FROM t; DELETE FROM t", None, false, Some(1));
    assert_eq!(items.len(), 1, "one row, nothing after it");
    let left = native.run("SELECT count(*) FROM t", None, true, None);
    assert_eq!(line(&left[0]), "row [\"count(*)\"] [\"BigInt(3)\"]");
}

#[test]
fn run_each_binds_each_statements_own_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let mut native = NativeSqlite::open(&dir.path().join("db")).unwrap();
    native.run("CREATE TABLE t (n INTEGER, s TEXT)", None, false, None);
    let first = [Param::Int(Some(1)), Param::Text(Some("one".into()))];
    let second = [Param::Int(None), Param::Bool(true)];
    let items = native.run_each([
        ("INSERT INTO t VALUES (?, ?)", &first[..]),
        ("INSERT INTO t VALUES (?, ?)", &second[..]),
        ("SELECT n, s FROM t ORDER BY rowid", &[][..]),
    ]);
    let lines: Vec<String> = items.iter().map(line).collect();
    assert_eq!(
        lines,
        [
            "done 1",
            "done 1",
            "row [\"n\", \"s\"] [\"BigInt(1)\", \"Text(\\\"one\\\")\"]",
            // TEXT affinity: SQLite stores the bound 1 as '1'.
            "row [\"n\", \"s\"] [\"Null\", \"Text(\\\"1\\\")\"]",
            "done 1",
        ]
    );
}

#[test]
fn an_empty_text_runs_nothing_as_sqlx_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut native = NativeSqlite::open(&dir.path().join("db")).unwrap();
    assert!(native.run("", None, true, None).is_empty());
    assert!(native.run("  \n ", None, false, None).is_empty());
    let lines: Vec<String> = native
        .run("SELECT 1 AS one;;", None, false, None)
        .iter()
        .map(line)
        .collect();
    assert_eq!(lines, ["row [\"one\"] [\"BigInt(1)\"]", "done 0"]);
}
