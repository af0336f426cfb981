//! A PostgreSQL database is never silently replaced either.
//!
//! There is no file to check: PostgreSQL guards its own pages, and a
//! database that does not exist is a connection error naming it. What
//! remains is the unmounted-volume case in another form: the URL (or its
//! `search_path`) now names an *empty* database or schema, and the first
//! migration would quietly make it a new, empty Boilerhouse.
//!
//! So each server remembers, in its data directory, every database it has
//! seen holding Boilerhouse's schema (`postgres-seen.toml`, the URL with
//! its password redacted). At startup, before anything is migrated, a
//! database that this server saw before and that now has no migration
//! history is refused in one sentence, with the way out: `pg_restore` the
//! backup, or `--rebuild-from-agents` on purpose. A URL this server never
//! used is a new database on purpose, like a new SQLite path.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::Refused;
use crate::store::{DatabaseLocation, sql};

/// The file, in the data directory, that lists the databases seen.
pub fn seen_path(data_dir: &Path) -> PathBuf {
    data_dir.join("postgres-seen.toml")
}

/// What this server found at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The schema is there: an existing installation.
    Existing,
    /// Empty, and never seen by this server: a fresh install.
    Fresh,
    /// Empty though this server saw it before, and `--rebuild-from-agents`
    /// was given: rebuilt on purpose.
    Rebuilt,
}

/// Checks `location` before the schema is migrated. Errors other than a
/// [`Refused`] are the database's (unreachable, …): the caller retries.
pub async fn check(
    location: &DatabaseLocation,
    data_dir: &Path,
    rebuild: bool,
) -> anyhow::Result<Found> {
    let mut conn = crate::store::open_inspector(location).await?;
    // `to_regclass` follows the connection's search_path, as the
    // migrations will.
    let (history,): (bool,) = sql::query_as("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("looking for the schema in {location}"))?;
    if history {
        return Ok(Found::Existing);
    }
    let key = location.to_string();
    if !seen(data_dir)?.contains(&key) {
        return Ok(Found::Fresh);
    }
    if rebuild {
        tracing::warn!(database = %key, "--rebuild-from-agents: the database this server used before is empty; starting from it to rebuild from the agents' reports");
        return Ok(Found::Rebuilt);
    }
    Err(Refused {
        sentence: format!(
            "the database {key} is empty, though this server used it before ({}): restore the last backup with `pg_restore` (docs/OPERATIONS.md, \"Back up\"), or rebuild it from the agents on purpose with `boilerhoused --rebuild-from-agents`",
            seen_path(data_dir).display()
        ),
        detail: None,
    }
    .into())
}

/// Records that this server has seen `location` holding the schema.
pub fn remember(location: &DatabaseLocation, data_dir: &Path) -> anyhow::Result<()> {
    let key = location.to_string();
    let mut all = seen(data_dir)?;
    if all.contains(&key) {
        return Ok(());
    }
    all.push(key);
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let text = format!(
        "# The PostgreSQL databases this boilerhoused has used. While one is\n\
         # listed here, finding it empty is refused rather than migrated anew:\n\
         # see docs/OPERATIONS.md, \"A missing or damaged database\".\n\
         databases = {}\n",
        toml::Value::Array(all.into_iter().map(toml::Value::String).collect())
    );
    let path = seen_path(data_dir);
    let scratch = path.with_extension("toml.tmp");
    std::fs::write(&scratch, text).with_context(|| format!("writing {}", scratch.display()))?;
    std::fs::rename(&scratch, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn seen(data_dir: &Path) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Seen {
        databases: Vec<String>,
    }
    let path = seen_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(toml::from_str::<Seen>(&text)
            .with_context(|| format!("reading {}", path.display()))?
            .databases),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_databases_are_listed_once_with_passwords_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let a = DatabaseLocation::parse("postgres://bh:secret@db/bh").unwrap();
        let b = DatabaseLocation::parse("postgres://bh@db2/bh").unwrap();
        assert!(seen(dir.path()).unwrap().is_empty());
        remember(&a, dir.path()).unwrap();
        remember(&a, dir.path()).unwrap();
        remember(&b, dir.path()).unwrap();
        let all = seen(dir.path()).unwrap();
        assert_eq!(all, vec![a.to_string(), b.to_string()]);
        let text = std::fs::read_to_string(seen_path(dir.path())).unwrap();
        assert!(!text.contains("secret"), "{text}");
    }
}
