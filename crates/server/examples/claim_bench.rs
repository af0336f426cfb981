//! Claim benchmark: warm claims through the real gRPC API against a cold
//! `docker create` + `start`, side by side in one run.
//!
//! cargo run --release -p boilerhouse-server --example claim_bench -- [pool-size] [quiet|churn]
//!
//! `quiet` sizes the pool so nothing refills during the measurement
//! (max_size = min_size): it measures the control plane alone. `churn`
//! lets the pool refill while claims arrive, so on a single machine Docker
//! creating replacements competes with the server for the CPU, as it would
//! if boilerhoused shared a host with a busy agent.
//!
//! It starts boilerhoused and an agent as processes on loopback, fills a
//! pool of busybox containers (the registry-free test image), then:
//! - cold: creates and starts containers straight through the Docker API,
//!   one after another, as a claim without a pool would have to;
//! - warm POOL claims: one claim per new tenant, issued open-loop at
//!   1,000 claims/s until the pool is used up;
//! - EXISTING claims: the same tenants claiming again at 1,000 claims/s
//!   for 3 seconds (the path a reconnecting client takes).
//!
//! Latencies are measured by the client, around the gRPC call.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::docker::{TEST_RUN_LABEL, test_run_id};
use boilerhouse_testkit::eventually;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// What one open-loop run measured.
struct Run {
    /// Client-side latency of each granted claim, sorted.
    client: Vec<Duration>,
    /// Server-side latency the response reported, sorted.
    server: Vec<Duration>,
    sources: HashMap<i32, usize>,
    wall: Duration,
    failures: usize,
}

