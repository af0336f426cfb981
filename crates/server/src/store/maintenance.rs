//! Background upkeep of the store: trimming the activity log, expired
//! request ids, what has ended (`retention`) and (PostgreSQL) the change feed's tombstones, and checkpointing the WAL outside the write path.

use std::time::Duration;

use futures::future::BoxFuture;

use super::Store;
use crate::tasks::BackgroundTask;

/// Trims the activity log, expired idempotency keys and old tombstones.
pub struct TrimTask {
    /// The store.
    pub store: Store,
    /// How long events are kept (the newest are kept anyway).
    pub event_retention: Duration,
    /// How long request ids are remembered.
    pub idempotency_retention: Duration,
    /// How long ended claims, boosts, sync status and lost nodes are kept
    /// (see [`super::retention`]).
    pub history_retention: Duration,
    /// Whether the whole database has passed its integrity check
    /// (`database::Opened::whole_checked`). The trim decides what to delete
    /// through indexes of the container rows, which startup checks whole
    /// only after it serves: it waits for that, or an index that disagrees
    /// with its table could delete history that must stay.
    pub whole_checked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Keeps the WAL short outside the write path.
pub struct CheckpointTask(pub Store);

/// How often [`CheckpointTask`] copies the WAL into the file. A copy ends
/// in an fsync of the file, which the writer's fsync of the WAL then waits
/// behind: the more it copies, the longer the claims committing meanwhile
/// wait. Every second, at 1,000 claims/s, that made p99.9 30–40 ms and
/// p99 5–12 ms; every 200 ms, 7–9 ms and 3–4 ms, with the same throughput
/// at the limit (docs/BENCHMARKS.md, P3). With nothing to copy a run only
/// reads the WAL's header.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

impl BackgroundTask for CheckpointTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let remaining = self.0.checkpoint().await?;
            Ok(serde_json::json!({ "wal_pages_remaining": remaining }))
        })
    }
}

/// How long a trim waits for the database's whole integrity check before
/// it skips its run.
const WHOLE_CHECK_WAIT: Duration = Duration::from_secs(60);

/// The newest events are kept even when old, so a quiet system still shows
/// its recent history.
const EVENTS_ALWAYS_KEPT: u64 = 10_000;

impl BackgroundTask for TrimTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            // The first run comes at startup, before the whole check has
            // passed: it waits for it (0.3 s to a few seconds), or a server
            // restarted more often than the trim's period would never trim.
            let deadline = tokio::time::Instant::now() + WHOLE_CHECK_WAIT;
            while !self
                .whole_checked
                .load(std::sync::atomic::Ordering::Acquire)
            {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(serde_json::json!({
                        "skipped": "the database's whole integrity check had not passed yet; the next run trims"
                    }));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let now = crate::clock::now();
            let events = self
                .store
                .trim_events(cutoff(now, self.event_retention), EVENTS_ALWAYS_KEPT)
                .await?;
            let keys = self
                .store
                .trim_idempotency_keys(cutoff(now, self.idempotency_retention))
                .await?;
            let history = self
                .store
                .trim_history(cutoff(now, self.history_retention))
                .await?;
            // PostgreSQL: deleted rows' tombstones, which standbys read.
            // Last, so that the rows trimmed above leave theirs first.
            let tombstones = self.store.trim_tombstones().await?;
            Ok(serde_json::json!({
                "events_trimmed": events,
                "idempotency_keys_trimmed": keys,
                "history_trimmed": history,
                "tombstones_trimmed": tombstones,
            }))
        })
    }
}

fn cutoff(now: boilerhouse_core::Timestamp, retention: Duration) -> boilerhouse_core::Timestamp {
    boilerhouse_core::Timestamp::from_millis(
        now.as_millis()
            .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX)),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// The trim's first run waits for the whole integrity check and then
    /// trims; a check that never passes makes it skip the run, saying so.
    #[tokio::test]
    async fn the_trim_waits_for_the_whole_check_then_trims() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path().join("t.db"),
            super::super::StoreOptions::default(),
        )
        .await
        .unwrap();
        let whole_checked = Arc::new(AtomicBool::new(false));
        let mut trim = TrimTask {
            store: store.clone(),
            event_retention: Duration::from_secs(60),
            idempotency_retention: Duration::from_secs(60),
            history_retention: Duration::from_secs(60),
            whole_checked: whole_checked.clone(),
        };
        let setter = {
            let flag = whole_checked.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                flag.store(true, Ordering::Release);
            })
        };
        let ran = trim.activate().await.unwrap();
        setter.await.unwrap();
        assert!(ran.get("events_trimmed").is_some(), "{ran}");

        whole_checked.store(false, Ordering::Release);
        tokio::time::pause();
        let skipped = trim.activate().await.unwrap();
        assert!(skipped.get("skipped").is_some(), "{skipped}");
        store.close().await;
    }
}
