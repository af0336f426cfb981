//! The real thing end to end: three real `boilerhoused` replicas on one
//! real PostgreSQL database, a real agent and the real `bh` given all three
//! addresses. The agent's node is Ready at whichever replica leads and the
//! pool fills on it; after a kill -9 of the leader the agent finds the new
//! leader by itself (past standbys that still name the dead one until its
//! lease runs out) and `bh` reads from and writes to the new leader.
//!
//! Needs Docker and a PostgreSQL server (`BOILERHOUSE_POSTGRES_URL`;
//! dev/test starts one with dev/postgres); skipped without either unless
//! `BOILERHOUSE_REQUIRE_POSTGRES=1`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::node_service_client::NodeServiceClient;
use boilerhouse_testkit::database::{TestDatabase, postgres_available};
use boilerhouse_testkit::docker::{
    remove_node_containers_blocking, require_docker, test_image, unique_node,
};
use boilerhouse_testkit::{
    AgentOptions, AgentProcess, ServerOptions, ServerProcess, eventually, stderr, stdout,
};

const WAIT: Duration = Duration::from_secs(60);

async fn replica(root: &Path, name: &str, database: &str) -> ServerProcess {
    ServerProcess::start_in(
        root,
        ServerOptions {
            args: vec!["--database".into(), database.into()],
            config_toml: Some(
                "leader_lease = \"2s\"\nheartbeat_interval = \"200ms\"\nsuspect_after = \"5s\"\n"
                    .into(),
            ),
            replica: Some(name.into()),
            ..Default::default()
        },
    )
    .await
    .expect("start a replica")
}

/// The replica that leads, once exactly one of the running ones does.
async fn the_leader(replicas: &[ServerProcess]) -> usize {
    eventually(WAIT, "exactly one leader", || async {
        let leaders: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].pid().is_some() && replicas[i].role() == "leader")
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
    .unwrap()
}

/// Waits until `leader` has `node` connected and Ready.
async fn wait_node_ready(leader: &ServerProcess, node: &str, agent: &AgentProcess) {
    eventually(WAIT, &format!("{node} ready at the leader"), || async {
        let mut nodes = NodeServiceClient::new(leader.channel().await.ok()?);
        let listed = nodes
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .ok()?
            .into_inner()
            .nodes;
        listed
            .iter()
            .any(|n| n.node_id == node && n.connected && n.status == pb::NodeStatus::Ready as i32)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent:\n{}\nleader:\n{}", agent.log(), leader.log()));
}

/// `bh --server <servers> args…`, without blocking the runtime.
async fn bh(server: &ServerProcess, servers: &str, args: &[&str]) -> Output {
    let mut command = server.bh_command(server.admin_token());
    command
        .args(["--server", servers])
        .args(args)
        .stdin(Stdio::null());
    tokio::process::Command::from(command)
        .output()
        .await
        .expect("run bh")
}

/// Removes the node's containers however the test ends.
struct Cleanup(bollard::Docker, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_node_containers_blocking(&self.0, std::slice::from_ref(&self.1));
    }
}

#[tokio::test]
async fn an_agent_and_bh_given_every_replica_follow_the_leader_across_a_kill() {
    if !postgres_available() {
        return;
    }
    let Some(docker) = require_docker().await else {
        return;
    };
    let image = test_image(&docker).await.unwrap();
    let database = TestDatabase::postgres_schema().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("workloads")).unwrap();
    std::fs::write(
        root.join("workloads/demo.yaml"),
        format!("id: demo\nimage: {image}\npool: {{min_size: 1, max_size: 4}}\n"),
    )
    .unwrap();
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(replica(root, name, database.value()).await);
    }
    let servers = replicas
        .iter()
        .map(ServerProcess::url)
        .collect::<Vec<_>>()
        .join(",");

    let node = unique_node("replicas");
    let _cleanup = Cleanup(docker.clone(), node.clone());
    let mut options = AgentOptions::new(&node, &servers, root.join("agents").join(&node));
    options.tls = replicas[0].node_tls(&node).unwrap();
    let agent = AgentProcess::start(options).unwrap();

    let first = the_leader(&replicas).await;
    wait_node_ready(&replicas[first], &node, &agent).await;
    let out = bh(&replicas[first], &servers, &["status"]).await;
    assert!(
        stdout(&out).contains(&format!("Server:     {} ", replicas[first].url())),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // The pool fills on the node: the leader really drives it.
    eventually(WAIT, "the pool filled", || async {
        let out = bh(&replicas[first], &servers, &["pool", "list", "-o", "json"]).await;
        let pools: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (pools[0]["idle"] == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas[first].log()));

    // kill -9 the leader: a standby takes over and the agent finds it.
    replicas[first].kill();
    let second = the_leader(&replicas).await;
    assert_ne!(second, first);
    wait_node_ready(&replicas[second], &node, &agent).await;

    // bh, given the same list with the dead leader in it, reaches the new
    // one for reads and for a write (a claim without request_id: the
    // standbys' refusals did nothing).
    let claim = eventually(WAIT, "a claim through the new leader", || async {
        let out = bh(&replicas[second], &servers, &["claim", "t1", "demo"]).await;
        out.status.success().then_some(out)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas[second].log()));
    assert!(stdout(&claim).contains("t1"), "{}", stdout(&claim));
    let claims = bh(&replicas[second], &servers, &["claims", "list"]).await;
    assert!(stdout(&claims).contains("t1"), "{}", stderr(&claims));
    let out = bh(&replicas[second], &servers, &["status"]).await;
    assert!(
        stdout(&out).contains(&format!("Server:     {} ", replicas[second].url())),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let log = agent.log();
    assert!(log.contains("a standby refused the session"), "{log}");
}