/// Issues one claim per entry of `tenants`, open-loop at `rate` per second.
async fn open_loop(
    channel: boilerhouse_proto::tls::AuthedChannel,
    tenants: Vec<String>,
    rate: f64,
) -> Run {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(tenants.len());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for tenant in tenants {
        ticker.tick().await;
        let mut client = ClaimServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let result = client
                .claim(pb::ClaimRequest {
                    tenant_id: tenant,
                    workload_id: "bench".into(),
                    ..Default::default()
                })
                .await;
            (
                t.elapsed(),
                result.map(|r| {
                    let r = r.into_inner();
                    let server = r
                        .server_latency
                        .map(|d| Duration::new(d.seconds as u64, d.nanos as u32))
                        .unwrap_or_default();
                    (r.claim.map(|c| c.source).unwrap_or_default(), server)
                }),
            )
        }));
    }
    let mut run = Run {
        client: Vec::new(),
        server: Vec::new(),
        sources: HashMap::new(),
        wall: Duration::ZERO,
        failures: 0,
    };
    for t in tasks {
        let (latency, result) = t.await.expect("claim task");
        match result {
            Ok((source, server)) => {
                run.client.push(latency);
                run.server.push(server);
                *run.sources.entry(source).or_insert(0) += 1;
            }
            Err(_) => run.failures += 1,
        }
    }
    run.wall = started.elapsed();
    run.client.sort();
    run.server.sort();
    run
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pool_size: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(150);
    let churn = std::env::args().nth(2).as_deref() == Some("churn");
    let max_size = if churn { pool_size * 2 } else { pool_size };
    let cluster = Cluster::builder()
        .config("heartbeat_interval = \"1s\"")
        .node("bench")
        .workload("bench", move |image| {
            format!(
                "id: bench\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}}}\n\
                 pool: {{min_size: {pool_size}, max_size: {max_size}, fill_concurrency: 16}}\n"
            )
        })
        .start()
        .await
        .ok_or_else(|| anyhow::anyhow!("the benchmark needs Docker"))?;
    let docker = cluster.docker();
    let image = cluster.image().to_owned();
    let channel = cluster.channel().await;

    let fill_started = Instant::now();
    eventually(Duration::from_secs(900), "the pool to fill", || {
        let mut pools = PoolServiceClient::new(channel.clone());
        async move {
            let pool = pools
                .get_pool(pb::GetPoolRequest {
                    pool_id: "bench".into(),
                })
                .await
                .ok()?
                .into_inner()
                .pool?;
            (pool.counts?.idle >= pool_size).then_some(())
        }
    })
    .await?;
    let fill = fill_started.elapsed();

    // Cold: what a claim costs without a pool.
    let mut cold = Vec::new();
    for i in 0..20 {
        let name = format!("bh-bench-cold-{}-{i}", std::process::id());
        let t = Instant::now();
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(image.clone()),
                    cmd: Some(vec!["sleep".into(), "infinity".into()]),
                    labels: Some(HashMap::from([(TEST_RUN_LABEL.to_owned(), test_run_id())])),
                    host_config: Some(HostConfig {
                        cap_drop: Some(vec!["ALL".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await?;
        docker.start_container(&name, None).await?;
        cold.push(t.elapsed());
        docker
            .remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await?;
    }
    cold.sort();

    let tenants: Vec<String> = (0..pool_size).map(|i| format!("tenant-{i}")).collect();
    let pool_run = open_loop(channel.clone(), tenants.clone(), 1000.0).await;
    let repeat: Vec<String> = (0..3000)
        .map(|i| tenants[i % tenants.len()].clone())
        .collect();
    let existing_run = open_loop(channel.clone(), repeat, 1000.0).await;

    let name = |s: i32| match pb::ClaimSource::try_from(s) {
        Ok(pb::ClaimSource::Pool) => "POOL",
        Ok(pb::ClaimSource::Existing) => "EXISTING",
        Ok(pb::ClaimSource::Cold) => "COLD",
        _ => "other",
    };
    println!(
        "mode: {}",
        if churn {
            "churn (the pool refills during the run)"
        } else {
            "quiet (max_size = min_size: nothing refills)"
        }
    );
    println!(
        "pool of {pool_size} filled in {:.1} s ({:.1} containers/s)",
        fill.as_secs_f64(),
        f64::from(pool_size) / fill.as_secs_f64()
    );
    println!();
    println!("| what | n | p50 | p99 | max | server-side p50 / p99 | throughput |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| cold `docker create` + `start` (Docker API, sequential) | {} | {} | {} | {} | - | {:.1}/s |",
        cold.len(),
        ms(percentile(&cold, 50.0)),
        ms(percentile(&cold, 99.0)),
        ms(*cold.last().unwrap()),
        cold.len() as f64 / cold.iter().sum::<Duration>().as_secs_f64()
    );
    for (what, run) in [
        ("warm claim, POOL, offered at 1000/s (gRPC)", &pool_run),
        (
            "warm claim, EXISTING, offered at 1000/s (gRPC)",
            &existing_run,
        ),
    ] {
        println!(
            "| {what} | {} | {} | {} | {} | {} / {} | {:.0}/s |",
            run.client.len(),
            ms(percentile(&run.client, 50.0)),
            ms(percentile(&run.client, 99.0)),
            ms(run.client.last().copied().unwrap_or_default()),
            ms(percentile(&run.server, 50.0)),
            ms(percentile(&run.server, 99.0)),
            run.client.len() as f64 / run.wall.as_secs_f64()
        );
    }
    println!();
    println!(
        "cold p50 / warm POOL p50 = {:.0}x; sources: POOL run {:?}, EXISTING run {:?}; failures: {} and {}",
        percentile(&cold, 50.0).as_secs_f64() / percentile(&pool_run.client, 50.0).as_secs_f64(),
        pool_run
            .sources
            .iter()
            .map(|(k, v)| (name(*k), *v))
            .collect::<Vec<_>>(),
        existing_run
            .sources
            .iter()
            .map(|(k, v)| (name(*k), *v))
            .collect::<Vec<_>>(),
        pool_run.failures,
        existing_run.failures,
    );
    Ok(())
}
