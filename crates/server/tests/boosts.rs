//! Resource boosts against the real Docker engine, driven as a new user
//! would: separate `bh` processes, server and agent restarts, and
//! `docker inspect` as the judge of what is really in force.

mod boost_support;

use tonic::Code;
use tonic_types::StatusExt as _;

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::{grpcurl_available, stderr, stdout};

use boost_support::{
    BASE_MEMORY, BASE_NANO_CPUS, claim, first_line, get_boost, limits, start, wait_limits,
};

fn cpu_boost(
    target: pb::boost_target::Target,
    amount: f64,
    priority: pb::BoostPriority,
) -> pb::RequestBoostRequest {
    pb::RequestBoostRequest {
        target: Some(pb::BoostTarget {
            target: Some(target),
        }),
        resource: pb::ResourceKind::Cpu as i32,
        amount,
        priority: priority as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn container_boosts_are_applied_survive_restarts_and_release_from_separate_processes() {
    let Some(mut c) = start(&["boost"], "{min_size: 1, max_size: 3}").await else {
        return;
    };
    let (container, docker_id) = claim(&c, "t1").await;
    assert_eq!(limits(&c, &docker_id).await, (BASE_NANO_CPUS, BASE_MEMORY));

    // Request in one process...
    let cpu_id = first_line(&c.bh_ok(&[
        "boost",
        "request",
        "tenant/t1/demo",
        "cpu",
        "0.5",
        "--priority",
        "high",
        "--duration",
        "30m",
    ]));
    let memory_id = first_line(&c.bh_ok(&[
        "boost",
        "request",
        &format!("container/{container}"),
        "memory",
        "64M",
    ]));
    // ...and Docker has the raised limits by the time bh returns.
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY + (64 << 20))
    );

    // Status in another process shows both, with their time left.
    let status = c.bh_ok(&["boost", "status"]);
    assert!(status.contains("REMAINING"), "{status}");
    for id in [&cpu_id, &memory_id] {
        let line = status.lines().find(|l| l.contains(id.as_str()));
        let line = line.unwrap_or_else(|| panic!("{id} missing from:\n{status}"));
        assert!(line.contains("active"), "{line}");
    }
    let cpu_line = status.lines().find(|l| l.contains(&cpu_id)).unwrap();
    assert!(
        cpu_line.contains("29m") || cpu_line.contains("30m"),
        "{cpu_line}"
    );

    // A repeated request id returns the same boost and applies nothing twice.
    let again = |c: &Cluster| {
        first_line(&c.bh_ok(&[
            "boost",
            "request",
            "tenant/t1/demo",
            "cpu",
            "0.25",
            "--request-id",
            "same-key",
        ]))
    };
    let first = again(&c);
    assert_eq!(again(&c), first);
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS + 750_000_000, BASE_MEMORY + (64 << 20))
    );
    c.bh_ok(&["boost", "release", &first]);
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY + (64 << 20)),
        "the keyed boost to be reverted",
    )
    .await;

    // The server restarts: the boosts are still there, still in force.
    c.restart_server().await;
    let status = c.bh_ok(&["boost", "status", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&status).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&cpu_id.as_str()) && ids.contains(&memory_id.as_str()),
        "{status}"
    );
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY + (64 << 20))
    );

    // Release in a third process: the limits go back to the workload's.
    let out = c.bh_ok(&["boost", "release", &cpu_id]);
    assert!(out.contains("released"), "{out}");
    c.bh_ok(&["boost", "release", &memory_id]);
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "base limits after release",
    )
    .await;
    let ended = c.bh_ok(&["boost", "status", "--all"]);
    assert!(
        ended
            .lines()
            .any(|l| l.contains(&cpu_id) && l.contains("released")),
        "{ended}"
    );
    // Releasing twice says it already ended.
    let err = c.bh_err(&["boost", "release", &cpu_id]);
    assert!(err.contains("already ended"), "{err}");
    let events = c.bh_ok(&["events", "-n", "100"]);
    for kind in ["boost.requested", "boost.active", "boost.released"] {
        assert!(events.contains(kind), "{kind} missing from:\n{events}");
    }
}

