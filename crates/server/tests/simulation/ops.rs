//! The operations the simulation interleaves. Each decides with the same
//! `core::pool::decide` functions the server calls, on the index as it
//! now stands, and either commits at once or leaves the decision pending
//! to commit after others: a stale decision must be refused, never
//! applied over what happened meanwhile.

use std::time::Duration;

use boilerhouse_core::idempotency::IdempotentRecord;
use boilerhouse_core::pool::decide::{self, AfterRelease, Choice, DrainScope, ReservationEnd};
use boilerhouse_core::pool::write::PoolWrite;
use boilerhouse_core::pool::{ClaimSource, ContainerRecord, ContainerState};

use boilerhouse_core::{ContainerId, NodeId, TenantId, WorkloadId};
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::world::{Intent, Pending, World};

const CLAIM: &str = "sim/Claim";

impl World {
    pub(crate) fn pick_tenant(&mut self) -> TenantId {
        self.tenants.choose(&mut self.rng).unwrap().clone()
    }

    pub(crate) fn pick_workload(&mut self) -> WorkloadId {
        let ids: Vec<_> = self.workloads.keys().cloned().collect();
        ids.choose(&mut self.rng).unwrap().clone()
    }

    pub(crate) fn pick_node(&mut self) -> NodeId {
        let ids: Vec<_> = self.hosts.keys().cloned().collect();
        ids.choose(&mut self.rng).unwrap().clone()
    }

    pub(crate) fn pick_container(&mut self) -> Option<ContainerRecord> {
        let all: Vec<_> = self.read(|i| i.containers().cloned().collect());
        all.choose(&mut self.rng).cloned()
    }

    /// Commits now, or leaves the decision for later.
    pub(crate) async fn submit(&mut self, write: PoolWrite, intent: Intent) -> bool {
        if self.skip(0.3) {
            self.pending.push(Pending { write, intent });
            return false;
        }
        self.settle(write, intent).await
    }

    async fn settle(&mut self, write: PoolWrite, intent: Intent) -> bool {
        let ok = self.commit(write.clone()).await.is_ok();
        if ok
            && let Intent::Claim {
                tenant,
                workload,
                request_id: Some(request_id),
            } = &intent
        {
            let claim_id = self
                .read(|i| i.claim(tenant, workload).map(|c| c.claim_id.clone()))
                .expect("a committed claim is in the index");
            self.answered.push((
                request_id.clone(),
                tenant.clone(),
                workload.clone(),
                claim_id,
            ));
        }
        let what = match &intent {
            Intent::Claim {
                tenant, workload, ..
            } => format!("claim of {tenant}/{workload}"),
            Intent::Other(what) => (*what).to_owned(),
        };
        self.note(format!(
            "commit {what}: {}",
            if ok { "ok" } else { "conflict" }
        ));
        ok
    }

