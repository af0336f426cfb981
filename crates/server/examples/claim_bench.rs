//! Claim benchmark: warm claims through the real gRPC API against a cold
//! `docker create` + `start`, side by side in one run, on SQLite and, when
//! given a PostgreSQL database, on PostgreSQL in the same run.
//!
//! cargo run --release -p boilerhouse-server --example claim_bench -- \
//!     [claims] [quiet|churn] [--postgres URL]
//!
//! Each POOL run makes `claims` claims (default 150), from one pool of
//! twice that. `quiet` sizes the pool so nothing refills during the measurement
//! (max_size = min_size): it measures the control plane alone. `churn`
//! lets the pool refill while claims arrive, so on a single machine Docker
//! creating replacements competes with the server for the CPU, as it would
//! if boilerhoused shared a host with a busy agent.
//!
//! For each backend it starts boilerhoused (on a SQLite file, then on a
//! fresh schema of the database `--postgres` or `BOILERHOUSE_POSTGRES_URL`
//! names, dropped afterwards) and an agent as processes on loopback, fills
//! a pool of busybox containers (the registry-free test image), then:
//! - cold: creates and starts containers straight through the Docker API,
//!   one after another, as a claim without a pool would have to;
//! - warm POOL claims one at a time: one claim per new tenant, each sent
//!   when the one before is answered, as the cold creates are timed: what
//!   one claim costs (P1 in docs/BENCHMARKS.md);
//! - warm POOL claims offered open-loop at 1,000 claims/s, one per new
//!   tenant (in `quiet` mode, until the pool is used up): a claim that
//!   lands while the one before is still committing waits for it;
//! - EXISTING claims: the same tenants claiming again at 1,000 claims/s
//!   for 3 seconds (the path a reconnecting client takes).
//!
//! Each backend gets the same machine, pool size, workload and offered
//! rate; its cluster is torn down before the next one starts. Latencies
//! are measured by the client around the gRPC call; the server-side ones
//! are the `server_latency` each response reports.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;
use boilerhouse_server::store::{DatabaseLocation, sql};
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::database::TestDatabase;
use boilerhouse_testkit::docker::{TEST_RUN_LABEL, test_run_id};
use boilerhouse_testkit::eventually;

/// Claims offered per second, open-loop, in the second POOL run and the
/// EXISTING run.
const RATE: f64 = 1000.0;
/// EXISTING claims: 3 seconds at [`RATE`].
const EXISTING_CLAIMS: usize = 3000;
/// Cold creates, one after another.
const COLD: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// "p50 / p99 / max ms" of sorted latencies.
fn spread(sorted: &[Duration]) -> String {
    format!(
        "{} / {} / {} ms",
        ms(percentile(sorted, 50.0)),
        ms(percentile(sorted, 99.0)),
        ms(sorted.last().copied().unwrap_or_default())
    )
}

/// What one run of claims measured.
struct Run {
    /// Client-side latency of each granted claim, sorted.
    client: Vec<Duration>,
    /// Server-side latency the response reported, sorted.
    server: Vec<Duration>,
    sources: HashMap<i32, usize>,
    wall: Duration,
    failures: usize,
}

impl Run {
    /// The run that gave `answers` over `wall`.
    fn of(answers: Vec<Answer>, wall: Duration) -> Self {
        let mut run = Run {
            client: Vec::new(),
            server: Vec::new(),
            sources: HashMap::new(),
            wall,
            failures: 0,
        };
        for (latency, result) in answers {
            match result {
                Ok((source, server)) => {
                    run.client.push(latency);
                    run.server.push(server);
                    *run.sources.entry(source).or_insert(0) += 1;
                }
                Err(_) => run.failures += 1,
            }
        }
        run.client.sort();
        run.server.sort();
        run
    }

    /// Granted claims per second of wall time, from the first offer to
    /// the last answer.
    fn rate(&self) -> f64 {
        self.client.len() as f64 / self.wall.as_secs_f64()
    }
}

/// A claim's latency around the call, and the source and server-side
/// latency its answer reports.
type Answer = (Duration, Result<(i32, Duration), tonic::Status>);

/// One claim as `tenant`, timed around the call: its latency, and the
/// source and server-side latency the answer reports.
async fn claim_once(channel: boilerhouse_proto::tls::AuthedChannel, tenant: String) -> Answer {
    let mut client = ClaimServiceClient::new(channel);
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
        tasks.push(tokio::spawn(claim_once(channel.clone(), tenant)));
    }
    let mut answers = Vec::with_capacity(tasks.len());
    for t in tasks {
        answers.push(t.await.expect("claim task"));
    }
    Run::of(answers, started.elapsed())
}

