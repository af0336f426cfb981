//! The mirror's bookkeeping: lookups follow every change, a write that
//! does not fit what memory holds is reported, and a rebuild from rows
//! gives the same index.

use super::*;
use crate::pool::ClaimSource;
use crate::pool::write::Expected;
use crate::workload::Limits;

fn container(n: u128, state: ContainerState) -> ContainerRecord {
    ContainerRecord {
        id: ContainerId::from_uuid(uuid::Uuid::from_u128(n)),
        workload_id: WorkloadId::new("w").unwrap(),
        node_id: NodeId::new("n").unwrap(),
        docker_id: None,
        state,
        spec_hash: String::new(),
        tenant_id: None,
        last_tenant_id: None,
        claim_generation: 0,
        revision: 0,
        limits: Limits::default(),
        state_path: String::new(),
        comm_path: String::new(),
        created_at: Timestamp::from_millis(100 - n as i64),
        updated_at: Timestamp::from_millis(0),
    }
}

fn insert(index: &mut Index, c: &ContainerRecord) {
    let write = PoolWrite {
        containers: vec![ContainerChange::Insert(c.clone())],
        ..Default::default()
    };
    assert!(index.apply(&write).is_empty());
}

#[test]
fn idle_containers_are_offered_oldest_first_and_leave_the_list_when_claimed() {
    let mut index = Index::default();
    let (a, b) = (
        container(1, ContainerState::Idle),
        container(2, ContainerState::Idle),
    );
    insert(&mut index, &a);
    insert(&mut index, &b);
    let w = WorkloadId::new("w").unwrap();
    let order: Vec<_> = index.idle(&w).map(|c| c.id).collect();
    assert_eq!(order, [b.id, a.id], "b was created first");
    let mut claimed = b.successor(Timestamp::from_millis(5));
    claimed.state = ContainerState::Claimed;
    claimed.tenant_id = Some(TenantId::new("t").unwrap());
    claimed.claim_generation = 1;
    let claim = ClaimRecord {
        claim_id: "c".into(),
        tenant_id: TenantId::new("t").unwrap(),
        workload_id: w.clone(),
        container_id: b.id,
        node_id: b.node_id.clone(),
        generation: 1,
        source: ClaimSource::Pool,
        status: ClaimStatus::Active,
        claimed_at: Timestamp::from_millis(5),
        last_activity_at: Timestamp::from_millis(5),
        released_at: None,
        restored: false,
    };
    let write = PoolWrite {
        containers: vec![ContainerChange::update(&b, claimed)],
        claims: vec![ClaimChange::Insert(claim.clone())],
        ..Default::default()
    };
    assert!(index.apply(&write).is_empty());
    assert_eq!(index.idle(&w).map(|c| c.id).collect::<Vec<_>>(), [a.id]);
    assert_eq!(index.claim_on(&b.id), Some(&claim));
    assert_eq!(index.claim_by_id("c"), Some(&claim));
    assert_eq!(index.counts(&w).claimed, 1);
    assert!(index.check().is_empty(), "{:?}", index.check());
    let rebuilt = Index::from_rows(
        index.containers().cloned(),
        index.claims().cloned(),
        index.reservations().cloned(),
    );
    assert_eq!(rebuilt, index);
}

#[test]
fn a_write_that_does_not_fit_memory_is_reported_and_memory_takes_it() {
    let mut index = Index::default();
    let a = container(1, ContainerState::Idle);
    insert(&mut index, &a);
    let mut stale = Expected::of(&a);
    stale.revision = 7;
    let mut next = a.successor(Timestamp::from_millis(1));
    next.state = ContainerState::Draining;
    let write = PoolWrite {
        containers: vec![ContainerChange::Update {
            expected: stale,
            record: next.clone(),
        }],
        ..Default::default()
    };
    assert!(index.admit(&write).is_err(), "the store would refuse it");
    assert_eq!(
        index.apply(&write).len(),
        1,
        "applied anyway, it is reported"
    );
    assert_eq!(index.container(&a.id), Some(&next));
}

#[test]
fn ended_claims_are_not_rebuilt() {
    let c = container(1, ContainerState::Idle);
    let ended = ClaimRecord {
        claim_id: "old".into(),
        tenant_id: TenantId::new("t").unwrap(),
        workload_id: c.workload_id.clone(),
        container_id: c.id,
        node_id: c.node_id.clone(),
        generation: 1,
        source: ClaimSource::Pool,
        status: ClaimStatus::Released,
        claimed_at: Timestamp::EPOCH,
        last_activity_at: Timestamp::EPOCH,
        released_at: Some(Timestamp::EPOCH),
        restored: false,
    };
    let index = Index::from_rows([c], [ended], []);
    assert_eq!(index.claims().count(), 0);
}

#[test]
fn containers_in_a_passing_state_follow_every_change_and_a_slice_scan_sees_each_once() {
    let mut index = Index::default();
    let rows: Vec<ContainerRecord> = (1..=40)
        .map(|n| {
            let state = match n % 4 {
                0 => ContainerState::Warming,
                1 => ContainerState::Draining,
                2 => ContainerState::Lost,
                _ => ContainerState::Idle,
            };
            container(n, state)
        })
        .collect();
    for c in &rows {
        insert(&mut index, c);
    }
    let ids_in = |index: &Index, state| -> Vec<ContainerId> {
        index.containers_in(state).map(|c| c.id).collect()
    };
    let scanned = |index: &Index, state| -> Vec<ContainerId> {
        index
            .containers()
            .filter(|c| c.state == state)
            .map(|c| c.id)
            .collect()
    };
    for state in [
        ContainerState::Warming,
        ContainerState::Draining,
        ContainerState::Lost,
        ContainerState::Idle,
    ] {
        assert_eq!(ids_in(&index, state), scanned(&index, state), "{state:?}");
    }
    assert_eq!(ids_in(&index, ContainerState::Warming).len(), 10);
    // A warming container promoted leaves the set; one drained joins it.
    let warming = rows[3].clone();
    let mut idle = warming.successor(Timestamp::from_millis(1));
    idle.state = ContainerState::Idle;
    let idle_one = rows[2].clone();
    let mut drained = idle_one.successor(Timestamp::from_millis(1));
    drained.state = ContainerState::Draining;
    let write = PoolWrite {
        containers: vec![
            ContainerChange::update(&warming, idle),
            ContainerChange::update(&idle_one, drained),
        ],
        ..Default::default()
    };
    assert!(index.apply(&write).is_empty());
    assert_eq!(ids_in(&index, ContainerState::Warming).len(), 9);
    assert!(ids_in(&index, ContainerState::Draining).contains(&idle_one.id));
    assert!(index.check().is_empty(), "{:?}", index.check());

    // Slices of 7 see every container once, in id order.
    let mut after = None;
    let mut seen: Vec<ContainerId> = Vec::new();
    loop {
        let slice: Vec<ContainerId> = index.containers_after(after, 7).map(|c| c.id).collect();
        seen.extend(&slice);
        match slice.last() {
            Some(last) if slice.len() == 7 => after = Some(*last),
            _ => break,
        }
    }
    let all: Vec<ContainerId> = index.containers().map(|c| c.id).collect();
    assert_eq!(seen, all);
}
