//! Resource boosts against the real Docker engine, driven as a new user
//! would: separate `bh` processes, server and agent restarts, and
//! `docker inspect` as the judge of what is really in force.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt as _;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::boost_service_client::BoostServiceClient;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_testkit::docker::{
    remove_node_containers, require_docker, test_image, unique_node,
};
use boilerhouse_testkit::{
    AgentOptions, AgentProcess, ServerOptions, ServerProcess, eventually, grpcurl_available,
    stderr, stdout,
};

const WAIT: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "5s"
"#;

/// Base limits of the test workload.
const BASE_NANO_CPUS: i64 = 250_000_000;
const BASE_MEMORY: i64 = 64 << 20;

struct Cluster {
    docker: bollard::Docker,
    server: ServerProcess,
    agents: Vec<AgentProcess>,
    nodes: Vec<String>,
    root: tempfile::TempDir,
}

fn workload(image: &str, pool: &str) -> String {
    format!(
        "id: demo\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\n\
         deploy: {{resources: {{limits: {{cpus: \"0.25\", memory: 64M}}}}}}\n\
         pool: {pool}\n"
    )
}

impl Cluster {
    /// A server and one agent per entry of `nodes` (prefixes made unique).
    async fn start(nodes: &[&str], pool: &str) -> Option<Self> {
        let docker = require_docker().await?;
        let image = test_image(&docker).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("workloads")).unwrap();
        std::fs::write(
            root.path().join("workloads/demo.yaml"),
            workload(&image, pool),
        )
        .unwrap();
        let server = ServerProcess::start_in(
            root.path(),
            ServerOptions {
                config_toml: Some(CONFIG.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let nodes: Vec<String> = nodes.iter().map(|n| unique_node(n)).collect();
        let agents = nodes
            .iter()
            .map(|node| {
                AgentProcess::start(AgentOptions::new(
                    node,
                    server.url(),
                    root.path().join(format!("agent-{node}")),
                ))
                .unwrap()
            })
            .collect();
        let cluster = Self {
            docker,
            server,
            agents,
            nodes,
            root,
        };
        cluster.wait_ready().await;
        Some(cluster)
    }

    /// Waits until every agent is connected and its node ready; returns
    /// the first node's capacity.
    async fn wait_ready(&self) -> pb::Resources {
        let nodes =
            pb::node_service_client::NodeServiceClient::new(self.server.channel().await.unwrap());
        let want = self.nodes.len();
        eventually(WAIT, "every node ready", || {
            let mut nodes = nodes.clone();
            async move {
                let listed = nodes
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .nodes;
                (listed
                    .iter()
                    .filter(|n| n.status == pb::NodeStatus::Ready as i32 && n.connected)
                    .count()
                    == want)
                    .then(|| listed[0].capacity.unwrap_or_default())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.server.log()))
    }

    async fn boosts(&self) -> BoostServiceClient<tonic::transport::Channel> {
        BoostServiceClient::new(self.server.channel().await.unwrap())
    }

    /// Claims for `tenant` and returns (container id, docker id).
    async fn claim(&self, tenant: &str) -> (String, String) {
        let claim = ClaimServiceClient::new(self.server.channel().await.unwrap())
            .claim(pb::ClaimRequest {
                tenant_id: tenant.into(),
                workload_id: "demo".into(),
                acquire_timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("claim: {e}\n{}", self.server.log()))
            .into_inner()
            .claim
            .unwrap();
        (claim.container_id, claim.docker_id)
    }

    /// (NanoCpus, Memory) as Docker has them.
    async fn limits(&self, docker_id: &str) -> (i64, i64) {
        let host = self
            .docker
            .inspect_container(docker_id, None)
            .await
            .unwrap()
            .host_config
            .unwrap();
        (host.nano_cpus.unwrap_or(0), host.memory.unwrap_or(0))
    }

    /// Waits until Docker shows exactly these limits.
    async fn wait_limits(&self, docker_id: &str, want: (i64, i64), what: &str) {
        let last = std::sync::Mutex::new((0, 0));
        eventually(WAIT, what, || async {
            let seen = self.limits(docker_id).await;
            *last.lock().unwrap() = seen;
            (seen == want).then_some(())
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: docker has {:?}, want {want:?}\nserver:\n{}",
                last.lock().unwrap(),
                self.server.log()
            )
        });
    }

    /// Runs `bh` and returns stdout, failing the test if it fails.
    fn bh_ok(&self, args: &[&str]) -> String {
        let out = self.server.bh(args);
        assert!(
            out.status.success(),
            "bh {args:?} failed: {}\n{}",
            stderr(&out),
            self.server.log()
        );
        stdout(&out)
    }

    /// Runs `bh` expecting failure; returns stderr.
    fn bh_err(&self, args: &[&str]) -> String {
        let out = self.server.bh(args);
        assert!(
            !out.status.success(),
            "bh {args:?} should have failed; it printed {}",
            stdout(&out)
        );
        stderr(&out)
    }

    async fn boost(&self, id: &str) -> pb::Boost {
        self.boosts()
            .await
            .get_boost(pb::GetBoostRequest {
                boost_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .boost
            .unwrap()
    }

    async fn wait_status(&self, id: &str, status: pb::BoostStatus) -> pb::Boost {
        eventually(WAIT, &format!("boost {id} to be {status:?}"), || async {
            let b = self.boost(id).await;
            (b.status == status as i32).then_some(b)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.server.log()))
    }

    /// Restarts the server on the same address and state (kill -9 first).
    async fn restart_server(&mut self) {
        let listen = self.server.addrs.grpc;
        self.server.kill();
        self.server = ServerProcess::start_in(
            self.root.path(),
            ServerOptions {
                config_toml: Some(CONFIG.into()),
                listen: Some(listen),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        self.server.kill();
        let docker = self.docker.clone();
        let nodes = self.nodes.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                for node in &nodes {
                    remove_node_containers(&docker, node).await;
                }
            })
        })
        .join()
        .ok();
    }
}

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

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

#[tokio::test]
async fn container_boosts_are_applied_survive_restarts_and_release_from_separate_processes() {
    let Some(mut c) = Cluster::start(&["boost"], "{min_size: 1, max_size: 3}").await else {
        return;
    };
    let (container, docker_id) = c.claim("t1").await;
    assert_eq!(c.limits(&docker_id).await, (BASE_NANO_CPUS, BASE_MEMORY));

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
        c.limits(&docker_id).await,
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
        c.limits(&docker_id).await,
        (BASE_NANO_CPUS + 750_000_000, BASE_MEMORY + (64 << 20))
    );
    c.bh_ok(&["boost", "release", &first]);
    c.wait_limits(
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
        c.limits(&docker_id).await,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY + (64 << 20))
    );

    // Release in a third process: the limits go back to the workload's.
    let out = c.bh_ok(&["boost", "release", &cpu_id]);
    assert!(out.contains("released"), "{out}");
    c.bh_ok(&["boost", "release", &memory_id]);
    c.wait_limits(
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
    let Some(c) = Cluster::start(&["boostbad"], "{min_size: 1, max_size: 2}").await else {
        return;
    };
    let (_container, docker_id) = c.claim("t1").await;
    let node = format!("node/{}", c.nodes[0]);
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
    let image = test_image(&c.docker).await.unwrap();
    std::fs::write(
        c.server.workloads_dir().join("open.yaml"),
        format!("id: open\nimage: {image}\ncommand: [sleep, infinity]\npool: {{min_size: 0, max_size: 1}}\n"),
    )
    .unwrap();
    eventually(WAIT, "a claim on the unlimited workload", || async {
        let out = c.server.bh(&["claim", "t1", "open", "--timeout", "60s"]);
        out.status.success().then_some(())
    })
    .await
    .unwrap();
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
    assert_eq!(c.limits(&docker_id).await, (BASE_NANO_CPUS, BASE_MEMORY));

    if grpcurl_available() {
        let out = c
            .server
            .grpcurl(&[
                "-d",
                r#"{"target": {"node_id": "nowhere"}, "resource": "RESOURCE_KIND_CPU", "amount": 1}"#,
                "boilerhouse.v1.BoostService/RequestBoost",
            ])
            .unwrap();
        assert!(!out.status.success());
        assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
        let out = c
            .server
            .grpcurl(&[
                "-d",
                r#"{"target": {"node_id": "x"}, "resource": "RESOURCE_KIND_GPU", "amount": -3}"#,
                "boilerhouse.v1.BoostService/RequestBoost",
            ])
            .unwrap();
        assert!(stderr(&out).contains("InvalidArgument"), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn a_short_boost_expires_on_time_and_docker_returns_to_base() {
    let Some(c) = Cluster::start(&["boostexp"], "{min_size: 1, max_size: 2}").await else {
        return;
    };
    let (_container, docker_id) = c.claim("t1").await;
    let id = first_line(&c.bh_ok(&[
        "boost",
        "request",
        "tenant/t1/demo",
        "cpu",
        "0.5",
        "--duration",
        "3s",
    ]));
    assert_eq!(
        c.limits(&docker_id).await,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY)
    );
    c.wait_limits(
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "base limits after expiry",
    )
    .await;
    let b = c.wait_status(&id, pb::BoostStatus::Expired).await;
    let expires = b.expires_at.unwrap();
    let ended = b.ended_at.unwrap();
    let lag_ms = (ended.seconds - expires.seconds) * 1000
        + i64::from(ended.nanos - expires.nanos) / 1_000_000;
    // A figure for docs/BENCHMARKS.md, not an assertion: machines are noisy.
    eprintln!("boost expiry lag: {lag_ms} ms after the deadline");
    assert!(lag_ms >= 0, "ended before its deadline: {lag_ms} ms");
    assert!(b.remaining.is_none());
    assert!(b.reason.contains("expired"), "{}", b.reason);
}

#[tokio::test]
async fn a_critical_boost_preempts_a_low_one_when_capacity_is_short() {
    let Some(c) = Cluster::start(&["boostpre"], "{min_size: 0, max_size: 1}").await else {
        return;
    };
    let (container, docker_id) = c.claim("t1").await;
    let node = c.nodes[0].clone();
    let capacity =
        pb::node_service_client::NodeServiceClient::new(c.server.channel().await.unwrap())
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
    let preempted = c.boost(&low).await;
    assert_eq!(preempted.status, pb::BoostStatus::Preempted as i32);
    assert!(
        preempted.reason.contains("preempted by critical boost"),
        "{}",
        preempted.reason
    );
    // Docker has the base plus the critical boost only.
    let want = BASE_NANO_CPUS + (share * 1e9).round() as i64;
    c.wait_limits(&docker_id, (want, BASE_MEMORY), "critical only")
        .await;
    let events = c.bh_ok(&["events", "-n", "50"]);
    assert!(events.contains("boost.preempted"), "{events}");
}

#[tokio::test]
async fn an_agent_restart_reapplies_live_boosts_and_reverts_ended_ones() {
    let Some(mut c) = Cluster::start(&["boostagent"], "{min_size: 1, max_size: 2}").await else {
        return;
    };
    let (_container, docker_id) = c.claim("t1").await;
    let _cpu = first_line(&c.bh_ok(&["boost", "request", "tenant/t1/demo", "cpu", "0.5"]));
    let memory = first_line(&c.bh_ok(&["boost", "request", "tenant/t1/demo", "memory", "32M"]));
    let boosted = (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY + (32 << 20));
    assert_eq!(c.limits(&docker_id).await, boosted);

    // The agent dies. Meanwhile the CPU boost is lost from the container
    // (as if someone ran docker update), and the memory boost is released
    // while nobody can apply the release.
    c.agents[0].kill();
    c.docker
        .update_container(
            &docker_id,
            bollard::models::ContainerUpdateBody {
                nano_cpus: Some(BASE_NANO_CPUS),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    c.bh_ok(&["boost", "release", &memory]);
    // A new container boost cannot be applied now: it fails, says so, and
    // holds no capacity.
    let err = c.bh_err(&["boost", "request", "tenant/t1/demo", "cpu", "0.1"]);
    assert!(
        err.contains("unavailable") && err.contains("failed"),
        "{err}"
    );
    let all = c.bh_ok(&["boost", "status", "--all"]);
    assert!(all.lines().any(|l| l.contains("failed")), "{all}");
    assert!(!c.bh_ok(&["boost", "status"]).contains("0.1"));
    assert_eq!(
        c.limits(&docker_id).await,
        (BASE_NANO_CPUS, BASE_MEMORY + (32 << 20)),
        "nothing should reach Docker while the agent is down"
    );

    // It comes back: the live boost is re-applied, the ended one reverted.
    c.agents[0].restart().unwrap();
    c.wait_limits(
        &docker_id,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY),
        "the cpu boost re-applied and the memory boost reverted",
    )
    .await;
}

#[tokio::test]
async fn boosts_that_expire_while_the_server_is_down_are_reverted_at_startup() {
    let Some(mut c) = Cluster::start(&["boostdown"], "{min_size: 1, max_size: 2}").await else {
        return;
    };
    let (_container, docker_id) = c.claim("t1").await;
    let id = first_line(&c.bh_ok(&[
        "boost",
        "request",
        "tenant/t1/demo",
        "memory",
        "32M",
        "--duration",
        "2s",
    ]));
    let expires_at = c.boost(&id).await.expires_at.unwrap();
    c.server.kill();
    // Poll the clock, not a fixed sleep: wait until the deadline has passed.
    eventually(WAIT, "the boost's deadline to pass", || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        (now.as_secs() as i64 > expires_at.seconds + 1).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        c.limits(&docker_id).await,
        (BASE_NANO_CPUS, BASE_MEMORY + (32 << 20))
    );
    c.restart_server().await;
    let b = c.boost(&id).await;
    assert_eq!(b.status, pb::BoostStatus::Expired as i32, "{b:?}");
    assert!(
        b.reason.contains("while the server was down"),
        "{}",
        b.reason
    );
    c.wait_limits(
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "base limits after the restart",
    )
    .await;
}

#[tokio::test]
async fn a_node_boost_moves_capacity_and_new_containers_follow_it() {
    // Two agents on one engine report the same capacity; with no boost the
    // placement tie-break alternates between them.
    let Some(c) = Cluster::start(&["boosta", "boostb"], "{min_size: 0, max_size: 6}").await else {
        return;
    };
    let (source, target) = (c.nodes[0].clone(), c.nodes[1].clone());
    let memory = c.wait_ready().await.memory_bytes;
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
    let b = c.boost(&id).await;
    assert_eq!(b.status, pb::BoostStatus::Active as i32);
    assert!(!b.enforced_on_host, "a node boost lives in the ledger");
    let by_source = c.bh_ok(&["boost", "status", "--node", &source]);
    assert!(by_source.contains(&id), "{by_source}");

    c.bh_ok(&["pool", "scale", "demo", "--min", "4"]);
    let placed = eventually(WAIT, "four containers", || async {
        let out = c.server.bh(&["container", "list", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
        let nodes: Vec<String> = list
            .as_array()?
            .iter()
            .map(|c| c["node"].as_str().unwrap_or_default().to_owned())
            .collect();
        (nodes.len() >= 4).then_some(nodes)
    })
    .await
    .unwrap();
    assert!(
        placed.iter().all(|n| n == &target),
        "every new container should land on the boosted node {target}: {placed:?}"
    );
}
