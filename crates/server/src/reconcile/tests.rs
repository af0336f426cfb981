//! Actions planned on a view that has since moved on.

use std::collections::BTreeMap;
use std::time::Duration;

use boilerhouse_core::container::{ObservedContainer, labels};
use boilerhouse_core::ids::Uuid;
use boilerhouse_core::pool::ContainerState;
use boilerhouse_core::pool::write::{ContainerChange, PoolWrite};
use boilerhouse_core::reconcile::{Action, ActionKind, PlanConfig};
use boilerhouse_core::workload::Limits;
use boilerhouse_core::{ContainerId, NodeId, Timestamp};

use super::{Applied, Outcome, Reconciler};
use crate::pools::Pools;

async fn reconciler(dir: &std::path::Path) -> Reconciler {
    let (store, agents, pools) = crate::pools::tests::pools_on(dir).await;
    Reconciler {
        store,
        pools,
        agents,
        config: PlanConfig {
            lost_grace: Duration::from_secs(30),
            creation_grace: Duration::from_secs(60),
        },
        command_timeout: Duration::from_secs(5),
    }
}

/// The node's row, as its agent's Hello makes it.
async fn register(r: &Reconciler, node: &NodeId) {
    r.store
        .register_node(
            crate::store::NodeHello::for_tests(node.clone()),
            crate::clock::now(),
        )
        .await
        .unwrap();
}

/// The workload `demo`, as the pools hold it.
async fn demo(r: &Reconciler) -> std::sync::Arc<boilerhouse_core::workload::WorkloadRecord> {
    r.pools
        .workload_record(&"demo".parse().unwrap())
        .await
        .unwrap()
}

/// `tenant`'s claim of `workload`, made on a task of its own, waiting up
/// to `timeout`.
fn claim_in_background(
    r: &Reconciler,
    tenant: &boilerhouse_core::TenantId,
    workload: &std::sync::Arc<boilerhouse_core::workload::WorkloadRecord>,
    timeout: Duration,
) -> tokio::task::JoinHandle<
    Result<(crate::pools::Granted, boilerhouse_core::pool::ClaimSource), crate::pools::PoolError>,
> {
    let (pools, tenant, workload) = (r.pools.clone(), tenant.clone(), workload.clone());
    tokio::spawn(async move {
        let guard = pools.lock_tenant(&tenant, &workload.spec.id).await;
        pools
            .claim_locked(&guard, &tenant, &workload, Some(timeout), None)
            .await
    })
}

/// The container as a full report shows it: labelled, running, never
/// claimed.
fn reported(id: ContainerId, node: &NodeId, hash: &str) -> ObservedContainer {
    let labels = BTreeMap::from([
        (labels::MANAGED.to_owned(), "true".to_owned()),
        (labels::NODE_ID.to_owned(), node.to_string()),
        (labels::WORKLOAD_ID.to_owned(), "demo".to_owned()),
        (labels::SPEC_HASH.to_owned(), hash.to_owned()),
        (labels::CREATED_AT.to_owned(), "1000".to_owned()),
        (labels::CONTAINER_ID.to_owned(), id.to_string()),
    ]);
    ObservedContainer {
        docker_id: format!("docker-{id}"),
        name: id.docker_name(),
        labels: labels.into(),
        docker_state: "running".into(),
        health: None,
        health_output: None,
        exit_code: 0,
        started_at: Some(Timestamp::from_millis(1000)),
        oom_killed: false,
        limits: Limits::default(),
        state_file: None,
    }
}

