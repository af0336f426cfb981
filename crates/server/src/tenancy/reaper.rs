//! The idle reaper: releases claims idle for longer than their workload's
//! idle_timeout, with the upload a release does.

use std::collections::HashMap;

use boilerhouse_core::WorkloadId;
use futures::future::BoxFuture;

use super::Tenancy;
use crate::tasks::BackgroundTask;

/// Releases claims idle past their workload's idle_timeout.
pub struct IdleReaper(pub Tenancy);

impl Tenancy {
    /// Releases every claim idle past its workload's idle_timeout. Each is
    /// released with the generation it was seen at, so a claim made anew
    /// meanwhile is never released in its place.
    pub async fn reap_idle(&self) -> anyhow::Result<usize> {
        let now = crate::clock::now();
        let mut released = 0;
        let unsettled = self.pools.unsettled_nodes();
        // Each pool's idle timeout: a few lookups, not one per claim.
        let pools: Vec<WorkloadId> = self
            .pools
            .read(|index| index.pools().map(|(pool, _)| pool.clone()).collect());
        let mut timeouts = HashMap::new();
        for pool in pools {
            if let Ok(workload) = self.pools.workload_record(&pool).await
                && let Some(timeout) = workload.spec.pool.idle_timeout
            {
                timeouts.insert(pool, timeout);
            }
        }
        for claim in self.pools.idle_claims(&timeouts, now) {
            // Activity on a node that cannot be reached is not seen; its
            // agent keeps it and reports it once back and reconciled, so
            // its silence is not the tenant's idleness.
            if unsettled.contains(&claim.node_id) {
                continue;
            }
            let reason = format!("idle since {}", claim.last_activity_at);
            match self
                .release_unless_active(
                    &claim.tenant_id,
                    &claim.workload_id,
                    Some(claim.generation),
                    &reason,
                    None,
                    Some(claim.last_activity_at),
                )
                .await
            {
                Ok(_) => {
                    released += 1;
                    tracing::info!(tenant = %claim.tenant_id, workload = %claim.workload_id, "released an idle claim");
                }
                Err(e) => {
                    tracing::warn!(tenant = %claim.tenant_id, error = %e, "cannot release an idle claim")
                }
            }
        }
        Ok(released)
    }
}

impl BackgroundTask for IdleReaper {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let flushed = self.0.pools.flush_activity().await?;
            let released = self.0.reap_idle().await?;
            Ok(serde_json::json!({ "released": released, "activity_flushed": flushed }))
        })
    }
}
