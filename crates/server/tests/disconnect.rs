//! The workload's `disconnect` policy against the real engine: a node
//! whose agent is gone (killed with SIGKILL, so its containers run on, as
//! on a host cut off by a partition) goes Lost, and what becomes of its
//! tenants' claims is what the policy says.
//!
//! - `replace: false` (the default): the claim is kept with its container,
//!   answered to its tenant with a warning, never handed to anyone else;
//!   files written while the node is away are there when it returns.
//! - `replace: true`: the claim is LOST, the tenant's next claim gets a
//!   new container with the files as last synced, and the original is
//!   destroyed when its node returns.
//!
//! The partitions themselves, with agents at their own addresses, are in
//! `multihost.rs`.

use std::path::Path;
use std::time::Duration;

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;

const FAST_LIVENESS: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "3s"
lost_grace = "2s"
restart_grace = "6s"
"#;

/// A syncing workload with the given `disconnect` block; each tenant's
/// files go to `<sink>/tenants/<tenant>` when a sync is triggered.
fn workload(image: &str, sink: &Path, disconnect: &str) -> String {
    format!(
        "id: away\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\n\
         pool: {{min_size: 2, max_size: 6}}\n\
         sync:\n  sink: {{type: local, path: {}, prefix: \"tenants/${{tenantId}}\"}}\n\
         \x20 mappings: [{{path: ., direction: bidirectional}}]\n\
         \x20 policy: {{manual: true}}\n\
         {disconnect}",
        sink.display()
    )
}

async fn start(disconnect: &'static str) -> Option<Cluster> {
    let builder = Cluster::builder()
        .node("away-a")
        .node("away-b")
        .config(FAST_LIVENESS)
        .timeout(Duration::from_secs(60));
    let sink = builder.dir().join("sink");
    builder
        .workload("away", move |image| workload(image, &sink, disconnect))
        .start()
        .await
}

