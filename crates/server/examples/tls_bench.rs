//! What TLS costs: new mTLS connections per second the server accepts, and
//! warm claim latency over TLS with a bearer token against plaintext with
//! none, side by side in one run.
//!
//! cargo run --release -p boilerhouse-server --example tls_bench -- [seconds] [claims]
//!
//! - connections: for `seconds` (default 3), 4 workers each open a new
//!   connection (an agent's node certificate, full handshake), make one
//!   health check on it and close it; the same against a plaintext
//!   (`--insecure`) server is the floor.
//! - claims: two clusters (one secure, one `--insecure`) with a pool of
//!   `claims` (default 100) idle containers each; one client claims them
//!   one after another on an established connection. The difference is
//!   the per-call cost of TLS records and the token check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::{ServerOptions, ServerProcess};

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

/// New connections, each with one health check, from 4 workers for
/// `seconds`; returns the latencies of connect + check, sorted.
async fn connections(make: Arc<dyn Fn() -> Endpoint + Send + Sync>, seconds: u64) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (make, stop) = (make.clone(), stop.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let channel = make().connect().await.expect("connect");
                    HealthClient::new(channel)
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .expect("health check");
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("a worker"));
    }
    all.sort();
    all
}

async fn claims(cluster: &Cluster, n: u32) -> Vec<Duration> {
    cluster.wait_idle("bench", n).await;
    let mut client = cluster.claims().await;
    let mut times = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        client
            .claim(pb::ClaimRequest {
                tenant_id: format!("tenant-{i}"),
                workload_id: "bench".into(),
                ..Default::default()
            })
            .await
            .expect("a warm claim");
        times.push(t.elapsed());
    }
    times.sort();
    times
}

async fn cluster(n: u32, insecure: bool) -> Cluster {
    let mut builder = Cluster::builder()
        .config("heartbeat_interval = \"1s\"")
        .node("tlsbench")
        .timeout(Duration::from_secs(600))
        .workload("bench", move |image| {
            format!(
                "id: bench\nimage: {image}\ncommand: [sleep, infinity]\n\
                 pool: {{min_size: {n}, max_size: {n}, fill_concurrency: 16}}\n"
            )
        });
    if insecure {
        builder = builder.insecure();
    }
    builder.start().await.expect("the benchmark needs Docker")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let n: u32 = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100);

    let secure = ServerProcess::start().await?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("workloads"))?;
    let plain = ServerProcess::start_in(
        dir.path(),
        ServerOptions {
            insecure: true,
            ..Default::default()
        },
    )
    .await?;
    let node = secure.node_tls("bench-node")?.expect("a secure server");
    let (ca, cert, key) = (
        std::fs::read(&node.ca)?,
        std::fs::read(&node.cert)?,
        std::fs::read(&node.key)?,
    );
    let url = secure.url();
    let mtls = connections(
        Arc::new(move || {
            Endpoint::from_shared(url.clone())
                .expect("a URL")
                .tls_config(boilerhouse_proto::tls::client_tls(
                    &ca,
                    Some((&cert, &key)),
                    None,
                ))
                .expect("TLS settings")
        }),
        seconds,
    )
    .await;
    let url = plain.url();
    let plaintext = connections(
        Arc::new(move || Endpoint::from_shared(url.clone()).expect("a URL")),
        seconds,
    )
    .await;
    drop((secure, plain));

    let secure_cluster = cluster(n, false).await;
    let tls_claims = claims(&secure_cluster, n).await;
    drop(secure_cluster);
    let plain_cluster = cluster(n, true).await;
    let plain_claims = claims(&plain_cluster, n).await;
    drop(plain_cluster);

    println!("| what | n | p50 | p99 | rate |");
    println!("|---|---:|---:|---:|---:|");
    for (what, times, rate) in [
        (
            "new connection + health check, mTLS (node certificate), 4 workers",
            &mtls,
            true,
        ),
        (
            "new connection + health check, plaintext (floor), 4 workers",
            &plaintext,
            true,
        ),
        (
            "warm POOL claim, TLS + bearer token, sequential",
            &tls_claims,
            false,
        ),
        (
            "warm POOL claim, plaintext, no token (floor), sequential",
            &plain_claims,
            false,
        ),
    ] {
        let rate = if rate {
            format!("{:.0} connections/s", times.len() as f64 / seconds as f64)
        } else {
            format!(
                "{:.0} claims/s",
                times.len() as f64 / times.iter().sum::<Duration>().as_secs_f64()
            )
        };
        println!(
            "| {what} | {} | {} | {} | {rate} |",
            times.len(),
            ms(percentile(times, 50.0)),
            ms(percentile(times, 99.0)),
        );
    }
    Ok(())
}
