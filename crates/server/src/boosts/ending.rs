//! Ending boosts: an operator's release, and expiry (time up, or the
//! container gone). Each ends the boost in the database first and then
//! restores the limits it raised.

use std::collections::HashSet;

use boilerhouse_core::BoostId;
use boilerhouse_core::boost::{self, Boost, BoostStatus};
use boilerhouse_core::units::format_duration;

use super::{BoostError, Boosts, end_into};
use crate::store::{BoostWrite, StoreError};

impl Boosts {
    /// Ends a live boost at an operator's request and restores its
    /// container's limits.
    pub async fn release(&self, id: &BoostId) -> Result<Boost, BoostError> {
        let inner = &self.inner;
        let guard = inner.admission.lock().await;
        let Some(b) = inner.ledger.get(id) else {
            return match inner.store.get_boost(id).await? {
                Some(b) => Err(BoostError::Precondition(format!(
                    "boost {id} already ended: {} ({})",
                    b.status, b.reason
                ))),
                None => Err(BoostError::NotFound(format!("boost {id} not found"))),
            };
        };
        let now = self.now();
        let mut write = BoostWrite::default();
        let reason = "released by an operator".into();
        end_into(&mut write, b, BoostStatus::Released, reason, now);
        let b = write.boosts[0].clone();
        inner.store.apply_boost_write(write).await?;
        inner.ledger.put(b.clone());
        drop(guard);
        if b.raises_container_limits()
            && let Some(c) = b.container_id
            && let Err(e) = self.enforce(c).await
        {
            tracing::warn!(boost = %b.id, container = %c, error = %e, "limits not restored yet; retrying in the background");
        }
        Ok(b)
    }

    /// Ends boosts whose time is up and container boosts whose container
    /// is gone, then restores the limits they raised. Returns how many
    /// ended.
    pub async fn expire(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let guard = inner.admission.lock().await;
        let now = self.now();
        let live = inner.ledger.live();
        let due: HashSet<BoostId> = boost::due(&live, now).into_iter().collect();
        let mut write = BoostWrite::default();
        let mut lags = Vec::new();
        for b in live {
            if due.contains(&b.id) {
                lags.push(now.saturating_since(b.expires_at));
                let reason = format!("expired after {}", format_duration(b.duration()));
                end_into(&mut write, b, BoostStatus::Expired, reason, now);
            } else if let Some(c) = b.container_id
                && inner.pools.container(&c).is_none()
            {
                let reason = format!("released: container {c} was destroyed");
                end_into(&mut write, b, BoostStatus::Released, reason, now);
            }
        }
        if write.boosts.is_empty() {
            return Ok(0);
        }
        let ended = write.boosts.clone();
        inner.store.apply_boost_write(write).await?;
        for b in &ended {
            inner.ledger.put(b.clone());
        }
        drop(guard);
        inner.ledger.record_expiry_lags(lags);
        for b in ended.iter().filter(|b| b.raises_container_limits()) {
            if let Some(c) = b.container_id
                && inner.pools.container(&c).is_some()
            {
                self.spawn_enforce(c);
            }
        }
        Ok(ended.len())
    }
}
