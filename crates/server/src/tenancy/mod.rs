//! The claim flow as a tenant sees it: a claim restores the tenant's files
//! before it answers, a release uploads them before the container is kept
//! or destroyed, and whatever ends a container settles the upload it was
//! owed. It sits above both the pools (which know nothing of files) and
//! the syncs (which know nothing of claims), and is the only module that
//! calls both.
//!
//! Every operation takes the tenant's lock for the workload, so a claim, a
//! release and the idle reaper of one tenant never interleave.

mod reaper;

pub use reaper::IdleReaper;

use std::time::Duration;

use boilerhouse_core::idempotency::IdempotentRecord;
use boilerhouse_core::pool::decide::{DrainScope, Refusal, ReservationEnd};
use boilerhouse_core::pool::{ClaimRecord, ClaimSource, ContainerRecord, Reservation};
use boilerhouse_core::workload::OnClaimError;
use boilerhouse_core::{ContainerId, TenantId, WorkloadId};

use crate::pools::claims::{Keep, Release};
use crate::pools::{Granted, PoolError, Pools};
use crate::syncs::{Phase, SyncReason, Syncs, runs_in};

/// Claims and releases with the tenant's files.
#[derive(Clone)]
pub struct Tenancy {
    /// The pools.
    pub pools: Pools,
    /// The syncs.
    pub syncs: Syncs,
}

/// What the restore on claim did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restore {
    /// Files of the tenant's were restored into the container: the claim
    /// is `*_WITH_DATA`. A restore that found nothing to restore is not.
    pub restored: bool,
    /// What it could not do, though the claim was granted.
    pub warning: Option<String>,
}

/// Builds the record of a request id from a claim's answer: the claim,
/// how it was made, and what its restore did.
pub type ClaimRecorder<'a> =
    &'a (dyn Fn(&Granted, ClaimSource, &Restore) -> Option<IdempotentRecord> + Sync);

impl Tenancy {
    /// Claims a container for `tenant`, restoring its files first when the
    /// workload syncs on claim. Returns the claim, how it was made, and
    /// whether files were restored. A claim whose restore fails is not
    /// granted (unless the workload says `on_claim_error: continue`): its
    /// container is released again, kept for the tenant as configured, and
    /// the request id records nothing, so a retry tries again.
    pub async fn claim(
        &self,
        tenant: &TenantId,
        workload_id: &WorkloadId,
        acquire_timeout: Option<Duration>,
        record: ClaimRecorder<'_>,
    ) -> Result<(Granted, ClaimSource, Restore), PoolError> {
        let workload = self.pools.workload_record(workload_id).await?;
        let restore = workload
            .spec
            .sync
            .as_ref()
            .is_some_and(|s| s.policy.on_claim && runs_in(s, Phase::Download));
        let guard = self.pools.lock_tenant(tenant, workload_id).await;
        // Without a restore to run first, the answer is known now and its
        // record commits with the claim.
        let at_grant = |g: &Granted, source: ClaimSource| {
            (source == ClaimSource::Existing || !restore)
                .then(|| record(g, source, &Restore::default()))
                .flatten()
        };
        let (granted, source) = self
            .pools
            .claim_locked(&guard, tenant, &workload, acquire_timeout, Some(&at_grant))
            .await?;
        // Its tenant has it back with files newer than the sink's (their
        // upload failed): they are in use again and go up with the next
        // release, and no restore may overwrite them with older ones.
        let holds_newest = source == ClaimSource::Affinity
            && self.syncs.release_upload_owed(&granted.container.id);
        if holds_newest {
            self.syncs
                .settle_release_upload(
                    granted.container.id,
                    "no longer owed: claimed again by its tenant",
                )
                .await?;
        }
        if source == ClaimSource::Existing || !restore {
            return Ok((granted, source, Restore::default()));
        }
        if holds_newest {
            if let Some(r) = record(&granted, source, &Restore::default()) {
                self.pools.record(r).await?;
            }
            return Ok((granted, source, Restore::default()));
        }
        let run = self
            .syncs
            .run(
                tenant,
                &workload,
                &granted.container,
                Phase::Download,
                None,
                SyncReason::Claim,
            )
            .await;
        let outcome = Restore {
            restored: run.ok() && run.downloaded > 0,
            warning: (!run.warnings.is_empty()).then(|| run.warnings.join("; ")),
        };
        let policy = workload.spec.sync.as_ref().map(|s| s.policy.on_claim_error);
        if let Some(e) = run.error
            && policy != Some(OnClaimError::Continue)
        {
            // Nothing is uploaded from it: it lacks the tenant's files.
            self.pools
                .release_locked(
                    &guard,
                    tenant,
                    workload_id,
                    Release {
                        generation: Some(granted.claim.generation),
                        keep: Keep::AsConfigured,
                        reason: "restoring the tenant's files failed",
                        idempotency: None,
                    },
                )
                .await?;
            return Err(PoolError::Unavailable(format!(
                "cannot restore {tenant}'s files for {workload_id} into container {}: {e}; \
                 the claim was not granted (retry, or set sync.policy.on_claim_error: continue to claim without them)",
                granted.container.id
            )));
        }
        let restored_claim = outcome.restored.then_some(granted.claim.claim_id.as_str());
        let answer = record(&granted, source, &outcome);
        if restored_claim.is_some() || answer.is_some() {
            self.pools.record_restore(restored_claim, answer).await?;
        }
        Ok((granted, source, outcome))
    }