    /// Commits one pending decision, chosen at random.
    pub async fn commit_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.pending.len());
        let p = self.pending.swap_remove(i);
        self.settle(p.write, p.intent).await;
    }

    /// A tenant claims: EXISTING, AFFINITY, POOL, or a cold start, as the
    /// server's claim does, optionally with a request id whose record
    /// commits with the claim.
    pub async fn claim(&mut self) {
        let tenant = self.pick_tenant();
        let workload = self.pick_workload();
        let request_id = self
            .rng
            .random_bool(0.3)
            .then(|| format!("r{}", self.uuid().simple()));
        let now = self.now;
        // Containers an operation owns, as the server's busy set: the ones
        // warming for a cold start and, in half the claims, the ones the
        // writes not yet settled change (the server marks a POOL choice
        // busy until its write commits; the other half decide as if two
        // servers' views raced, which the writes' conditions must catch).
        let mut taken: Vec<ContainerId> = self.warming_for.keys().copied().collect();
        if self.rng.random_bool(0.5) {
            taken.extend(
                self.pending
                    .iter()
                    .flat_map(|p| p.write.containers.iter().map(|c| c.id())),
            );
        }
        let hosts = self.hosts.clone();
        let hash = self.workloads[&workload].hash.clone();
        let choice = self.read(|i| {
            decide::choose(
                i,
                &tenant,
                &workload,
                &hash,
                |id| taken.contains(id),
                |c| hosts.get(&c.node_id).is_some_and(|h| h.up),
            )
        });
        if let Ok(Choice::Pool(c, _) | Choice::Affinity(_, c)) = &choice {
            assert!(
                !taken.contains(&c.id),
                "seed {}: claim given {}, which an operation in flight owns\n{}",
                self.seed,
                c.id,
                self.trace.join("\n")
            );
        }
        // A rollout never hands out a stale container while a current one
        // is idle and offerable.
        if let Ok(Choice::Pool(c, _)) = &choice
            && c.spec_hash != hash
        {
            let current_idle = self.read(|i| {
                i.idle(&workload)
                    .filter(|o| o.spec_hash == hash && !o.used())
                    .filter(|o| hosts.get(&o.node_id).is_some_and(|h| h.up))
                    .any(|o| !taken.contains(&o.id))
            });
            assert!(
                !current_idle,
                "seed {}: claim given stale {} while a current container was idle\n{}",
                self.seed,
                c.id,
                self.trace.join("\n")
            );
        }
        let claim_id = self.uuid().to_string();
        let (grant, source) = match choice {
            Err(_) | Ok(Choice::Existing(..)) => return,
            Ok(Choice::Affinity(r, c)) => (
                self.read(|i| {
                    decide::grant(
                        i,
                        &tenant,
                        &c,
                        ClaimSource::Affinity,
                        Some(&r),
                        None,
                        claim_id,
                        now,
                    )
                }),
                ClaimSource::Affinity,
            ),
            Ok(Choice::Pool(c, superseded)) => (
                self.read(|i| {
                    decide::grant(
                        i,
                        &tenant,
                        &c,
                        ClaimSource::Pool,
                        None,
                        superseded.as_ref(),
                        claim_id,
                        now,
                    )
                }),
                ClaimSource::Pool,
            ),
            Ok(Choice::Cold(_)) => {
                self.cold_start(tenant, workload).await;
                return;
            }
        };
        let Ok((mut write, claim, _)) = grant else {
            return;
        };
        self.stats.claims += 1;
        write.idempotency = request_id
            .as_ref()
            .map(|id| record(id, &claim.claim_id, now));
        self.note(format!(
            "claim {tenant}/{workload} {} on {}",
            source.as_str(),
            claim.container_id
        ));
        let intent = Intent::Claim {
            tenant,
            workload,
            request_id,
        };
        self.submit(write, intent).await;
    }

    /// A cold start takes a create slot and commits a warming row the
    /// claim owns; its create and grant come later ([`Self::cold_ready`]).
    async fn cold_start(&mut self, tenant: TenantId, workload: WorkloadId) {
        let wl = self.workloads[&workload].clone();
        if !wl.configured || wl.drained {
            return;
        }
        let total = self.read(|i| i.counts(&workload).total());
        let live: Vec<NodeId> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.up)
            .map(|(n, _)| n.clone())
            .collect();
        let Some(node) = live.choose(&mut self.rng).cloned() else {
            return;
        };
        if total >= wl.max {
            return;
        }
        let record = self.new_row(&workload, &node);
        if self.commit(decide::insert(record.clone())).await.is_ok() {
            self.note(format!("cold start {} for {tenant}/{workload}", record.id));
            self.warming_for.insert(record.id, (tenant, workload));
        }
    }

    pub(crate) fn new_row(&mut self, workload: &WorkloadId, node: &NodeId) -> ContainerRecord {
        let id = ContainerId::from_uuid(self.uuid());
        ContainerRecord {
            id,
            workload_id: workload.clone(),
            node_id: node.clone(),
            docker_id: None,
            state: ContainerState::Warming,
            spec_hash: self.workloads[workload].hash.clone(),
            tenant_id: None,
            last_tenant_id: None,
            claim_generation: 0,
            revision: 0,
            limits: Default::default(),
            state_path: String::new(),
            comm_path: String::new(),
            created_at: self.now,
            updated_at: self.now,
        }
    }

    /// A cold start's container is made and ready: record its Docker id
    /// and grant it, on the state as it now is.
    pub async fn cold_ready(&mut self) {
        let Some((&id, (tenant, workload))) =
            self.warming_for.iter().next().map(|(k, v)| (k, v.clone()))
        else {
            return;
        };
        self.warming_for.remove(&id);
        let Some(c) = self.read(|i| i.container(&id).cloned()) else {
            return;
        };
        if !self.live(&c.node_id) || c.state != ContainerState::Warming {
            return;
        }
        let docker_id = match self.hosts[&c.node_id].containers.get(&id) {
            Some(h) => h.docker_id.clone(),
            None => self.host_create(&c),
        };
        let now = self.now;
        if let Some(w) = self.read(|i| decide::set_docker_id(i, &id, &docker_id, now))
            && self.commit(w).await.is_err()
        {
            return;
        }
        let claim_id = self.uuid().to_string();
        let grant = self.read(|i| {
            let c = i.container(&id)?.clone();
            let superseded = i.reservation(&tenant, &workload).cloned();
            decide::grant(
                i,
                &tenant,
                &c,
                ClaimSource::Cold,
                None,
                superseded.as_ref(),
                claim_id,
                now,
            )
            .ok()
        });
        if let Some((write, claim, _)) = grant {
            self.note(format!(
                "cold claim {tenant}/{} on {}",
                claim.workload_id, claim.container_id
            ));
            self.stats.claims += 1;
            let intent = Intent::Claim {
                tenant,
                workload,
                request_id: None,
            };
            self.settle(write, intent).await;
        }
    }

    pub async fn release(&mut self) {
        let Some(claim) = self
            .read(|i| i.claims().cloned().collect::<Vec<_>>())
            .choose(&mut self.rng)
            .cloned()
        else {
            return;
        };
        self.release_claim(
            &claim.tenant_id,
            &claim.workload_id,
            Some(claim.generation),
            "released",
        )
        .await;
    }

    async fn release_claim(
        &mut self,
        tenant: &TenantId,
        workload: &WorkloadId,
        generation: Option<u64>,
        why: &str,
    ) {
        let now = self.now;
        let after = match self.workloads.get(workload) {
            Some(w) if w.configured && w.reuse => AfterRelease::Reserve {
                until: now.saturating_add(w.affinity),
            },
            _ => AfterRelease::Destroy,
        };
        let Ok(released) =
            self.read(|i| decide::release(i, tenant, workload, generation, after, why, now))
        else {
            return;
        };
        self.stats.releases += 1;
        self.note(format!(
            "release {tenant}/{workload} on {} ({why})",
            released.claim.container_id
        ));
        self.submit(released.write, Intent::Other("release")).await;
    }

    pub async fn touch(&mut self) {
        let tenant = self.pick_tenant();
        let workload = self.pick_workload();
        let now = self.now;
        if let Ok(w) = self.read(|i| decide::touch(i, &tenant, &workload, None, now)) {
            self.submit(w, Intent::Other("touch")).await;
        }
    }

    pub async fn reap_idle(&mut self) {
        let now = self.now;
        let idle: Vec<_> = self.read(|i| i.claims().cloned().collect::<Vec<_>>());
        for claim in idle {
            let timeout = self
                .workloads
                .get(&claim.workload_id)
                .map_or(Duration::MAX, |w| w.idle_timeout);
            if now.saturating_since(claim.last_activity_at) >= timeout {
                self.release_claim(
                    &claim.tenant_id,
                    &claim.workload_id,
                    Some(claim.generation),
                    "idle",
                )
                .await;
            }
        }
    }

    pub async fn expire_reservations(&mut self) {
        let now = self.now;
        let expired: Vec<_> = self.read(|i| {
            i.reservations()
                .filter(|r| r.expires_at <= now)
                .cloned()
                .collect()
        });
        for r in expired {
            if let Ok((w, _)) = self.read(|i| {
                decide::end_reservation(
                    i,
                    &r.tenant_id,
                    &r.workload_id,
                    ReservationEnd::Expired,
                    now,
                )
            }) {
                self.submit(w, Intent::Other("expire")).await;
            }
        }
    }

    pub async fn extend_or_revoke(&mut self) {
        let Some(r) = self
            .read(|i| i.reservations().cloned().collect::<Vec<_>>())
            .choose(&mut self.rng)
            .cloned()
        else {
            return;
        };
        let now = self.now;
        let decided = if self.rng.random_bool(0.5) {
            self.read(|i| {
                decide::extend_reservation(
                    i,
                    &r.tenant_id,
                    &r.workload_id,
                    Duration::from_secs(30),
                    now,
                    // The simulation owes no uploads.
                    |_| false,
                )
            })
        } else {
            self.read(|i| {
                decide::end_reservation(
                    i,
                    &r.tenant_id,
                    &r.workload_id,
                    ReservationEnd::Revoked,
                    now,
                )
            })
        };
        if let Ok((w, _)) = decided {
            self.submit(w, Intent::Other("extend/revoke")).await;
        }
    }

    /// An operator destroys a container, forced or not.
    pub async fn destroy(&mut self) {
        let Some(c) = self.pick_container() else {
            return;
        };
        let scope = if self.rng.random_bool(0.5) {
            DrainScope::Any
        } else {
            DrainScope::Unclaimed
        };
        let now = self.now;
        if let Ok(Some(w)) = self.read(|i| decide::drain(i, &c.id, scope, "operator", now)) {
            self.note(format!("destroy {} ({scope:?})", c.id));
            self.submit(w, Intent::Other("destroy")).await;
        }
    }

    /// A client whose claim call was cut off retries with the same request
    /// id: it must get the answer that was committed.
    pub async fn retry_answered(&mut self) {
        let Some((request_id, tenant, workload, claim_id)) =
            self.answered.choose(&mut self.rng).cloned()
        else {
            return;
        };
        let hit = self
            .store
            .lookup_idempotent(CLAIM, &request_id, "hash")
            .await
            .expect("idempotency lookup");
        self.stats.replays += 1;
        match hit {
            boilerhouse_server::store::IdempotencyLookup::Hit(bytes) => assert_eq!(
                String::from_utf8(bytes).unwrap(),
                claim_id,
                "seed {}: request {request_id} of {tenant}/{workload} replays another claim",
                self.seed
            ),
            other => panic!(
                "seed {}: claim {claim_id} of {tenant}/{workload} was acknowledged for request {request_id} but its record is {other:?}",
                self.seed
            ),
        }
    }
}

fn record(request_id: &str, claim_id: &str, now: boilerhouse_core::Timestamp) -> IdempotentRecord {
    IdempotentRecord {
        method: CLAIM.to_owned(),
        request_id: request_id.to_owned(),
        request_hash: "hash".to_owned(),
        response: claim_id.as_bytes().to_vec(),
        created_at: now,
    }
}
