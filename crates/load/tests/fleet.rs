//! The simulated fleet against a real server over mTLS: its agents become
//! Ready nodes, the server fills a pool on them, claims through the API
//! land on their containers, and after a kill -9 and restart of the server
//! every agent comes back and the server rebuilds its pool from their
//! reports. A smoke run that asserts it worked, not how fast.

use std::process::{Command, Stdio};

use boilerhouse_proto::pb;
use boilerhouse_testkit::binary;
use boilerhouse_testkit::cluster::Cluster;

const AGENTS: usize = 12;
const POOL: u32 = 24;

#[tokio::test]
async fn a_fleet_of_fake_agents_carries_a_pool_and_survives_a_server_restart() {
    let Some(mut c) = Cluster::builder()
        .config("full_report_interval = \"5s\"")
        .workload("w", |image| {
            format!(
                "id: w\nimage: {image}\ncommand: [sleep, infinity]\n\
                 healthcheck: {{test: [CMD, 'true'], interval: 1s}}\n\
                 deploy: {{resources: {{limits: {{cpus: 0.1, memory: 32M}}}}}}\n\
                 pool: {{min_size: {POOL}, max_size: {POOL}}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    let names: Vec<String> = (0..AGENTS).map(|i| format!("fleet-{i:04}")).collect();
    for name in &names {
        c.server().node_tls(name).expect("issue a node certificate");
    }
    let pki = c
        .server()
        .credentials()
        .expect("a secure server")
        .pki_dir
        .clone();
    let fleet = Command::new(binary("boilerhouse-fleet"))
        .args(["--server", &c.url(), "--agents", &AGENTS.to_string()])
        .arg("--pki")
        .arg(&pki)
        .args([
            "--wait-containers",
            &POOL.to_string(),
            "--wait-timeout",
            "60s",
        ])
        .args(["--duration", "300s", "--max-backoff", "2s", "--json", "-"])
        .args(["--activity-every", "1s", "--progress", "2s"])
        .env_remove("BOILERHOUSE_ADDR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start boilerhouse-fleet");

    // Every fake agent is a Ready node, and the pool fills on them.
    c.wait_nodes_ready(names.clone()).await;
    c.wait_idle("w", POOL).await;

    // A claim lands on a fleet container, and the release returns it.
    let claim = c.claim("t-1", "w").await;
    assert!(names.contains(&claim.node_id), "{claim:?}");
    let mut claims = c.claims().await;
    claims
        .release(pb::ReleaseRequest {
            tenant_id: "t-1".into(),
            workload_id: "w".into(),
            generation: claim.generation,
            request_id: String::new(),
        })
        .await
        .expect("release");

    // The released container is kept for t-1 (affinity), the rest idle.
    let pool = c.wait_idle("w", POOL - 1).await;
    assert_eq!(pool.counts.expect("counts").reserved, 1);

    // kill -9 and a restart: the agents come back, and the server's pool
    // is whole again from the database and their reports, the tenant's
    // reservation included.
    c.kill_server();
    c.start_server().await;
    c.wait_nodes_ready(names.clone()).await;
    let pool = c.wait_idle("w", POOL - 1).await;
    assert_eq!(pool.counts.expect("counts").reserved, 1);
    // The tenant is served again from its own container: a claim that
    // finds its reservation on a node not yet reconciled since the
    // restart waits for the node instead of ending the reservation.
    let again = c.claim("t-1", "w").await;
    assert_eq!(again.container_id, claim.container_id, "{again:?}");
    assert_eq!(again.source, pb::ClaimSource::Affinity as i32, "{again:?}");

    // The fleet's window ends at SIGTERM, and it reports.
    let pid = nix::unistd::Pid::from_raw(fleet.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the fleet");
    let out = tokio::task::spawn_blocking(move || fleet.wait_with_output())
        .await
        .expect("join")
        .expect("boilerhouse-fleet ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "boilerhouse-fleet failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("a JSON report ({e}):\n{stderr}"));
    assert_eq!(report["all_connected"], true, "{report:#}");
    assert_eq!(report["connected"], AGENTS, "{report:#}");
    assert!(
        report["containers"].as_u64() >= Some(u64::from(POOL)),
        "{report:#}"
    );
    assert!(
        report["commands"]["create"].as_u64() >= Some(u64::from(POOL)),
        "{report:#}"
    );
    assert!(
        report["command_failures"].as_object().unwrap().is_empty(),
        "{report:#}"
    );
    assert!(report["heartbeats"].as_u64() > Some(0), "{report:#}");
    assert!(report["events"].as_u64() > Some(0), "{report:#}");
    // The restart was one outage of every agent, and all came back.
    let outages = report["outages"].as_array().expect("outages");
    assert!(!outages.is_empty(), "{report:#}");
    assert_eq!(outages[0]["most_lost"], AGENTS, "{report:#}");
    assert!(
        outages
            .iter()
            .all(|o| o["all_back_after_s"].as_f64() > Some(0.0))
    );
    // The server was measured only when asked; the fleet always is.
    assert!(
        report["fleet_usage"]["rss_mib_max"].as_f64() > Some(0.0),
        "{report:#}"
    );
}
