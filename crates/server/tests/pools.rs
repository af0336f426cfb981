//! Warm pools, claims and affinity against the real Docker engine, with
//! boilerhoused and an agent as real processes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;
use boilerhouse_testkit::docker::{
    containers_with, remove_node_containers, require_docker, test_image, unique_node,
};
use boilerhouse_testkit::{
    AgentOptions, AgentProcess, ServerOptions, ServerProcess, eventually, stderr, stdout,
};

const WAIT: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "5s"
"#;

struct Cluster {
    docker: bollard::Docker,
    server: ServerProcess,
    agent: AgentProcess,
    node: String,
    _root: tempfile::TempDir,
}

impl Cluster {
    async fn start(workload_yaml: impl Fn(&str) -> String) -> Option<Self> {
        Self::start_with("", workload_yaml).await
    }

    /// Starts with extra server configuration appended to CONFIG.
    async fn start_with(
        extra_config: &str,
        workload_yaml: impl Fn(&str) -> String,
    ) -> Option<Self> {
        let docker = require_docker().await?;
        let image = test_image(&docker).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("workloads")).unwrap();
        std::fs::write(
            root.path().join("workloads/demo.yaml"),
            workload_yaml(&image),
        )
        .unwrap();
        let server = ServerProcess::start_in(
            root.path(),
            ServerOptions {
                config_toml: Some(format!("{CONFIG}{extra_config}")),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let node = unique_node("pool");
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
            _root: root,
        })
    }

    async fn pool(&self) -> pb::Pool {
        PoolServiceClient::new(self.server.channel().await.unwrap())
            .get_pool(pb::GetPoolRequest {
                pool_id: "demo".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .pool
            .unwrap()
    }

    async fn wait_idle(&self, idle: u32) -> pb::Pool {
        let last = std::sync::Mutex::new(None);
        eventually(WAIT, &format!("{idle} idle containers"), || async {
            let pool = self.pool().await;
            *last.lock().unwrap() = Some(pool.clone());
            (pool.counts.unwrap().idle == idle).then_some(pool)
        })
        .await
        .unwrap_or_else(|e| {
            let containers = stdout(&self.server.bh(&["container", "list"]));
            panic!(
                "{e}\nlast: {:?}\n{containers}\nserver:\n{}",
                last.lock().unwrap(),
                self.server.log()
            )
        })
    }

    /// Waits until Docker no longer has the container.
    async fn wait_gone(&self, docker_id: &str, what: &str) {
        eventually(WAIT, what, || async {
            self.docker
                .inspect_container(docker_id, None)
                .await
                .is_err()
                .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\nserver:\n{}", self.server.log()));
    }

    async fn claims(&self) -> ClaimServiceClient<tonic::transport::Channel> {
        ClaimServiceClient::new(self.server.channel().await.unwrap())
    }

    async fn docker_containers(&self) -> Vec<bollard::models::ContainerSummary> {
        containers_with(&self.docker, "boilerhouse.node-id", &self.node)
            .await
            .unwrap()
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
                .block_on(remove_node_containers(&docker, &node));
        })
        .join()
        .ok();
    }
}

fn claim_request(tenant: &str) -> pb::ClaimRequest {
    pb::ClaimRequest {
        tenant_id: tenant.into(),
        workload_id: "demo".into(),
        ..Default::default()
    }
}

fn workload(image: &str, pool: &str) -> String {
    format!(
        "id: demo\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}, comm: {{target: /comm}}}}\npool: {pool}\n"
    )
}

#[tokio::test]
async fn the_pool_fills_and_a_claim_is_served_from_it_and_recorded_in_the_state_file() {
    let Some(c) =
        Cluster::start(|image| workload(image, "{min_size: 2, max_size: 6, fill_concurrency: 4}"))
            .await
    else {
        return;
    };
    c.wait_idle(2).await;

    let out = c.server.bh(&["claim", "t1", "demo", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let claim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claim["source"], "POOL");
    assert_eq!(claim["tenant"], "t1");
    assert_eq!(claim["generation"], 1);
    let container = claim["container"].as_str().unwrap().to_owned();
    let state_path = claim["state_path"].as_str().unwrap().to_owned();
    assert!(
        std::path::Path::new(&state_path).is_dir(),
        "the state volume's host path exists: {state_path}"
    );
    assert!(claim["comm_path"].as_str().unwrap().ends_with("/comm"));

    // The agent records the tenant in the container's state file.
    let state_file = std::path::Path::new(&state_path)
        .parent()
        .unwrap()
        .join("boilerhouse-state.json");
    eventually(WAIT, "the state file to name t1", || {
        let path = state_file.clone();
        async move {
            let text = std::fs::read_to_string(&path).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            (json["tenant_id"] == "t1").then_some(())
        }
    })
    .await
    .unwrap();

    // Claiming again returns the existing claim; the pool refills.
    let again = c
        .claims()
        .await
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(again.source, pb::ClaimSource::Existing as i32);
    assert_eq!(again.container_id, container);
    let pool = c.wait_idle(2).await;
    assert_eq!(pool.counts.unwrap().claimed, 1);

    // The container really runs, with the claimed Docker id.
    let docker_id = claim["docker_id"].as_str().unwrap();
    let inspect = c.docker.inspect_container(docker_id, None).await.unwrap();
    assert_eq!(inspect.state.unwrap().running, Some(true));

    // A retried request id returns the original answer, not EXISTING.
    let mut claims = c.claims().await;
    let with_id = pb::ClaimRequest {
        request_id: "claim-t2-1".into(),
        ..claim_request("t2")
    };
    let first = claims.claim(with_id.clone()).await.unwrap().into_inner();
    let retry = claims.claim(with_id).await.unwrap().into_inner();
    assert_eq!(retry, first, "the same answer, latency included");
    assert_eq!(first.claim.unwrap().source, pb::ClaimSource::Pool as i32);

    let out = c.server.bh(&["claims", "list"]);
    assert!(
        stdout(&out).contains("t1") && stdout(&out).contains("t2"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn concurrent_claims_never_share_a_container() {
    let Some(c) = Cluster::start(|image| {
        workload(image, "{min_size: 10, max_size: 60, fill_concurrency: 8}")
    })
    .await
    else {
        return;
    };
    c.wait_idle(10).await;
    let channel = c.server.channel().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let tenant = format!("tenant-{}", i % 50);
            let response = ClaimServiceClient::new(channel)
                .claim(pb::ClaimRequest {
                    acquire_timeout: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..claim_request(&tenant)
                })
                .await;
            (tenant, response)
        }));
    }
    let mut by_tenant: HashMap<String, HashSet<String>> = HashMap::new();
    for t in tasks {
        let (tenant, response) = t.await.unwrap();
        let claim = response
            .unwrap_or_else(|s| panic!("{tenant}: {s:?}"))
            .into_inner()
            .claim
            .unwrap();
        by_tenant
            .entry(tenant)
            .or_default()
            .insert(claim.container_id);
    }
    assert_eq!(by_tenant.len(), 50);
    let mut owners: HashMap<String, String> = HashMap::new();
    for (tenant, containers) in &by_tenant {
        assert_eq!(containers.len(), 1, "{tenant} got {containers:?}");
        let container = containers.iter().next().unwrap().clone();
        if let Some(other) = owners.insert(container.clone(), tenant.clone()) {
            panic!("container {container} went to {other} and {tenant}");
        }
    }
    let claims = c
        .claims()
        .await
        .list_claims(pb::ListClaimsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .claims;
    assert_eq!(claims.len(), 50);
}

#[tokio::test]
async fn release_reserves_for_the_tenant_then_expiry_destroys_and_the_pool_refills() {
    let Some(c) =
        Cluster::start(|image| workload(image, "{min_size: 1, max_size: 4, affinity_timeout: 3s}"))
            .await
    else {
        return;
    };
    c.wait_idle(1).await;
    let mut claims = c.claims().await;
    let first = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();

    let stale = claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: first.generation + 1,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);

    let released = claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: first.generation,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.affinity_expires_at.is_some());
    let out = c.server.bh(&["affinity", "list"]);
    assert!(stdout(&out).contains("t1"), "{}", stdout(&out));

    // Back within the TTL: the same container, source AFFINITY, a new generation.
    let back = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(back.source, pb::ClaimSource::Affinity as i32);
    assert_eq!(back.container_id, first.container_id);
    assert_eq!(back.generation, first.generation + 1);
    // Another tenant never gets it.
    let other = claims
        .claim(claim_request("t2"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_ne!(other.container_id, first.container_id);

    // Release again and let the reservation expire: the container is gone
    // from Docker and the pool is back at min_size.
    claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: back.generation,
            request_id: String::new(),
        })
        .await
        .unwrap();
    let docker_id = first.docker_id.clone();
    c.wait_gone(&docker_id, "the expired container to be removed")
        .await;
    c.wait_idle(1).await;
    let fresh = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_ne!(
        fresh.container_id, first.container_id,
        "a container never passes on after expiry"
    );
    assert_eq!(fresh.source, pb::ClaimSource::Pool as i32);
}

