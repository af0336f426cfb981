//! Claims at the pool level: choosing and granting a container, releasing
//! it, and tenant activity. Restores and uploads are not done here: the
//! claim flow in `crate::tenancy` wraps these with the tenant's files.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use boilerhouse_core::idempotency::IdempotentRecord;
use boilerhouse_core::pool::decide::{self, AfterRelease, Choice, Refusal};
use boilerhouse_core::pool::write::PoolWrite;
use boilerhouse_core::pool::{ClaimRecord, ClaimSource, Reservation};
use boilerhouse_core::workload::WorkloadRecord;
use boilerhouse_core::{NodeId, TenantId, Timestamp, WorkloadId};

use super::{Granted, PoolError, Pools, TenantGuard};
use crate::store::StoreError;

/// Builds the record of a request id from the decision it answers, so it
/// commits with the claim.
pub type Recorder<'a> = &'a (dyn Fn(&Granted, ClaimSource) -> Option<IdempotentRecord> + Sync);

/// What a release does with the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// As the workload says: reserved for `affinity_timeout` if it reuses
    /// containers, else destroyed.
    AsConfigured,
    /// Reserved whatever the workload says: the tenant's newest files are
    /// only in it (a failed upload, or a restore that did not run).
    Hold,
}

/// How to release a claim.
#[derive(Debug, Clone)]
pub struct Release<'a> {
    /// Only the claim of this generation (a fencing token), if given.
    pub generation: Option<u64>,
    /// What becomes of the container.
    pub keep: Keep,
    /// Why, for the event.
    pub reason: &'a str,
    /// The request id's record, committed with the release.
    pub idempotency: Option<IdempotentRecord>,
}

/// A claim decided on one view of the index.
enum Decided {
    Existing(Granted),
    /// An affinity claim, granted under the lock. Its container is not
    /// marked busy: it is reserved for this tenant, whose lock the caller
    /// holds, and anything else that changes it meanwhile (the
    /// reservation's expiry, a drain) makes this write a conflict.
    Affinity(
        (
            PoolWrite,
            ClaimRecord,
            boilerhouse_core::pool::ContainerRecord,
        ),
    ),
    /// An idle container, marked busy: granted after the index's lock is
    /// let go, with the reservation it supersedes and that reservation's
    /// container as the view had them.
    Pool(
        boilerhouse_core::pool::ContainerRecord,
        Option<(Reservation, Option<boilerhouse_core::pool::ContainerRecord>)>,
    ),
    Cold(Option<Reservation>),
    /// The tenant's reservation is on a node whose agent has reconnected
    /// and not yet been reconciled: the container is very likely there
    /// and the tenant's; wait for the node rather than end it.
    AwaitNode(NodeId),
    /// The tenant's reservation is past its expiry: end it first.
    Expired,
}

fn claim_id() -> String {
    boilerhouse_core::ids::Uuid::now_v7().to_string()
}

