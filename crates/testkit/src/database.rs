//! The database a test runs on: a SQLite file (the default), or, when
//! `BOILERHOUSE_TEST_DATABASE=postgres`, a schema of its own in the
//! PostgreSQL server at `BOILERHOUSE_POSTGRES_URL` (dev/test starts one
//! with dev/postgres). The same tests therefore run on both backends.
//!
//! A schema rather than a database per test: creating a database copies
//! a template and writes it all to the WAL; a schema costs one catalog
//! row, and hundreds of tests create theirs at once. Every schema is named
//! after the run (`bh_<run>_…`), and `boilerhouse-test-image clean <run>`
//! drops what a killed test left behind.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sqlx::{Connection as _, Executor as _};

/// Which backend tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// A SQLite file.
    Sqlite,
    /// A schema in a PostgreSQL server.
    Postgres,
}

/// `BOILERHOUSE_TEST_DATABASE`: `postgres` or, by default, `sqlite`.
pub fn backend() -> TestBackend {
    match std::env::var("BOILERHOUSE_TEST_DATABASE").as_deref() {
        Ok("postgres" | "postgresql") => TestBackend::Postgres,
        _ => TestBackend::Sqlite,
    }
}

/// Whether the run has a PostgreSQL server (`BOILERHOUSE_POSTGRES_URL`),
/// for tests that need one whatever the run's backend (replicas, the
/// change feed). Without one such a test skips, saying so, unless
/// `BOILERHOUSE_REQUIRE_POSTGRES=1`, which makes that a failure.
pub fn postgres_available() -> bool {
    if std::env::var("BOILERHOUSE_POSTGRES_URL").is_ok() {
        return true;
    }
    assert!(
        std::env::var("BOILERHOUSE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
        "BOILERHOUSE_REQUIRE_POSTGRES=1 but BOILERHOUSE_POSTGRES_URL is not set"
    );
    eprintln!("skipped: no PostgreSQL (set BOILERHOUSE_POSTGRES_URL; dev/postgres starts one)");
    false
}

/// The admin URL of the PostgreSQL server tests use.
pub fn postgres_admin_url() -> anyhow::Result<String> {
    std::env::var("BOILERHOUSE_POSTGRES_URL").context(
        "BOILERHOUSE_TEST_DATABASE=postgres needs BOILERHOUSE_POSTGRES_URL (dev/postgres prints one)",
    )
}

/// A database for one test, removed when dropped.
pub struct TestDatabase {
    /// What `--database` (or `DatabaseLocation::parse`) takes.
    value: String,
    /// PostgreSQL: the admin URL and the schema to drop.
    schema: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A fresh, empty database on the run's backend.
    pub async fn fresh() -> anyhow::Result<Self> {
        match backend() {
            TestBackend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let mut db = Self::sqlite(&dir.path().join("boilerhouse.db"));
                db._dir = Some(dir);
                Ok(db)
            }
            TestBackend::Postgres => Self::postgres_schema().await,
        }
    }

    /// The SQLite file `path` (whatever the run's backend): for tests of
    /// SQLite's own behaviour.
    pub fn sqlite(path: &Path) -> Self {
        Self {
            value: path.display().to_string(),
            schema: None,
            _dir: None,
        }
    }

    /// A fresh schema in the run's PostgreSQL server.
    pub async fn postgres_schema() -> anyhow::Result<Self> {
        Self::postgres_schema_in(&postgres_admin_url()?).await
    }

    /// A fresh schema in the database `admin` names: for benchmarks, which
    /// are given a database of their own rather than the run's server.
    pub async fn postgres_schema_in(admin: &str) -> anyhow::Result<Self> {
        let admin = admin.to_owned();
        let schema = format!(
            "bh_{}_{}",
            sanitize(&crate::docker::test_run_id()),
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .with_context(|| format!("connecting to {admin}"))?;
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .await?;
        let _ = conn.close().await;
        let separator = if admin.contains('?') { '&' } else { '?' };
        Ok(Self {
            value: format!("{admin}{separator}options[search_path]={schema}"),
            schema: Some((admin, schema)),
            _dir: None,
        })
    }

    /// What `--database` takes: a file path or a postgres:// URL.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.schema.is_none().then(|| PathBuf::from(&self.value))
    }

    /// Keeps the database past this value's life (the run's cleanup drops
    /// it) and returns what `--database` takes.
    pub fn keep(mut self) -> String {
        self.schema = None;
        std::mem::take(&mut self.value)
    }

    /// Whether this is a PostgreSQL schema.
    pub fn is_postgres(&self) -> bool {
        self.schema.is_some()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((admin, schema)) = self.schema.take() else {
            return;
        };
        // Drop runs outside any runtime (or inside one that must not
        // block): a thread of its own with a runtime of its own.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .await
                .ok()
            })
        });
        let _ = done.join();
    }
}

/// Drops every schema the run `run` made: after the run, or after a
/// killed test. Returns how many went.
pub async fn drop_run_schemas(admin_url: &str, run: &str) -> anyhow::Result<usize> {
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    let prefix = format!("bh_{}_", sanitize(run));
    let schemas: Vec<(String,)> = sqlx::query_as(
        "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname::text, $1)",
    )
    .bind(&prefix)
    .fetch_all(&mut conn)
    .await?;
    for (schema,) in &schemas {
        conn.execute(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .await?;
    }
    Ok(schemas.len())
}

/// A run id as part of an unquoted identifier: lower-case letters, digits
/// and underscores, short enough to leave room for the suffix.
fn sanitize(run: &str) -> String {
    run.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}
