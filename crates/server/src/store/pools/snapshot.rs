//! Reading everything the pool index is rebuilt from at startup.
//!
//! A restart is not serving claims until this read is done, and at
//! 100,000 containers it was most of the restart: the container rows are
//! read in parts at once, each on a read connection of the pool (SQLite
//! steps each on that connection's own thread) and decoded on a task of
//! its own, so both cores work on it. The pool's connections, not new
//! ones: a connection's first statement parses the whole schema, and a
//! read that opened four each time (the seeded simulation reads after
//! every step) spent most of its time there.
//!
//! Each part comes back from SQLite as one JSON array of rows
//! ([`CONTAINER_ROWS_AS_JSON`]). Row by row, the driver copied every
//! value into an allocation of its own and handed each row across
//! threads: 0.57 s of CPU-bound work for 100,000 rows that SQLite itself
//! steps through in 0.05 s. A part whose JSON does not decode (a value
//! that is not UTF-8, a column of the wrong type) is read again row by
//! row, which names each row it cannot read.

use futures::TryFutureExt as _;

use boilerhouse_core::pool::ContainerRecord;

use super::super::lenient;
use super::super::sql;
use super::super::{Store, StoreError};
use super::rows::ContainerRow;
use super::{
    PoolSnapshot, claim_columns, container_columns, read_claim, read_container, read_reservation,
    reservation_columns,
};

/// Parts read at once (SQLite). More than the cores, so that an uneven
/// part does not leave one idle.
const PARTS_AT_ONCE: usize = 4;

/// Rows in one part at most: its JSON (~230 bytes a row) stays a few
/// MiB, far below SQLite's limit on a value (1 GB) at any size.
const PART_ROWS: i64 = 32_768;

/// Rows read as a single part, whatever the parts at once.
const ONE_PART_ROWS: i64 = 1024;

/// One part's container rows as one JSON array of arrays, the columns in
/// [`ContainerRow`]'s order. The REAL as text of 17 digits: JSON's
/// rendering keeps 15, and a limit must read back as it was written.
const CONTAINER_ROWS_AS_JSON: &str = "SELECT CAST(json_group_array(json_array(\
     container_id, workload_id, node_id, docker_id, state, spec_hash, tenant_id, last_tenant_id, \
     claim_generation, revision, \
     iif(limits_cpus IS NULL, NULL, printf('%!.17g', limits_cpus)), \
     limits_memory, state_path, comm_path, created_at, updated_at)) AS BLOB) \
     FROM containers WHERE rowid BETWEEN ? AND ?";

/// Rows a part's SQLite thread may read ahead of its decoding.
const ROW_CHANNEL: usize = 4096;

impl Store {
    /// Every container, active claim and reservation.
    pub async fn load_pool_snapshot(&self) -> Result<PoolSnapshot, StoreError> {
        // Everything read at once, each on a read connection: no less
        // consistent than one after another, since no pool write is made
        // before the index they build exists. No ORDER BY: the index
        // orders everything itself, and sorting 100,000 rows was a visible
        // part of a restart.
        let (containers, claims, reservations) = tokio::try_join!(
            self.read_all_containers(),
            sql::query(concat!(
                "SELECT ",
                claim_columns!(),
                " FROM claims WHERE status = 'active'"
            ))
            .fetch_all(&self.reads)
            .map_err(StoreError::from),
            sql::query(concat!(
                "SELECT ",
                reservation_columns!(),
                " FROM affinity_reservations"
            ))
            .fetch_all(&self.reads)
            .map_err(StoreError::from),
        )?;
        let (containers, mut unreadable) = containers;
        let (claims, more) = lenient::split(claims.iter().map(read_claim));
        unreadable.extend(more);
        let (reservations, more) = lenient::split(reservations.iter().map(read_reservation));
        unreadable.extend(more);
        Ok(PoolSnapshot {
            containers,
            claims,
            reservations,
            unreadable,
        })
    }

