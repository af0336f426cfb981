//! The chaos harness across hosts: the server and three agents each on a
//! host of its own (network namespaces, see `boilerhouse_testkit::netns`),
//! tenants driving claim, touch and release traffic through the real API,
//! while a seeded schedule mixes partitions (symmetric, one-way, of one
//! agent or of most of the fleet), flapping links, delay, loss, kill -9 of
//! agents and of the server, graceful server restarts, and heals. Then
//! everything is healed, the system converges, and the history checker
//! (`chaos_support`) holds what the tenants were told against the
//! database, the state files and the engine.
//!
//! `BOILERHOUSE_MULTIHOST_CHAOS_FAULTS` sets the number of fault events (25
//! by default, which CI runs; the long run in docs/BENCHMARKS.md used
//! 1,000); `BOILERHOUSE_CHAOS_SEED` replays a schedule. The seed is printed
//! first, and in every failure.

mod chaos_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use boilerhouse_proto::tls::BearerToken;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::netns::{Fault, Host};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tonic::service::interceptor::InterceptedService;

use chaos_support::traffic::{Servers, Traffic, TrafficOptions};
use chaos_support::{Subject, Verdict, check, converge};

const TENANTS: usize = 12;
const AGENTS: usize = 3;

/// Short windows, so that nodes go Suspect and Lost (and come back) many
/// times within a run.
const CONFIG: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "3s"
lost_grace = "2s"
restart_grace = "6s"
reconcile_interval = "500ms"
reconcile_lost_grace = "5s"
reconcile_creation_grace = "3s"
"#;

/// The kinds of fault the schedule draws from.
const KINDS: &[&str] = &[
    "partition_agent",
    "partition_majority",
    "one_way_to_agent",
    "one_way_to_server",
    "flap",
    "delay",
    "loss",
    "kill_agent",
    "kill_server",
    "restart_server",
    "heal_one",
];

/// Every this many events, everything heals (so faults last long enough,
/// often, to make nodes Lost, and the system still gets whole again).
const HEAL_ALL_EVERY: usize = 16;