#[tokio::test]
async fn the_idle_timeout_releases_a_forgotten_claim() {
    let Some(c) =
        Cluster::start(|image| workload(image, "{min_size: 1, max_size: 3, idle_timeout: 2s}"))
            .await
    else {
        return;
    };
    c.wait_idle(1).await;
    let mut claims = c.claims().await;
    claims.claim(claim_request("forgetful")).await.unwrap();
    eventually(WAIT, "the idle reaper to release the claim", || {
        let mut claims = claims.clone();
        async move {
            let err = claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "forgetful".into(),
                    workload_id: "demo".into(),
                })
                .await
                .err()?;
            (err.code() == Code::NotFound).then_some(())
        }
    })
    .await
    .unwrap();
    let out = c
        .server
        .bh(&["events", "--kind", "claim.released", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("idle since"),
        "{events}"
    );
}

#[tokio::test]
async fn max_size_holds_under_a_burst() {
    let Some(c) = Cluster::start(|image| workload(image, "{min_size: 1, max_size: 3}")).await
    else {
        return;
    };
    c.wait_idle(1).await;
    let channel = c.server.channel().await.unwrap();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let channel = channel.clone();
            tokio::spawn(async move {
                ClaimServiceClient::new(channel)
                    .claim(claim_request(&format!("burst-{i}")))
                    .await
            })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => granted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let details = tonic_types::StatusExt::get_error_details(&status);
                assert!(
                    details.retry_info().is_some(),
                    "retry information is attached"
                );
            }
        }
    }
    assert_eq!(granted, 3, "exactly max_size claims succeed");
    let pool = c.pool().await;
    assert!(pool.counts.unwrap().total <= 3, "{pool:?}");
    assert!(c.docker_containers().await.len() <= 3);
}

