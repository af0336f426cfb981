//! Reservations: a released container kept for its tenant until it claims
//! again (AFFINITY), the reservation expires, or an operator revokes it.
//! Its container is destroyed when the reservation ends, never offered to
//! anyone else.

use std::time::Duration;

use boilerhouse_core::pool::Reservation;
use boilerhouse_core::pool::decide::{self, Refusal, ReservationEnd};
use boilerhouse_core::{ContainerId, TenantId, WorkloadId};

use super::{PoolError, Pools};

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
                index, tenant, workload, by, now,
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
    /// kept. Also run once at startup, before the API opens, for
    /// reservations that expired during downtime.
    pub async fn expire_reservations(&self) -> Result<usize, PoolError> {
        let now = crate::clock::now();
        let expired: Vec<Reservation> = self.read(|index| {
            index
                .reservations()
                .filter(|r| r.expires_at <= now && !self.retained(&r.container_id))
                .cloned()
                .collect()
        });
        let mut ended = 0;
        for r in expired {
            match self
                .end_reservation(&r.tenant_id, &r.workload_id, ReservationEnd::Expired)
                .await
            {
                Ok(_) => ended += 1,
                // Claimed back, revoked or retained meanwhile.
                Err(PoolError::Refused(why)) => {
                    tracing::debug!(tenant = %r.tenant_id, %why, "reservation not expired")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(ended)
    }
}
