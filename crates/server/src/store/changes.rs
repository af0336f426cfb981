//! A standby's warm copy of the pool's rows, kept up to date from the
//! database's change feed (PostgreSQL only; see
//! `migrations/postgres/0003_change_feed.sql`).
//!
//! A server elected leader must read the database after it holds the
//! lease: until the lease was its own, the old leader could commit. With a
//! warm copy that read is only what changed since the standby last looked,
//! a few rows, instead of every container, claim and reservation, and the
//! copy is the pool index itself, kept in step with the rows
//! ([`Index::put_rows`]): nothing is built at election.
//!
//! # Invariants
//!
//! - Every read is one REPEATABLE READ transaction: the clock's version and
//!   the rows come from one snapshot, so the copy is exactly the database
//!   as of `version`. Versions are taken in commit order (the clock row's
//!   lock), so nothing committed later can carry a version at or below it.
//! - A change read is applied whole, after its transaction ended, or not
//!   at all: a failed read leaves the copy as it was.
//! - The copy's index equals `Index::from_rows` of the readable rows at
//!   its version, and its unreadable rows are those a cold load skips.
//! - The copy reads everything again whenever a delta could be incomplete:
//!   the tombstones it needs were trimmed, or its version is not the
//!   database's any more (the clock went back, or the number was handed
//!   out again with another token: a rewound history).

use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Connection as _};

use boilerhouse_core::pool::index::{Index, RowChanges};
use boilerhouse_core::pool::{ClaimRecord, ContainerRecord, Reservation};
use boilerhouse_core::{ContainerId, TenantId, WorkloadId};

use super::lenient::{self, Unreadable};
use super::pools::{
    claim_columns, container_columns, read_claim, read_container, read_reservation,
    reservation_columns,
};
use super::{Backend, Store, StoreError, sql};

/// How long a deleted row's tombstone is kept. A standby that has not
/// read the feed for longer reads everything again.
pub const TOMBSTONE_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

type Read<T> = Result<T, Unreadable>;

/// The pool index as of one version of the database, and the rows a cold
/// load would skip as unreadable.
#[derive(Debug, Default, Clone)]
pub struct WarmPool {
    /// The version the copy is at; `None` until first read.
    version: Option<i64>,
    /// That version's token: the same number with another token is
    /// another history.
    token: Option<String>,
    index: Index,
    /// By table and key.
    unreadable: BTreeMap<(&'static str, String), Unreadable>,
}

/// What one refresh read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// Everything was read, not a delta.
    pub full: bool,
    /// Rows read or removed.
    pub rows: usize,
    /// The version the copy is now at.
    pub version: i64,
}

/// Everything one read brought, applied only once its transaction ended.
struct Changes {
    version: i64,
    token: Option<String>,
    full: bool,
    containers: Vec<(String, Read<ContainerRecord>)>,
    claims: Vec<(String, Read<ClaimRecord>)>,
    /// Claims that ended since (no longer in the index).
    ended_claims: Vec<String>,
    reservations: Vec<((String, String), Read<Reservation>)>,
    /// Tombstones: (table, key, second key).
    deleted: Vec<(String, String, String)>,
}

impl Changes {
    fn len(&self) -> usize {
        self.containers.len()
            + self.claims.len()
            + self.ended_claims.len()
            + self.reservations.len()
            + self.deleted.len()
    }
}

impl WarmPool {
    /// The version the copy is at, once read.
    pub fn version(&self) -> Option<i64> {
        self.version
    }

    /// The index of the readable rows.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The rows a cold load would skip, by table and key.
    pub fn unreadable(&self) -> Vec<Unreadable> {
        self.unreadable.values().cloned().collect()
    }

    /// The index and the unreadable rows, for the elected server.
    pub fn into_parts(self) -> (Index, Vec<Unreadable>) {
        (self.index, self.unreadable.into_values().collect())
    }

    /// Brings the copy up to the database's current version on `conn`:
    /// what changed since it last looked, or everything the first time
    /// (and whenever a delta could be incomplete).
    pub async fn refresh(&mut self, conn: &mut AnyConnection) -> Result<Refreshed, StoreError> {
        // Rolled back if dropped before its end (read-only: either way
        // it changes nothing).
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let since = self.version.zip(self.token.as_deref());
        let changes = read_changes(&mut tx, since).await?;
        tx.commit().await?;
        let refreshed = Refreshed {
            full: changes.full,
            rows: changes.len(),
            version: changes.version,
        };
        self.apply(changes);
        Ok(refreshed)
    }