async fn exec(docker: &bollard::Docker, container: &str, script: &str) {
    let exec = docker
        .create_exec(
            container,
            bollard::models::ExecConfig {
                cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    docker.start_exec(&exec.id, None).await.unwrap();
}

#[tokio::test]
async fn file_changes_in_the_state_directory_count_as_activity() {
    let Some(c) =
        Cluster::start(|image| workload(image, "{min_size: 1, max_size: 3, idle_timeout: 4s}"))
            .await
    else {
        return;
    };
    c.wait_idle(1).await;
    let mut claims = c.claims().await;
    let claim = claims
        .claim(claim_request("busy"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    let started = std::time::Instant::now();
    // The tenant keeps writing inside its container for twice the idle
    // timeout; the claim must survive it.
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        ticks.tick().await;
        n += 1;
        exec(
            &c.docker,
            &claim.docker_id,
            &format!("echo {n} > /state/work-{n}.txt"),
        )
        .await;
    }
    let still = claims
        .get_claim(pb::GetClaimRequest {
            tenant_id: "busy".into(),
            workload_id: "demo".into(),
        })
        .await;
    assert!(
        still.is_ok(),
        "an active tenant was reaped after {:?}: {still:?}",
        started.elapsed()
    );
    // Once the writing stops, the idle timeout applies.
    eventually(WAIT, "the idle claim to be released", || {
        let mut claims = claims.clone();
        async move {
            claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "busy".into(),
                    workload_id: "demo".into(),
                })
                .await
                .is_err()
                .then_some(())
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn reservations_survive_a_restart_and_expired_ones_are_dropped_at_startup() {
    let Some(mut c) =
        Cluster::start(|image| workload(image, "{min_size: 1, max_size: 4, affinity_timeout: 4s}"))
            .await
    else {
        return;
    };
    c.wait_idle(1).await;
    let mut claims = c.claims().await;
    let first = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: first.generation,
            request_id: String::new(),
        })
        .await
        .unwrap();

    // Restart at once: the reservation is still there and still honoured.
    let root = c.server.root.clone();
    let listen = c.server.addrs.grpc;
    let options = ServerOptions {
        config_toml: Some(CONFIG.into()),
        listen: Some(listen),
        ..Default::default()
    };
    c.server
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM, WAIT)
        .await
        .unwrap();
    c.server = ServerProcess::start_in(&root, options.clone())
        .await
        .unwrap();
    let out = c.server.bh(&["affinity", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["tenant"], "t1", "{listed}\n{}", c.server.log());
    c.wait_idle(1).await;
    let mut claims = c.claims().await;
    let back = eventually(
        WAIT,
        "the agent to reconnect and the reservation to be honoured",
        || {
            let mut claims = claims.clone();
            async move {
                claims
                    .claim(claim_request("t1"))
                    .await
                    .ok()
                    .map(|r| r.into_inner().claim.unwrap())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(back.source, pb::ClaimSource::Affinity as i32);
    assert_eq!(back.container_id, first.container_id);
    let released = claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: back.generation,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let expires = released.affinity_expires_at.unwrap();

    // Stop the server until the reservation has expired, then start it.
    c.server
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM, WAIT)
        .await
        .unwrap();
    eventually(WAIT, "the reservation's expiry to pass", || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now > expires.seconds).then_some(())
    })
    .await
    .unwrap();
    c.server = ServerProcess::start_in(&root, options).await.unwrap();
    let out = c.server.bh(&["affinity", "list", "-o", "json"]);
    assert_eq!(stdout(&out).trim(), "[]", "dropped at startup");
    let out = c
        .server
        .bh(&["events", "--kind", "affinity.expired", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    let docker_id = first.docker_id.clone();
    eventually(
        WAIT,
        "the expired container to be destroyed once the agent is back",
        || {
            let docker = c.docker.clone();
            let id = docker_id.clone();
            async move {
                docker
                    .inspect_container(&id, None)
                    .await
                    .is_err()
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn operators_scale_drain_extend_revoke_and_destroy_with_bh() {
    let Some(c) =
        Cluster::start(|image| workload(image, "{min_size: 1, max_size: 5, affinity_timeout: 1m}"))
            .await
    else {
        return;
    };
    c.wait_idle(1).await;

    // Scale up: the pool refills to the new minimum.
    let out = c.server.bh(&["pool", "scale", "demo", "--min", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_idle(3).await;
    let out = c.server.bh(&["pool", "list"]);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("demo") && l.contains(" 3 ")),
        "{}",
        stdout(&out)
    );
    let out = c
        .server
        .bh(&["pool", "scale", "demo", "--min", "9", "--max", "2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("min_size"), "{}", stderr(&out));

    // Extend and revoke a reservation.
    let out = c.server.bh(&["claim", "t1", "demo", "-o", "json"]);
    let claim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = c.server.bh(&["release", "t1", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kept for t1"), "{}", stdout(&out));
    let out = c
        .server
        .bh(&["affinity", "extend", "t1", "demo", "--by", "10m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.server.bh(&["affinity", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed[0]["remaining"].as_str().unwrap().ends_with('m'),
        "{listed}"
    );
    let out = c.server.bh(&["affinity", "revoke", "t1", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let docker_id = claim["docker_id"].as_str().unwrap().to_owned();
    c.wait_gone(&docker_id, "the revoked reservation's container to go")
        .await;

    // A claimed container needs --force; its claim is then lost.
    let out = c.server.bh(&["claim", "t2", "demo", "-o", "json"]);
    let claim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = claim["container"].as_str().unwrap().to_owned();
    let out = c.server.bh(&["container", "destroy", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("force"), "{}", stderr(&out));
    let out = c.server.bh(&["container", "destroy", &id, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.server.bh(&["claims", "list", "--all", "-o", "json"]);
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        claims
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tenant"] == "t2" && c["status"] == "lost"),
        "{claims}"
    );

    // Drain: idle containers go, nothing refills.
    let out = c.server.bh(&["pool", "drain", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually(WAIT, "the drained pool to empty", || async {
        let counts = c.pool().await.counts.unwrap();
        (counts.total == 0).then_some(())
    })
    .await
    .unwrap();
    let out = c.server.bh(&["claim", "t3", "demo"]);
    assert!(!out.status.success(), "a drained pool serves no new claims");
}

#[tokio::test]
async fn containers_become_idle_only_once_their_healthcheck_passes() {
    let Some(c) = Cluster::start(|image| {
        format!(
            "id: demo\nimage: {image}\ncommand: [sh, -c, 'sleep 2; touch /tmp/ready; sleep infinity']\n\
             healthcheck: {{test: [CMD, test, -f, /tmp/ready], interval: 500ms, timeout: 1s, retries: 30}}\n\
             read_only: false\npool: {{min_size: 1, max_size: 2}}\n"
        )
    })
    .await
    else {
        return;
    };
    // While the container starts, the pool shows it warming, not idle.
    eventually(WAIT, "a warming container", || async {
        (c.pool().await.counts.unwrap().warming == 1).then_some(())
    })
    .await
    .unwrap();
    c.wait_idle(1).await;
    let containers = c.docker_containers().await;
    let inspect = c
        .docker
        .inspect_container(containers[0].id.as_deref().unwrap(), None)
        .await
        .unwrap();
    let health = inspect
        .state
        .unwrap()
        .health
        .unwrap()
        .status
        .unwrap()
        .to_string();
    assert_eq!(health, "healthy", "idle only once Docker says healthy");
}

#[tokio::test]
async fn failing_creates_back_off_with_events_and_do_not_stop_the_server() {
    let Some(c) = Cluster::start(|_| "id: demo\nimage: boilerhouse-test/no-such-image:missing\npool: {min_size: 2, max_size: 4}\n".to_owned()).await else { return };
    let out = eventually(WAIT, "a pool.create_failed event", || async {
        let out = c
            .server
            .bh(&["events", "--kind", "pool.create_failed", "-o", "json"]);
        let events: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (!events.as_array()?.is_empty()).then_some(events)
    })
    .await
    .unwrap();
    assert!(
        out[0]["message"].as_str().unwrap().contains("backing off"),
        "{out}"
    );
    // The failed containers are cleaned up and nothing stays half made.
    eventually(WAIT, "the failed creates to be cleaned up", || async {
        let counts = c.pool().await.counts.unwrap();
        (counts.idle == 0 && counts.claimed == 0).then_some(())
    })
    .await
    .unwrap();
    let out = c.server.bh(&["status"]);
    assert!(
        out.status.success(),
        "the server is still serving: {}",
        stderr(&out)
    );
    let err = c
        .claims()
        .await
        .claim(claim_request("t1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::ResourceExhausted),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_stray_managed_container_is_shown_pending_then_destroyed_after_the_grace() {
    let extra = "reconcile_interval = \"500ms\"\nreconcile_creation_grace = \"4s\"\n";
    let Some(c) =
        Cluster::start_with(extra, |image| workload(image, "{min_size: 1, max_size: 2}")).await
    else {
        return;
    };
    c.wait_idle(1).await;
    // A managed container made by hand, with our labels, for an unknown pool.
    let image = test_image(&c.docker).await.unwrap();
    let spec = boilerhouse_testkit::docker::managed_spec(
        &image,
        &c.node,
        "nobody-knows",
        boilerhouse_core::Timestamp::from_system_time(std::time::SystemTime::now()),
    );
    let runtime = boilerhouse_agent::docker::DockerRuntime::connect(None)
        .await
        .unwrap();
    use boilerhouse_agent::runtime::ContainerRuntime as _;
    let docker_id = runtime.create(&spec, &[]).await.unwrap();
    runtime.start(&docker_id).await.unwrap();

    let plan = eventually(WAIT, "the stray to appear in the plan", || async {
        let out = c.server.bh(&["reconcile", "plan", "-o", "json"]);
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        plan.as_array()?
            .iter()
            .find(|a| a["container"] == spec.container_id.to_string())
            .cloned()
    })
    .await
    .unwrap();
    assert_eq!(plan["action"], "destroy");
    assert!(
        plan["reason"]
            .as_str()
            .unwrap()
            .contains("nobody-knows is not configured"),
        "{plan}"
    );
    assert!(
        plan["due"].as_str().unwrap().starts_with("in "),
        "pending until the creation grace passes: {plan}"
    );
    // The pool's own containers are in agreement: nothing else is planned.
    let out = c.server.bh(&["reconcile", "plan"]);
    assert_eq!(
        stdout(&out)
            .lines()
            .filter(|l| l.starts_with("destroy")
                || l.starts_with("mark_lost")
                || l.starts_with("adopt"))
            .count(),
        1,
        "{}",
        stdout(&out)
    );

    // Once the creation grace has passed, reconciliation destroys it.
    c.wait_gone(&docker_id, "the stray to be destroyed").await;
    let out = c
        .server
        .bh(&["events", "--kind", "reconcile.destroyed", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("nobody-knows is not configured"),
        "{events}"
    );
}

#[tokio::test]
async fn after_the_database_is_deleted_every_tenant_keeps_its_container() {
    let Some(mut c) = Cluster::start(|image| workload(image, "{min_size: 2, max_size: 6}")).await
    else {
        return;
    };
    c.wait_idle(2).await;
    let mut claims = c.claims().await;
    let mut before = Vec::new();
    for tenant in ["t1", "t2"] {
        before.push(
            claims
                .claim(claim_request(tenant))
                .await
                .unwrap()
                .into_inner()
                .claim
                .unwrap(),
        );
    }
    // The agent has recorded each tenant in its container's state file.
    for claim in &before {
        let state_file = std::path::Path::new(&claim.state_path)
            .parent()
            .unwrap()
            .join("boilerhouse-state.json");
        let tenant = claim.tenant_id.clone();
        eventually(WAIT, "the state file", || {
            let path = state_file.clone();
            let tenant = tenant.clone();
            async move {
                let json: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
                (json["tenant_id"] == tenant.as_str()).then_some(())
            }
        })
        .await
        .unwrap();
    }

    // Stop, delete the database, start again on the same address.
    let root = c.server.root.clone();
    let listen = c.server.addrs.grpc;
    c.server
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM, WAIT)
        .await
        .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(root.join(format!("data/boilerhouse.db{suffix}")));
    }
    let config = format!("{CONFIG}reconcile_interval = \"500ms\"\n");
    c.server = ServerProcess::start_in(
        &root,
        ServerOptions {
            config_toml: Some(config),
            listen: Some(listen),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let mut claims = c.claims().await;
    for old in &before {
        let back = eventually(
            WAIT,
            &format!("{}'s claim to be rebuilt", old.tenant_id),
            || {
                let mut claims = claims.clone();
                let tenant = old.tenant_id.clone();
                async move {
                    claims
                        .get_claim(pb::GetClaimRequest {
                            tenant_id: tenant,
                            workload_id: "demo".into(),
                        })
                        .await
                        .ok()
                        .and_then(|r| r.into_inner().claim)
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
        assert_eq!(back.container_id, old.container_id, "the same container");
        assert_eq!(back.docker_id, old.docker_id);
        assert_eq!(back.generation, old.generation);
    }
    // Claiming again returns the same container, not a new one.
    let again = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(again.source, pb::ClaimSource::Existing as i32);
    assert_eq!(again.container_id, before[0].container_id);
    let out = c.server.bh(&["claims", "list"]);
    assert!(
        stdout(&out).contains("t1") && stdout(&out).contains("t2"),
        "{}",
        stdout(&out)
    );
    let out = c
        .server
        .bh(&["events", "--kind", "reconcile.rebuilt", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !events.as_array().unwrap().is_empty(),
        "one event summarises the rebuild"
    );
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("2 tenant claims"),
        "{events}"
    );
}

#[tokio::test]
async fn a_lost_nodes_claims_are_lost_then_resumed_or_replaced_when_it_returns() {
    let extra = "lost_grace = \"2s\"\nreconcile_interval = \"500ms\"\n";
    let Some(mut c) =
        Cluster::start_with(extra, |image| workload(image, "{min_size: 2, max_size: 8}")).await
    else {
        return;
    };
    c.wait_idle(2).await;
    let mut claims = c.claims().await;
    let t1 = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    let t2 = claims
        .claim(claim_request("t2"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        (t1.node_id.as_str(), t2.node_id.as_str()),
        (c.node.as_str(), c.node.as_str())
    );

    // A second node joins, then the first one's agent dies.
    let other = unique_node("pool-b");
    let _agent_b = AgentProcess::start(AgentOptions::new(
        &other,
        c.server.url(),
        c.server.root.join("agent-b"),
    ))
    .unwrap();
    c.agent.kill();
    eventually(WAIT, "t1's claim to be lost with its node", || {
        let mut claims = claims.clone();
        async move {
            let err = claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "t1".into(),
                    workload_id: "demo".into(),
                })
                .await
                .err()?;
            (err.code() == Code::NotFound).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    let out = c
        .server
        .bh(&["events", "--kind", "claim.lost", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 2, "{events}");

    // The pool refills on the node that remains; t2 claims again there.
    let t2_again = eventually(WAIT, "a container for t2 on the other node", || {
        let mut claims = claims.clone();
        async move {
            claims
                .claim(claim_request("t2"))
                .await
                .ok()
                .map(|r| r.into_inner().claim.unwrap())
        }
    })
    .await
    .unwrap();
    assert_eq!(t2_again.node_id, other);
    assert_ne!(t2_again.container_id, t2.container_id);

    // The first node returns: t1 gets its container back; t2's old one is
    // destroyed, since t2 holds another.
    c.agent.restart().unwrap();
    let back = eventually(WAIT, "t1's claim to resume", || {
        let mut claims = claims.clone();
        async move {
            claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "t1".into(),
                    workload_id: "demo".into(),
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().claim)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    assert_eq!(back.container_id, t1.container_id, "the same container");
    assert!(back.generation > t1.generation, "a new fencing generation");
    let old_docker_id = t2.docker_id.clone();
    c.wait_gone(&old_docker_id, "t2's returning container to be destroyed")
        .await;
    let current = claims
        .get_claim(pb::GetClaimRequest {
            tenant_id: "t2".into(),
            workload_id: "demo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        current.container_id, t2_again.container_id,
        "t2 never holds two containers"
    );
    remove_node_containers(&c.docker, &other).await;
}