    /// Releases the tenant's claim (with `generation`, only that one),
    /// uploading its files first when the workload syncs on release. If
    /// the upload fails the container is kept for the tenant, whatever
    /// `reuse` says, and the upload is retried until it succeeds: the
    /// tenant's newest files are never destroyed.
    pub async fn release(
        &self,
        tenant: &TenantId,
        workload_id: &WorkloadId,
        generation: Option<u64>,
        reason: &str,
        idempotency: Option<IdempotentRecord>,
    ) -> Result<(ClaimRecord, Option<Reservation>), PoolError> {
        self.release_unless_active(tenant, workload_id, generation, reason, idempotency, None)
            .await
    }

    /// [`Self::release`], refused if the claim saw activity after
    /// `idle_since` (checked under the tenant's lock: the idle reaper's
    /// view may be minutes old by the time its turn comes).
    pub(crate) async fn release_unless_active(
        &self,
        tenant: &TenantId,
        workload_id: &WorkloadId,
        generation: Option<u64>,
        reason: &str,
        idempotency: Option<IdempotentRecord>,
        idle_since: Option<boilerhouse_core::Timestamp>,
    ) -> Result<(ClaimRecord, Option<Reservation>), PoolError> {
        let guard = self.pools.lock_tenant(tenant, workload_id).await;
        let held = self
            .pools
            .active_claim(tenant, workload_id)
            .ok_or_else(|| Refusal::NoClaim(tenant.clone(), workload_id.clone()))?;
        if idle_since.is_some_and(|t| held.claim.last_activity_at > t) {
            return Err(Refusal::Precondition(format!(
                "{tenant}'s claim of {workload_id} is in use again"
            ))
            .into());
        }
        if let Some(given) = generation.filter(|g| *g != held.claim.generation) {
            return Err(Refusal::StaleGeneration {
                given,
                current: held.claim.generation,
            }
            .into());
        }
        let mut keep = Keep::AsConfigured;
        let workload = self.pools.workload_record(workload_id).await.ok();
        if let Some(w) = &workload
            && w.spec
                .sync
                .as_ref()
                .is_some_and(|s| s.policy.on_release && runs_in(s, Phase::Upload))
        {
            let run = self
                .syncs
                .run(
                    tenant,
                    w,
                    &held.container,
                    Phase::Upload,
                    None,
                    SyncReason::Release,
                )
                .await;
            if let Some(e) = run.error {
                // Recorded before the release commits: a crash in between
                // leaves an owed upload on a claimed container, which is
                // harmless, never a released container nobody will upload.
                self.syncs
                    .owe_release_upload(tenant, workload_id, &held.container, &e)
                    .await?;
                keep = Keep::Hold;
            }
        }
        self.pools
            .release_locked(
                &guard,
                tenant,
                workload_id,
                Release {
                    generation: Some(held.claim.generation),
                    keep,
                    reason,
                    idempotency,
                },
            )
            .await
    }

    /// An operator ends a reservation now. Files whose upload was still
    /// owed are given up, and the event says so.
    pub async fn revoke(
        &self,
        tenant: &TenantId,
        workload_id: &WorkloadId,
    ) -> Result<Reservation, PoolError> {
        let _guard = self.pools.lock_tenant(tenant, workload_id).await;
        let reservation = self
            .pools
            .reservations()
            .into_iter()
            .find(|r| &r.tenant_id == tenant && &r.workload_id == workload_id)
            .ok_or_else(|| Refusal::NoReservation(tenant.clone(), workload_id.clone()))?;
        let ended = self
            .pools
            .end_reservation(tenant, workload_id, ReservationEnd::Revoked)
            .await?;
        self.settle(
            reservation.container_id,
            "abandoned: the reservation was revoked by an operator",
        )
        .await?;
        Ok(ended)
    }

    /// An operator destroys a container. A claimed one needs `force`, and
    /// its claim becomes LOST; files whose upload was owed are given up.
    pub async fn destroy(
        &self,
        id: &ContainerId,
        force: bool,
        reason: &str,
    ) -> Result<ContainerRecord, PoolError> {
        let scope = if force {
            DrainScope::Any
        } else {
            DrainScope::Unclaimed
        };
        let container = self.pools.drain(id, scope, reason).await?;
        self.settle(
            *id,
            &format!("abandoned: the container was destroyed ({reason})"),
        )
        .await?;
        Ok(container)
    }

    async fn settle(&self, container: ContainerId, why: &str) -> Result<(), PoolError> {
        if self.syncs.release_upload_owed(&container) {
            self.syncs.settle_release_upload(container, why).await?;
        }
        Ok(())
    }
}
