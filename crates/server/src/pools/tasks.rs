//! The pool controllers, as background tasks: the refiller (resends lost
//! creates, promotes ready containers, removes draining ones, fills pools)
//! and affinity expiry. Each reads the current state itself on every run.
//! The idle reaper releases with the tenant's files, so it lives with the
//! claim flow in `crate::tenancy`.

use futures::future::BoxFuture;

use super::Pools;
use crate::tasks::BackgroundTask;

/// Keeps every pool at min_size idle containers.
pub struct Refiller(pub Pools);

impl BackgroundTask for Refiller {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let pools = &self.0;
            let workloads = pools.inner.store.list_workloads().await?;
            pools.refresh_workloads(&workloads);
            let resent = pools.resend_unfinished_creates(&workloads).await?;
            let promoted = pools.promote_ready(&workloads).await;
            let unhealthy = pools.replace_unhealthy().await;
            let (removing, removal_waits_for_agent) = pools.remove_draining();
            let created = pools.fill(&workloads).await?;
            Ok(serde_json::json!({
                "promoted": promoted,
                "creating": created,
                "removing": removing,
                "removal_waits_for_agent": removal_waits_for_agent,
                "resent": resent,
                "unhealthy": unhealthy,
            }))
        })
    }
}

/// Destroys containers whose reservation expired.
pub struct AffinityExpiry(pub Pools);

impl BackgroundTask for AffinityExpiry {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let expired = self.0.expire_reservations().await?;
            Ok(serde_json::json!({ "expired": expired }))
        })
    }
}
