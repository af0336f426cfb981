//! One SQL text for both backends.
//!
//! The store runs on sqlx's `Any` driver, so every statement is written
//! once, in the SQL that SQLite and PostgreSQL share. What differs is
//! kept here and in the writer's transaction handling:
//!
//! - placeholders: statements are written with `?`; [`numbered`] turns
//!   them into `$1, $2, …`, which PostgreSQL requires and SQLite (through
//!   sqlx) accepts, so one text serves both;
//! - booleans: SQLite has none (a flag is an INTEGER 0/1), PostgreSQL's
//!   columns are BOOLEAN; [`Flag`] reads either.

use std::fmt;
use std::path::{Path, PathBuf};

use sqlx::any::{Any, AnyArguments, AnyTypeInfo, AnyTypeInfoKind, AnyValueRef};
use sqlx::error::BoxDynError;
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{AssertSqlSafe, Decode, Type};

/// Which database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One file on the server's disk.
    Sqlite,
    /// A PostgreSQL server, shared by the server's replicas.
    Postgres,
}

impl Backend {
    /// The name operators know it by.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Where the database is: a SQLite file or a PostgreSQL URL, chosen by
/// what `--database` was given.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    /// A SQLite file (a plain path, or `sqlite://<path>`).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl DatabaseLocation {
    /// Reads a `--database` value. A value naming neither scheme is a path.
    pub fn parse(value: &str) -> Result<Self, String> {
        let lower = value.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            let url: url::Url = value
                .parse()
                .map_err(|e| format!("database URL {}: {e}", redact(value)))?;
            if url.host_str().is_none_or(str::is_empty)
                && !url.query().is_some_and(|q| q.contains("host="))
            {
                return Err(format!("database URL {}: no host", redact(value)));
            }
            return Ok(DatabaseLocation::Postgres(value.to_owned()));
        }
        if let Some(path) = value.strip_prefix("sqlite://") {
            return Ok(DatabaseLocation::Sqlite(PathBuf::from(path)));
        }
        if lower.contains("://") {
            return Err(format!(
                "database {value:?}: unknown scheme (use a file path, sqlite://<path> or postgres://…)"
            ));
        }
        if value.is_empty() {
            return Err("database: empty".into());
        }
        Ok(DatabaseLocation::Sqlite(PathBuf::from(value)))
    }

    /// The backend this location selects.
    pub fn backend(&self) -> Backend {
        match self {
            DatabaseLocation::Sqlite(_) => Backend::Sqlite,
            DatabaseLocation::Postgres(_) => Backend::Postgres,
        }
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            DatabaseLocation::Sqlite(path) => Some(path),
            DatabaseLocation::Postgres(_) => None,
        }
    }
}

impl From<PathBuf> for DatabaseLocation {
    fn from(path: PathBuf) -> Self {
        DatabaseLocation::Sqlite(path)
    }
}

impl From<&PathBuf> for DatabaseLocation {
    fn from(path: &PathBuf) -> Self {
        DatabaseLocation::Sqlite(path.clone())
    }
}

impl From<&Path> for DatabaseLocation {
    fn from(path: &Path) -> Self {
        DatabaseLocation::Sqlite(path.to_owned())
    }
}

/// Shown in logs and errors: a URL's password never is.
impl fmt::Display for DatabaseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseLocation::Sqlite(path) => write!(f, "{}", path.display()),
            DatabaseLocation::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for DatabaseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseLocation({self})")
    }
}

/// The URL with its password replaced.
fn redact(url: &str) -> String {
    match url.parse::<url::Url>() {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "(unparseable URL)".into(),
    }
}

/// `?` placeholders numbered `$1, $2, …` in order; a `?` inside a quoted
/// string or identifier is left alone.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' => {
                out.push('$');
                // `?NNN` names its parameter already: keep the number.
                if !chars.peek().is_some_and(char::is_ascii_digit) {
                    n += 1;
                    out.push_str(&n.to_string());
                }
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

/// `sqlx::query` for a statement written with `?` placeholders.
pub fn query<'q>(sql: &str) -> Query<'q, Any, AnyArguments> {
    sqlx::query(AssertSqlSafe(numbered(sql)))
}

/// `sqlx::query_as` for a statement written with `?` placeholders.
pub fn query_as<'q, O>(sql: &str) -> QueryAs<'q, Any, O, AnyArguments>
where
    O: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
{
    sqlx::query_as(AssertSqlSafe(numbered(sql)))
}

/// `sqlx::query_scalar` for a statement written with `?` placeholders.
pub fn query_scalar<'q, O>(sql: &str) -> QueryScalar<'q, Any, O, AnyArguments>
where
    (O,): for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
{
    sqlx::query_scalar(AssertSqlSafe(numbered(sql)))
}

/// A stored flag: SQLite's INTEGER 0/1 or PostgreSQL's BOOLEAN. Written
/// by binding a `bool`, which each backend stores its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub bool);

impl Type<Any> for Flag {
    fn type_info() -> AnyTypeInfo {
        <bool as Type<Any>>::type_info()
    }

    fn compatible(ty: &AnyTypeInfo) -> bool {
        ty.kind() == AnyTypeInfoKind::Bool || ty.kind().is_integer()
    }
}

impl<'r> Decode<'r, Any> for Flag {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        match <bool as Decode<Any>>::decode(value.clone()) {
            Ok(b) => Ok(Flag(b)),
            Err(_) => <i64 as Decode<Any>>::decode(value).map(|i| Flag(i != 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            numbered("UPDATE t SET a = ? WHERE b = ? AND c IS ?"),
            "UPDATE t SET a = $1 WHERE b = $2 AND c IS $3"
        );
        assert_eq!(
            numbered("SELECT ?1 + ?2 WHERE x = ?1"),
            "SELECT $1 + $2 WHERE x = $1"
        );
    }

    #[test]
    fn question_marks_in_quotes_are_not_placeholders() {
        assert_eq!(
            numbered("SELECT '?', \"a?\" FROM t WHERE x = ? AND y = 'it''s ?'"),
            "SELECT '?', \"a?\" FROM t WHERE x = $1 AND y = 'it''s ?'"
        );
    }

    #[test]
    fn locations_are_chosen_by_scheme() {
        assert_eq!(
            DatabaseLocation::parse("./data/bh.db").unwrap(),
            DatabaseLocation::Sqlite("./data/bh.db".into())
        );
        assert_eq!(
            DatabaseLocation::parse("sqlite:///var/bh.db").unwrap(),
            DatabaseLocation::Sqlite("/var/bh.db".into())
        );
        let pg = DatabaseLocation::parse("postgres://bh:secret@db:5432/bh").unwrap();
        assert_eq!(pg.backend(), Backend::Postgres);
        assert!(!pg.to_string().contains("secret"), "{pg}");
        assert!(DatabaseLocation::parse("mysql://x/y").is_err());
        assert!(DatabaseLocation::parse("postgres://").is_err());
    }
}