/// Issues one claim per entry of `tenants`, each after the one before has
/// been answered: the latency of a claim that waits for no other, as the
/// cold creates it is set beside are timed one after another.
async fn one_at_a_time(
    channel: boilerhouse_proto::tls::AuthedChannel,
    tenants: Vec<String>,
) -> Run {
    let started = Instant::now();
    let mut answers = Vec::with_capacity(tenants.len());
    for tenant in tenants {
        answers.push(claim_once(channel.clone(), tenant).await);
    }
    Run::of(answers, started.elapsed())
}

/// What a claim costs without a pool: `COLD` containers created and
/// started straight through the Docker API, one after another, each
/// removed after it is timed. Sorted.
async fn cold_floor(docker: &Docker, image: &str) -> anyhow::Result<Vec<Duration>> {
    let mut cold = Vec::new();
    for i in 0..COLD {
        let name = format!("bh-bench-cold-{}-{i}", std::process::id());
        let t = Instant::now();
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(image.to_owned()),
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
    Ok(cold)
}

/// The backends of one run, in the order they are measured.
enum Backend {
    Sqlite,
    /// A database the run may make schemas in.
    Postgres(String),
}

impl Backend {
    fn title(&self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres(_) => "PostgreSQL",
        }
    }
}

/// What one backend's cluster measured.
struct Phase {
    fill: Duration,
    cold: Vec<Duration>,
    /// POOL claims one at a time.
    single: Run,
    /// POOL claims offered at [`RATE`].
    pool: Run,
    existing: Run,
}

/// Starts a cluster on `backend`, fills its pool and measures it; the
/// cluster and its database are gone when this returns.
async fn measure(backend: &Backend, claims: u32, churn: bool) -> anyhow::Result<Phase> {
    // Both POOL runs take `claims` each from the same pool.
    let pool_size = claims * 2;
    let max_size = if churn { pool_size * 2 } else { pool_size };
    let builder = Cluster::builder()
        .config("heartbeat_interval = \"1s\"")
        .node("bench")
        .workload("bench", move |image| {
            format!(
                "id: bench\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}}}\n\
                 pool: {{min_size: {pool_size}, max_size: {max_size}, fill_concurrency: 16}}\n"
            )
        });
    // Named explicitly on both backends, so that a developer's
    // BOILERHOUSE_TEST_DATABASE cannot move the SQLite run elsewhere.
    let schema = match backend {
        Backend::Sqlite => None,
        Backend::Postgres(url) => Some(TestDatabase::postgres_schema_in(url).await?),
    };
    let database = match &schema {
        Some(schema) => schema.value().to_owned(),
        None => builder
            .dir()
            .join("data")
            .join("boilerhouse.db")
            .display()
            .to_string(),
    };
    let cluster = builder
        .database(&database)
        .start()
        .await
        .ok_or_else(|| anyhow::anyhow!("the benchmark needs Docker"))?;
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

    let cold = cold_floor(cluster.docker(), cluster.image()).await?;
    let tenants: Vec<String> = (0..pool_size).map(|i| format!("tenant-{i}")).collect();
    let (first, second) = tenants.split_at(claims as usize);
    let single = one_at_a_time(channel.clone(), first.to_vec()).await;
    let pool = open_loop(channel.clone(), second.to_vec(), RATE).await;
    let repeat: Vec<String> = (0..EXISTING_CLAIMS)
        .map(|i| tenants[i % tenants.len()].clone())
        .collect();
    let existing = open_loop(channel.clone(), repeat, RATE).await;
    // The server goes (and its containers with it) before its schema.
    drop(channel);
    drop(cluster);
    drop(schema);
    Ok(Phase {
        fill,
        cold,
        single,
        pool,
        existing,
    })
}

/// The durability settings of the PostgreSQL server `url` names, as a
/// session that does not change them (the store's writer, by default)
/// gets them.
async fn postgres_settings(url: &str) -> anyhow::Result<String> {
    let location = DatabaseLocation::parse(url).map_err(anyhow::Error::msg)?;
    let mut conn = boilerhouse_server::store::open_inspector(&location).await?;
    let mut shown = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
    ] {
        let value: String = sql::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut conn)
            .await?;
        shown.push(format!("{name}={value}"));
    }
    Ok(shown.join(", "))
}