/// A container the server created between the plan's view of the index
/// and its view of the reports has a row by the time the adoption is
/// decided: nothing is adopted, the action says it was moot, and the
/// pass's "rebuilt from the labels" does not count it. One with no row is
/// adopted and said to be done.
#[tokio::test]
async fn an_adoption_planned_before_the_row_was_committed_is_moot() {
    let dir = tempfile::tempdir().unwrap();
    let r = reconciler(dir.path()).await;
    let node = NodeId::new("node-a").unwrap();
    let workload = demo(&r).await;
    let adopt = |id| Action {
        kind: ActionKind::Adopt {
            observed: Box::new(reported(id, &node, &workload.spec_hash)),
        },
        node_id: node.clone(),
        reason: "managed container with no row".into(),
        not_before: None,
    };

    // The server's own create: the row commits after the plan was made.
    let created = ContainerId::from_uuid(Uuid::now_v7());
    let mut record = Pools::new_container(
        &workload.spec,
        &workload.spec_hash,
        created,
        (node.clone(), "/var/lib/boilerhouse".into()),
        Timestamp::from_millis(1000),
    );
    record.state = ContainerState::Idle;
    r.pools
        .commit(PoolWrite {
            containers: vec![ContainerChange::Insert(record.clone())],
            ..Default::default()
        })
        .await
        .unwrap();
    let moot = r.apply_action(&adopt(created)).await.unwrap();
    assert_eq!(moot, Outcome::Moot);
    assert_eq!(
        r.pools.container(&created).unwrap(),
        record,
        "the row is untouched"
    );

    // A container nobody has a row for is taken in.
    let stray = ContainerId::from_uuid(Uuid::now_v7());
    let done = r.apply_action(&adopt(stray)).await.unwrap();
    assert_eq!(done, Outcome::Done);
    assert_eq!(
        r.pools.container(&stray).unwrap().state,
        ContainerState::Idle
    );

    let (adopted, with_tenant, message) = super::rebuilt(&[
        Applied {
            action: adopt(created),
            result: Ok(moot),
        },
        Applied {
            action: adopt(stray),
            result: Ok(done),
        },
    ])
    .expect("one container was rebuilt");
    assert_eq!((adopted, with_tenant), (1, 0), "{message}");
    assert!(message.starts_with("rebuilt 1 containers"), "{message}");
    assert!(
        super::rebuilt(&[Applied {
            action: adopt(created),
            result: Ok(Outcome::Moot),
        }])
        .is_none(),
        "a moot adoption rebuilt nothing"
    );
}

/// A node's first report is reconciled by a pass over that node alone
/// (after a restart, 1,000 agents report again, and each waited for whole
/// passes over every row): its container without a row is adopted and
/// the node is marked reconciled, while a container without a row on a
/// node already reconciled waits for the next whole pass, which waits
/// while agents are still coming back (half a period at most).
#[tokio::test]
async fn a_first_report_is_reconciled_by_a_pass_over_its_node_alone() {
    use crate::tasks::BackgroundTask as _;
    let dir = tempfile::tempdir().unwrap();
    let r = reconciler(dir.path()).await;
    let hash = demo(&r).await.spec_hash.clone();
    let (a, b) = (
        NodeId::new("node-a").unwrap(),
        NodeId::new("node-b").unwrap(),
    );
    let now = crate::clock::now();
    let mut task = super::ReconcileTask::new(r.clone(), Duration::from_secs(60));
    // The server starts: no agent is connected, and a whole pass would
    // find no evidence anywhere. It waits.
    let status = task.activate().await.unwrap();
    assert_eq!(status["whole_pass"], "none yet", "{status}");

    let mut sessions = Vec::new();
    for n in [&a, &b] {
        register(&r, n).await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        r.agents.attach(n, format!("session-{n}"), tx, now);
        sessions.push(rx);
    }
    // Node a's first report: a pass over it alone. The whole pass waits
    // while a connected node (b) is not reconciled yet.
    r.agents.full_report(&a, now, vec![]);
    let status = task.activate().await.unwrap();
    assert_eq!(status["first_reports"]["nodes"], 1, "{status}");
    assert_eq!(status["whole_pass"], "none yet", "{status}");
    assert_eq!(r.agents.unreconciled(), vec![b.clone()]);
    let status = task.activate().await.unwrap();
    assert!(status.get("first_reports").is_none(), "{status}");
    assert_eq!(status["whole_pass"], "none yet", "{status}");

    // Then a container with no row on a (reconciled already) and node b's
    // first report, with one of its own.
    let (on_a, on_b) = (
        ContainerId::from_uuid(Uuid::now_v7()),
        ContainerId::from_uuid(Uuid::now_v7()),
    );
    r.agents
        .full_report(&a, now, vec![reported(on_a, &a, &hash)]);
    r.agents
        .full_report(&b, now, vec![reported(on_b, &b, &hash)]);
    let status = task.activate().await.unwrap();
    assert_eq!(status["first_reports"]["nodes"], 1, "{status}");
    assert_eq!(status["first_reports"]["applied"], 1, "{status}");
    assert_eq!(
        status["first_reports"]["cost"]["rows"], 0,
        "node b's rows only: {status}"
    );
    assert_eq!(status["whole_pass"], "none yet", "{status}");
    assert_eq!(
        r.pools.container(&on_b).map(|c| c.state),
        Some(ContainerState::Idle),
        "node b's container is adopted"
    );
    assert!(
        r.pools.container(&on_a).is_none(),
        "node a was not in the pass"
    );
    assert!(r.agents.unreconciled().is_empty());

    // Every node is back and reconciled: the whole pass runs, and takes
    // in the rest.
    let status = task.activate().await.unwrap();
    assert!(status.get("first_reports").is_none(), "{status}");
    assert_eq!(status["applied"], 1, "the whole pass: {status}");
    assert_eq!(
        r.pools.container(&on_a).map(|c| c.state),
        Some(ContainerState::Idle)
    );
    drop(sessions);
}