    /// Every container row, read and decoded in parts at once on SQLite
    /// (by rowid range), in one query on PostgreSQL.
    async fn read_all_containers(&self) -> Result<lenient::Lenient<ContainerRecord>, StoreError> {
        let Some(path) = self.location.sqlite_path() else {
            let rows = sql::query(concat!("SELECT ", container_columns!(), " FROM containers"))
                .fetch_all(&self.reads)
                .await?;
            return Ok(lenient::split(rows.iter().map(read_container)));
        };
        // A count through whichever index SQLite picks: if that index is
        // wrong, the parts are uneven, never incomplete.
        let (rows,): (i64,) = sql::query_as("SELECT count(*) FROM containers")
            .fetch_one(&self.reads)
            .await?;
        // A small table is one part: finding part boundaries costs a
        // query each, more than reading a few hundred rows on one thread.
        let ranges = if rows <= ONE_PART_ROWS {
            vec![(i64::MIN, i64::MAX)]
        } else {
            let part_rows = (rows / PARTS_AT_ONCE as i64 + 1).min(PART_ROWS);
            self.container_parts(part_rows).await?
        };
        self.read_container_ranges(path, ranges).await
    }

    /// The container rows of each of `ranges`, read and decoded at once.
    async fn read_container_ranges(
        &self,
        path: &std::path::Path,
        ranges: Vec<(i64, i64)>,
    ) -> Result<lenient::Lenient<ContainerRecord>, StoreError> {
        use futures::StreamExt as _;
        let parts: Vec<_> = futures::stream::iter(ranges)
            .map(|range| {
                tokio::spawn(read_container_part(
                    self.reads.clone(),
                    path.to_owned(),
                    range,
                ))
            })
            .buffered(PARTS_AT_ONCE)
            .collect()
            .await;
        let mut read = Vec::with_capacity(parts.len());
        for part in parts {
            read.push(
                part.map_err(|e| {
                    StoreError::Internal(format!("reading the container rows: {e}"))
                })??,
            );
        }
        let mut containers = Vec::with_capacity(read.iter().map(|(r, _)| r.len()).sum());
        let mut unreadable = Vec::new();
        for (rows, skipped) in read {
            containers.extend(rows);
            unreadable.extend(skipped);
        }
        Ok((containers, unreadable))
    }

    /// Inclusive rowid ranges that together cover every rowid there can
    /// be, each of about `part_rows` rows: the boundaries are found by
    /// stepping through the table's rowids, so gaps between them (one
    /// long-lived row among months of churn) cost nothing.
    async fn container_parts(&self, part_rows: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut ranges = Vec::new();
        let mut start = i64::MIN;
        loop {
            let next: Option<(i64,)> = sql::query_as(
                "SELECT rowid FROM containers WHERE rowid >= ? ORDER BY rowid LIMIT 1 OFFSET ?",
            )
            .bind(start)
            .bind(part_rows.max(1))
            .fetch_optional(&self.reads)
            .await?;
            // The row `part_rows` past `start` begins the next part: always
            // after `start`, so this ends.
            match next {
                Some((next,)) => {
                    ranges.push((start, next - 1));
                    start = next;
                }
                None => {
                    ranges.push((start, i64::MAX));
                    return Ok(ranges);
                }
            }
        }
    }
}

/// The container rows whose rowid is in `range`, as one JSON value; row
/// by row (on a native connection of its own, `path`'s) when that cannot
/// be read or does not decode.
async fn read_container_part(
    reads: sqlx::AnyPool,
    path: std::path::PathBuf,
    range: (i64, i64),
) -> Result<lenient::Lenient<ContainerRecord>, StoreError> {
    match read_container_json(&reads, range).await {
        Ok(Some(rows)) => Ok(lenient::partition(
            "containers",
            rows.into_iter()
                .map(|row| (row.key().to_owned(), ContainerRecord::try_from(row))),
        )),
        Ok(None) => read_container_range(path, range).await,
        // Too big a value, say, that one row at a time would not be: the
        // row-by-row read meets any lasting trouble again and reports it.
        Err(e) => {
            tracing::debug!(?range, error = %e, "container rows' JSON could not be read; reading them row by row");
            read_container_range(path, range).await
        }
    }
}