    fn apply(&mut self, changes: Changes) {
        if changes.full {
            *self = WarmPool::default();
        }
        self.version = Some(changes.version);
        self.token = changes.token;
        let mut rows = RowChanges::default();
        // Removals first: the rows read are the rows as they are now, so
        // a row deleted and then made again (a container adopted back
        // under its old id, a tenant reserving again) is there, whatever
        // its tombstone says.
        for (table, key, key2) in changes.deleted {
            match table.as_str() {
                "containers" => {
                    self.unreadable.remove(&("containers", key.clone()));
                    rows.removed_containers
                        .extend(key.parse::<ContainerId>().ok());
                }
                "claims" => {
                    self.unreadable.remove(&("claims", key.clone()));
                    rows.removed_claims.push(key);
                }
                "affinity_reservations" => {
                    self.unreadable
                        .remove(&("affinity_reservations", format!("({key}, {key2})")));
                    rows.removed_reservations.extend(tenant_key(&key, &key2));
                }
                _ => {}
            }
        }
        for id in changes.ended_claims {
            self.unreadable.remove(&("claims", id.clone()));
            rows.removed_claims.push(id);
        }
        for (key, row) in changes.containers {
            // A row that no longer reads leaves the index, as a cold load
            // would skip it.
            rows.removed_containers
                .extend(key.parse::<ContainerId>().ok());
            self.put(("containers", key), row, &mut rows.containers);
        }
        for (key, row) in changes.claims {
            rows.removed_claims.push(key.clone());
            self.put(("claims", key), row, &mut rows.claims);
        }
        for ((tenant, workload), row) in changes.reservations {
            rows.removed_reservations
                .extend(tenant_key(&tenant, &workload));
            let key = format!("({tenant}, {workload})");
            self.put(("affinity_reservations", key), row, &mut rows.reservations);
        }
        self.index.put_rows(rows);
    }

