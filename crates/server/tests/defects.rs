//! Regressions of issue 12 against the real Docker engine, with
//! boilerhoused and an agent as processes. Each reproduced its defect
//! before the fix. (Defects 3, 4 and 5 are also replayed step by step in
//! the simulation's scripted schedules.)

use std::time::Duration;

use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::affinity_service_client::AffinityServiceClient;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_testkit::docker::{
    remove_node_containers, require_docker, test_image, unique_node,
};
use boilerhouse_testkit::{AgentOptions, AgentProcess, ServerOptions, ServerProcess, eventually};

const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    docker: bollard::Docker,
    server: ServerProcess,
    agent: AgentProcess,
    node: String,
    root: tempfile::TempDir,
}

impl Cluster {
    async fn start(config: &str, pool: &str) -> Option<Self> {
        Self::start_with(config, "command: [sleep, infinity]\n", pool).await
    }

    /// With `body` (command, healthcheck, ...) in the workload file.
    async fn start_with(config: &str, body: &str, pool: &str) -> Option<Self> {
        let docker = require_docker().await?;
        let image = test_image(&docker).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("workloads")).unwrap();
        std::fs::write(
            root.path().join("workloads/demo.yaml"),
            format!("id: demo\nimage: {image}\n{body}pool: {pool}\n"),
        )
        .unwrap();
        let server = ServerProcess::start_in(
            root.path(),
            ServerOptions {
                config_toml: Some(format!("heartbeat_interval = \"200ms\"\n{config}")),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let node = unique_node("defects");
        let agent = AgentProcess::start(AgentOptions::new(
            &node,
            server.url(),
            root.path().join("agent"),
        ))
        .unwrap();
        Some(Self {
            docker,
            server,
            agent,
            node,
            root,
        })
    }

    async fn claims(&self) -> ClaimServiceClient<tonic::transport::Channel> {
        ClaimServiceClient::new(self.server.channel().await.unwrap())
    }

    async fn claim(&self, tenant: &str) -> Result<pb::ClaimInfo, tonic::Status> {
        self.claims()
            .await
            .claim(request(tenant, None))
            .await
            .map(|r| r.into_inner().claim.unwrap())
    }

    async fn reservations(&self) -> Vec<pb::Reservation> {
        AffinityServiceClient::new(self.server.channel().await.unwrap())
            .list_reservations(pb::ListReservationsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .reservations
    }

    async fn node_status(&self) -> i32 {
        pb::node_service_client::NodeServiceClient::new(self.server.channel().await.unwrap())
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .into_iter()
            .find(|n| n.node_id == self.node)
            .map_or(0, |n| n.status)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agent.kill();
        self.server.kill();
        let docker = self.docker.clone();
        let node = self.node.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(remove_node_containers(&docker, &node))
        })
        .join()
        .ok();
    }
}

fn request(tenant: &str, request_id: Option<&str>) -> pb::ClaimRequest {
    pb::ClaimRequest {
        tenant_id: tenant.into(),
        workload_id: "demo".into(),
        request_id: request_id.unwrap_or_default().into(),
        ..Default::default()
    }
}

