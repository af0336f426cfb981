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
use crate::pool::{ClaimSource, ClaimStatus, ContainerRecord, ContainerState};
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
    let Ok(Choice::Pool(c, superseded)) = choose(index, tenant, workload, live) else {
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
    let write = node_lost(&index, &n, "no heartbeat", |_| false, at(30)).unwrap();
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
        choose(&index, &t(2), &wl, live),
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
    let write = node_lost(&index, &n, "gone", |_| false, at(30)).unwrap();
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
        let Ok(Choice::Pool(c, _)) = choose(&snapshot, tenant, &wl, live) else {
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

#[test]
fn a_claim_away_from_an_unreachable_reservation_ends_it_and_destroys_its_container() {
    let mut index = Index::default();
    let (a, wl) = (t(1), w(1));
    let first = idle(&mut index, 1, &wl, &node(1));
    idle(&mut index, 2, &wl, &node(2));
    claim_pool(&mut index, &a, &wl, 1);
    release_reserve(&mut index, &a, &wl);
    let reachable = |c: &ContainerRecord| c.node_id != node(1);
    let Ok(Choice::Pool(c, Some(superseded))) = choose(&index, &a, &wl, reachable) else {
        panic!("expected a pool claim superseding the reservation");
    };
    let (write, _, _) = grant(
        &index,
        &a,
        &c,
        ClaimSource::Pool,
        None,
        Some(&superseded),
        "c2".into(),
        at(50),
    )
    .unwrap();
    assert!(commit(&mut index, &write));
    assert!(index.reservation(&a, &wl).is_none());
    assert_eq!(
        index.container(&first).unwrap().state,
        ContainerState::Draining
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
        extend_reservation(&index, &a, &wl, Duration::from_secs(5), at(30)).unwrap()
    };
    assert_eq!(r.expires_at, at(6_000));
    assert!(commit(&mut index, &write));
}

// The property: whatever the interleaving, committed state keeps the rules.

#[derive(Debug, Clone)]
enum Op {
    Create {
        workload: u32,
        node: u32,
    },
    Promote {
        container: usize,
    },
    Claim {
        tenant: u32,
        workload: u32,
    },
    Release {
        tenant: u32,
        workload: u32,
        reserve: bool,
    },
    EndReservation {
        tenant: u32,
        workload: u32,
    },
    Drain {
        container: usize,
        scope: u8,
    },
    Removed {
        container: usize,
    },
    NodeLost {
        node: u32,
    },
    MarkLost {
        container: usize,
    },
    Resume {
        container: usize,
    },
    Adopt {
        container: usize,
        tenant: Option<u32>,
        last: Option<u32>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2u32, 0..2u32).prop_map(|(workload, node)| Op::Create { workload, node }),
        (0..16usize).prop_map(|container| Op::Promote { container }),
        (0..4u32, 0..2u32).prop_map(|(tenant, workload)| Op::Claim { tenant, workload }),
        (0..4u32, 0..2u32, any::<bool>()).prop_map(|(tenant, workload, reserve)| Op::Release {
            tenant,
            workload,
            reserve
        }),
        (0..4u32, 0..2u32).prop_map(|(tenant, workload)| Op::EndReservation { tenant, workload }),
        (0..16usize, 0..3u8).prop_map(|(container, scope)| Op::Drain { container, scope }),
        (0..16usize).prop_map(|container| Op::Removed { container }),
        (0..2u32).prop_map(|node| Op::NodeLost { node }),
        (0..16usize).prop_map(|container| Op::MarkLost { container }),
        (0..16usize).prop_map(|container| Op::Resume { container }),
        (
            0..16usize,
            proptest::option::of(0..4u32),
            proptest::option::of(0..4u32)
        )
            .prop_map(|(container, tenant, last)| Op::Adopt {
                container,
                tenant,
                last
            }),
    ]
}

/// Decides `op` on `view`. Containers are named by their creation order.
fn decide(
    view: &Index,
    op: &Op,
    created: &[ContainerRecord],
    history: &BTreeMap<ContainerId, BTreeSet<TenantId>>,
    step: u64,
) -> Option<PoolWrite> {
    let now = at(1_000 + step as i64);
    let nth = |i: usize| created.get(i % created.len().max(1)).map(|c| c.id);
    match op {
        Op::Create { workload, node: n } => {
            let mut c = record(u128::from(step as u32) + 1_000, &w(*workload), &node(*n));
            c.created_at = now;
            Some(insert(c))
        }
        Op::Promote { container } => promote(view, &nth(*container)?, now),
        Op::Claim { tenant, workload } => {
            match choose(view, &t(*tenant), &w(*workload), live).ok()? {
                Choice::Existing(..) | Choice::Cold(_) => None,
                Choice::Affinity(r, c) => grant(
                    view,
                    &t(*tenant),
                    &c,
                    ClaimSource::Affinity,
                    Some(&r),
                    None,
                    format!("c{step}"),
                    now,
                )
                .ok()
                .map(|g| g.0),
                Choice::Pool(c, s) => grant(
                    view,
                    &t(*tenant),
                    &c,
                    ClaimSource::Pool,
                    None,
                    s.as_ref(),
                    format!("c{step}"),
                    now,
                )
                .ok()
                .map(|g| g.0),
            }
        }
        Op::Release {
            tenant,
            workload,
            reserve,
        } => {
            let after = if *reserve {
                AfterRelease::Reserve {
                    until: now.saturating_add(Duration::from_secs(60)),
                }
            } else {
                AfterRelease::Destroy
            };
            release(view, &t(*tenant), &w(*workload), None, after, "r", now)
                .ok()
                .map(|r| r.write)
        }
        Op::EndReservation { tenant, workload } => end_reservation(
            view,
            &t(*tenant),
            &w(*workload),
            ReservationEnd::Expired,
            now,
        )
        .ok()
        .map(|r| r.0),
        Op::Drain { container, scope } => {
            let scope =
                [DrainScope::Unowned, DrainScope::Unclaimed, DrainScope::Any][*scope as usize];
            drain(view, &nth(*container)?, scope, "r", now)
                .ok()
                .flatten()
        }
        Op::Removed { container } => removed(view, &nth(*container)?, now),
        Op::NodeLost { node: n } => node_lost(view, &node(*n), "r", |_| false, now),
        Op::MarkLost { container } => mark_lost(view, &nth(*container)?, "r", now),
        Op::Resume { container } => {
            resume(view, &nth(*container)?, true, "r", format!("c{step}"), now).map(|r| r.0)
        }
        Op::Adopt {
            container,
            tenant,
            last,
        } => {
            let base = created.get(*container % created.len().max(1))?.clone();
            // A state file names the tenant that really held the container,
            // or nobody when its write was lost; the history is what the
            // claims table remembers.
            let known = history.get(&base.id).and_then(|s| s.first().cloned());
            let only = tenant.or(*last).unwrap_or(0);
            let name = |_: u32| known.clone().unwrap_or_else(|| t(only));
            let state = StateFile {
                tenant_id: tenant.map(name),
                last_tenant_id: last.map(name),
                claim_generation: u64::from(tenant.is_some() || last.is_some()),
                ..Default::default()
            };
            let prior = known.as_ref().map(|k| (k, 1));
            adopt(
                view,
                base,
                true,
                &state,
                prior,
                format!("c{step}"),
                "r",
                now,
            )
            .map(|r| r.0)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Decisions made on views up to three steps stale, committed only when
    /// admitted, keep every rule of a committed state; a rebuild from the
    /// rows equals memory; no container ever has two tenants.
    #[test]
    fn committed_state_keeps_the_rules_under_stale_decisions(
        ops in proptest::collection::vec((op(), 0..4usize), 1..120)
    ) {
        let mut index = Index::default();
        let mut views: Vec<Index> = vec![index.clone()];
        let mut created: Vec<ContainerRecord> = Vec::new();
        let mut tenants_of: BTreeMap<ContainerId, BTreeSet<TenantId>> = BTreeMap::new();
        for (step, (op, staleness)) in ops.iter().enumerate() {
            let view = &views[views.len().saturating_sub(1 + staleness)];
            let Some(write) = decide(view, op, &created, &tenants_of, step as u64) else { continue };
            // Adoption of a container that exists, by a stale view, is a conflict.
            if !commit(&mut index, &write) {
                continue;
            }
            for change in &write.containers {
                if let crate::pool::write::ContainerChange::Insert(c) = change
                    && !created.iter().any(|x| x.id == c.id)
                {
                    created.push(c.clone());
                }
            }
            let broken = index.check();
            prop_assert!(broken.is_empty(), "step {step} {op:?}: {broken:?}");
            let rebuilt = Index::from_rows(
                index.containers().cloned(),
                index.claims().cloned(),
                index.reservations().cloned(),
            );
            prop_assert_eq!(&rebuilt, &index);
            for c in index.containers() {
                let seen = tenants_of.entry(c.id).or_default();
                seen.extend(c.tenant_id.iter().chain(c.last_tenant_id.iter()).cloned());
                prop_assert!(seen.len() <= 1, "container {} served {seen:?}", c.id);
            }
            for claim in index.claims() {
                prop_assert_eq!(claim.status, ClaimStatus::Active);
                let seen = tenants_of.entry(claim.container_id).or_default();
                seen.insert(claim.tenant_id.clone());
                prop_assert!(seen.len() <= 1, "container {} served {seen:?}", claim.container_id);
            }
            views.push(index.clone());
            if views.len() > 4 {
                views.remove(0);
            }
        }
    }
}
