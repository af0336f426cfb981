//! Boost benchmark: how long a container boost takes to be in force, side
//! by side with the Docker calls it is made of, in one run.
//!
//! cargo run --release -p boilerhouse-server --example boost_bench -- [rounds]
//!
//! It starts boilerhoused and an agent as processes on loopback, claims one
//! container, then per round:
//! - boost: RequestBoost (cpu +0.25) until the answer, which comes after
//!   the agent applied the limits through Docker's update API and
//!   confirmed them by inspecting the container; then ReleaseBoost, which
//!   puts the base limits back the same way;
//! - raw: the same two limit changes as bare `docker update` + `inspect`
//!   calls from this process, the floor any control plane pays.
//!
//! The difference is what the control plane adds: admission, two fsynced
//! commits per request (pending, then active), the agent round trip.

use std::time::{Duration, Instant};

use bollard::models::ContainerUpdateBody;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::boost_service_client::BoostServiceClient;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::eventually;

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| {
        let rank = ((p / 100.0) * (samples.len() as f64 - 1.0)).round() as usize;
        samples[rank.min(samples.len() - 1)].as_secs_f64() * 1000.0
    };
    println!(
        "{name:<28} n={:<4} p50 {:>7.2} ms   p90 {:>7.2} ms   p99 {:>7.2} ms",
        samples.len(),
        at(50.0),
        at(90.0),
        at(99.0)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50);
    let cluster = Cluster::builder()
        .config("heartbeat_interval = \"1s\"")
        .node("boostbench")
        .workload("bench", |image| {
            format!(
                "id: bench\nimage: {image}\ncommand: [sleep, infinity]\n\
                 deploy: {{resources: {{limits: {{cpus: \"0.25\", memory: 64M}}}}}}\n\
                 pool: {{min_size: 1, max_size: 2}}\n"
            )
        })
        .start()
        .await
        .ok_or_else(|| anyhow::anyhow!("the benchmark needs Docker"))?;
    let docker = cluster.docker();
    let channel = cluster.channel().await;
    // The pool may not have a container yet: retry until a claim lands.
    let claim = eventually(Duration::from_secs(120), "a claim", || {
        let mut claims = ClaimServiceClient::new(channel.clone());
        async move {
            claims
                .claim(pb::ClaimRequest {
                    tenant_id: "bench".into(),
                    workload_id: "bench".into(),
                    acquire_timeout: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .claim
        }
    })
    .await?;
    let mut boosts = BoostServiceClient::new(channel);
    let (mut requests, mut releases, mut raw_up, mut raw_down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let boost = boosts
            .request_boost(pb::RequestBoostRequest {
                target: Some(pb::BoostTarget {
                    target: Some(pb::boost_target::Target::ContainerId(
                        claim.container_id.clone(),
                    )),
                }),
                resource: pb::ResourceKind::Cpu as i32,
                amount: 0.25,
                ..Default::default()
            })
            .await?
            .into_inner()
            .boost
            .ok_or_else(|| anyhow::anyhow!("no boost"))?;
        requests.push(t.elapsed());
        let t = Instant::now();
        boosts
            .release_boost(pb::ReleaseBoostRequest {
                boost_id: boost.boost_id,
                request_id: String::new(),
            })
            .await?;
        releases.push(t.elapsed());

        for (nano_cpus, samples) in [(500_000_000, &mut raw_up), (250_000_000, &mut raw_down)] {
            let t = Instant::now();
            docker
                .update_container(
                    &claim.docker_id,
                    ContainerUpdateBody {
                        nano_cpus: Some(nano_cpus),
                        ..Default::default()
                    },
                )
                .await?;
            docker.inspect_container(&claim.docker_id, None).await?;
            samples.push(t.elapsed());
        }
    }
    println!("{rounds} rounds on one claimed busybox container (cpu 0.25 -> 0.5 -> 0.25)");
    summary("RequestBoost (in force)", requests);
    summary("ReleaseBoost (reverted)", releases);
    summary("raw docker update+inspect up", raw_up);
    summary("raw docker update+inspect down", raw_down);
    Ok(())
}
