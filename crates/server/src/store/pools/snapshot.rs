//! Reading everything the pool index is rebuilt from at startup.
//!
//! A restart is not serving claims until this read is done, and at
//! 100,000 containers it was most of the restart: the container rows are
//! read in parts at once, each on a read connection of its own (SQLite
//! steps each on that connection's own thread) and decoded on a task of
//! its own, so both cores work on it.
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

/// The rowids of one part at most: its JSON (~230 bytes a row) stays a
/// few MiB, far below SQLite's limit on a value (1 GB) at any size.
const PART_ROWIDS: i64 = 16_384;

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
        // Everything read at once on connections of their own: no less
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
        let (low, high): (Option<i64>, Option<i64>) =
            sql::query_as("SELECT MIN(rowid), MAX(rowid) FROM containers")
                .fetch_one(&self.reads)
                .await?;
        let (Some(low), Some(high)) = (low, high) else {
            return Ok((Vec::new(), Vec::new()));
        };
        use futures::StreamExt as _;
        let span = high.saturating_sub(low).saturating_add(1);
        let parts = (span / PART_ROWIDS + 1).max(PARTS_AT_ONCE as i64);
        let parts: Vec<_> = futures::stream::iter(rowid_ranges(low, high, parts))
            .map(|range| tokio::spawn(read_container_part(path.to_owned(), range)))
            .buffered(PARTS_AT_ONCE)
            .collect()
            .await;
        let mut containers = Vec::with_capacity(usize::try_from(span).unwrap_or(0));
        let mut unreadable = Vec::new();
        for part in parts {
            let (read, skipped) = part
                .map_err(|e| StoreError::Internal(format!("reading the container rows: {e}")))??;
            containers.extend(read);
            unreadable.extend(skipped);
        }
        Ok((containers, unreadable))
    }
}

/// The container rows whose rowid is in `range`, as one JSON value; row
/// by row when that does not decode.
async fn read_container_part(
    path: std::path::PathBuf,
    range: (i64, i64),
) -> Result<lenient::Lenient<ContainerRecord>, StoreError> {
    match read_container_json(&path, range).await? {
        Some(rows) => Ok(lenient::partition(
            "containers",
            rows.into_iter()
                .map(|row| (row.key().to_owned(), ContainerRecord::try_from(row))),
        )),
        None => read_container_range(path, range).await,
    }
}

/// `None` when the part's JSON is not UTF-8 or does not decode into rows.
async fn read_container_json(
    path: &std::path::Path,
    (from, to): (i64, i64),
) -> Result<Option<Vec<ContainerRow>>, StoreError> {
    use sqlx::ConnectOptions as _;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await?;
    // Bytes, not text: text that is not UTF-8 would fail the driver's
    // decoding; here serde_json refuses it and the rows are read one by one.
    let json: Vec<u8> = sqlx::query_scalar(CONTAINER_ROWS_AS_JSON)
        .bind(from)
        .bind(to)
        .fetch_one(&mut conn)
        .await?;
    let _ = sqlx::Connection::close(conn).await;
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

/// `parts` inclusive ranges covering `low..=high` in order, without gaps
/// or overlaps; fewer when there are fewer rowids than parts.
fn rowid_ranges(low: i64, high: i64, parts: i64) -> Vec<(i64, i64)> {
    let span = high.saturating_sub(low).saturating_add(1).max(1);
    let step = (span / parts).max(1);
    let mut ranges = Vec::new();
    let mut from = low;
    while from <= high {
        let last = ranges.len() as i64 == parts - 1;
        let to = if last {
            high
        } else {
            from.saturating_add(step - 1).min(high)
        };
        ranges.push((from, to));
        if to == high {
            break;
        }
        from = to + 1;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::{read_container_json, read_container_part, read_container_range, rowid_ranges};

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
            let json = read_container_json(&path, (1, 300)).await.unwrap();
            assert!(json.is_some(), "seed {seed}: the JSON did not decode");
            let fast = read_container_part(path.clone(), (1, 300)).await.unwrap();
            let slow = read_container_range(path.clone(), (1, 300)).await.unwrap();
            assert_eq!(fast.0.len() + fast.1.len(), 300, "seed {seed}");
            assert!(!fast.1.is_empty(), "seed {seed}: no unreadable row made");
            assert_eq!(fast, slow, "seed {seed}");
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
        assert!(read_container_json(&path, (1, 20)).await.unwrap().is_none());
        let (read, unreadable) = read_container_part(path.clone(), (1, 20)).await.unwrap();
        let slow = read_container_range(path, (1, 20)).await.unwrap();
        assert_eq!((read.clone(), unreadable.clone()), slow);
        assert!(
            unreadable.iter().any(|u| u.reason.contains("spec_hash")),
            "{unreadable:?}"
        );
        assert!(read.len() >= 15, "{} read", read.len());
    }

    /// Every rowid between the lowest and the highest is in exactly one
    /// range, whatever the span and the number of parts.
    #[test]
    fn rowid_ranges_cover_the_span_once() {
        for (low, high) in [
            (1, 1),
            (1, 3),
            (1, 4),
            (1, 5),
            (7, 100_006),
            (-5, 5),
            (1, 1_000_003),
        ] {
            for parts in 1..=6 {
                let ranges = rowid_ranges(low, high, parts);
                assert!(
                    !ranges.is_empty() && ranges.len() as i64 <= parts,
                    "{low}..{high} in {parts}: {ranges:?}"
                );
                assert_eq!(ranges[0].0, low);
                assert_eq!(ranges.last().unwrap().1, high);
                for pair in ranges.windows(2) {
                    assert_eq!(
                        pair[0].1 + 1,
                        pair[1].0,
                        "{low}..{high} in {parts}: {ranges:?}"
                    );
                }
                assert!(ranges.iter().all(|(a, b)| a <= b));
            }
        }
    }
}