fn source_name(s: i32) -> &'static str {
    match pb::ClaimSource::try_from(s) {
        Ok(pb::ClaimSource::Pool) => "POOL",
        Ok(pb::ClaimSource::Existing) => "EXISTING",
        Ok(pb::ClaimSource::Cold) => "COLD",
        _ => "other",
    }
}

fn sources(run: &Run) -> String {
    let mut named: Vec<_> = run
        .sources
        .iter()
        .map(|(k, v)| format!("{} {v}", source_name(*k)))
        .collect();
    named.sort();
    named.join(", ")
}

/// One table, a column group per backend.
fn print_table(results: &[(&Backend, Phase)]) {
    let mut header = String::from("| what |");
    let mut rule = String::from("|---|");
    for (backend, _) in results {
        let b = backend.title();
        header.push_str(&format!(
            " {b} n | {b} per s | {b} p50 / p99 / max | {b} server p50 / p99 / max |"
        ));
        rule.push_str("---:|---:|---:|---:|");
    }
    println!("{header}");
    println!("{rule}");
    let mut cold = String::from("| cold `docker create` + `start` (Docker API, sequential) |");
    for (_, phase) in results {
        cold.push_str(&format!(
            " {} | {:.1} | {} | - |",
            phase.cold.len(),
            phase.cold.len() as f64 / phase.cold.iter().sum::<Duration>().as_secs_f64(),
            spread(&phase.cold)
        ));
    }
    println!("{cold}");
    type RunOf = fn(&Phase) -> &Run;
    let runs: [(&str, RunOf); 3] = [
        ("warm claim, POOL, one at a time (gRPC)", |p| &p.single),
        ("warm claim, POOL, offered at 1000/s (gRPC)", |p| &p.pool),
        ("warm claim, EXISTING, offered at 1000/s (gRPC)", |p| {
            &p.existing
        }),
    ];
    for (what, run_of) in runs {
        let mut row = format!("| {what} |");
        for (_, phase) in results {
            let run = run_of(phase);
            row.push_str(&format!(
                " {} | {:.0} | {} | {} |",
                run.client.len(),
                run.rate(),
                spread(&run.client),
                spread(&run.server)
            ));
        }
        println!("{row}");
    }
    println!();
    for (backend, phase) in results {
        let cold_p50 = percentile(&phase.cold, 50.0).as_secs_f64();
        let ratio = |run: &Run| {
            format!(
                "{:.0}x ({:.0}x server-side)",
                cold_p50 / percentile(&run.client, 50.0).as_secs_f64(),
                cold_p50 / percentile(&run.server, 50.0).as_secs_f64()
            )
        };
        println!(
            "{}: cold p50 / warm POOL p50 = {} one at a time, {} offered at 1000/s; sources: POOL runs {} and {}, EXISTING run {}; failures: {}, {} and {}",
            backend.title(),
            ratio(&phase.single),
            ratio(&phase.pool),
            sources(&phase.single),
            sources(&phase.pool),
            sources(&phase.existing),
            phase.single.failures,
            phase.pool.failures,
            phase.existing.failures,
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut claims = 150u32;
    let mut churn = false;
    let mut postgres = std::env::var("BOILERHOUSE_POSTGRES_URL")
        .ok()
        .filter(|v| !v.is_empty());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "quiet" => churn = false,
            "churn" => churn = true,
            "--postgres" => postgres = Some(args.next().context("--postgres needs a URL")?),
            other => {
                claims = other.parse().ok().filter(|n| *n > 0).with_context(|| {
                    format!(
                        "{other:?}: expected a number of claims a run (1 or more), quiet or churn"
                    )
                })?;
            }
        }
    }
    let mut backends = vec![Backend::Sqlite];
    if let Some(url) = postgres {
        backends.push(Backend::Postgres(url));
    }

    println!(
        "mode: {}",
        if churn {
            "churn (the pool refills during the run)"
        } else {
            "quiet (max_size = min_size: nothing refills)"
        }
    );
    let mut results = Vec::new();
    for backend in &backends {
        let settings = match backend {
            Backend::Sqlite => "WAL, synchronous=FULL".to_owned(),
            Backend::Postgres(url) => postgres_settings(url).await?,
        };
        let phase = measure(backend, claims, churn).await?;
        println!(
            "{}: {settings}; pool of {} filled in {:.1} s ({:.1} containers/s)",
            backend.title(),
            claims * 2,
            phase.fill.as_secs_f64(),
            f64::from(claims * 2) / phase.fill.as_secs_f64()
        );
        results.push((backend, phase));
    }
    println!();
    print_table(&results);
    Ok(())
}
