//! Losing, copying and restoring a stopped server's database, on either
//! backend, so that tests of database loss and of restored backups run on
//! SQLite and on PostgreSQL alike.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use sqlx::{Connection as _, Executor as _};

use super::{Cluster, ClusterBuilder};

impl ClusterBuilder {
    /// The server's `--database` (a SQLite path or a postgres:// URL),
    /// whatever the run's backend: for benchmarks that compare backends
    /// in one run. The caller owns that database and removes it; the
    /// helpers below know only the run's own databases and ignore it.
    pub fn database(mut self, value: &str) -> Self {
        self.database = Some(value.to_owned());
        self
    }
}

impl Cluster {
    /// The database is gone (a deleted file, a dropped schema) while the
    /// agents and their containers live on. Call with the server stopped.
    pub async fn lose_database(&self) {
        match postgres_schema(&self.server.database_value()) {
            Some((admin, schema)) => recreate_schema(&admin, &schema)
                .await
                .expect("drop and recreate the test's schema"),
            None => {
                let file = self.server.database();
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
                }
            }
        }
    }

    /// Copies the database to `name` in the cluster's directory: the
    /// file (with its WAL) or a `pg_dump` of the schema. Call with the
    /// server stopped.
    pub fn save_database(&self, name: &str) {
        let to = self.dir().join(name);
        match postgres_schema(&self.server.database_value()) {
            Some((admin, schema)) => {
                let out = Command::new(pg_tool("pg_dump"))
                    .args(["--dbname", &admin, "--schema", &schema, "--file"])
                    .arg(&to)
                    .output()
                    .expect("run pg_dump");
                assert!(out.status.success(), "pg_dump: {}", crate::stderr(&out));
            }
            None => copy_sqlite(&self.server.database(), &to),
        }
    }

    /// Puts back what [`Cluster::save_database`] saved as `name`. Call
    /// with the server stopped.
    pub async fn restore_database(&self, name: &str) {
        let from = self.dir().join(name);
        match postgres_schema(&self.server.database_value()) {
            Some((admin, schema)) => {
                let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect");
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .await
                .expect("drop the schema");
                let out = Command::new(pg_tool("psql"))
                    .args([
                        "--quiet",
                        "--set",
                        "ON_ERROR_STOP=1",
                        "--dbname",
                        &admin,
                        "--file",
                    ])
                    .arg(&from)
                    .output()
                    .expect("run psql");
                assert!(out.status.success(), "psql: {}", crate::stderr(&out));
            }
            None => copy_sqlite(&from, &self.server.database()),
        }
    }
}

/// The admin URL and schema of a `--database` value made by
/// [`crate::database::TestDatabase::postgres_schema`].
fn postgres_schema(value: &str) -> Option<(String, String)> {
    let (admin, schema) = value.split_once("options[search_path]=")?;
    let admin = admin.trim_end_matches(['?', '&']).to_owned();
    Some((admin, schema.to_owned()))
}

async fn recreate_schema(admin: &str, schema: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .await?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .await
        .with_context(|| format!("create schema {schema}"))?;
    Ok(())
}

/// A PostgreSQL client tool of the server's version when one is installed
/// beside it (dev/postgres's), else the one on PATH.
fn pg_tool(name: &str) -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("BOILERHOUSE_PG_BIN") {
        return Path::new(&dir).join(name);
    }
    let mut found = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let candidate = entry.path().join("bin").join(name);
            if candidate.exists() {
                found = Some(candidate);
            }
        }
    }
    found.unwrap_or_else(|| name.into())
}

/// A SQLite file with its WAL and shared-memory files, as they are.
fn copy_sqlite(from: &Path, to: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let src = format!("{}{suffix}", from.display());
        let dst = format!("{}{suffix}", to.display());
        let _ = std::fs::remove_file(&dst);
        if Path::new(&src).exists() {
            std::fs::copy(&src, &dst).expect("copy the database");
        }
    }
}