    /// A row read under `key`: into `readable`, or among the unreadable
    /// ones (and out of them once it reads again).
    fn put<T>(&mut self, key: (&'static str, String), row: Read<T>, readable: &mut Vec<T>) {
        match row {
            Ok(value) => {
                self.unreadable.remove(&key);
                readable.push(value);
            }
            Err(skipped) => {
                self.unreadable.insert(key, skipped);
            }
        }
    }
}

/// A reservation's key, if its ids read.
fn tenant_key(tenant: &str, workload: &str) -> Option<(TenantId, WorkloadId)> {
    Some((
        TenantId::new(tenant.to_owned()).ok()?,
        WorkloadId::new(workload.to_owned()).ok()?,
    ))
}

/// Reads, inside the caller's transaction, everything above `since` (a
/// version and its token), or everything when there is no `since` or the
/// feed cannot cover it.
async fn read_changes(
    conn: &mut AnyConnection,
    since: Option<(i64, &str)>,
) -> Result<Changes, StoreError> {
    let (version, trimmed_through, token, since_token): (i64, i64, Option<String>, Option<String>) =
        sql::query_as(
            "SELECT version, trimmed_through, \
             (SELECT CAST(token AS TEXT) FROM change_versions WHERE version = c.version), \
             (SELECT CAST(token AS TEXT) FROM change_versions WHERE version = ?) \
             FROM change_clock c WHERE id = 1",
        )
        .bind(since.map_or(-1, |(v, _)| v))
        .fetch_one(&mut *conn)
        .await?;
    // Tombstones at or below trimmed_through may be gone; a version whose
    // token changed or is gone, or a clock behind the copy, is another
    // history (a rewound database).
    let since = since
        .filter(|&(s, t)| s >= trimmed_through && s <= version && since_token.as_deref() == Some(t))
        .map(|(s, _)| s);
    // Everything is a delta from below every version (a row's
    // change_version is 0 or more); a copy read whole starts empty, so it
    // has nothing to remove.
    let full = since.is_none();
    let above = since.unwrap_or(-1);
    let containers = fetch(
        conn,
        concat!(
            "SELECT ",
            container_columns!(),
            " FROM containers WHERE change_version > ?"
        ),
        above,
    )
    .await?;
    let claims = fetch(
        conn,
        concat!(
            "SELECT ",
            claim_columns!(),
            " FROM claims WHERE change_version > ? AND status = 'active'"
        ),
        above,
    )
    .await?;
    let reservations = fetch(
        conn,
        concat!(
            "SELECT ",
            reservation_columns!(),
            " FROM affinity_reservations WHERE change_version > ?"
        ),
        above,
    )
    .await?;
    let (ended_claims, deleted) = if full {
        (Vec::new(), Vec::new())
    } else {
        let ended: Vec<(String,)> = sql::query_as(
            "SELECT claim_id FROM claims WHERE change_version > ? AND status <> 'active'",
        )
        .bind(above)
        .fetch_all(&mut *conn)
        .await?;
        let deleted: Vec<(String, String, String)> = sql::query_as(
            "SELECT table_name, row_key, row_key2 FROM deleted_rows WHERE change_version > ? \
             ORDER BY change_version",
        )
        .bind(above)
        .fetch_all(&mut *conn)
        .await?;
        (ended.into_iter().map(|(id,)| id).collect(), deleted)
    };
    Ok(Changes {
        version,
        token,
        full,
        containers: keyed_containers(&containers),
        claims: keyed_claims(&claims),
        ended_claims,
        reservations: keyed_reservations(&reservations),
        deleted,
    })
}

async fn fetch(
    conn: &mut AnyConnection,
    statement: &'static str,
    above: i64,
) -> Result<Vec<AnyRow>, StoreError> {
    Ok(sql::query(statement)
        .bind(above)
        .fetch_all(&mut *conn)
        .await?)
}

fn keyed_containers(rows: &[AnyRow]) -> Vec<(String, Read<ContainerRecord>)> {
    rows.iter()
        .map(|r| (lenient::text(r, "container_id"), read_container(r)))
        .collect()
}

fn keyed_claims(rows: &[AnyRow]) -> Vec<(String, Read<ClaimRecord>)> {
    rows.iter()
        .map(|r| (lenient::text(r, "claim_id"), read_claim(r)))
        .collect()
}

fn keyed_reservations(rows: &[AnyRow]) -> Vec<((String, String), Read<Reservation>)> {
    rows.iter()
        .map(|r| {
            (
                (
                    lenient::text(r, "tenant_id"),
                    lenient::text(r, "workload_id"),
                ),
                read_reservation(r),
            )
        })
        .collect()
}

impl Store {
    /// Brings a standby's warm copy up to date on a read connection: at
    /// election, after the lease is this server's, so nothing the old
    /// leader committed is missed.
    pub async fn catch_up(&self, warm: &mut WarmPool) -> Result<Refreshed, StoreError> {
        let mut conn = self.reads.acquire().await?;
        warm.refresh(&mut conn).await
    }

    /// Trims tombstones older than [`TOMBSTONE_RETENTION`] and records the
    /// newest version trimmed. Nothing to do on SQLite, which keeps no
    /// feed.
    pub async fn trim_tombstones(&self) -> Result<u64, StoreError> {
        if self.backend() != Backend::Postgres {
            return Ok(0);
        }
        let retention_ms = TOMBSTONE_RETENTION.as_millis() as f64;
        self.writer
            .write(move |tx| {
                use futures::FutureExt as _;
                async move {
                    // Versions' tokens go with them; the newest stays.
                    let (trimmed,): (i64,) = sql::query_as(
                        "WITH gone AS (DELETE FROM deleted_rows \
                         WHERE deleted_at < now() - CAST(? AS DOUBLE PRECISION) * INTERVAL '1 millisecond' \
                         RETURNING change_version), \
                         raised AS (UPDATE change_clock SET trimmed_through = \
                         GREATEST(trimmed_through, (SELECT max(change_version) FROM gone)) WHERE id = 1), \
                         tokens AS (DELETE FROM change_versions \
                         WHERE taken_at < now() - CAST(? AS DOUBLE PRECISION) * INTERVAL '1 millisecond' \
                         AND version < (SELECT version FROM change_clock WHERE id = 1)) \
                         SELECT count(*) FROM gone",
                    )
                    .bind(retention_ms)
                    .bind(retention_ms)
                    .fetch_one(tx.conn())
                    .await?;
                    Ok(trimmed.max(0) as u64)
                }
                .boxed()
            })
            .await
    }
}
