//! boilerhoused with real agents on the real Docker engine: nodes join,
//! go Suspect and Lost when their agent dies, return, survive a server
//! restart, and can be cordoned.

use std::time::Duration;

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::{Cluster, ClusterBuilder};
use boilerhouse_testkit::{stderr, stdout};

const WAIT: Duration = Duration::from_secs(30);

/// Short liveness windows so the test sees Suspect and Lost quickly, yet
/// wide enough (15 heartbeats) that a loaded CI machine never makes a
/// healthy node Suspect, and an agent reconnecting after a server restart
/// (backoff up to 1s) is back well within them.
const FAST_LIVENESS: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "3s"
lost_grace = "2s"
restart_grace = "6s"
"#;

/// A cluster whose agents all report the label `zone=test`.
fn cluster() -> ClusterBuilder {
    Cluster::builder().label("zone", "test").timeout(WAIT)
}

async fn node_events(c: &Cluster, id: &str) -> Vec<String> {
    c.events()
        .await
        .list_events(pb::ListEventsRequest {
            filter: Some(pb::EventFilter {
                node_id: id.to_owned(),
                ..Default::default()
            }),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[tokio::test]
async fn agents_join_and_bh_lists_them_ready_with_capacity() {
    let Some(c) = cluster().node("node-a").node("node-b").start().await else {
        return;
    };
    let (a, b) = (c.node(0).to_owned(), c.node(1).to_owned());

    for id in [&a, &b] {
        let n = c.wait_node(id, pb::NodeStatus::Ready, Some(true)).await;
        let capacity = n.capacity.unwrap();
        assert!(
            capacity.cpus >= 1.0 && capacity.memory_bytes > 0,
            "{capacity:?}"
        );
        assert!(!n.engine_version.is_empty());
        assert_eq!(n.labels["zone"], "test");
    }
    let out = c.bh(&["node", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    for id in [&a, &b] {
        let line = table
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not in\n{table}"));
        assert!(line.contains("ready"), "{line}");
    }
    let out = c.bh(&["node", "get", &a, "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["status"], "ready");
    assert_eq!(json["connected"], true);
    assert_eq!(node_events(&c, &a).await, ["node.joined"]);

    let out = c.bh(&["status"]);
    assert!(
        stdout(&out).contains("2 agents connected"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("node_liveness"), "{}", stdout(&out));
}

#[tokio::test]
async fn a_killed_agent_goes_suspect_then_lost_and_returns_with_its_containers() {
    let Some(mut c) = cluster().config(FAST_LIVENESS).node("node-k").start().await else {
        return;
    };
    let name = c.node(0).to_owned();
    c.wait_node(&name, pb::NodeStatus::Ready, Some(true)).await;

    // A managed container on that node, created the way the agent would.
    // Its pool is not configured, so reconciliation would remove it once
    // its creation grace (60 s) has passed: it is created now.
    let spec = boilerhouse_testkit::docker::managed_spec(
        c.image(),
        &name,
        "k",
        boilerhouse_core::Timestamp::from_system_time(std::time::SystemTime::now()),
    );
    let runtime = boilerhouse_agent::docker::DockerRuntime::connect(None)
        .await
        .unwrap();
    use boilerhouse_agent::runtime::ContainerRuntime as _;
    let docker_id = runtime.create(&spec, &[]).await.unwrap();
    runtime.start(&docker_id).await.unwrap();
    let started_at = c
        .docker()
        .inspect_container(&docker_id, None)
        .await
        .unwrap()
        .state
        .unwrap()
        .started_at;
    c.eventually("the heartbeat to count the container", || async {
        c.node_info(&name).await.filter(|n| n.container_count == 1)
    })
    .await;

    c.kill_agent(0);
    c.wait_node(&name, pb::NodeStatus::Suspect, Some(false))
        .await;
    c.wait_node(&name, pb::NodeStatus::Lost, Some(false)).await;
    assert_eq!(
        node_events(&c, &name).await,
        ["node.joined", "node.suspect", "node.lost"]
    );

    c.restart_agent(0);
    let back = c.wait_node(&name, pb::NodeStatus::Ready, Some(true)).await;
    assert_eq!(
        node_events(&c, &name).await,
        ["node.joined", "node.suspect", "node.lost", "node.returned"]
    );
    c.eventually("the returned agent to report its container", || async {
        c.node_info(&name).await.filter(|n| n.container_count == 1)
    })
    .await;
    let after = c
        .docker()
        .inspect_container(&docker_id, None)
        .await
        .unwrap();
    assert_eq!(
        after.id.as_deref(),
        Some(docker_id.as_str()),
        "the same Docker container"
    );
    assert_eq!(
        after.state.unwrap().started_at,
        started_at,
        "never restarted or recreated"
    );
    assert!(back.connected);
}

#[tokio::test]
async fn a_restarted_server_gets_every_agent_back_without_help() {
    let Some(mut c) = cluster()
        .config(FAST_LIVENESS)
        .node("node-a")
        .node("node-b")
        .start()
        .await
    else {
        return;
    };
    let (a, b) = (c.node(0).to_owned(), c.node(1).to_owned());
    for id in [&a, &b] {
        c.wait_node(id, pb::NodeStatus::Ready, Some(true)).await;
    }

    let status = c.stop_server().await;
    assert!(status.success());
    c.start_server().await;
    for id in [&a, &b] {
        c.wait_node(id, pb::NodeStatus::Ready, Some(true)).await;
        let events = node_events(&c, id).await;
        assert_eq!(
            events,
            ["node.joined"],
            "a server restart is not the node's absence: {events:?}"
        );
    }
}

#[tokio::test]
async fn cordon_and_uncordon_persist_and_are_recorded() {
    let Some(c) = cluster().node("node-c").start().await else {
        return;
    };
    let name = c.node(0).to_owned();
    c.wait_node(&name, pb::NodeStatus::Ready, Some(true)).await;

    let out = c.bh(&["node", "cordon", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cordoned"), "{}", stdout(&out));
    assert!(c.node_info(&name).await.unwrap().cordoned);
    let out = c.bh(&["node", "list"]);
    assert!(stdout(&out).contains("ready,cordoned"), "{}", stdout(&out));
    let out = c.bh(&["node", "uncordon", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!c.node_info(&name).await.unwrap().cordoned);
    assert_eq!(
        node_events(&c, &name).await,
        ["node.joined", "node.cordoned", "node.uncordoned"]
    );

    let out = c.bh(&["node", "cordon", "no-such-node"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}
