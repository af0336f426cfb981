//! The transitions, one rule at a time, and a property test that random
//! decisions made on stale views, committed only when the store's
//! conditions admit them, never break the rules of a committed state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::container::StateFile;
use crate::ids::{ContainerId, NodeId, TenantId, WorkloadId};
use crate::pool::index::Index;
use crate::pool::write::PoolWrite;
use crate::pool::{ClaimSource, ClaimStatus, ContainerRecord, ContainerState, Reservation};
use crate::time::Timestamp;
use crate::workload::Limits;

fn t(n: u32) -> TenantId {
    TenantId::new(format!("t{n}")).unwrap()
}

fn w(n: u32) -> WorkloadId {
    WorkloadId::new(format!("w{n}")).unwrap()
}

fn node(n: u32) -> NodeId {
    NodeId::new(format!("n{n}")).unwrap()
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn record(id: u128, workload: &WorkloadId, node: &NodeId) -> ContainerRecord {
    ContainerRecord {
        id: ContainerId::from_uuid(uuid::Uuid::from_u128(id)),
        workload_id: workload.clone(),
        node_id: node.clone(),
        docker_id: Some(format!("docker-{id}")),
        state: ContainerState::Warming,
        spec_hash: "h".into(),
        tenant_id: None,
        last_tenant_id: None,
        claim_generation: 0,
        revision: 0,
        limits: Limits::default(),
        state_path: String::new(),
        comm_path: String::new(),
        created_at: at(id as i64),
        updated_at: at(id as i64),
    }
}

/// Commits `write` the way the store would: refused whole on a conflict.
fn commit(index: &mut Index, write: &PoolWrite) -> bool {
    if index.admit(write).is_err() {
        return false;
    }
    assert!(index.apply(write).is_empty(), "mirror drift on {write:?}");
    true
}

/// An idle container `id` of `workload` on `node`.
fn idle(index: &mut Index, id: u128, workload: &WorkloadId, node: &NodeId) -> ContainerId {
    let c = record(id, workload, node);
    assert!(commit(index, &insert(c.clone())));
    let write = promote(index, &c.id, at(1)).unwrap();
    assert!(commit(index, &write));
    c.id
}

fn live(_: &ContainerRecord) -> bool {
    true
}

fn claim_pool(index: &mut Index, tenant: &TenantId, workload: &WorkloadId, n: u64) -> ContainerId {
    let Ok(Choice::Pool(c, superseded)) = choose(index, tenant, workload, "h", |_| false, live)
    else {
        panic!("no pool choice for {tenant}");
    };
    let (write, _, _) = grant(
        index,
        tenant,
        &c,
        ClaimSource::Pool,
        None,
        superseded.as_ref(),
        format!("claim-{n}"),
        at(10),
    )
    .unwrap();
    assert!(commit(index, &write));
    c.id
}

fn release_reserve(index: &mut Index, tenant: &TenantId, workload: &WorkloadId) {
    let released = release(
        index,
        tenant,
        workload,
        None,
        AfterRelease::Reserve { until: at(1_000) },
        "done",
        at(20),
    )
    .unwrap();
    assert!(commit(index, &released.write));
}

#[test]
fn a_used_container_is_never_offered_to_the_pool_again() {
    let mut index = Index::default();
    let (a, wl, n) = (t(1), w(1), node(1));
    let c = idle(&mut index, 1, &wl, &n);
    claim_pool(&mut index, &a, &wl, 1);
    release_reserve(&mut index, &a, &wl);
    // The node is lost: the reservation ends, in the write the store
    // commits, not only in memory.
    let write = node_lost(&index, &n, "no heartbeat", |_| false, |_| true, at(30)).unwrap();
    assert!(
        write
            .reservations
            .iter()
            .any(|r| matches!(r, crate::pool::write::ReservationChange::Remove { .. })),
        "the reservation is removed by the committed write"
    );
    assert!(commit(&mut index, &write));
    assert!(index.reservation(&a, &wl).is_none());
    assert_eq!(index.container(&c).unwrap().state, ContainerState::Lost);
    // It comes back: it served a, so it is destroyed, never idle.
    let (write, claim) =
        resume(&index, &c, true, "running again", "claim-2".into(), at(40)).unwrap();
    assert!(claim.is_none());
    assert!(commit(&mut index, &write));
    assert_eq!(index.container(&c).unwrap().state, ContainerState::Draining);
    assert!(matches!(
        choose(&index, &t(2), &wl, "h", |_| false, live),
        Ok(Choice::Cold(None))
    ));
    assert!(index.check().is_empty(), "{:?}", index.check());
}

#[test]
fn a_claimed_container_back_from_a_lost_node_resumes_with_a_new_generation() {
    let mut index = Index::default();
    let (a, wl, n) = (t(1), w(1), node(1));
    let c = idle(&mut index, 1, &wl, &n);
    claim_pool(&mut index, &a, &wl, 1);
    let write = node_lost(&index, &n, "gone", |_| false, |_| true, at(30)).unwrap();
    assert!(commit(&mut index, &write));
    assert!(index.claim(&a, &wl).is_none(), "the claim is lost");
    let (write, claim) = resume(&index, &c, true, "back", "claim-2".into(), at(40)).unwrap();
    assert!(commit(&mut index, &write));
    let claim = claim.unwrap();
    assert_eq!(claim.generation, 2, "the lost claim's token is not reused");
    assert_eq!(index.claim(&a, &wl).unwrap().claim_id, "claim-2");
    assert!(index.check().is_empty(), "{:?}", index.check());
}

#[test]
fn a_container_missing_from_a_report_and_then_back_is_resumed_not_duplicated() {
    let mut index = Index::default();
    let (a, wl, n) = (t(1), w(1), node(1));
    let c = idle(&mut index, 1, &wl, &n);
    claim_pool(&mut index, &a, &wl, 1);
    // A report misses it: the claim ends, the row stays (as Lost).
    let write = mark_lost(&index, &c, "missing", at(30)).unwrap();
    assert!(commit(&mut index, &write));
    assert_eq!(index.container(&c).unwrap().state, ContainerState::Lost);
    // Adoption does not apply to a container that has a row.
    let state = StateFile {
        tenant_id: Some(a.clone()),
        claim_generation: 1,
        ..Default::default()
    };
    assert!(
        adopt(
            &index,
            record(1, &wl, &n),
            true,
            &state,
            None,
            "x".into(),
            "r",
            at(35)
        )
        .is_none()
    );
    // The next report has it: it resumes with a new generation.
    let (write, claim) = resume(&index, &c, true, "back", "claim-2".into(), at(40)).unwrap();
    assert!(commit(&mut index, &write));
    assert_eq!(claim.unwrap().generation, 2);
    assert_eq!(index.claims().count(), 1);
    // Missing again, and still missing: the row goes.
    let write = mark_lost(&index, &c, "missing", at(50)).unwrap();
    assert!(commit(&mut index, &write));
    let write = mark_lost(&index, &c, "still missing", at(60)).unwrap();
    assert!(commit(&mut index, &write));
    assert!(index.container(&c).is_none());
}

#[test]
fn adoption_never_reuses_a_generation_the_database_has_seen() {
    let index = Index::default();
    let (a, wl, n) = (t(1), w(1), node(1));
    let state = StateFile {
        tenant_id: Some(a.clone()),
        claim_generation: 3,
        ..Default::default()
    };
    let (_, claim) = adopt(
        &index,
        record(1, &wl, &n),
        true,
        &state,
        None,
        "c".into(),
        "r",
        at(5),
    )
    .unwrap();
    assert_eq!(
        claim.unwrap().generation,
        3,
        "after a database loss the claim goes on"
    );
    let (_, claim) = adopt(
        &index,
        record(1, &wl, &n),
        true,
        &state,
        Some((&a, 3)),
        "c".into(),
        "r",
        at(5),
    )
    .unwrap();
    assert_eq!(
        claim.unwrap().generation,
        4,
        "past the generation the database has seen"
    );
    // The database knows another tenant held it: conflicting evidence.
    let (_, claim) = adopt(
        &index,
        record(1, &wl, &n),
        true,
        &state,
        Some((&t(2), 1)),
        "c".into(),
        "r",
        at(5),
    )
    .unwrap();
    assert!(claim.is_none());
    // A state file that never got written, but the database saw a claim:
    // used all the same, so never idle.
    let (write, _) = adopt(
        &index,
        record(1, &wl, &n),
        true,
        &StateFile::default(),
        Some((&a, 1)),
        "c".into(),
        "r",
        at(5),
    )
    .unwrap();
    let mut fresh = Index::default();
    assert!(commit(&mut fresh, &write));
    assert_eq!(
        fresh.containers().next().unwrap().state,
        ContainerState::Draining
    );
    // Released before: kept for no one but its tenant, so destroyed.
    let released = StateFile {
        last_tenant_id: Some(a),
        claim_generation: 3,
        ..Default::default()
    };
    let (write, claim) = adopt(
        &index,
        record(1, &wl, &n),
        true,
        &released,
        None,
        "c".into(),
        "r",
        at(5),
    )
    .unwrap();
    assert!(claim.is_none());
    let mut index = Index::default();
    assert!(commit(&mut index, &write));
    assert_eq!(
        index.containers().next().unwrap().state,
        ContainerState::Draining
    );
}

#[test]
fn a_drain_decided_before_a_claim_is_refused_after_it() {
    let mut index = Index::default();
    let (a, wl, n) = (t(1), w(1), node(1));
    let c = idle(&mut index, 1, &wl, &n);
    let drain_write = drain(&index, &c, DrainScope::Unowned, "pool drained", at(5))
        .unwrap()
        .unwrap();
    claim_pool(&mut index, &a, &wl, 1);
    assert!(
        index.admit(&drain_write).is_err(),
        "a drain decided on the idle container must not overwrite the claim"
    );
    // Decided again on what is committed now, it is refused outright.
    assert!(drain(&index, &c, DrainScope::Unowned, "pool drained", at(6)).is_err());
    assert_eq!(index.container(&c).unwrap().state, ContainerState::Claimed);
}

#[test]
fn two_claims_decided_on_one_snapshot_cannot_both_take_a_container() {
    let mut index = Index::default();
    let wl = w(1);
    idle(&mut index, 1, &wl, &node(1));
    let snapshot = index.clone();
    let decide = |tenant: &TenantId, n| {
        let Ok(Choice::Pool(c, _)) = choose(&snapshot, tenant, &wl, "h", |_| false, live) else {
            panic!()
        };
        grant(
            &snapshot,
            tenant,
            &c,
            ClaimSource::Pool,
            None,
            None,
            format!("c{n}"),
            at(5),
        )
        .unwrap()
        .0
    };
    let (first, second) = (decide(&t(1), 1), decide(&t(2), 2));
    assert!(commit(&mut index, &first));
    assert!(!commit(&mut index, &second), "the second is a conflict");
}

/// Tenant t1's reservation on n1, which stopped answering, and the pool
/// choice of its new claim (an idle container on n2) superseding it; the
/// index, and the reserved container's id.
fn superseding_choice() -> (Index, ContainerId, ContainerRecord, Reservation) {
    let mut index = Index::default();
    let (a, wl) = (t(1), w(1));
    let first = idle(&mut index, 1, &wl, &node(1));
    idle(&mut index, 2, &wl, &node(2));
    claim_pool(&mut index, &a, &wl, 1);
    release_reserve(&mut index, &a, &wl);
    let reachable = |c: &ContainerRecord| c.node_id != node(1);
    let Ok(Choice::Pool(c, Some(superseded))) = choose(&index, &a, &wl, "h", |_| false, reachable)
    else {
        panic!("expected a pool claim superseding the reservation");
    };
    (index, first, c, superseded)
}

/// t1's claim of `c`, granted under the lock, ending `superseded`.
fn grant_superseding(
    index: &Index,
    c: &ContainerRecord,
    superseded: &Reservation,
) -> (PoolWrite, crate::pool::ClaimRecord, ContainerRecord) {
    grant(
        index,
        &t(1),
        c,
        ClaimSource::Pool,
        None,
        Some(superseded),
        "c2".into(),
        at(50),
    )
    .unwrap()
}

#[test]
fn a_claim_away_from_an_unreachable_reservation_ends_it_and_destroys_its_container() {
    let (mut index, first, c, superseded) = superseding_choice();
    let (a, wl) = (t(1), w(1));
    let (write, _, _) = grant_superseding(&index, &c, &superseded);
    assert!(commit(&mut index, &write));
    assert!(index.reservation(&a, &wl).is_none());
    assert_eq!(
        index.container(&first).unwrap().state,
        ContainerState::Draining
    );
    assert!(index.check().is_empty(), "{:?}", index.check());
}

#[test]
fn a_grant_built_outside_the_pools_lock_is_the_same_write_and_still_conditional() {
    // The server chooses under the pools' lock and builds the write after
    // letting it go (`grant_resolved`, the superseded reservation's
    // container looked up under the lock): it must be the write `grant`
    // builds, and a change committed in between must refuse it.
    let (mut index, first, c, superseded) = superseding_choice();
    let (a, wl) = (t(1), w(1));
    let old = index.container(&superseded.container_id).cloned();
    assert_eq!(old.as_ref().map(|o| o.id), Some(first));
    let resolved = grant_resolved(
        &a,
        &c,
        ClaimSource::Pool,
        None,
        Some((&superseded, old.as_ref())),
        "c2".into(),
        at(50),
    )
    .unwrap();
    let under_lock = grant_superseding(&index, &c, &superseded);
    assert_eq!(resolved, under_lock);
    assert!(
        resolved
            .0
            .containers
            .iter()
            .any(|change| change.id() == first),
        "the superseded reservation's container is drained by the same write"
    );
    // Another tenant takes the chosen container before the write commits.
    claim_pool(&mut index, &t(2), &wl, 3);
    assert!(
        !commit(&mut index, &resolved.0),
        "a write built on a view that changed is a conflict"
    );
    assert_eq!(
        index.reservation(&a, &wl).map(|r| r.container_id),
        Some(first),
        "the refused write ended nothing"
    );
    assert!(index.check().is_empty(), "{:?}", index.check());
}

#[test]
fn stale_generations_and_missing_claims_are_refused() {
    let mut index = Index::default();
    let (a, wl) = (t(1), w(1));
    idle(&mut index, 1, &wl, &node(1));
    claim_pool(&mut index, &a, &wl, 1);
    assert_eq!(
        release(&index, &a, &wl, Some(7), AfterRelease::Destroy, "r", at(5)).unwrap_err(),
        Refusal::StaleGeneration {
            given: 7,
            current: 1
        }
    );
    assert!(matches!(
        touch(&index, &t(9), &wl, None, at(5)),
        Err(Refusal::NoClaim(..))
    ));
    let (write, r) = {
        release_reserve(&mut index, &a, &wl);
        extend_reservation(&index, &a, &wl, Duration::from_secs(5), at(30), |_| false).unwrap()
    };
    assert_eq!(r.expires_at, at(6_000));
    assert!(commit(&mut index, &write));

    // Past its expiry it is over: not extended back to life...
    let refused = extend_reservation(&index, &a, &wl, Duration::from_secs(5), at(6_000), |_| {
        false
    })
    .unwrap_err();
    assert!(
        matches!(&refused, Refusal::Precondition(why) if why.contains("expired at")),
        "{refused:?}"
    );
    // ...unless its container is kept for files still owed: then from now.
    let (_, kept) =
        extend_reservation(&index, &a, &wl, Duration::from_secs(5), at(9_000), |_| true).unwrap();
    assert_eq!(kept.expires_at, at(14_000));
}

mod property;

#[test]
fn a_lost_node_keeps_claims_its_workloads_do_not_give_up_and_sets_idle_containers_aside() {
    let mut index = Index::default();
    let (a, b, kept, replaced, n) = (t(1), t(2), w(1), w(2), node(1));
    let first = idle(&mut index, 1, &kept, &n);
    idle(&mut index, 2, &replaced, &n);
    let second = idle(&mut index, 3, &kept, &n);
    let held = claim_pool(&mut index, &a, &kept, 1);
    let moved = claim_pool(&mut index, &b, &replaced, 2);
    let spare = if held == first { second } else { first };
    let write = node_lost(
        &index,
        &n,
        "no heartbeat",
        |_| false,
        |w| w == &replaced,
        at(30),
    )
    .unwrap();
    assert!(commit(&mut index, &write));
    // The kept claim and its container are untouched: no one else can be
    // handed either, and the tenant's next claim is the same one.
    assert_eq!(index.claim(&a, &kept).unwrap().container_id, held);
    assert_eq!(
        index.container(&held).unwrap().state,
        ContainerState::Claimed
    );
    assert!(matches!(
        choose(&index, &a, &kept, "h", |_| false, |_| false),
        Ok(Choice::Existing(claim, _)) if claim.container_id == held
    ));
    // The replaced one is LOST and set aside; its tenant may claim anew.
    assert!(index.claim(&b, &replaced).is_none());
    assert_eq!(index.container(&moved).unwrap().state, ContainerState::Lost);
    assert_eq!(index.container(&spare).unwrap().state, ContainerState::Lost);
    assert!(index.check().is_empty(), "{:?}", index.check());
}

#[test]
fn containers_other_claims_are_taking_are_passed_over_by_id() {
    let mut index = Index::default();
    let wl = w(1);
    let ids: Vec<ContainerId> = (1..=3)
        .map(|i| idle(&mut index, i, &wl, &node(1)))
        .collect();
    let asked = std::cell::RefCell::new(Vec::new());
    let offerable = |c: &ContainerRecord| {
        asked.borrow_mut().push(c.id);
        true
    };
    let taken = |id: &ContainerId| ids[..2].contains(id);
    let Ok(Choice::Pool(c, None)) = choose(&index, &t(1), &wl, "h", taken, offerable) else {
        panic!("the one container no claim is taking is offered");
    };
    assert_eq!(c.id, ids[2]);
    assert_eq!(*asked.borrow(), [ids[2]], "taken ones are not looked at");
    assert!(matches!(
        choose(&index, &t(1), &wl, "h", |_| true, live),
        Ok(Choice::Cold(None))
    ));
}
