//! Uploads owed on release: a release whose upload failed leaves its
//! container held, and the upload is retried with backoff (across
//! restarts, from the database) until it succeeds or an operator settles
//! it.
//!
//! The pools ask [`Syncs`] (as their `Retention`) before destroying a
//! container, so one whose upload is owed outlives its reservation.

use std::collections::HashMap;
use std::time::Instant;

use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::sync::retry_delay;
use boilerhouse_core::{ContainerId, TenantId, WorkloadId};

use super::{Syncs, subject};
use crate::store::{PendingReleaseUpload, StoreError};

/// A container holding files whose upload is owed outlives its
/// reservation: the pools ask before destroying it.
impl crate::pools::Retention for Syncs {
    fn must_keep(&self, container: &ContainerId) -> bool {
        self.release_upload_owed(container)
    }
}

impl Syncs {
    fn owed_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ContainerId, (PendingReleaseUpload, Instant)>> {
        self.inner.owed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `container` holds files whose upload on release is owed.
    pub fn release_upload_owed(&self, container: &ContainerId) -> bool {
        self.owed_lock().contains_key(container)
    }

    /// Records that a release's upload failed; the container is held and
    /// the upload retried.
    pub async fn owe_release_upload(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        container: &ContainerRecord,
        error: &str,
    ) -> Result<(), StoreError> {
        let now = crate::clock::now();
        let pending = PendingReleaseUpload {
            container_id: container.id,
            tenant_id: tenant.clone(),
            workload_id: workload.clone(),
            since: now,
            attempts: 1,
            last_error: error.to_owned(),
        };
        self.inner
            .store
            .put_pending_release(
                pending.clone(),
                vec![
                    NewEvent::new(
                        now,
                        EventKind::SyncReleasePending,
                        format!(
                            "upload on release of {tenant}'s {workload} files failed ({error}); container {} is kept and the upload retried",
                            container.id
                        ),
                    )
                    .with_subject(subject(tenant, workload, container)),
                ],
            )
            .await?;
        self.owed_lock()
            .insert(container.id, (pending, Instant::now() + retry_delay(1)));
        Ok(())
    }

    /// Forgets an owed upload, with an event saying why.
    pub async fn settle_release_upload(
        &self,
        container: ContainerId,
        why: &str,
    ) -> Result<(), StoreError> {
        let Some((pending, _)) = self.owed_lock().get(&container).cloned() else {
            return Ok(());
        };
        let now = crate::clock::now();
        self.inner
            .store
            .clear_pending_release(
                container,
                vec![
                    NewEvent::new(
                        now,
                        EventKind::SyncReleaseSettled,
                        format!(
                            "owed upload of {}'s {} files from container {}: {why}",
                            pending.tenant_id, pending.workload_id, container
                        ),
                    )
                    .with_subject(EventSubject {
                        tenant_id: Some(pending.tenant_id.to_string()),
                        workload_id: Some(pending.workload_id.to_string()),
                        container_id: Some(container.to_string()),
                        node_id: None,
                        boost_id: None,
                    }),
                ],
            )
            .await?;
        self.owed_lock().remove(&container);
        Ok(())
    }

    /// Whether any container of `tenant`'s `workload` is owed an upload.
    pub fn owes(&self, tenant: &TenantId, workload: &WorkloadId) -> bool {
        self.owed_lock()
            .values()
            .any(|(p, _)| &p.tenant_id == tenant && &p.workload_id == workload)
    }

    /// Owed uploads whose retry time has come.
    pub fn owed_due(&self) -> Vec<PendingReleaseUpload> {
        let now = Instant::now();
        self.owed_lock()
            .values()
            .filter(|(_, next)| *next <= now)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Every owed upload.
    pub fn owed(&self) -> Vec<PendingReleaseUpload> {
        self.owed_lock().values().map(|(p, _)| p.clone()).collect()
    }

    /// A retry failed: count it and schedule the next with backoff.
    pub async fn retry_failed(&self, container: &ContainerId, error: &str) {
        let updated = {
            let mut owed = self.owed_lock();
            let Some((pending, next)) = owed.get_mut(container) else {
                return;
            };
            pending.attempts = pending.attempts.saturating_add(1);
            pending.last_error = error.to_owned();
            *next = Instant::now() + retry_delay(pending.attempts);
            pending.clone()
        };
        if let Err(e) = self
            .inner
            .store
            .put_pending_release(updated, Vec::new())
            .await
        {
            tracing::warn!(error = %e, "cannot record a failed upload retry");
        }
    }
}
