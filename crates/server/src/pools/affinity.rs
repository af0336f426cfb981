//! Reservations: a released container kept for its tenant until it claims
//! again (AFFINITY), the reservation expires, or an operator revokes it.
//! Its container is destroyed when the reservation ends, never offered to
//! anyone else.

use std::time::Duration;

use futures::StreamExt as _;

use boilerhouse_core::pool::Reservation;
use boilerhouse_core::pool::decide::{self, Refusal, ReservationEnd};
use boilerhouse_core::pool::write::PoolWrite;
use boilerhouse_core::{ContainerId, TenantId, WorkloadId};

use super::{PoolError, Pools};

/// Expired reservations ended in one write (each a reservation, a
/// container and an event)...
const EXPIRED_PER_WRITE: usize = 128;

/// ... and writes of them in flight at once, sharing commits.
const WRITES_AT_ONCE: usize = 4;

impl Pools {
    /// Pushes a reservation's expiry later.
    pub async fn extend(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        by: Duration,
    ) -> Result<Reservation, PoolError> {
        let now = crate::clock::now();
        self.commit_decided(|index| {
            Ok(Some(decide::extend_reservation(
                index,
                tenant,
                workload,
                by,
                now,
                |c| self.retained(c),
            )?))
        })
        .await?
        .ok_or_else(|| Refusal::NoReservation(tenant.clone(), workload.clone()).into())
    }

    /// Ends a reservation: its container is destroyed. An expiry never
    /// takes a container whose tenant's files are still owed upstream (see
    /// [`super::Retention`]); a revoke does, so the caller settles the owed
    /// upload first and says so.
    pub async fn end_reservation(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        why: ReservationEnd,
    ) -> Result<Reservation, PoolError> {
        let now = crate::clock::now();
        let ended = self
            .commit_decided(|index| {
                if why == ReservationEnd::Expired
                    && let Some(r) = index.reservation(tenant, workload)
                {
                    if r.expires_at > now {
                        return Err(Refusal::Precondition(format!(
                            "the reservation of {tenant} for {workload} was extended to {}",
                            r.expires_at
                        ))
                        .into());
                    }
                    if self.retained(&r.container_id) {
                        return Err(Refusal::Precondition(format!(
                            "container {} holds {tenant}'s files whose upload is still owed",
                            r.container_id
                        ))
                        .into());
                    }
                }
                Ok(Some(decide::end_reservation(
                    index, tenant, workload, why, now,
                )?))
            })
            .await?
            .ok_or_else(|| Refusal::NoReservation(tenant.clone(), workload.clone()))?;
        self.inner.refill.notify_one();
        Ok(ended)
    }

    /// Starts a reservation's full `timeout` again from now: the upload
    /// its tenant was owed has just succeeded. Only if it still reserves
    /// `container`.
    pub async fn restart_reservation(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        container: &ContainerId,
        timeout: Duration,
    ) -> Result<Reservation, PoolError> {
        let now = crate::clock::now();
        self.commit_decided(|index| {
            Ok(Some(decide::restart_reservation(
                index, tenant, workload, container, timeout, now,
            )?))
        })
        .await?
        .ok_or_else(|| Refusal::NoReservation(tenant.clone(), workload.clone()).into())
    }

    /// Ends every reservation past its expiry whose container need not be
    /// kept. The expiry task's first pass, as the server starts, ends those
    /// that expired during the downtime; it runs beside serving (44,189
    /// after a day of churn took 2.3 s), and a claim that comes to one
    /// first ends it itself (`claim_locked`).
    pub async fn expire_reservations(&self) -> Result<usize, PoolError> {
        let now = crate::clock::now();
        let expired: Vec<(TenantId, WorkloadId)> = self.read(|index| {
            index
                .reservations()
                .filter(|r| r.expires_at <= now && !self.retained(&r.container_id))
                .map(|r| (r.tenant_id.clone(), r.workload_id.clone()))
                .collect()
        });
        // Many to a write, and several writes at once: one reservation a
        // commit, the 22,739 that expired while a server was down after a
        // day of churn took 26 s of its restart.
        let chunks: Vec<Vec<(TenantId, WorkloadId)>> = expired
            .chunks(EXPIRED_PER_WRITE)
            .map(<[_]>::to_vec)
            .collect();
        let mut writes = futures::stream::iter(chunks)
            .map(|chunk| self.end_expired(chunk))
            .buffer_unordered(WRITES_AT_ONCE);
        let mut ended = 0;
        while let Some(outcome) = writes.next().await {
            ended += outcome?;
        }
        if ended > 0 {
            self.inner.refill.notify_one();
        }
        Ok(ended)
    }

    /// Ends those of `chunk` that are still reserved, expired and not
    /// retained, in one write; how many.
    pub(super) async fn end_expired(
        &self,
        chunk: Vec<(TenantId, WorkloadId)>,
    ) -> Result<usize, PoolError> {
        let ended = self
            .commit_decided(|index| {
                // Read at each decision: a retry's rows and events carry its
                // own time.
                let now = crate::clock::now();
                let mut write = PoolWrite::default();
                let mut ended = 0;
                for (tenant, workload) in &chunk {
                    // Claimed back, revoked, extended or retained meanwhile.
                    let Some(r) = index.reservation(tenant, workload) else {
                        continue;
                    };
                    if r.expires_at > now || self.retained(&r.container_id) {
                        continue;
                    }
                    // A refusal skips this one, as when each was its own
                    // write, and never the rest of the chunk.
                    match decide::end_reservation(
                        index,
                        tenant,
                        workload,
                        ReservationEnd::Expired,
                        now,
                    ) {
                        Ok((one, _)) => {
                            write.extend(one);
                            ended += 1;
                        }
                        Err(why) => {
                            tracing::debug!(%tenant, %why, "reservation not expired");
                        }
                    }
                }
                Ok((ended > 0).then_some((write, ended)))
            })
            .await?;
        Ok(ended.unwrap_or(0))
    }
}
