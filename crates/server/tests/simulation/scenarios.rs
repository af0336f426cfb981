//! Scripted schedules: each defect the pool state machine once had,
//! replayed step by step on the real store, the index and the decide
//! rules. Each failed before the change that fixed it.

use std::time::Duration;

use boilerhouse_core::pool::decide::{self, AfterRelease, Choice, DrainScope};
use boilerhouse_core::pool::{ClaimSource, ClaimStatus, ContainerRecord, ContainerState};
use boilerhouse_core::{ContainerId, NodeId, TenantId, WorkloadId};
use boilerhouse_server::store::StoreError;

use crate::world::{LOST_GRACE, Workload, World};

fn t(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn w0() -> WorkloadId {
    WorkloadId::new("w0").unwrap()
}

fn n0() -> NodeId {
    NodeId::new("node-0").unwrap()
}

/// One node, one workload that reuses containers, tenants t0 and t1.
async fn world() -> World {
    let mut w = World::new(0).await;
    w.hosts.retain(|n, _| *n == n0());
    w.hosts.entry(n0()).or_default().up = true;
    w.workloads.clear();
    w.workloads.insert(
        w0(),
        Workload {
            id: w0(),
            hash: "h1".into(),
            min: 0,
            max: 4,
            reuse: true,
            affinity: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(3600),
            configured: true,
            drained: false,
        },
    );
    w.tenants = vec![t("t0"), t("t1")];
    // Scripted: every decision commits at once, nothing is skipped.
    w.settling = true;
    w
}

/// An idle container, made and promoted as the refiller does.
async fn idle(w: &mut World) -> ContainerId {
    let id = ContainerId::from_uuid(w.uuid());
    let row = ContainerRecord {
        id,
        workload_id: w0(),
        node_id: n0(),
        docker_id: None,
        state: ContainerState::Warming,
        spec_hash: "h1".into(),
        tenant_id: None,
        last_tenant_id: None,
        claim_generation: 0,
        revision: 0,
        limits: Default::default(),
        state_path: String::new(),
        comm_path: String::new(),
        created_at: w.now,
        updated_at: w.now,
    };
    w.commit(decide::insert(row.clone())).await.unwrap();
    let docker_id = w.host_create(&row);
    let now = w.now;
    let set = w
        .read(|i| decide::set_docker_id(i, &id, &docker_id, now))
        .unwrap();
    w.commit(set).await.unwrap();
    let promote = w.read(|i| decide::promote(i, &id, now)).unwrap();
    w.commit(promote).await.unwrap();
    id
}

/// `tenant` claims from the pool and the claim commits.
async fn pool_claim(w: &mut World, tenant: &TenantId) -> (ContainerId, u64) {
    let now = w.now;
    let claim_id = w.uuid().to_string();
    let write = w.read(|i| {
        let Choice::Pool(c, _) =
            decide::choose(i, tenant, &w0(), "h1", |_| false, |_| true).unwrap()
        else {
            panic!("expected an idle container");
        };
        decide::grant(i, tenant, &c, ClaimSource::Pool, None, None, claim_id, now).unwrap()
    });
    let (write, claim, _) = write;
    w.commit(write).await.unwrap();
    (claim.container_id, claim.generation)
}

async fn release(w: &mut World, tenant: &TenantId) {
    let now = w.now;
    let until = now.saturating_add(Duration::from_secs(600));
    let released = w
        .read(|i| {
            decide::release(
                i,
                tenant,
                &w0(),
                None,
                AfterRelease::Reserve { until },
                "released",
                now,
            )
        })
        .unwrap();
    w.commit(released.write).await.unwrap();
}

async fn lose_node(w: &mut World) {
    w.hosts.get_mut(&n0()).unwrap().up = false;
    w.hosts.get_mut(&n0()).unwrap().report = None;
    let now = w.now;
    let lost = w
        .read(|i| decide::node_lost(i, &n0(), "no heartbeat", |_| false, |_| true, now))
        .unwrap();
    w.commit(lost).await.unwrap();
}

async fn node_returns(w: &mut World) {
    w.hosts.get_mut(&n0()).unwrap().up = true;
    w.deliver_state_files(&n0(), usize::MAX);
    w.report(&n0(), false);
    w.reconcile().await;
}

/// Defect 1: a released, reserved container whose node is lost and comes
/// back went Idle, and the next tenant's POOL claim received the first
/// tenant's files. It may only go back to that tenant, or be destroyed.
#[tokio::test]
async fn a_reserved_container_back_from_a_lost_node_is_never_offered_to_another_tenant() {
    let mut w = world().await;
    idle(&mut w).await;
    let (container, _) = pool_claim(&mut w, &t("t0")).await;
    release(&mut w, &t("t0")).await;
    lose_node(&mut w).await;
    node_returns(&mut w).await;
    let c = w.read(|i| i.container(&container).cloned()).unwrap();
    assert_eq!(c.state, ContainerState::Draining, "{c:?}");
    let choice = w
        .read(|i| decide::choose(i, &t("t1"), &w0(), "h1", |_| false, |_| true))
        .unwrap();
    assert!(
        matches!(choice, Choice::Cold(None)),
        "t1 was offered {choice:?}"
    );
}

/// Defect 4: node loss dropped reservations in memory only, so they came
/// back after a restart.
#[tokio::test]
async fn reservations_ended_by_node_loss_stay_ended_after_a_restart() {
    let mut w = world().await;
    idle(&mut w).await;
    pool_claim(&mut w, &t("t0")).await;
    release(&mut w, &t("t0")).await;
    assert_eq!(w.read(|i| i.reservations().count()), 1);
    lose_node(&mut w).await;
    assert_eq!(w.read(|i| i.reservations().count()), 0);
    w.restart().await;
    assert_eq!(w.read(|i| i.reservations().count()), 0);
    let rows = w.store.load_pool_snapshot().await.unwrap();
    assert!(rows.reservations.is_empty(), "{:?}", rows.reservations);
}

/// Defect 3: a pool drain decided on a snapshot destroyed a container a
/// POOL claim took a moment before. Whichever commits second is refused.
#[tokio::test]
async fn a_drain_and_a_claim_decided_on_the_same_view_never_both_commit() {
    for claim_first in [true, false] {
        let mut w = world().await;
        let id = idle(&mut w).await;
        let now = w.now;
        let claim_id = w.uuid().to_string();
        let (claim, _, _) = w.read(|i| {
            let c = i.container(&id).unwrap().clone();
            decide::grant(
                i,
                &t("t0"),
                &c,
                ClaimSource::Pool,
                None,
                None,
                claim_id,
                now,
            )
            .unwrap()
        });
        let drain = w
            .read(|i| decide::drain(i, &id, DrainScope::Unowned, "pool drained", now))
            .unwrap()
            .unwrap();
        let (first, second) = if claim_first {
            (claim, drain)
        } else {
            (drain, claim)
        };
        w.commit(first).await.unwrap();
        let refused = w.commit(second).await;
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
        let c = w.read(|i| i.container(&id).cloned()).unwrap();
        let claims = w.read(|i| i.claims().count());
        if claim_first {
            assert_eq!((c.state, claims), (ContainerState::Claimed, 1));
        } else {
            assert_eq!((c.state, claims), (ContainerState::Draining, 0));
        }
        // Memory is what the database holds.
        let rows = w.store.load_pool_snapshot().await.unwrap();
        let from_rows = boilerhouse_core::pool::index::Index::from_rows(
            rows.containers,
            rows.claims,
            rows.reservations,
        );
        assert_eq!(from_rows, w.index());
    }
}

/// Defect 5: a report that missed a claimed container (it was marked
/// lost), then one that had it again, left the tenant with a second claim
/// row of the same generation. Now it gets the container back once, with
/// a new generation.
#[tokio::test]
async fn a_claimed_container_missing_from_one_report_comes_back_with_one_newer_claim() {
    let mut w = world().await;
    idle(&mut w).await;
    let (container, generation) = pool_claim(&mut w, &t("t0")).await;
    w.deliver_state_files(&n0(), usize::MAX);
    // A full report without it, past the grace: marked lost.
    let hidden = w
        .hosts
        .get_mut(&n0())
        .unwrap()
        .containers
        .remove(&container)
        .unwrap();
    w.report(&n0(), false);
    w.hosts
        .get_mut(&n0())
        .unwrap()
        .containers
        .insert(container, hidden);
    w.advance(LOST_GRACE + Duration::from_secs(1));
    w.reconcile().await;
    assert_eq!(w.read(|i| i.claims().count()), 0);
    // The next report has it again.
    w.report(&n0(), false);
    w.reconcile().await;
    let claims = w.store.list_claims(true, 100).await.unwrap();
    let active: Vec<_> = claims
        .iter()
        .filter(|c| c.status == ClaimStatus::Active)
        .collect();
    assert_eq!(active.len(), 1, "{claims:?}");
    assert_eq!(active[0].tenant_id, t("t0"));
    assert!(active[0].generation > generation, "{claims:?}");
    let mut generations: Vec<_> = claims.iter().map(|c| c.generation).collect();
    generations.sort_unstable();
    generations.dedup();
    assert_eq!(
        generations.len(),
        claims.len(),
        "a generation was reused: {claims:?}"
    );
}

/// Found by the simulation (seed 1003044): a POOL claim decided while the
/// tenant held nothing, committed after the tenant's other claim was made
/// and released (leaving a reservation), left the tenant with a claim and
/// a reservation of one workload. The store now refuses it.
#[tokio::test]
async fn a_claim_decided_before_the_tenants_release_is_refused_after_it() {
    let mut w = world().await;
    let a = idle(&mut w).await;
    let b = idle(&mut w).await;
    // The pool offers the oldest first; the late claim takes the other.
    let first = w.read(|i| i.idle(&w0()).next().unwrap().id);
    let spare = if first == a { b } else { a };
    // Decided now, on a view where t0 holds nothing.
    let now = w.now;
    let claim_id = w.uuid().to_string();
    let (late, _, _) = w.read(|i| {
        let c = i.container(&spare).unwrap().clone();
        decide::grant(
            i,
            &t("t0"),
            &c,
            ClaimSource::Pool,
            None,
            None,
            claim_id,
            now,
        )
        .unwrap()
    });
    // Meanwhile t0 claims another container and releases it: reserved.
    let (other, _) = pool_claim(&mut w, &t("t0")).await;
    assert_ne!(other, spare);
    release(&mut w, &t("t0")).await;
    let refused = w.commit(late).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert_eq!(w.read(|i| i.claims().count()), 0);
    assert_eq!(w.read(|i| i.reservations().count()), 1);
}

/// Found by the simulation (seed 3005674): an adoption decided while a
/// container had no row and no history, committed after the container had
/// since been adopted, served a tenant and been removed, brought it back
/// as an idle, unused container. The store now refuses a row whose claims
/// history is newer than it says, and a claim whose generation was used.
#[tokio::test]
async fn a_stale_adoption_never_revives_a_used_container_as_idle() {
    let mut w = world().await;
    let id = idle(&mut w).await;
    let now = w.now;
    let gone = w
        .read(|i| decide::mark_lost(i, &id, "missing from a report", now))
        .unwrap();
    w.commit(gone).await.unwrap();
    let adopt = |w: &World| {
        let host = &w.hosts[&n0()].containers[&id];
        let row = ContainerRecord {
            id,
            workload_id: w0(),
            node_id: n0(),
            docker_id: Some(host.docker_id.clone()),
            state: ContainerState::Warming,
            spec_hash: "h1".into(),
            tenant_id: None,
            last_tenant_id: None,
            claim_generation: 0,
            revision: 0,
            limits: Default::default(),
            state_path: String::new(),
            comm_path: String::new(),
            created_at: host.created_at,
            updated_at: now,
        };
        let state = host.state_file.clone();
        w.read(|i| decide::adopt(i, row, true, &state, None, "c".into(), "no row", now))
            .unwrap()
            .0
    };
    let stale = adopt(&w);
    w.commit(adopt(&w)).await.unwrap();
    // It serves t0, is released and destroyed; its row goes.
    pool_claim(&mut w, &t("t0")).await;
    let released = w
        .read(|i| {
            decide::release(
                i,
                &t("t0"),
                &w0(),
                None,
                AfterRelease::Destroy,
                "released",
                now,
            )
        })
        .unwrap();
    w.commit(released.write).await.unwrap();
    let removed = w.read(|i| decide::removed(i, &id, now)).unwrap();
    w.commit(removed).await.unwrap();
    // The adoption decided before all that lands now: refused.
    let refused = w.commit(stale).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert!(w.read(|i| i.container(&id).is_none()));
}