impl Pools {
    /// Claims a container of `workload` for `tenant`: its existing claim,
    /// its reservation, an idle container, or a cold start, in that order.
    /// With `recorder`, the request id's record commits with the claim.
    pub async fn claim_locked(
        &self,
        _lock: &TenantGuard<'_>,
        tenant: &TenantId,
        workload: &WorkloadRecord,
        acquire_timeout: Option<Duration>,
        recorder: Option<Recorder<'_>>,
    ) -> Result<(Granted, ClaimSource), PoolError> {
        let workload_id = &workload.spec.id;
        let deadline =
            Instant::now() + acquire_timeout.unwrap_or(self.inner.config.acquire_timeout);
        // Each conflict means another change committed first; decide again
        // on the newer state, a bounded number of times. A wait for a
        // reconnected node's reconciliation is no conflict: the deadline
        // bounds those (after a restart a claim may wake several times as
        // nodes come back and other claims take their idle containers).
        // A node whose agent just (re)connected offers nothing until its
        // first report is reconciled: the database may be older than what
        // runs there (a restored backup), and reconciliation is what sets
        // such containers aside.
        let mut unreconciled = self.unreconciled();
        let mut stale_views = 0;
        while stale_views < 8 {
            let mut now = crate::clock::now();
            // Choose on one view of the index. A pool container is marked
            // busy in the same breath, so concurrent claims pass it by
            // instead of colliding on it; its write is built after the
            // lock is let go, conditional on the rows as seen here.
            let decided = 'decide: {
                let mut state = self.state();
                let super::State {
                    index, inflight, ..
                } = &mut *state;
                let taken = |id: &boilerhouse_core::ContainerId| inflight.busy.contains(id);
                let offerable = |c: &boilerhouse_core::pool::ContainerRecord| {
                    self.node_live(&c.node_id, now) && !unreconciled.contains(&c.node_id)
                };
                // A reservation past its expiry is never claimed through:
                // it ends here as the expiry task would end it (container
                // destroyed, `affinity.expired`), whichever comes first.
                // So the task's first pass after a restart, over what
                // expired during the downtime, runs beside serving.
                let expired = index
                    .reservation(tenant, workload_id)
                    .is_some_and(|r| r.expires_at <= now && !self.retained(&r.container_id));
                if expired {
                    break 'decide Decided::Expired;
                }
                match decide::choose(
                    index,
                    tenant,
                    workload_id,
                    &workload.spec_hash,
                    taken,
                    offerable,
                )? {
                    Choice::Existing(claim, container) => {
                        // Claiming again is activity, as a Touch is: it
                        // resets the idle clock. Kept in memory with the
                        // activity seen on containers and flushed with it.
                        let seen = inflight
                            .activity
                            .entry(claim.claim_id.clone())
                            .or_insert(now);
                        *seen = (*seen).max(now);
                        Decided::Existing(Granted { claim, container })
                    }
                    Choice::Affinity(r, c) => Decided::Affinity(decide::grant(
                        index,
                        tenant,
                        &c,
                        ClaimSource::Affinity,
                        Some(&r),
                        None,
                        claim_id(),
                        now,
                    )?),
                    Choice::Pool(_, Some(r)) | Choice::Cold(Some(r))
                        if unreconciled.contains(&r.node_id) =>
                    {
                        Decided::AwaitNode(r.node_id.clone())
                    }
                    Choice::Pool(c, superseded) => {
                        self.check_superseded(superseded.as_ref())?;
                        // Building the write (its event's sentence, the
                        // records' copies, a claim id) was most of a
                        // claim's time under this lock, which every claim
                        // and every commit's index update takes.
                        let superseded = superseded.map(|r| {
                            let old = index.container(&r.container_id).cloned();
                            (r, old)
                        });
                        inflight.busy.insert(c.id);
                        Decided::Pool(c, superseded)
                    }
                    Choice::Cold(superseded) => {
                        self.check_superseded(superseded.as_ref())?;
                        Decided::Cold(superseded)
                    }
                }
            };
            let (grant, source, busy) = match decided {
                Decided::Expired => {
                    self.end_expired(vec![(tenant.clone(), workload_id.clone())])
                        .await?;
                    stale_views += 1;
                    continue;
                }
                Decided::Existing(granted) => {
                    if let Some(record) = recorder.and_then(|r| r(&granted, ClaimSource::Existing))
                    {
                        self.record(record).await?;
                    }
                    return Ok((granted, ClaimSource::Existing));
                }
                Decided::Affinity(grant) => (grant, ClaimSource::Affinity, None),
                Decided::Pool(c, superseded) => {
                    let busy = super::BusyGuard {
                        pools: self.clone(),
                        id: c.id,
                    };
                    let grant = decide::grant_resolved(
                        tenant,
                        &c,
                        ClaimSource::Pool,
                        None,
                        superseded.as_ref().map(|(r, old)| (r, old.as_ref())),
                        claim_id(),
                        now,
                    )?;
                    (grant, ClaimSource::Pool, Some(busy))
                }
                Decided::AwaitNode(node) => {
                    self.await_reconciled(std::slice::from_ref(&node), deadline, tenant)
                        .await?;
                    unreconciled = self.unreconciled();
                    continue;
                }
                Decided::Cold(superseded) => {
                    // The container is ours (busy) while it warms; it is
                    // granted once ready, on the state as it then is.
                    let (id, busy) = match self.cold_start(workload, deadline).await {
                        Ok(started) => started,
                        // No room for one more while idle containers sit
                        // on a node whose agent just reconnected: they are
                        // offered once its report is reconciled (well
                        // under a second after Hello), so wait for that
                        // rather than refuse. Below max_size the cold
                        // start goes ahead, as it must when such a node
                        // never settles (an agent that keeps reconnecting).
                        Err(PoolError::Exhausted(why)) => {
                            if !self.idle_awaiting_reconcile(workload_id, &unreconciled) {
                                return Err(PoolError::Exhausted(why));
                            }
                            // Any of them reconciled may offer one (or
                            // another claim takes it first, and this one
                            // waits again).
                            let nodes: Vec<NodeId> = unreconciled.iter().cloned().collect();
                            self.await_reconciled(&nodes, deadline, tenant).await?;
                            unreconciled = self.unreconciled();
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    // The claim begins when it is granted, not when the
                    // cold start began (the idle reaper counts from it).
                    now = crate::clock::now();
                    let grant = {
                        let state = self.state();
                        state.index.container(&id).cloned().map(|c| {
                            decide::grant(
                                &state.index,
                                tenant,
                                &c,
                                ClaimSource::Cold,
                                None,
                                superseded.as_ref(),
                                claim_id(),
                                now,
                            )
                        })
                    };
                    match grant {
                        Some(Ok(grant)) => (grant, ClaimSource::Cold, Some(busy)),
                        // Removed or changed while warming: start over.
                        _ => {
                            stale_views += 1;
                            continue;
                        }
                    }
                }
            };
            let (mut write, claim, claimed) = grant;
            let granted = Granted {
                claim,
                container: claimed,
            };
            write.idempotency = recorder.and_then(|r| r(&granted, source));
            let committed = self.commit(write).await;
            drop(busy);
            match committed {
                Ok(()) => {
                    self.inner.refill.notify_one();
                    self.write_state_file(&granted.container, now);
                    return Ok((granted, source));
                }
                Err(StoreError::Conflict(why)) => {
                    tracing::debug!(tenant = %tenant, %why, "claim decided on a stale view; deciding again");
                    stale_views += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(PoolError::Unavailable(format!(
            "pool {workload_id} kept changing while claiming for {tenant}; retry"
        )))
    }

    /// Waits until one of `nodes` (whose agents reconnected) has had its
    /// first report reconciled, or `deadline`. A restarted server must not
    /// end a tenant's reservation, and destroy its container, nor refuse a
    /// claim while the pool's idle containers are there, only because the
    /// node's report has not been read yet. A claim for the pool waits on
    /// every such node: after a restart a thousand come back over a second
    /// or two, reconciled a batch at a time, and it takes the first idle
    /// container offered again rather than wait for one node in particular.
    async fn await_reconciled(
        &self,
        nodes: &[NodeId],
        deadline: Instant,
        tenant: &TenantId,
    ) -> Result<(), PoolError> {
        let agents = &self.inner.agents;
        loop {
            let changed = agents.report_changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let unreconciled = self.unreconciled();
            if nodes.iter().any(|n| !unreconciled.contains(n)) {
                return Ok(());
            }
            // Reconciliation marks a report after it changed: look again
            // now and then as well as on every change.
            let wake = (Instant::now() + Duration::from_millis(100)).min(deadline);
            let _ = tokio::time::timeout_at(wake.into(), changed).await;
            if Instant::now() >= deadline {
                let named = match nodes {
                    [node] => format!("node {node}"),
                    [first, rest @ ..] => format!("node {first} (or {} more)", rest.len()),
                    [] => "a node".to_owned(),
                };
                return Err(PoolError::Unavailable(format!(
                    "{tenant}'s claim waits for {named} (its reservation, or the pool's only idle containers, are there), whose agent reconnected and has not been reconciled yet; retry shortly"
                )));
            }
        }
    }

    /// The nodes whose agents reconnected and whose first reports are not
    /// reconciled yet, as a set: a claim asks of every candidate container
    /// whether its node is one, and after a restart there are a thousand.
    fn unreconciled(&self) -> HashSet<NodeId> {
        self.inner.agents.unreconciled().into_iter().collect()
    }

    /// Whether a live node, not reconciled since its agent reconnected,
    /// holds an idle container of `workload` that no claim is taking.
    fn idle_awaiting_reconcile(
        &self,
        workload: &WorkloadId,
        unreconciled: &HashSet<NodeId>,
    ) -> bool {
        let now = crate::clock::now();
        let state = self.state();
        state.index.idle(workload).any(|c| {
            !c.used()
                && unreconciled.contains(&c.node_id)
                && self.free_on_live_node(c, &state.inflight.busy, now)
        })
    }

    /// No claim is taking `c`, and its node's agent heartbeats.
    fn free_on_live_node(
        &self,
        c: &boilerhouse_core::pool::ContainerRecord,
        busy: &std::collections::HashSet<boilerhouse_core::ContainerId>,
        now: Timestamp,
    ) -> bool {
        !busy.contains(&c.id) && self.node_live(&c.node_id, now)
    }

    /// A tenant claiming away from a reservation on an unreachable node
    /// ends it and destroys its container, unless that container holds the
    /// tenant's only copy of newer files: then the claim waits.
    fn check_superseded(&self, superseded: Option<&Reservation>) -> Result<(), PoolError> {
        match superseded {
            Some(r) if self.retained(&r.container_id) => Err(PoolError::Unavailable(format!(
                "{}'s newest files are on container {} (their upload is still owed) and node {} cannot be reached; retry when it is back",
                r.tenant_id, r.container_id, r.node_id
            ))),
            _ => Ok(()),
        }
    }

    /// Commits a request id's record on its own (a claim that was already
    /// there, or one whose restore finished).
    pub async fn record(&self, record: IdempotentRecord) -> Result<(), PoolError> {
        self.commit(PoolWrite {
            idempotency: Some(record),
            ..Default::default()
        })
        .await
        .map_err(Into::into)
    }

    /// Records, in one commit, that a claim's restore put the tenant's
    /// files into its container (so every view of the claim says
    /// `*_WITH_DATA`) and the request id's answer.
    pub async fn record_restore(
        &self,
        restored_claim: Option<&str>,
        record: Option<IdempotentRecord>,
    ) -> Result<(), PoolError> {
        let claims = restored_claim
            .map(
                |claim_id| boilerhouse_core::pool::write::ClaimChange::Restored {
                    claim_id: claim_id.to_owned(),
                },
            )
            .into_iter()
            .collect();
        self.commit(PoolWrite {
            claims,
            idempotency: record,
            ..Default::default()
        })
        .await
        .map_err(Into::into)
    }

    /// Releases the tenant's claim: the container is kept for the tenant,
    /// or destroyed, as `how.keep` says.
    pub async fn release_locked(
        &self,
        _lock: &TenantGuard<'_>,
        tenant: &TenantId,
        workload_id: &WorkloadId,
        how: Release<'_>,
    ) -> Result<(ClaimRecord, Option<Reservation>), PoolError> {
        let Release {
            generation,
            keep,
            reason,
            idempotency,
        } = how;
        // A workload deleted since the claim means the container is not
        // reused.
        let policy = self
            .workload_record(workload_id)
            .await
            .ok()
            .map(|w| (w.spec.pool.reuse, w.spec.pool.affinity_timeout));
        let now = crate::clock::now();
        let after = match (policy, keep) {
            (Some((_, timeout)), Keep::Hold) | (Some((true, timeout)), _) => {
                AfterRelease::Reserve {
                    until: now.saturating_add(timeout),
                }
            }
            (None, Keep::Hold) => AfterRelease::Reserve { until: now },
            _ => AfterRelease::Destroy,
        };
        let released = self
            .commit_decided(|index| {
                let mut r =
                    decide::release(index, tenant, workload_id, generation, after, reason, now)?;
                r.write.idempotency = idempotency.clone();
                Ok(Some((r.write.clone(), r)))
            })
            .await?
            .ok_or_else(|| Refusal::NoClaim(tenant.clone(), workload_id.clone()))?;
        if let Some(c) = &released.container {
            self.write_state_file(c, now);
        }
        self.inner.refill.notify_one();
        Ok((released.claim, released.reservation))
    }

    /// Records activity on a claim (a Touch); with a generation, checks it.
    pub async fn touch(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        generation: Option<u64>,
    ) -> Result<Timestamp, PoolError> {
        let now = crate::clock::now();
        self.commit_decided(|index| {
            Ok(Some((
                decide::touch(index, tenant, workload, generation, now)?,
                (),
            )))
        })
        .await?;
        Ok(now)
    }

    /// Records activity seen on a container (its state directory changed).
    /// Kept in memory and flushed in batches by the idle reaper; until then
    /// it is in-flight state, not part of the mirror.
    ///
    /// Returns false, and counts nothing, when the container is known on
    /// another node than the one whose agent reported the activity.
    pub fn container_activity(
        &self,
        node: &NodeId,
        container: &boilerhouse_core::ContainerId,
        at: Timestamp,
    ) -> bool {
        let mut state = self.state();
        if state
            .index
            .container(container)
            .is_some_and(|c| &c.node_id != node)
        {
            return false;
        }
        let Some(claim) = state.index.claim_on(container) else {
            return true;
        };
        let claim_id = claim.claim_id.clone();
        let newest = claim.last_activity_at.max(at);
        let seen = state.inflight.activity.entry(claim_id).or_insert(newest);
        *seen = (*seen).max(newest);
        true
    }

    /// Writes activity seen on containers to the database, so a restarted
    /// server does not reap a claim that was in use.
    pub async fn flush_activity(&self) -> Result<usize, StoreError> {
        let touches: Vec<(String, Timestamp)> = self.state().inflight.activity.drain().collect();
        if touches.is_empty() {
            return Ok(0);
        }
        let count = touches.len();
        let write = PoolWrite {
            claims: touches
                .iter()
                .map(
                    |(claim_id, at)| boilerhouse_core::pool::write::ClaimChange::Touch {
                        claim_id: claim_id.clone(),
                        at: *at,
                    },
                )
                .collect(),
            ..Default::default()
        };
        if let Err(e) = self.commit(write).await {
            // Not lost: kept for the next flush (a newer sighting wins).
            let mut state = self.state();
            for (claim_id, at) in touches {
                let seen = state.inflight.activity.entry(claim_id).or_insert(at);
                *seen = (*seen).max(at);
            }
            return Err(e);
        }
        Ok(count)
    }

    /// The active claims idle past their workload's entry in `timeouts`
    /// at `now` (activity not yet flushed counted). Filtered under the
    /// index lock, so a tick of the reaper copies only the claims it will
    /// release, not every claim.
    pub fn idle_claims(
        &self,
        timeouts: &std::collections::HashMap<WorkloadId, Duration>,
        now: Timestamp,
    ) -> Vec<ClaimRecord> {
        let state = self.state();
        state
            .index
            .claims()
            .filter(|claim| {
                timeouts.get(&claim.workload_id).is_some_and(|timeout| {
                    now.saturating_since(super::last_seen(&state, claim)) >= *timeout
                })
            })
            .map(|claim| {
                let mut claim = claim.clone();
                claim.last_activity_at = super::last_seen(&state, &claim);
                claim
            })
            .collect()
    }
}
