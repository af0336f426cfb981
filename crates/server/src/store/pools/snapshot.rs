//! Reading everything the pool index is rebuilt from at startup.
//!
//! A restart is not serving claims until this read is done, and at
//! 100,000 containers it was most of the restart: the container rows are
//! read in parts at once, each on a read connection of its own (SQLite
//! steps each on that connection's own thread) and decoded on a task of
//! its own, so both cores work on it.

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

/// Parts the container rows are read in (SQLite). More than the cores, so
/// that an uneven part does not leave one idle; no more than the read
/// connections, or parts would wait for one.
const CONTAINER_PARTS: i64 = 4;

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
        let parts = rowid_ranges(low, high, CONTAINER_PARTS)
            .into_iter()
            .map(|range| tokio::spawn(read_container_range(path.to_owned(), range)));
        let mut containers = Vec::new();
        let mut unreadable = Vec::new();
        for part in futures::future::join_all(parts).await {
            let (read, skipped) = part
                .map_err(|e| StoreError::Internal(format!("reading the container rows: {e}")))??;
            containers.extend(read);
            unreadable.extend(skipped);
        }
        Ok((containers, unreadable))
    }
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
    use super::rowid_ranges;

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