/// `None` when the part's JSON is not UTF-8 or does not decode into rows.
async fn read_container_json(
    reads: &sqlx::AnyPool,
    (from, to): (i64, i64),
) -> Result<Option<Vec<ContainerRow>>, StoreError> {
    // Bytes, not text: text that is not UTF-8 would fail the driver's
    // decoding; here serde_json refuses it and the rows are read one by one.
    let json: Vec<u8> = sql::query_scalar(CONTAINER_ROWS_AS_JSON)
        .bind(from)
        .bind(to)
        .fetch_one(reads)
        .await?;
    Ok(match serde_json::from_slice(&json) {
        Ok(rows) => Some(rows),
        Err(e) => {
            tracing::debug!(from, to, error = %e, "container rows' JSON does not decode; reading them row by row");
            None
        }
    })
}

/// The container rows whose rowid is in `range`, on a native SQLite
/// connection of their own: through sqlx's `Any` driver each row was built
/// twice (a SQLite row, then an `Any` row with every value copied), and
/// that copy was most of a restart's read at 100,000 containers.
async fn read_container_range(
    path: std::path::PathBuf,
    (from, to): (i64, i64),
) -> Result<lenient::Lenient<ContainerRecord>, StoreError> {
    use futures::TryStreamExt as _;
    use sqlx::ConnectOptions as _;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(5))
        // Rows cross from SQLite's thread to ours through this channel;
        // at sqlx's 50 each side waited on the other for every row.
        .row_buffer_size(ROW_CHANNEL)
        .connect()
        .await?;
    let mut rows = sqlx::query(concat!(
        "SELECT ",
        container_columns!(),
        " FROM containers WHERE rowid BETWEEN ? AND ?"
    ))
    .bind(from)
    .bind(to)
    .fetch(&mut conn);
    let mut read = Vec::new();
    let mut unreadable = Vec::new();
    while let Some(row) = rows.try_next().await? {
        match lenient::decode_one::<_, ContainerRow, ContainerRecord>(&row, "containers", |r| {
            lenient::text(r, "container_id")
        }) {
            Ok(c) => read.push(c),
            Err(u) => unreadable.push(u),
        }
    }
    drop(rows);
    let _ = sqlx::Connection::close(conn).await;
    Ok((read, unreadable))
}

#[cfg(test)]
mod tests {
    use super::{read_container_json, read_container_part, read_container_range};

    async fn open(path: &std::path::Path) -> crate::store::Store {
        crate::store::Store::open(path, crate::store::StoreOptions::default())
            .await
            .unwrap()
    }

    /// Rows of every shape: NULLs, limits whose REAL needs all 17 digits,
    /// a row that does not convert, seeded at random.
    async fn database_with_rows(
        dir: &std::path::Path,
        seed: u64,
        rows: usize,
    ) -> std::path::PathBuf {
        use rand::{Rng as _, SeedableRng as _};
        let path = dir.join("t.db");
        let store = crate::store::Store::open(&path, crate::store::StoreOptions::default())
            .await
            .unwrap();
        store.close().await;
        drop(store);
        let mut conn = crate::store::open_raw(&path).await.unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for i in 0..rows {
            let id = uuid::Uuid::from_u128(rng.random()).to_string();
            let cpus: Option<f64> = match i % 3 {
                0 => None,
                1 => Some(f64::from(rng.random_range(1..64u32)) * 0.1 * 3.0),
                _ => Some(rng.random::<f64>() * 7.0),
            };
            let tenant = match i % 5 {
                0 => None,
                // Not a tenant id: the row is skipped and named.
                1 if i % 7 == 0 => Some("not a tenant!".to_owned()),
                _ => Some(format!("tenant-{i}")),
            };
            sqlx::query(
                "INSERT INTO containers (container_id, pool_id, workload_id, node_id, docker_id, state, spec_hash, \
                 tenant_id, last_tenant_id, claim_generation, revision, limits_cpus, limits_memory, state_path, comm_path, created_at, updated_at) \
                 VALUES (?, 'w', 'w', 'n', ?, ?, 'h', ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
            )
            .bind(&id)
            .bind((i % 4 != 0).then(|| format!("{i:064x}")))
            .bind(if tenant.is_some() { "claimed" } else { "idle" })
            .bind(&tenant)
            .bind((i % 2 == 0).then(|| format!("last-{i}")))
            .bind(rng.random_range(0..1_000_000i64))
            .bind(rng.random_range(0..1_000i64))
            .bind(cpus)
            .bind((i % 3 != 0).then(|| rng.random_range(1..1i64 << 40)))
            .bind(format!("/state/\"{i}\"\\ü"))
            .bind(rng.random_range(0..i64::MAX / 2))
            .bind(rng.random_range(0..i64::MAX / 2))
            .execute(&mut conn)
            .await
            .unwrap();
        }
        sqlx::Connection::close(conn).await.unwrap();
        path
    }

