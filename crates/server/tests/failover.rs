//! Failover under load, for real: three `boilerhoused` replicas on one
//! PostgreSQL database, two real agents (two nodes) given every replica's
//! address, and tenants driving claim, touch and release traffic that
//! follows the leader as a client must (`chaos_support`). While it runs,
//! the leader is killed with SIGKILL (and started again, as a standby),
//! then the next leader is paused with SIGSTOP past its lease (under load,
//! most likely inside a write transaction, holding the fence's lock on the
//! lease row), a standby takes over, and the paused one is woken: a pool
//! override and a claim sent to it while it was paused are refused,
//! neither took effect, and it stands by. At the end the history checker
//! holds what every tenant was told against the converged system: no
//! container served two tenants, and every acknowledged claim and release
//! is there.
//!
//! Prints how long each takeover took (to a new leader, to every node back
//! with it, and to the first claim it acknowledged), with no bound
//! asserted. After a pause the agents are the slow part: they leave a
//! stalled server only when their HTTP/2 keepalive gives up (10 s + 5 s).
//!
//! `BOILERHOUSE_SOAK_SECS` repeats the kill-and-pause round until that
//! many seconds have passed (one round by default). Needs Docker and a
//! PostgreSQL server (`BOILERHOUSE_POSTGRES_URL`; dev/test starts one with
//! dev/postgres); skipped without either unless
//! `BOILERHOUSE_REQUIRE_POSTGRES=1` (or `BOILERHOUSE_REQUIRE_DOCKER=1`).

mod chaos_support;
mod failover_support;

use std::time::{Duration, Instant};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::pb::node_service_client::NodeServiceClient;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;
use boilerhouse_testkit::database::{TestDatabase, postgres_available};
use boilerhouse_testkit::docker::{require_docker, test_image};
use boilerhouse_testkit::eventually;
use boilerhouse_testkit::replicas::Replicas;
use tonic::Code;

use chaos_support::traffic::{Traffic, TrafficOptions};
use chaos_support::{Subject, Verdict, check, converge};
use failover_support::{WAIT, claims_flow, first_claim_since, servers};

const TENANTS: usize = 8;
const LEASE: &str = "2s";

fn config() -> String {
    format!(
        r#"
leader_lease = "{LEASE}"
heartbeat_interval = "200ms"
suspect_after = "5s"
restart_grace = "10s"
reconcile_interval = "500ms"
reconcile_lost_grace = "5s"
reconcile_creation_grace = "3s"
"#
    )
}

/// Waits until every agent's node is connected and Ready at `leader`.
async fn nodes_ready(replicas: &Replicas, leader: usize) {
    let nodes = replicas.node_names();
    eventually(WAIT, "every node ready at the new leader", || async {
        let channel = replicas.server(leader).channel().await.ok()?;
        let listed = NodeServiceClient::new(channel)
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .ok()?
            .into_inner()
            .nodes;
        nodes
            .iter()
            .all(|node| {
                listed.iter().any(|n| {
                    &n.node_id == node && n.connected && n.status == pb::NodeStatus::Ready as i32
                })
            })
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));
}

/// How one takeover went, from the fault.
struct Takeover {
    /// The replica that leads now.
    leader: usize,
    /// Until it said it leads.
    elected: Duration,
    /// Until every agent was back with it.
    nodes_back: Duration,
    /// Until the first claim (sent after the fault) it acknowledged.
    claims_back: Duration,
}

/// Measures the takeover after a fault at `at` to the leader `old`.
async fn takeover(traffic: &Traffic, replicas: &Replicas, old: usize, at: Instant) -> Takeover {
    let leader = replicas
        .leader(&[old], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));
    let elected = at.elapsed();
    // It stood by with a warm copy of the pool's rows and restored from
    // it and what changed since, not from every row.
    let log = replicas.server(leader).log();
    let restored = log
        .lines()
        .rfind(|l| l.contains("pool index restored from the standby's warm copy"))
        .unwrap_or_else(|| panic!("replica {leader} restored from its warm copy:\n{log}"));
    println!("replica {leader}: {restored}");
    nodes_ready(replicas, leader).await;
    let nodes_back = at.elapsed();
    let claims_back = first_claim_since(traffic, at, Some(old), replicas).await;
    Takeover {
        leader,
        elected,
        nodes_back,
        claims_back,
    }
}

