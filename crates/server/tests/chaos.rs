//! The chaos harness on one host: tenants drive claim, touch and release
//! traffic through the real API while the server and the agents are
//! killed with SIGKILL at random moments and restarted; then the history
//! checker (`chaos_support`) holds what they were told against the
//! converged system. The same checker runs across hosts, with partitions,
//! in `multihost_chaos.rs`.
//!
//! `BOILERHOUSE_CHAOS_ITERATIONS` sets the number of kills (20 by default,
//! which CI runs); set it high for a long run.

mod chaos_support;

use std::time::Duration;

use boilerhouse_proto::tls::BearerToken;
use rand::Rng as _;
use tonic::service::interceptor::InterceptedService;

use boilerhouse_testkit::cluster::Cluster;
use chaos_support::traffic::{Servers, Traffic, TrafficOptions};
use chaos_support::{Subject, Verdict, check, converge};

const TENANTS: usize = 12;

const CONFIG: &str = r#"
restart_grace = "10s"
reconcile_interval = "500ms"
reconcile_lost_grace = "5s"
reconcile_creation_grace = "3s"
"#;

#[tokio::test]
async fn chaos_kill9_server_and_agents_under_claim_traffic() {
    let iterations: usize = std::env::var("BOILERHOUSE_CHAOS_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Some(mut c) = Cluster::builder()
        .config(CONFIG)
        .node("chaos-a")
        .node("chaos-b")
        .workload("demo", |image| {
            format!(
                "id: demo\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}}}\n\
                 pool: {{min_size: 3, max_size: 12, affinity_timeout: 2s, fill_concurrency: 4}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    let nodes = c.node_names();
    // Lazy, so it reconnects by itself each time the server comes back;
    // over TLS with the admin token, as every client of a real server.
    let channel = InterceptedService::new(
        c.server().endpoint().unwrap().connect_lazy(),
        BearerToken::new(c.server().admin_token()).unwrap(),
    );

    let servers = Servers::new([(c.url(), channel.clone())]);
    let traffic = Traffic::start(&servers, TENANTS, TrafficOptions::default());

    let (mut server_kills, mut agent_kills) = (0, 0);
    for _ in 0..iterations {
        let wait = Duration::from_millis(rand::rng().random_range(200..1200));
        // Deliberate: chaos strikes at a random moment, not on a condition.
        tokio::time::sleep(wait).await;
        let victim = rand::rng().random_range(0..3);
        if victim == 0 {
            c.restart_server().await;
            server_kills += 1;
        } else {
            c.restart_agent(victim - 1);
            agent_kills += 1;
        }
    }
    let history = traffic.stop().await;

    // Convergence: both agents back, nothing left for reconciliation.
    converge(&channel, nodes.len(), Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.server().log()));

    let subject = Subject {
        channel: channel.clone(),
        database: c.server().database_value(),
        state_roots: (0..nodes.len())
            .map(|i| c.agent(i).options.state_root.clone())
            .collect(),
        nodes: nodes.clone(),
        docker: c.docker(),
    };
    let Verdict {
        violations,
        claims_acked,
        releases_acked,
    } = check(&subject, &history).await;

    eprintln!(
        "chaos: {iterations} iterations, {server_kills} server kills, {agent_kills} agent kills, \
         {claims_acked} claims and {releases_acked} releases acknowledged, {} violations; {}",
        violations.len(),
        history.tally()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    assert!(
        claims_acked > iterations,
        "the traffic made progress: {claims_acked} claims"
    );
}
