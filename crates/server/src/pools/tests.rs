//! Claims against the pools alone: a store in a temporary directory, no
//! agent, no background task.

use std::sync::Arc;
use std::time::Duration;

use boilerhouse_core::event::EventKind;
use boilerhouse_core::ids::Uuid;
use boilerhouse_core::pool::write::{ContainerChange, PoolWrite, ReservationChange};
use boilerhouse_core::pool::{ContainerState, Reservation};
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp, WorkloadId};

use super::{Plain, Pools, PoolsConfig};
use crate::agents::Registry;
use crate::store::{EventQuery, Store, StoreOptions};

const WORKLOAD: &str = "id: demo\nimage: demo:1\npool: {min_size: 0, max_size: 4}\n";

/// A store in `dir` holding the workload `demo` (no pool minimum), the
/// pools loaded on it, and the agents' registry (empty: no node is live).
pub(crate) async fn pools_on(dir: &std::path::Path) -> (Store, Registry, Pools) {
    let store = Store::open(&dir.join("t.db"), StoreOptions::default())
        .await
        .unwrap();
    let spec = boilerhouse_core::workload::parse_workload("demo.yaml", WORKLOAD).unwrap();
    store
        .put_workload(
            spec,
            WORKLOAD.into(),
            "demo.yaml".into(),
            Timestamp::from_millis(1),
            false,
        )
        .await
        .unwrap();
    let agents = Registry::default();
    let pools = Pools::load(
        store.clone(),
        agents.clone(),
        PoolsConfig {
            suspect_after: Duration::from_secs(15),
            command_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            surplus_grace: Duration::from_secs(60),
        },
        Arc::new(Plain),
        Arc::new(Plain),
        None,
    )
    .await
    .unwrap();
    (store, agents, pools)
}

/// A container of `demo` kept for `tenant` on node n1 until `expires_at`.
async fn reserve(pools: &Pools, tenant: &TenantId, expires_at: Timestamp) -> ContainerId {
    let workload_id = WorkloadId::new("demo").unwrap();
    let workload = pools.workload_record(&workload_id).await.unwrap();
    let node = NodeId::new("n1").unwrap();
    let id = ContainerId::from_uuid(Uuid::now_v7());
    let mut kept = Pools::new_container(
        &workload.spec,
        &workload.spec_hash,
        id,
        (node.clone(), "/var/lib/boilerhouse".into()),
        Timestamp::from_millis(1000),
    );
    kept.state = ContainerState::Reserved;
    kept.last_tenant_id = Some(tenant.clone());
    kept.claim_generation = 1;
    let reservation = Reservation {
        tenant_id: tenant.clone(),
        workload_id,
        container_id: id,
        node_id: node,
        reserved_at: Timestamp::from_millis(1000),
        expires_at,
    };
    pools
        .commit(PoolWrite {
            containers: vec![ContainerChange::Insert(kept)],
            reservations: vec![ReservationChange::Insert(reservation)],
            ..Default::default()
        })
        .await
        .unwrap();
    id
}

/// A claim never goes through its tenant's reservation once it is past
/// its expiry, though no expiry pass has come to it (after a restart,
/// the first pass runs beside serving): the claim ends it as the pass
/// would, its container to be destroyed, one `affinity.expired`.
#[tokio::test]
async fn a_claim_ends_an_expired_reservation_itself_and_never_goes_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _agents, pools) = pools_on(dir.path()).await;
    let workload_id = WorkloadId::new("demo").unwrap();
    let workload = pools.workload_record(&workload_id).await.unwrap();
    let tenant = TenantId::new("t1").unwrap();
    let id = reserve(&pools, &tenant, Timestamp::from_millis(2000)).await;

    let lock = pools.lock_tenant(&tenant, &workload_id).await;
    // No node can take a cold start here: the claim itself fails, after
    // it has ended the reservation.
    let outcome = pools
        .claim_locked(
            &lock,
            &tenant,
            &workload,
            Some(Duration::from_millis(200)),
            None,
        )
        .await;
    assert!(outcome.is_err(), "granted with no node: {outcome:?}");
    drop(lock);

    assert_eq!(
        pools.read(|index| index.reservation(&tenant, &workload_id).cloned()),
        None,
        "the expired reservation outlived the claim"
    );
    assert_eq!(
        pools.container(&id).unwrap().state,
        ContainerState::Draining,
        "its container is to be destroyed"
    );
    let events = store
        .list_events(&EventQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let ended: Vec<_> = events
        .iter()
        .filter(|e| e.event.kind == EventKind::AffinityExpired.as_str())
        .collect();
    assert_eq!(ended.len(), 1, "{events:?}");
}

/// An operator's extension does not bring back a reservation past its
/// expiry that no expiry pass has reached yet: it is refused, saying so,
/// and the reservation is left for the pass to end. One still running is
/// extended from its expiry.
#[tokio::test]
async fn an_expired_reservation_cannot_be_extended_back_to_life() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _agents, pools) = pools_on(dir.path()).await;
    let workload_id = WorkloadId::new("demo").unwrap();
    let late = TenantId::new("late").unwrap();
    let expired_at = Timestamp::from_millis(2000);
    reserve(&pools, &late, expired_at).await;

    let refused = pools
        .extend(&late, &workload_id, Duration::from_secs(300))
        .await
        .expect_err("an expired reservation was extended");
    let message = refused.to_string();
    assert!(
        message.contains("expired at") && message.contains("late"),
        "{message}"
    );
    assert_eq!(
        pools.read(|index| index.reservation(&late, &workload_id).map(|r| r.expires_at)),
        Some(expired_at),
        "the refusal changed the reservation"
    );
    assert_eq!(pools.expire_reservations().await.unwrap(), 1);

    let on_time = TenantId::new("on-time").unwrap();
    let until = crate::clock::now().saturating_add(Duration::from_secs(60));
    reserve(&pools, &on_time, until).await;
    let extended = pools
        .extend(&on_time, &workload_id, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(
        extended.expires_at,
        until.saturating_add(Duration::from_secs(300))
    );
}