/// A claim at the pool's `max_size` whose idle containers are all on a
/// node whose agent just reconnected waits for that node's report to be
/// reconciled and then gets one, rather than be refused while they sit
/// idle.
#[tokio::test]
async fn a_claim_waits_for_the_idle_containers_of_a_reconnected_node() {
    use crate::tasks::BackgroundTask as _;
    let dir = tempfile::tempdir().unwrap();
    let r = reconciler(dir.path()).await;
    let workload = demo(&r).await;
    let hash = workload.spec_hash.clone();
    let a = NodeId::new("node-a").unwrap();
    register(&r, &a).await;
    let (tx, _first) = tokio::sync::mpsc::channel(16);
    r.agents
        .attach(&a, "session-1".into(), tx, crate::clock::now());
    // The pool at its max_size (4), every container idle on node a.
    let ids: Vec<ContainerId> = (0..4)
        .map(|_| ContainerId::from_uuid(Uuid::now_v7()))
        .collect();
    let report = || ids.iter().map(|id| reported(*id, &a, &hash)).collect();
    r.agents.full_report(&a, crate::clock::now(), report());
    let mut task = super::ReconcileTask::new(r.clone(), Duration::from_secs(60));
    task.activate().await.unwrap();
    for id in &ids {
        assert_eq!(
            r.pools.container(id).map(|c| c.state),
            Some(ContainerState::Idle)
        );
    }

    // The agent reconnects: its containers are offered again only once
    // its first report on the new session is reconciled.
    let (tx, _second) = tokio::sync::mpsc::channel(16);
    r.agents
        .attach(&a, "session-2".into(), tx, crate::clock::now());
    assert_eq!(r.agents.unreconciled(), vec![a.clone()]);
    let tenant: boilerhouse_core::TenantId = "alice".parse().unwrap();
    let claim = |timeout: Duration| claim_in_background(&r, &tenant, &workload, timeout);
    // Until then a claim waits, and says why when its time is up.
    let waited = claim(Duration::from_millis(300)).await.unwrap();
    match waited {
        Err(crate::pools::PoolError::Unavailable(why)) => assert!(
            why.contains("node-a") && why.contains("not been reconciled"),
            "{why}"
        ),
        other => panic!("expected the claim to wait for node-a, got {other:?}"),
    }

    // A claim waiting when the report is reconciled gets an idle one.
    let waiting = claim(Duration::from_secs(30));
    r.agents.full_report(&a, crate::clock::now(), report());
    task.activate().await.unwrap();
    let (granted, source) = waiting.await.unwrap().unwrap();
    assert_eq!(source, boilerhouse_core::pool::ClaimSource::Pool);
    assert!(ids.contains(&granted.container.id), "{granted:?}");
    assert_eq!(granted.claim.tenant_id, tenant);
}