#[tokio::test]
async fn chaos_across_hosts_partitions_heals_and_kills_under_claim_traffic() {
    let events: usize = std::env::var("BOILERHOUSE_MULTIHOST_CHAOS_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let seed: u64 = std::env::var("BOILERHOUSE_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("multihost chaos: seed {seed} (BOILERHOUSE_CHAOS_SEED={seed} replays the schedule)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Half the runs give claims on a lost node up (the replacement path),
    // half keep them (the default).
    let replace = rng.random_bool(0.5);
    let mut builder = Cluster::builder().multihost().config(CONFIG);
    for i in 0..AGENTS {
        builder = builder.node(&format!("mh-{i}"));
    }
    let Some(mut c) = builder
        .workload("demo", move |image| {
            format!(
                "id: demo\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}}}\n\
                 pool: {{min_size: 3, max_size: 12, affinity_timeout: 2s, fill_concurrency: 4}}\n\
                 disconnect: {{replace: {replace}}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    let nodes = c.node_names();
    let channel = InterceptedService::new(
        c.server().endpoint().unwrap().connect_lazy(),
        BearerToken::new(c.server().admin_token()).unwrap(),
    );
    // The pool is full before the first fault, so that the traffic has
    // something to claim whatever the schedule does next (seed
    // 2679565949837827240 cut and killed before a container was ready,
    // and no claim was ever granted).
    c.wait_idle("demo", 3).await;
    let servers = Servers::new([(c.url(), channel.clone())]);
    let traffic = Traffic::start(&servers, TENANTS, TrafficOptions::default());
    let started = Instant::now();

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut active: Vec<Fault> = Vec::new();
    let mut flapping: Option<usize> = None;
    for event in 0..events {
        // Deliberate: chaos strikes at a random moment, not on a condition.
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        let mut kind = KINDS[rng.random_range(0..KINDS.len())];
        if event % HEAL_ALL_EVERY == HEAL_ALL_EVERY - 1 {
            kind = "heal_all";
        }
        // Too many faults at once leave nothing to observe: heal first.
        if active.len() >= 3 && !kind.starts_with("heal") {
            kind = "heal_one";
        }
        let agent = rng.random_range(0..AGENTS);
        let server = c.server_host().clone();
        let host = c.node_host(agent).clone();
        let fault = match kind {
            "partition_agent" => Some(c.network().partition(&[&server], &[&host])),
            "partition_majority" => {
                let other = c.node_host((agent + 1) % AGENTS).clone();
                Some(c.network().partition(&[&server], &[&host, &other]))
            }
            "one_way_to_agent" => Some(c.network().partition_one_way(&server, &host)),
            "one_way_to_server" => Some(c.network().partition_one_way(&host, &server)),
            "delay" => {
                let victim = pick(&mut rng, &server, &host);
                let ms = rng.random_range(20..300);
                Some(c.network().delay(
                    victim,
                    Duration::from_millis(ms),
                    Duration::from_millis(ms / 4),
                ))
            }
            "loss" => {
                let victim = pick(&mut rng, &server, &host);
                Some(c.network().loss(victim, rng.random_range(5..40)))
            }
            "flap" => {
                // Down now, up at the next event whatever it is: a link
                // that goes up and down every second or so.
                if let Some(i) = flapping.take() {
                    let h = c.node_host(i).clone();
                    c.network().link_up(&h).unwrap();
                }
                c.network().link_down(&host).unwrap();
                flapping = Some(agent);
                None
            }
            "kill_agent" => {
                c.restart_agent(agent);
                None
            }
            "kill_server" => {
                c.restart_server().await;
                None
            }
            "restart_server" => {
                c.stop_server().await;
                c.start_server().await;
                None
            }
            "heal_one" => {
                if !active.is_empty() {
                    let f = active.swap_remove(rng.random_range(0..active.len()));
                    c.network().heal(f).unwrap();
                }
                None
            }
            "heal_all" => {
                c.network().heal_all().unwrap();
                active.clear();
                flapping = None;
                None
            }
            _ => unreachable!("{kind}"),
        };
        if kind != "flap"
            && let Some(i) = flapping.take()
        {
            let h = c.node_host(i).clone();
            c.network().link_up(&h).unwrap();
        }
        if let Some(f) = fault {
            active.push(f.unwrap_or_else(|e| panic!("seed {seed}: {kind}: {e}")));
        }
        *counts.entry(kind).or_default() += 1;
    }
    c.network().heal_all().unwrap();
    let history = traffic.stop().await;
    let chaos_time = started.elapsed();

    let converging = Instant::now();
    converge(&channel, nodes.len(), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", c.server().log()));
    let converged_in = converging.elapsed();

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
    // What the faults made the server do, from its activity log.
    let mut outcomes = BTreeMap::new();
    for kind in [
        "node.suspect",
        "node.lost",
        "node.loss_held",
        "claim.lost",
        "claim.resumed",
    ] {
        let out = c.bh_ok(&["events", "--kind", kind, "-n", "100000", "-o", "json"]);
        let listed: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        outcomes.insert(kind, listed.as_array().map_or(0, Vec::len));
    }
    let agent_connects: Vec<usize> = (0..nodes.len())
        .map(|i| c.agent(i).log().matches("connected to the server").count())
        .collect();

    eprintln!(
        "multihost chaos: seed {seed}, replace {replace}, {events} fault events in {:.0?} ({counts:?}), \
         {claims_acked} claims and {releases_acked} releases acknowledged, converged in {:.1?} after the last heal, \
         server events {outcomes:?}, agent sessions {agent_connects:?}, {} violations; {}",
        chaos_time,
        converged_in,
        violations.len(),
        history.tally()
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: violations:\n{}",
        violations.join("\n")
    );
    assert!(
        claims_acked > 0,
        "seed {seed}: the traffic made progress: {claims_acked} claims"
    );
}

/// The server's host or the agent's, at random.
fn pick<'a>(rng: &mut StdRng, server: &'a Host, agent: &'a Host) -> &'a Host {
    if rng.random_bool(0.5) { server } else { agent }
}