impl std::fmt::Display for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2?} to the first claim (replica {} led after {:.2?}, every node back after {:.2?}; lease {LEASE})",
            self.claims_back, self.leader, self.elected, self.nodes_back
        )
    }
}

/// Whether the call's connection was cut (a transport error, not an
/// answer of the server).
fn cut(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some_and(|e| e.is::<tonic::transport::Error>())
}

/// What a spawned call was answered, within [`WAIT`].
async fn answered<T>(
    task: tokio::task::JoinHandle<Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the woken replica answers what it was sent while paused")
        .unwrap()
}

/// Writes sent to a paused leader, answered only once it wakes: a pool
/// override (a write whatever its memory holds) and a claim of the `late`
/// pool, which no tenant uses and so has an idle container.
struct LateWrites {
    tenant: String,
    scale: tokio::task::JoinHandle<Result<pb::Pool, tonic::Status>>,
    claim: tokio::task::JoinHandle<Result<pb::ClaimInfo, tonic::Status>>,
}

impl LateWrites {
    fn send(replicas: &Replicas, paused: usize, round: usize) -> Self {
        let tenant = format!("late-{round}");
        let channel = replicas.lazy_channel(paused).unwrap();
        let scale = {
            let mut pools = PoolServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let request = pb::ScalePoolRequest {
                    pool_id: "late".into(),
                    min_size: Some(2),
                    max_size: None,
                    request_id: String::new(),
                };
                pools
                    .scale_pool(request)
                    .await
                    .map(|r| r.into_inner().pool.expect("a pool"))
            })
        };
        let claim = {
            let mut claims = ClaimServiceClient::new(channel);
            let request = pb::ClaimRequest {
                tenant_id: tenant.clone(),
                workload_id: "late".into(),
                acquire_timeout: Some(boilerhouse_proto::convert::duration_to_pb(
                    Duration::from_secs(1),
                )),
                ..Default::default()
            };
            tokio::spawn(async move {
                claims
                    .claim(request)
                    .await
                    .map(|r| r.into_inner().claim.expect("a claim"))
            })
        };
        Self {
            tenant,
            scale,
            claim,
        }
    }

    /// Once the paused replica is woken: it refused both, and neither
    /// took effect at `leader`.
    async fn refused(self, replicas: &Replicas, leader: usize) {
        let scale = answered(self.scale).await;
        let claim = answered(self.claim).await;
        // The override is a write whatever its memory holds: refused by
        // the fence, by a server stepping down, or by a standby, or its
        // connection cut as the server swaps its listener.
        let refused = scale.expect_err("the deposed leader commits no override");
        assert!(
            refused.code() == Code::Unavailable || cut(&refused),
            "{refused:?}"
        );
        // The claim may also be refused from its stale memory (its agents
        // have left it), before any write.
        let claim = claim.expect_err("the deposed leader acknowledges no claim");
        assert!(
            claim.code() != Code::Internal && (claim.code() != Code::Unknown || cut(&claim)),
            "{claim:?}"
        );
        println!(
            "the woken replica refused a late override ({}) and a late claim ({:?}: {})",
            refused.message(),
            claim.code(),
            claim.message()
        );
        let channel = replicas.server(leader).channel().await.unwrap();
        let pool = PoolServiceClient::new(channel.clone())
            .get_pool(pb::GetPoolRequest {
                pool_id: "late".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .pool
            .unwrap();
        assert_eq!(pool.min_size, 1, "the late override took no effect");
        let gone = ClaimServiceClient::new(channel)
            .get_claim(pb::GetClaimRequest {
                tenant_id: self.tenant,
                workload_id: "late".into(),
            })
            .await
            .expect_err("the late claim took no effect");
        assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    }
}

#[tokio::test]
async fn takeover_under_claim_traffic_after_kill_and_pause_loses_nothing_acknowledged() {
    if !postgres_available() {
        return;
    }
    let Some(docker) = require_docker().await else {
        return;
    };
    let soak = Duration::from_secs(
        std::env::var("BOILERHOUSE_SOAK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let image = test_image(&docker).await.unwrap();
    let database = TestDatabase::postgres_schema().await.unwrap();
    let workload = format!(
        "id: demo\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}}}\n\
         pool: {{min_size: 3, max_size: 12, affinity_timeout: 2s, fill_concurrency: 4}}\n"
    );
    let mut replicas = Replicas::start(
        &docker,
        database.value(),
        &["a", "b", "c"],
        &config(),
        &[
            ("demo", workload),
            (
                "late",
                format!(
                    "id: late\nimage: {image}\ncommand: [sleep, infinity]\n\
                     pool: {{min_size: 1, max_size: 2}}\n"
                ),
            ),
        ],
    )
    .await
    .unwrap();
    for prefix in ["soak-a", "soak-b"] {
        replicas.add_agent(prefix).unwrap();
    }
    let first = replicas.leader(&[], WAIT).await.unwrap();
    converge(&replicas.server(first).channel().await.unwrap(), 2, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));

    let traffic = Traffic::start(
        &servers(&replicas),
        TENANTS,
        TrafficOptions {
            acquire_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(10),
        },
    );

    let started = Instant::now();
    let mut figures = Vec::new();
    let mut round = 0;
    loop {
        round += 1;
        // kill -9 the leader under load; a standby takes over.
        let leader = replicas.leader(&[], WAIT).await.unwrap();
        claims_flow(&traffic, 10, &replicas).await;
        let killed_at = Instant::now();
        replicas.kill(leader);
        let after_kill = takeover(&traffic, &replicas, leader, killed_at).await;
        println!("takeover after kill -9 under load: {after_kill}");
        figures.push(format!("kill {:.2?}", after_kill.claims_back));
        // The killed replica comes back, as a standby.
        replicas.start_again(leader).await.unwrap();
        assert_eq!(replicas.server(leader).role(), "standby");

        // SIGSTOP the new leader past its lease; the last standby takes
        // over. Writes sent to the paused one wait in its socket.
        let paused = after_kill.leader;
        claims_flow(&traffic, 10, &replicas).await;
        let paused_at = Instant::now();
        replicas.pause(paused).unwrap();
        let late = LateWrites::send(&replicas, paused, round);
        let after_pause = takeover(&traffic, &replicas, paused, paused_at).await;
        println!("takeover after SIGSTOP under load: {after_pause}");
        figures.push(format!("pause {:.2?}", after_pause.claims_back));

        // Woken, the deposed leader refuses what it was sent while paused
        // and stands by.
        replicas.resume(paused).unwrap();
        late.refused(&replicas, after_pause.leader).await;
        eventually(WAIT, "the deposed leader to stand by", || async {
            (replicas.server(paused).role() == "standby").then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));
        let log = replicas.server(paused).log();
        // However it noticed: the lease gone, a fenced write, a renewal
        // too late, or (PostgreSQL ended its transaction while it was
        // paused) a commit whose outcome it cannot know.
        assert!(
            log.contains("the lease was taken by another server")
                || log.contains("fenced")
                || log.contains("could not be renewed in time")
                || log.contains("this server must restore from the database"),
            "the deposed leader noticed:\n{log}"
        );
        if started.elapsed() >= soak {
            break;
        }
    }
    claims_flow(&traffic, 10, &replicas).await;
    let recorded = traffic.stop().await;

    let leader = replicas.leader(&[], WAIT).await.unwrap();
    let channel = replicas.server(leader).channel().await.unwrap();
    converge(&channel, 2, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));
    let subject = Subject {
        channel,
        database: database.value().to_owned(),
        state_roots: (0..2)
            .map(|i| replicas.agent(i).options.state_root.clone())
            .collect(),
        nodes: replicas.node_names(),
        docker: &docker,
    };
    let Verdict {
        violations,
        claims_acked,
        releases_acked,
    } = check(&subject, &recorded).await;
    println!(
        "failover soak: {round} rounds in {:.0?} (takeovers to the first claim: {}), \
         {claims_acked} claims and {releases_acked} releases acknowledged, {} violations; {}",
        started.elapsed(),
        figures.join(", "),
        violations.len(),
        recorded.tally()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    assert_eq!(replicas.leaders(&[]).len(), 1, "one leader at the end");
}
