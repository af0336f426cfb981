//! Final uploads: every claimed container's files uploaded at once,
//! under a deadline, when the server shuts down gracefully or a node is
//! drained.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Phase, SyncReason, Syncs, runs_in};

/// What a round of final uploads did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FinalUploads {
    /// Containers whose files all reached the sink.
    pub ok: usize,
    /// Containers whose upload failed.
    pub failed: usize,
    /// Containers still uploading at the deadline.
    pub unfinished: usize,
}

/// Uploads the files of every claimed container (on `node`, if given)
/// whose workload syncs, all at once, giving up at `deadline`. Used by
/// graceful shutdown and node drain.
pub async fn final_uploads(
    syncs: &Syncs,
    pools: &crate::pools::Pools,
    reason: SyncReason,
    node: Option<&boilerhouse_core::NodeId>,
    deadline: Duration,
) -> FinalUploads {
    let mut jobs = Vec::new();
    for granted in pools.active_claims() {
        if node.is_some_and(|n| n != &granted.container.node_id) {
            continue;
        }
        let Ok(workload) = pools.workload_record(&granted.claim.workload_id).await else {
            continue;
        };
        if !workload
            .spec
            .sync
            .as_ref()
            .is_some_and(|s| runs_in(s, Phase::Upload))
        {
            continue;
        }
        let syncs = syncs.clone();
        jobs.push(async move {
            syncs
                .run(
                    &granted.claim.tenant_id,
                    &workload,
                    &granted.container,
                    Phase::Upload,
                    None,
                    reason,
                )
                .await
                .ok()
        });
    }
    let total = jobs.len();
    let done = Arc::new(Mutex::new(Vec::new()));
    let collect = {
        let done = done.clone();
        futures::future::join_all(jobs.into_iter().map(move |job| {
            let done = done.clone();
            async move {
                let ok = job.await;
                done.lock().unwrap_or_else(|e| e.into_inner()).push(ok);
            }
        }))
    };
    let _ = tokio::time::timeout(deadline, collect).await;
    let done = done.lock().unwrap_or_else(|e| e.into_inner());
    let ok = done.iter().filter(|ok| **ok).count();
    FinalUploads {
        ok,
        failed: done.len() - ok,
        unfinished: total - done.len(),
    }
}