/// Defect 6: after `docker rm -f` of a claimed container, Claim kept
/// answering EXISTING with the removed Docker id until reconciliation's
/// grace passed. The engine's destroy event now ends the claim at once
/// (the grace here is ten minutes, so reconciliation cannot be what acts).
#[tokio::test]
async fn a_claimed_container_removed_from_the_engine_is_never_answered_again() {
    let config = "reconcile_lost_grace = \"10m\"\n";
    let Some(c) = Cluster::start(config, "{min_size: 1, max_size: 3}").await else {
        return;
    };
    let first = eventually(WAIT, "a claim", || async { c.claim("t0").await.ok() })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    c.docker
        .remove_container(
            &first.docker_id,
            Some(bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let second = eventually(
        Duration::from_secs(20),
        "a claim on another container",
        || async {
            let claim = c.claim("t0").await.ok()?;
            (claim.docker_id != first.docker_id).then_some(claim)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    assert_ne!(second.container_id, first.container_id);
    assert!(second.generation >= 1);
    let ended = c
        .claims()
        .await
        .list_claims(pb::ListClaimsRequest {
            include_ended: true,
            tenant_id: "t0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .claims;
    let lost = ended
        .iter()
        .find(|cl| cl.container_id == first.container_id)
        .expect("the first claim is recorded");
    assert_eq!(lost.status, pb::ClaimStatus::Lost as i32, "{ended:?}");
}

/// Defect 2: a claim whose client gave up during a cold start left the
/// warming container holding the pool's only `max_size` slot forever, and
/// the tenant's retry with the same request id could not be answered. The
/// handler now runs to completion: the retry replays the claim that was
/// made, and once released the slot serves the next tenant.
#[tokio::test]
async fn a_claim_whose_client_gave_up_mid_cold_start_completes_and_leaks_nothing() {
    // Ready two seconds after it starts: every cold start outlasts the
    // client's patience below.
    let body = "command: [sh, -c, 'sleep 2; touch /tmp/ready; sleep infinity']\n\
                healthcheck: {test: [CMD, test, -f, /tmp/ready], interval: 200ms, timeout: 1s, retries: 60}\n\
                read_only: false\n";
    let Some(c) = Cluster::start_with("", body, "{min_size: 0, max_size: 1, reuse: false}").await
    else {
        return;
    };
    // The agent must be connected before a cold start can place anything.
    eventually(WAIT, "the node to be ready", || async {
        (c.node_status().await == pb::NodeStatus::Ready as i32).then_some(())
    })
    .await
    .unwrap();
    let mut claims = c.claims().await;
    let mut impatient = tonic::Request::new(request("t0", Some("claim-t0-1")));
    impatient.set_timeout(Duration::from_millis(500));
    let gave_up = claims.claim(impatient).await.unwrap_err();
    assert!(
        matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{gave_up:?}"
    );
    // Nobody is waiting for it any more, yet the claim is made.
    let made = eventually(WAIT, "the abandoned claim to complete", || {
        let mut claims = claims.clone();
        async move {
            claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "t0".into(),
                    workload_id: "demo".into(),
                })
                .await
                .ok()
                .map(|r| r.into_inner().claim.unwrap())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    // The retry with the same request id gets that very claim.
    let replayed = claims
        .claim(request("t0", Some("claim-t0-1")))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        (replayed.container_id.as_str(), replayed.generation),
        (made.container_id.as_str(), 1)
    );
    assert_eq!(
        replayed.source,
        pb::ClaimSource::Cold as i32,
        "{replayed:?}"
    );
    // Only one container was made for it, and t1 must wait for it.
    let busy = c.claim("t1").await.unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");

    claims
        .release(pb::ReleaseRequest {
            tenant_id: "t0".into(),
            workload_id: "demo".into(),
            generation: replayed.generation,
            ..Default::default()
        })
        .await
        .unwrap();
    let next = eventually(WAIT, "t1's claim once t0 released", || async {
        c.claim("t1").await.ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    assert_ne!(next.container_id, replayed.container_id);
}

/// Defect 1 (and 4): a released, reserved container whose node was lost
/// and came back went Idle, and the next tenant's POOL claim received the
/// first tenant's files; the lost node's reservation came back after a
/// server restart. Now the reservation ends for good and the container is
/// destroyed when it comes back.
#[tokio::test]
async fn a_reserved_container_back_from_a_lost_node_is_destroyed_not_pooled() {
    let config = "suspect_after = \"2s\"\nlost_grace = \"1s\"\nreconcile_interval = \"500ms\"\n";
    let Some(mut c) = Cluster::start(config, "{min_size: 1, max_size: 3}").await else {
        return;
    };
    let first = eventually(WAIT, "a claim", || async { c.claim("t0").await.ok() })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    c.claims()
        .await
        .release(pb::ReleaseRequest {
            tenant_id: "t0".into(),
            workload_id: "demo".into(),
            generation: first.generation,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(c.reservations().await.len(), 1);

    c.agent.kill();
    eventually(WAIT, "the node to be lost", || async {
        (c.node_status().await == pb::NodeStatus::Lost as i32).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    eventually(WAIT, "the lost node's reservation to end", || async {
        c.reservations().await.is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    // In the database too: a restart does not bring it back.
    let listen = c.server.addrs.grpc;
    c.server.kill();
    c.server = ServerProcess::start_in(
        c.root.path(),
        ServerOptions {
            config_toml: Some(format!("heartbeat_interval = \"200ms\"\n{config}")),
            listen: Some(listen),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        c.reservations().await.is_empty(),
        "{:?}",
        c.reservations().await
    );

    c.agent.restart().unwrap();
    eventually(WAIT, "t0's old container to be destroyed", || async {
        c.docker
            .inspect_container(&first.docker_id, None)
            .await
            .is_err()
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    let other = eventually(WAIT, "t1's claim", || async { c.claim("t1").await.ok() })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    assert_ne!(other.container_id, first.container_id);
}