async fn claim(c: &Cluster, tenant: &str) -> pb::ClaimResponse {
    c.claims()
        .await
        .claim(pb::ClaimRequest {
            tenant_id: tenant.into(),
            workload_id: "away".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("claim for {tenant}: {e}\n{}", c.server().log()))
        .into_inner()
}

async fn ended_claims(c: &Cluster, tenant: &str) -> Vec<pb::ClaimInfo> {
    c.claims()
        .await
        .list_claims(pb::ListClaimsRequest {
            tenant_id: tenant.into(),
            include_ended: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .claims
}

async fn running(c: &Cluster, docker_id: &str) -> bool {
    c.docker()
        .inspect_container(docker_id, None)
        .await
        .ok()
        .and_then(|i| i.state)
        .and_then(|s| s.running)
        .unwrap_or(false)
}

fn agent_index(c: &Cluster, node: &str) -> usize {
    c.node_names()
        .iter()
        .position(|n| n == node)
        .expect("the claim's node is one of ours")
}

#[tokio::test]
async fn by_default_a_lost_nodes_claim_is_kept_and_its_files_are_there_on_return() {
    let Some(mut c) = start("").await else {
        return;
    };
    let first = claim(&c, "t1").await.claim.unwrap();
    let node = first.node_id.clone();
    let state = Path::new(&first.state_path).to_owned();
    std::fs::write(state.join("before.txt"), "before").unwrap();

    c.kill_agent(agent_index(&c, &node));
    c.wait_node(&node, pb::NodeStatus::Lost, Some(false)).await;
    // The tenant keeps writing while its node is away.
    std::fs::write(state.join("during.txt"), "during").unwrap();

    // The tenant's claim is the same one, with a warning; the server has
    // ended nothing.
    let again = claim(&c, "t1").await;
    let kept = again.claim.unwrap();
    assert_eq!(kept.container_id, first.container_id);
    assert_eq!(kept.generation, first.generation);
    assert!(
        again.node_warning.contains(&node),
        "the tenant is told its node is away: {:?}",
        again.node_warning
    );
    assert!(
        ended_claims(&c, "t1")
            .await
            .iter()
            .all(|cl| cl.status == pb::ClaimStatus::Active as i32),
        "no claim of t1 ended"
    );
    // No one else is ever handed it: another tenant gets another one.
    let other = claim(&c, "t2").await.claim.unwrap();
    assert_ne!(other.container_id, first.container_id);
    assert_ne!(other.node_id, node, "new claims go to the node that is up");
    assert!(running(&c, &first.docker_id).await);

    // The node returns: same claim, same container, the files written
    // while away are there, and the warning is gone.
    c.restart_agent(agent_index(&c, &node));
    c.wait_node(&node, pb::NodeStatus::Ready, Some(true)).await;
    let back = claim(&c, "t1").await;
    let claim_back = back.claim.unwrap();
    assert_eq!(claim_back.container_id, first.container_id);
    assert_eq!(claim_back.generation, first.generation);
    assert_eq!(claim_back.docker_id, first.docker_id, "never recreated");
    assert!(back.node_warning.is_empty(), "{:?}", back.node_warning);
    assert_eq!(
        std::fs::read_to_string(state.join("during.txt")).unwrap(),
        "during"
    );
    assert!(running(&c, &first.docker_id).await);
    let events = c.bh_ok(&["events", "--kind", "claim"]);
    assert!(!events.contains("claim.lost"), "{events}");
}

#[tokio::test]
async fn with_replace_the_tenant_moves_with_its_synced_files_and_the_original_goes_on_return() {
    let Some(mut c) = start("disconnect: {replace: true}\n").await else {
        return;
    };
    let first = claim(&c, "t1").await.claim.unwrap();
    let node = first.node_id.clone();
    std::fs::write(Path::new(&first.state_path).join("notes.txt"), "v1").unwrap();
    c.syncs()
        .await
        .trigger_sync(pb::TriggerSyncRequest {
            tenant_id: "t1".into(),
            workload_id: "away".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("trigger sync: {e}\n{}", c.server().log()));
    let synced = c.dir().join("sink/tenants/t1/notes.txt");
    c.eventually("v1 to reach the sink", || async {
        (std::fs::read_to_string(&synced).ok()? == "v1").then_some(())
    })
    .await;

    c.kill_agent(agent_index(&c, &node));
    c.wait_node(&node, pb::NodeStatus::Lost, Some(false)).await;
    c.eventually("the claim on the lost node to be LOST", || async {
        ended_claims(&c, "t1")
            .await
            .iter()
            .any(|cl| {
                cl.container_id == first.container_id && cl.status == pb::ClaimStatus::Lost as i32
            })
            .then_some(())
    })
    .await;
    assert!(
        running(&c, &first.docker_id).await,
        "nothing is destroyed while its node is away"
    );

    // The tenant claims again: a new container on the node that is up,
    // with its files as last synced.
    let moved = claim(&c, "t1").await.claim.unwrap();
    assert_ne!(moved.container_id, first.container_id);
    assert_ne!(moved.node_id, node);
    assert_eq!(
        std::fs::read_to_string(Path::new(&moved.state_path).join("notes.txt")).unwrap(),
        "v1"
    );

    // The node returns: the original served t1, who holds a replacement,
    // so it is destroyed; t1 keeps the replacement.
    c.restart_agent(agent_index(&c, &node));
    c.wait_node(&node, pb::NodeStatus::Ready, Some(true)).await;
    c.wait_gone(&first.docker_id, "the original to be destroyed")
        .await;
    let still = claim(&c, "t1").await.claim.unwrap();
    assert_eq!(still.container_id, moved.container_id);
    // No other tenant ever held either container.
    for tenant in ["t2", "t3"] {
        let other = claim(&c, tenant).await.claim.unwrap();
        assert_ne!(other.container_id, first.container_id);
        assert_ne!(other.container_id, moved.container_id);
    }
}
