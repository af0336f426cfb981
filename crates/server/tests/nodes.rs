//! boilerhoused with real agents on the real Docker engine: nodes join,
//! go Suspect and Lost when their agent dies, return, survive a server
//! restart, and can be cordoned.

use std::time::Duration;

use nix::sys::signal::Signal;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::event_service_client::EventServiceClient;
use boilerhouse_proto::pb::node_service_client::NodeServiceClient;
use boilerhouse_testkit::docker::{
    remove_node_containers, require_docker, test_image, unique_node,
};
use boilerhouse_testkit::{
    AgentOptions, AgentProcess, ServerOptions, ServerProcess, eventually, stderr, stdout,
};

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

async fn nodes(server: &ServerProcess) -> Vec<pb::Node> {
    NodeServiceClient::new(server.channel().await.unwrap())
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

async fn node(server: &ServerProcess, id: &str) -> Option<pb::Node> {
    nodes(server).await.into_iter().find(|n| n.node_id == id)
}

async fn wait_status(
    server: &ServerProcess,
    id: &str,
    status: pb::NodeStatus,
    connected: Option<bool>,
) -> pb::Node {
    eventually(WAIT, &format!("{id} to be {status:?}"), || async {
        node(server, id)
            .await
            .filter(|n| n.status == status as i32 && connected.is_none_or(|c| n.connected == c))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log()))
}

async fn node_events(server: &ServerProcess, id: &str) -> Vec<String> {
    EventServiceClient::new(server.channel().await.unwrap())
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

fn agent(server_url: &str, name: &str, dir: &std::path::Path) -> AgentProcess {
    let mut options = AgentOptions::new(name, server_url, dir.join(name));
    options.labels.push(("zone".into(), "test".into()));
    AgentProcess::start(options).unwrap()
}

#[tokio::test]
async fn agents_join_and_bh_lists_them_ready_with_capacity() {
    let Some(_docker) = require_docker().await else {
        return;
    };
    let server = ServerProcess::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (unique_node("node-a"), unique_node("node-b"));
    let _agent_a = agent(&server.url(), &a, dir.path());
    let _agent_b = agent(&server.url(), &b, dir.path());

    for id in [&a, &b] {
        let n = wait_status(&server, id, pb::NodeStatus::Ready, Some(true)).await;
        let capacity = n.capacity.unwrap();
        assert!(
            capacity.cpus >= 1.0 && capacity.memory_bytes > 0,
            "{capacity:?}"
        );
        assert!(!n.engine_version.is_empty());
        assert_eq!(n.labels["zone"], "test");
    }
    let out = server.bh(&["node", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    for id in [&a, &b] {
        let line = table
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not in\n{table}"));
        assert!(line.contains("ready"), "{line}");
    }
    let out = server.bh(&["node", "get", &a, "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["status"], "ready");
    assert_eq!(json["connected"], true);
    assert_eq!(node_events(&server, &a).await, ["node.joined"]);

    let out = server.bh(&["status"]);
    assert!(
        stdout(&out).contains("2 agents connected"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("node_liveness"), "{}", stdout(&out));
}

#[tokio::test]
async fn a_killed_agent_goes_suspect_then_lost_and_returns_with_its_containers() {
    let Some(docker) = require_docker().await else {
        return;
    };
    let image = test_image(&docker).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_in(
        root.path(),
        ServerOptions {
            config_toml: Some(FAST_LIVENESS.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_node("node-k");
    let mut agent = agent(&server.url(), &name, dir.path());
    wait_status(&server, &name, pb::NodeStatus::Ready, Some(true)).await;

    // A managed container on that node, created the way the agent would.
    let spec = boilerhouse_testkit::docker::managed_spec(
        &image,
        &name,
        "k",
        boilerhouse_core::Timestamp::from_millis(1),
    );
    let runtime = boilerhouse_agent::docker::DockerRuntime::connect(None)
        .await
        .unwrap();
    use boilerhouse_agent::runtime::ContainerRuntime as _;
    let docker_id = runtime.create(&spec, &[]).await.unwrap();
    runtime.start(&docker_id).await.unwrap();
    let started_at = docker
        .inspect_container(&docker_id, None)
        .await
        .unwrap()
        .state
        .unwrap()
        .started_at;
    eventually(WAIT, "the heartbeat to count the container", || async {
        node(&server, &name)
            .await
            .filter(|n| n.container_count == 1)
    })
    .await
    .unwrap();

    agent.kill();
    wait_status(&server, &name, pb::NodeStatus::Suspect, Some(false)).await;
    wait_status(&server, &name, pb::NodeStatus::Lost, Some(false)).await;
    assert_eq!(
        node_events(&server, &name).await,
        ["node.joined", "node.suspect", "node.lost"]
    );

    agent.restart().unwrap();
    let back = wait_status(&server, &name, pb::NodeStatus::Ready, Some(true)).await;
    assert_eq!(
        node_events(&server, &name).await,
        ["node.joined", "node.suspect", "node.lost", "node.returned"]
    );
    eventually(
        WAIT,
        "the returned agent to report its container",
        || async {
            node(&server, &name)
                .await
                .filter(|n| n.container_count == 1)
        },
    )
    .await
    .unwrap();
    let after = docker.inspect_container(&docker_id, None).await.unwrap();
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
    remove_node_containers(&docker, &name).await;
}

#[tokio::test]
async fn a_restarted_server_gets_every_agent_back_without_help() {
    let Some(_docker) = require_docker().await else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let options = ServerOptions {
        config_toml: Some(FAST_LIVENESS.into()),
        ..Default::default()
    };
    let mut server = ServerProcess::start_in(root.path(), options.clone())
        .await
        .unwrap();
    let listen = server.addrs.grpc;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (unique_node("node-a"), unique_node("node-b"));
    let _agent_a = agent(&server.url(), &a, dir.path());
    let _agent_b = agent(&server.url(), &b, dir.path());
    for id in [&a, &b] {
        wait_status(&server, id, pb::NodeStatus::Ready, Some(true)).await;
    }

    let status = server.signal_and_wait(Signal::SIGTERM, WAIT).await.unwrap();
    assert!(status.success());
    let server = ServerProcess::start_in(
        root.path(),
        ServerOptions {
            listen: Some(listen),
            ..options
        },
    )
    .await
    .unwrap();
    for id in [&a, &b] {
        wait_status(&server, id, pb::NodeStatus::Ready, Some(true)).await;
        let events = node_events(&server, id).await;
        assert_eq!(
            events,
            ["node.joined"],
            "a server restart is not the node's absence: {events:?}"
        );
    }
}

#[tokio::test]
async fn cordon_and_uncordon_persist_and_are_recorded() {
    let Some(_docker) = require_docker().await else {
        return;
    };
    let server = ServerProcess::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_node("node-c");
    let _agent = agent(&server.url(), &name, dir.path());
    wait_status(&server, &name, pb::NodeStatus::Ready, Some(true)).await;

    let out = server.bh(&["node", "cordon", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cordoned"), "{}", stdout(&out));
    assert!(node(&server, &name).await.unwrap().cordoned);
    let out = server.bh(&["node", "list"]);
    assert!(stdout(&out).contains("ready,cordoned"), "{}", stdout(&out));
    let out = server.bh(&["node", "uncordon", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!node(&server, &name).await.unwrap().cordoned);
    assert_eq!(
        node_events(&server, &name).await,
        ["node.joined", "node.cordoned", "node.uncordoned"]
    );

    let out = server.bh(&["node", "cordon", "no-such-node"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}
