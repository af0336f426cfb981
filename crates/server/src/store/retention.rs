//! Retention of what has ended, so that neither the database nor a
//! restart's reading grows with a day of churn: released and lost claims,
//! ended boosts, finished sync status of tenants that hold nothing, lost
//! nodes with nothing left on them.
//!
//! Deletes go in batches of [`BATCH`] rows, each its own transaction
//! through the writer: a trim never holds the group commit for longer
//! than one batch, so claims go on between batches.
//!
//! What is kept whatever its age, and why:
//! - the newest claim of a container that still has a row: its generation
//!   is the fencing token the next claim of that container must exceed,
//!   and adoption reads the tenant from it;
//! - sync status of a tenant with a claim, a reservation or an owed
//!   release upload, and any sync status that is pending, running or in
//!   error: an operator needs to see those;
//! - a node with a container row, or not lost.

use futures::FutureExt as _;

use boilerhouse_core::Timestamp;

use super::sql;
use super::{Store, StoreError};

/// Rows per transaction.
pub const BATCH: i64 = 2_000;

/// Claims ended before the cutoff, except the newest of a container
/// that still has a row.
const CLAIMS: &str = "DELETE FROM claims WHERE claim_id IN ( \
     SELECT c.claim_id FROM claims c \
     WHERE c.status <> 'active' AND c.released_at < ? \
       AND (NOT EXISTS (SELECT 1 FROM containers k WHERE k.container_id = c.container_id) \
            OR c.generation < (SELECT MAX(m.generation) FROM claims m WHERE m.container_id = c.container_id)) \
     LIMIT ?)";

const BOOSTS: &str = "DELETE FROM boosts WHERE boost_id IN ( \
     SELECT boost_id FROM boosts \
     WHERE status IN ('released', 'expired', 'preempted', 'failed') AND COALESCE(ended_at, expires_at) < ? \
     LIMIT ?)";

/// A tenant "holds something" of a workload while it has an active claim,
/// a reservation or an owed release upload there.
const SYNC_STATUS: &str = "DELETE FROM sync_status WHERE (tenant_id, workload_id, sync_id) IN ( \
     SELECT s.tenant_id, s.workload_id, s.sync_id FROM sync_status s \
     WHERE s.updated_at < ? AND s.state IN ('idle', 'ok', 'warning') \
       AND NOT EXISTS (SELECT 1 FROM claims c WHERE c.tenant_id = s.tenant_id \
                       AND c.workload_id = s.workload_id AND c.status = 'active') \
       AND NOT EXISTS (SELECT 1 FROM affinity_reservations r WHERE r.tenant_id = s.tenant_id \
                       AND r.workload_id = s.workload_id) \
       AND NOT EXISTS (SELECT 1 FROM sync_release_pending p WHERE p.tenant_id = s.tenant_id \
                       AND p.workload_id = s.workload_id) \
     LIMIT ?)";

/// Errors of sync status rows that are gone.
const SYNC_ERRORS: &str = "DELETE FROM sync_errors WHERE id IN ( \
     SELECT e.id FROM sync_errors e WHERE e.at < ? AND NOT EXISTS ( \
       SELECT 1 FROM sync_status s WHERE s.tenant_id = e.tenant_id \
       AND s.workload_id = e.workload_id AND s.sync_id = e.sync_id) \
     LIMIT ?)";

const NODES: &str = "DELETE FROM nodes WHERE node_id IN ( \
     SELECT n.node_id FROM nodes n WHERE n.status = 'lost' AND n.last_heartbeat_at < ? \
       AND NOT EXISTS (SELECT 1 FROM containers k WHERE k.node_id = n.node_id) \
     LIMIT ?)";

/// How many rows one trim removed, by table.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Trimmed {
    pub claims: u64,
    pub boosts: u64,
    pub sync_status: u64,
    pub sync_errors: u64,
    pub nodes: u64,
}

impl Store {
    /// Removes what ended before `before`, in batches.
    pub async fn trim_history(&self, before: Timestamp) -> Result<Trimmed, StoreError> {
        let cutoff = before.as_millis();
        let trimmed = Trimmed {
            claims: self.delete_in_batches(CLAIMS, cutoff).await?,
            boosts: self.delete_in_batches(BOOSTS, cutoff).await?,
            sync_status: self.delete_in_batches(SYNC_STATUS, cutoff).await?,
            sync_errors: self.delete_in_batches(SYNC_ERRORS, cutoff).await?,
            nodes: self.delete_in_batches(NODES, cutoff).await?,
        };
        if trimmed.nodes > 0 {
            self.node_list.invalidate();
        }
        Ok(trimmed)
    }

    /// Runs `statement` (binds: the cutoff, then the batch size) until a
    /// batch deletes fewer than [`BATCH`] rows.
    pub(super) async fn delete_in_batches(
        &self,
        statement: &str,
        cutoff: i64,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let statement = statement.to_owned();
            let deleted = self
                .writer
                .write(move |tx| {
                    async move {
                        let done = sql::query(&statement)
                            .bind(cutoff)
                            .bind(BATCH)
                            .execute(tx.conn())
                            .await?;
                        Ok(done.rows_affected())
                    }
                    .boxed()
                })
                .await?;
            total += deleted;
            if deleted < BATCH as u64 {
                return Ok(total);
            }
            // Let the claims queued behind this batch through first.
            tokio::task::yield_now().await;
        }
    }
}