/// After a restart many nodes come back at once, each with idle
/// containers: a claim at the pool's `max_size` takes the first node
/// reconciled, whichever it is, and does not wait for one in particular
/// (node a here, whose containers the pool lists first, is never
/// reconciled while the claim waits).
#[tokio::test]
async fn a_waiting_claim_takes_the_first_reconnected_node_that_is_reconciled() {
    use crate::tasks::BackgroundTask as _;
    let dir = tempfile::tempdir().unwrap();
    let r = reconciler(dir.path()).await;
    let workload = demo(&r).await;
    let hash = workload.spec_hash.clone();
    let (a, b) = (
        NodeId::new("node-a").unwrap(),
        NodeId::new("node-b").unwrap(),
    );
    // The pool at its max_size (4): three idle on a, then one on b.
    let on_a: Vec<ContainerId> = (0..3)
        .map(|_| ContainerId::from_uuid(Uuid::now_v7()))
        .collect();
    let on_b = ContainerId::from_uuid(Uuid::now_v7());
    let mut sessions = Vec::new();
    for (n, ids) in [(&a, on_a.clone()), (&b, vec![on_b])] {
        register(&r, n).await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        r.agents
            .attach(n, format!("{n}-1"), tx, crate::clock::now());
        sessions.push(rx);
        let report = ids.iter().map(|id| reported(*id, n, &hash)).collect();
        r.agents.full_report(n, crate::clock::now(), report);
    }
    let mut task = super::ReconcileTask::new(r.clone(), Duration::from_secs(60));
    task.activate().await.unwrap();
    assert!(r.agents.unreconciled().is_empty());

    // Both agents reconnect (the server restarted, say).
    for n in [&a, &b] {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        r.agents
            .attach(n, format!("{n}-2"), tx, crate::clock::now());
        sessions.push(rx);
    }
    let tenant: boilerhouse_core::TenantId = "alice".parse().unwrap();
    let waiting = claim_in_background(&r, &tenant, &workload, Duration::from_secs(30));
    // Only node b's first report arrives and is reconciled.
    r.agents
        .full_report(&b, crate::clock::now(), vec![reported(on_b, &b, &hash)]);
    let status = task.activate().await.unwrap();
    assert_eq!(status["first_reports"]["nodes"], 1, "{status}");
    assert_eq!(r.agents.unreconciled(), vec![a.clone()]);
    let (granted, source) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the claim still waits for node a")
        .unwrap()
        .unwrap();
    assert_eq!(source, boilerhouse_core::pool::ClaimSource::Pool);
    assert_eq!(granted.container.id, on_b);
    drop(sessions);
}

/// First reports put the whole pass off only for half a period: with a
/// period of nothing, a first report's activation runs both.
#[tokio::test]
async fn first_reports_put_the_whole_pass_off_for_half_a_period_at_most() {
    use crate::tasks::BackgroundTask as _;
    let dir = tempfile::tempdir().unwrap();
    let r = reconciler(dir.path()).await;
    let a = NodeId::new("node-a").unwrap();
    register(&r, &a).await;
    let (tx, _session) = tokio::sync::mpsc::channel(16);
    r.agents
        .attach(&a, "session-1".into(), tx, crate::clock::now());
    r.agents.full_report(&a, crate::clock::now(), vec![]);
    let mut task = super::ReconcileTask::new(r.clone(), Duration::ZERO);
    let status = task.activate().await.unwrap();
    assert_eq!(status["first_reports"]["nodes"], 1, "{status}");
    assert!(status.get("cost").is_some(), "no whole pass: {status}");
}