    /// The JSON read gives exactly what the row-by-row read gives, limits
    /// to the last bit, and names the same rows it cannot read.
    #[tokio::test]
    async fn the_json_read_equals_the_row_by_row_read() {
        for seed in [1, 2, 3] {
            let dir = tempfile::tempdir().unwrap();
            let path = database_with_rows(dir.path(), seed, 300).await;
            let store = open(&path).await;
            let json = read_container_json(&store.reads, (1, 300)).await.unwrap();
            assert!(json.is_some(), "seed {seed}: the JSON did not decode");
            let fast = read_container_part(store.reads.clone(), path.clone(), (1, 300))
                .await
                .unwrap();
            let slow = read_container_range(path.clone(), (1, 300)).await.unwrap();
            assert_eq!(fast.0.len() + fast.1.len(), 300, "seed {seed}");
            assert!(!fast.1.is_empty(), "seed {seed}: no unreadable row made");
            assert_eq!(fast, slow, "seed {seed}");
            store.close().await;
        }
    }

    /// Text that is not UTF-8 is no JSON: that part is read row by row,
    /// which names the row.
    #[tokio::test]
    async fn a_part_whose_json_does_not_decode_is_read_row_by_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = database_with_rows(dir.path(), 9, 20).await;
        let mut conn = crate::store::open_raw(&path).await.unwrap();
        sqlx::query("UPDATE containers SET spec_hash = CAST(x'ff00ff' AS TEXT) WHERE rowid = 5")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::Connection::close(conn).await.unwrap();
        let store = open(&path).await;
        assert!(
            read_container_json(&store.reads, (1, 20))
                .await
                .unwrap()
                .is_none()
        );
        let (read, unreadable) = read_container_part(store.reads.clone(), path.clone(), (1, 20))
            .await
            .unwrap();
        let slow = read_container_range(path, (1, 20)).await.unwrap();
        assert_eq!((read.clone(), unreadable.clone()), slow);
        assert!(
            unreadable.iter().any(|u| u.reason.contains("spec_hash")),
            "{unreadable:?}"
        );
        assert!(read.len() >= 15, "{} read", read.len());
        store.close().await;
    }

    /// Rowids far apart (a long-lived row among months of churn, one near
    /// the end of the range): parts follow the rows, not the span, cover
    /// every rowid once, and the whole read finds every row.
    #[tokio::test]
    async fn parts_follow_the_rows_however_far_apart_their_rowids_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = database_with_rows(dir.path(), 5, 100).await;
        let mut conn = crate::store::open_raw(&path).await.unwrap();
        for (rowid, to) in [(3, 50_000_000), (4, i64::MAX - 1), (5, -7)] {
            sqlx::query("UPDATE containers SET rowid = ? WHERE rowid = ?")
                .bind(to)
                .bind(rowid)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        sqlx::Connection::close(conn).await.unwrap();
        let store = crate::store::Store::open(&path, crate::store::StoreOptions::default())
            .await
            .unwrap();

        let ranges = store.container_parts(7).await.unwrap();
        assert_eq!(ranges.len(), 100usize.div_ceil(7), "{ranges:?}");
        assert_eq!(ranges[0].0, i64::MIN);
        assert_eq!(ranges.last().unwrap().1, i64::MAX);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].1 + 1, pair[1].0, "{ranges:?}");
        }

        let slow = read_container_range(path.clone(), (i64::MIN, i64::MAX))
            .await
            .unwrap();
        // In those parts, and whole (one part, the table being small).
        let (read, unreadable) = store.read_container_ranges(&path, ranges).await.unwrap();
        assert_eq!(read.len() + unreadable.len(), 100);
        let (whole, _) = store.read_all_containers().await.unwrap();
        let ids = |records: &[boilerhouse_core::pool::ContainerRecord]| {
            let mut ids: Vec<String> = records.iter().map(|c| c.id.to_string()).collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(&read), ids(&slow.0));
        assert_eq!(ids(&whole), ids(&slow.0));
        store.close().await;
    }
}
