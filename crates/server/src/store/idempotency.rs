//! Idempotency keys for mutating RPCs.
//!
//! A client that retries after a timeout cannot know whether its first
//! attempt took effect. With a `request_id`, the retry gets the first
//! answer back instead of doing the work twice. The request is hashed so
//! that reusing an id for a different request is caught, not answered with
//! an unrelated result.

use futures::FutureExt as _;

use boilerhouse_core::Timestamp;

use super::sql;
use super::statements::{Expect, Statements};
use super::{Store, StoreError, WriteTx};

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyLookup {
    /// First time this id is seen.
    Miss,
    /// Seen with the same request: here is the stored response.
    Hit(Vec<u8>),
    /// Seen with a different request.
    Mismatch,
}

pub use boilerhouse_core::idempotency::IdempotentRecord;

/// Records a response inside the caller's transaction, so the mutation and
/// its key commit together or not at all.
pub async fn insert_idempotent(
    tx: &mut WriteTx,
    record: &IdempotentRecord,
) -> Result<(), StoreError> {
    let mut statements = Statements::default();
    push_idempotent(&mut statements, record);
    statements.run(tx).await?;
    Ok(())
}

/// Adds the record of `record` to a write's statements.
pub(super) fn push_idempotent(statements: &mut Statements, record: &IdempotentRecord) {
    statements.push(
        "INSERT INTO idempotency_keys (method, request_id, request_hash, response, created_at) \
         VALUES (?, ?, ?, ?, ?)",
        vec![
            (&record.method).into(),
            (&record.request_id).into(),
            (&record.request_hash).into(),
            (&record.response).into(),
            record.created_at.as_millis().into(),
        ],
        Expect::Anything,
    );
}

impl Store {
    /// Looks up an earlier answer for `(method, request_id)`.
    pub async fn lookup_idempotent(
        &self,
        method: &str,
        request_id: &str,
        request_hash: &str,
    ) -> Result<IdempotencyLookup, StoreError> {
        let row: Option<(String, Vec<u8>)> = sql::query_as(
            "SELECT request_hash, response FROM idempotency_keys WHERE method = ? AND request_id = ?",
        )
        .bind(method)
        .bind(request_id)
        .fetch_optional(&self.reads)
        .await?;
        Ok(match row {
            None => IdempotencyLookup::Miss,
            Some((hash, response)) if hash == request_hash => IdempotencyLookup::Hit(response),
            Some(_) => IdempotencyLookup::Mismatch,
        })
    }

    /// Remembers an answer on its own. A concurrent twin that got there
    /// first wins; the caller re-reads to return the same answer.
    pub async fn record_idempotent(&self, record: IdempotentRecord) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| async move { insert_idempotent(tx, &record).await }.boxed())
            .await
    }

    /// Forgets keys older than `before`.
    pub async fn trim_idempotency_keys(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.delete_in_batches(
            "DELETE FROM idempotency_keys WHERE (method, request_id) IN ( \
             SELECT method, request_id FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
            before.as_millis(),
        )
        .await
    }
}