#[tokio::test]
async fn bad_boost_requests_are_refused_with_the_field_and_change_nothing() {
    let Some(c) = start(&["boostbad"], "{min_size: 1, max_size: 2}").await else {
        return;
    };
    let (_container, docker_id) = claim(&c, "t1").await;
    let node = format!("node/{}", c.node(0));
    for (amount, resource) in [
        ("-1", "cpu"),
        ("0", "cpu"),
        ("NaN", "cpu"),
        ("1e12", "cpu"),
        ("0.5", "gpu"),
        ("1024", "memory"),
    ] {
        let err = c.bh_err(&["boost", "request", &node, resource, amount]);
        assert!(
            err.contains("invalid argument") && err.contains("amount"),
            "{resource} {amount}: {err}"
        );
    }
    let err = c.bh_err(&["boost", "request", &node, "disk", "1"]);
    assert!(err.contains("unknown resource"), "{err}");
    let err = c.bh_err(&["boost", "request", "node/nowhere", "cpu", "1"]);
    assert!(err.contains("not found"), "{err}");
    let err = c.bh_err(&["boost", "request", "tenant/nobody/demo", "cpu", "1"]);
    assert!(err.contains("not found"), "{err}");
    let err = c.bh_err(&[
        "boost",
        "request",
        "container/01900000-0000-7000-8000-000000000000",
        "cpu",
        "1",
    ]);
    assert!(err.contains("not found"), "{err}");

    // The same checks over gRPC: codes and field violations.
    let mut boosts = c.boosts().await;
    let tenant_target = pb::BoostTarget {
        target: Some(pb::boost_target::Target::Tenant(pb::TenantTarget {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
        })),
    };
    for (resource, amount, field) in [
        (pb::ResourceKind::Cpu as i32, f64::NAN, "amount"),
        (pb::ResourceKind::Cpu as i32, -2.0, "amount"),
        (pb::ResourceKind::Memory as i32, f64::INFINITY, "amount"),
        (42, 1.0, "resource"),
        (pb::ResourceKind::Unspecified as i32, 1.0, "resource"),
    ] {
        let err = boosts
            .request_boost(pb::RequestBoostRequest {
                target: Some(tenant_target.clone()),
                resource,
                amount,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let violations = err.get_error_details().bad_request().unwrap().clone();
        assert_eq!(violations.field_violations[0].field, field, "{err:?}");
    }
    let err = boosts
        .request_boost(pb::RequestBoostRequest {
            target: Some(tenant_target.clone()),
            resource: pb::ResourceKind::Cpu as i32,
            amount: 0.5,
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("duration"), "{err:?}");
    let err = boosts
        .request_boost(pb::RequestBoostRequest {
            target: Some(tenant_target.clone()),
            resource: pb::ResourceKind::Cpu as i32,
            amount: 0.5,
            source_node_id: "elsewhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("source_node_id"), "{err:?}");

    // A workload that sets no memory limit has none to raise.
    c.write_workload(
        "open",
        &format!(
            "id: open\nimage: {}\ncommand: [sleep, infinity]\npool: {{min_size: 0, max_size: 1}}\n",
            c.image()
        ),
    );
    c.eventually("a claim on the unlimited workload", || async {
        let out = c.bh(&["claim", "t1", "open", "--timeout", "60s"]);
        out.status.success().then_some(())
    })
    .await;
    let err = c.bh_err(&["boost", "request", "tenant/t1/open", "memory", "64M"]);
    assert!(
        err.contains("failed precondition") && err.contains("no memory limit to raise"),
        "{err}"
    );

    // Nothing was recorded, nothing applied.
    let all = boosts
        .list_boosts(pb::ListBoostsRequest {
            node_id: String::new(),
            include_ended: true,
        })
        .await
        .unwrap()
        .into_inner()
        .boosts;
    assert!(all.is_empty(), "{all:?}");
    assert_eq!(limits(&c, &docker_id).await, (BASE_NANO_CPUS, BASE_MEMORY));

    if grpcurl_available() {
        let out = c.grpcurl(&[
            "-d",
            r#"{"target": {"node_id": "nowhere"}, "resource": "RESOURCE_KIND_CPU", "amount": 1}"#,
            "boilerhouse.v1.BoostService/RequestBoost",
        ]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
        let out = c.grpcurl(&[
            "-d",
            r#"{"target": {"node_id": "x"}, "resource": "RESOURCE_KIND_GPU", "amount": -3}"#,
            "boilerhouse.v1.BoostService/RequestBoost",
        ]);
        assert!(stderr(&out).contains("InvalidArgument"), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn a_critical_boost_preempts_a_low_one_when_capacity_is_short() {
    let Some(c) = start(&["boostpre"], "{min_size: 0, max_size: 1}").await else {
        return;
    };
    let (container, docker_id) = claim(&c, "t1").await;
    let node = c.node(0).to_owned();
    let capacity = pb::node_service_client::NodeServiceClient::new(c.channel().await)
        .get_node(pb::GetNodeRequest {
            node_id: node.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap()
        .capacity
        .unwrap()
        .cpus;
    // One container of 0.25 cpus is the only reservation (max_size 1).
    let free = capacity - 0.25;
    let share = ((free * 0.6) * 1000.0).floor() / 1000.0;
    let share_text = share.to_string();
    let target = format!("container/{container}");
    let low = first_line(&c.bh_ok(&[
        "boost",
        "request",
        &target,
        "cpu",
        &share_text,
        "--priority",
        "low",
    ]));
    // A normal boost of the same size does not fit and may not preempt
    // anything of its own priority or above: RESOURCE_EXHAUSTED, with the
    // shortfall in the details.
    let mut boosts = c.boosts().await;
    let err = boosts
        .request_boost(pb::RequestBoostRequest {
            source_node_id: node.clone(),
            ..cpu_boost(
                pb::boost_target::Target::NodeId(node.clone()),
                share,
                pb::BoostPriority::Low,
            )
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a node cannot draw from itself: {err:?}"
    );
    let err = boosts
        .request_boost(cpu_boost(
            pb::boost_target::Target::ContainerId(container.clone()),
            share,
            pb::BoostPriority::Low,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let quota = err.get_error_details().quota_failure().unwrap().clone();
    assert!(quota.violations[0].subject.contains(&node), "{quota:?}");

    let critical = boosts
        .request_boost(cpu_boost(
            pb::boost_target::Target::ContainerId(container.clone()),
            share,
            pb::BoostPriority::Critical,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(critical.preempted_boost_ids, vec![low.clone()]);
    let boost = critical.boost.unwrap();
    assert_eq!(boost.status, pb::BoostStatus::Active as i32);
    let preempted = get_boost(&c, &low).await;
    assert_eq!(preempted.status, pb::BoostStatus::Preempted as i32);
    assert!(
        preempted.reason.contains("preempted by critical boost"),
        "{}",
        preempted.reason
    );
    // Docker has the base plus the critical boost only.
    let want = BASE_NANO_CPUS + (share * 1e9).round() as i64;
    wait_limits(&c, &docker_id, (want, BASE_MEMORY), "critical only").await;
    let events = c.bh_ok(&["events", "-n", "50"]);
    assert!(events.contains("boost.preempted"), "{events}");
}

#[tokio::test]
async fn a_node_boost_moves_capacity_and_new_containers_follow_it() {
    // Two agents on one engine report the same capacity; with no boost the
    // placement tie-break alternates between them.
    let Some(c) = start(&["boosta", "boostb"], "{min_size: 0, max_size: 6}").await else {
        return;
    };
    let (source, target) = (c.node(0).to_owned(), c.node(1).to_owned());
    let memory = c.wait_ready().await[0]
        .capacity
        .unwrap_or_default()
        .memory_bytes;
    // Move half of the source's memory to the target.
    let half = format!("{}", (memory / 2) >> 20 << 20);
    let id = first_line(&c.bh_ok(&[
        "boost",
        "request",
        &format!("node/{target}"),
        "memory",
        &half,
        "--source",
        &source,
    ]));
    let b = get_boost(&c, &id).await;
    assert_eq!(b.status, pb::BoostStatus::Active as i32);
    assert!(!b.enforced_on_host, "a node boost lives in the ledger");
    let by_source = c.bh_ok(&["boost", "status", "--node", &source]);
    assert!(by_source.contains(&id), "{by_source}");

    c.bh_ok(&["pool", "scale", "demo", "--min", "4"]);
    let placed = c
        .eventually("four containers", || async {
            let out = c.bh(&["container", "list", "-o", "json"]);
            let list: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
            let nodes: Vec<String> = list
                .as_array()?
                .iter()
                .map(|c| c["node"].as_str().unwrap_or_default().to_owned())
                .collect();
            (nodes.len() >= 4).then_some(nodes)
        })
        .await;
    assert!(
        placed.iter().all(|n| n == &target),
        "every new container should land on the boosted node {target}: {placed:?}"
    );
}
