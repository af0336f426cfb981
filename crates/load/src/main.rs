//! boilerhouse-load: drives claims and releases through the real gRPC API
//! and reports what the server sustained.
//!
//! A cycle is one tenant claiming a container of a workload, holding it
//! for `--hold`, and releasing it. Tenants are drawn from a pool of
//! `--tenants` ids (prefixed, so they never collide with real ones), and a
//! tenant is in at most one cycle at a time, as a real client is.
//!
//! - closed loop (`--concurrency C`): C workers run cycles back to back;
//!   throughput is what the server sustains at that concurrency.
//! - open loop (`--rate R`): a cycle is due every 1/R s whatever the
//!   answers; latency is counted from when it was due, so a slow server
//!   cannot hide its queue (no coordinated omission). A cycle due while
//!   every tenant is busy is skipped and counted.
//!
//!   boilerhouse-load --workload sandbox --tenants 200 --concurrency 16 --duration 10s
//!   boilerhouse-load --workload sandbox --rate 1000 --duration 30s --json out.json
//!
//! `--server`, `--ca` and `--token` default to `BOILERHOUSE_ADDR`,
//! `BOILERHOUSE_CA` and `BOILERHOUSE_TOKEN`, as for `bh`.

mod probe;
mod report;

/// jemalloc, as the server uses: with glibc's malloc a quarter of the
/// generator's CPU went to malloc and free, on cores it shares with the
/// server it measures (docs/BENCHMARKS.md, P2).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::tls::BearerToken;

use report::Report;

/// Claims and releases at a rate or a concurrency, with latency
/// histograms and answers by status code.
#[derive(Debug, Parser)]
#[command(name = "boilerhouse-load", version)]
struct Args {
    /// The server.
    #[arg(
        long,
        env = "BOILERHOUSE_ADDR",
        default_value = "https://127.0.0.1:7600"
    )]
    server: String,
    /// The CA that signed the server's certificate (https).
    #[arg(long, env = "BOILERHOUSE_CA")]
    ca: Option<PathBuf>,
    /// A bearer token allowed to claim for every tenant (admin or operator).
    #[arg(long, env = "BOILERHOUSE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Workloads to claim from, round robin (repeat the flag).
    #[arg(long = "workload", required = true)]
    workloads: Vec<String>,
    /// How many distinct tenants.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Tenant ids are `<prefix>-<n>`.
    #[arg(long, default_value = "load")]
    tenant_prefix: String,
    /// Closed loop: this many cycles in flight (the default mode).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: this many cycles started per second.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long a tenant holds its claim before releasing it.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Claims only: no release, and each tenant claims once (its claim
    /// stays). Measures granting alone; give as many --tenants as claims
    /// the run may make, and a pool to match.
    #[arg(long)]
    claims_only: bool,
    /// Send a fresh request id with every claim and release, as a client
    /// that retries safely does (the server then keeps an idempotency
    /// record of each for `idempotency_retention`).
    #[arg(long)]
    request_ids: bool,
    /// HTTP/2 connections the claims spread over, one after another: as
    /// many clients would (one carries every call by default)
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Every call's deadline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Health checks sent one after another before the run, through the
    /// same channel: the floor (one round trip through TLS, the token
    /// check and the server's router) the claims are set beside.
    #[arg(long, default_value_t = 200)]
    floor_calls: u32,
    /// Instead of a run: claim as one tenant (`<prefix>-probe`) every
    /// 10 ms until a claim is granted or this long has passed, and print
    /// how long it took as JSON; the server need not be up yet.
    #[arg(long, value_parser = humantime::parse_duration)]
    until_granted: Option<Duration>,
    /// Also write the report as JSON to this file (`-`: standard output,
    /// instead of the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

type Authed = InterceptedService<Channel, BearerToken>;
type Client = ClaimServiceClient<Authed>;

/// What the workers share.
struct Shared {
    /// One client a connection.
    clients: Vec<Client>,
    /// The next cycle's client.
    next_client: std::sync::atomic::AtomicUsize,
    workloads: Vec<String>,
    idle_tenants: Mutex<VecDeque<String>>,
    report: Mutex<Report>,
    hold: Duration,
    claims_only: bool,
    request_ids: bool,
}

async fn connect(args: &Args) -> anyhow::Result<Authed> {
    connect_as(args, false).await
}

/// A channel to the server; `lazy` connects at the first call, so the
/// server may not be listening yet.
async fn connect_as(args: &Args, lazy: bool) -> anyhow::Result<Authed> {
    let mut endpoint = Endpoint::from_shared(args.server.clone())
        .with_context(|| format!("--server {:?}", args.server))?
        .tcp_nodelay(true)
        .timeout(args.timeout);
    if args.server.starts_with("https://") {
        let ca_path = args
            .ca
            .as_ref()
            .context("--server is https: give --ca (or BOILERHOUSE_CA)")?;
        let ca = std::fs::read(ca_path).with_context(|| format!("--ca {}", ca_path.display()))?;
        endpoint = endpoint.tls_config(boilerhouse_proto::tls::client_tls(&ca, None, None))?;
    }
    let channel = if lazy {
        endpoint.connect_lazy()
    } else {
        endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.server))?
    };
    let token =
        BearerToken::new(args.token.as_deref()).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    Ok(InterceptedService::new(channel, token))
}

/// The floor: `calls` health checks, one after another.
async fn floor(channel: Authed, calls: u32) -> report::Operation {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut floor = report::Operation::default();
    for _ in 0..calls {
        let sent = Instant::now();
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await;
        let code = answer.map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        floor.record(code, sent.elapsed(), None);
    }
    floor
}

/// One cycle for a tenant that is free; `due` is when the open loop meant
/// to send it.
async fn cycle(shared: &Shared, tenant: &str, workload: &str, due: Option<Instant>) {
    let n = shared
        .next_client
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut client = shared.clients[n % shared.clients.len()].clone();
    let sent = Instant::now();
    if let Some(due) = due {
        let lag = sent.saturating_duration_since(due);
        let mut report = shared.report.lock().unwrap_or_else(|e| e.into_inner());
        report.record_lag(lag);
    }
    let claimed = client
        .claim(pb::ClaimRequest {
            tenant_id: tenant.to_owned(),
            workload_id: workload.to_owned(),
            request_id: shared.request_id(),
            ..Default::default()
        })
        .await;
    let took = sent.elapsed();
    let generation = {
        let mut report = shared.report.lock().unwrap_or_else(|e| e.into_inner());
        match &claimed {
            Ok(answer) => {
                let answer = answer.get_ref();
                let server = answer
                    .server_latency
                    .and_then(|d| Duration::try_from(d).ok());
                report.claim.record(tonic::Code::Ok, took, server);
                let source = answer.claim.as_ref().map_or(0, |c| c.source);
                let source = pb::ClaimSource::try_from(source).map_or_else(
                    |_| "UNKNOWN".to_owned(),
                    |s| {
                        let name = s.as_str_name();
                        name.strip_prefix("CLAIM_SOURCE_")
                            .unwrap_or(name)
                            .to_owned()
                    },
                );
                *report.sources.entry(source).or_default() += 1;
                answer.claim.as_ref().map(|c| c.generation)
            }
            Err(status) => {
                report.claim.record(status.code(), took, None);
                None
            }
        }
    };
    let Some(generation) = generation else {
        return;
    };
    if shared.claims_only {
        return;
    }
    if !shared.hold.is_zero() {
        tokio::time::sleep(shared.hold).await;
    }
    let sent = Instant::now();
    let released = client
        .release(pb::ReleaseRequest {
            tenant_id: tenant.to_owned(),
            workload_id: workload.to_owned(),
            generation,
            request_id: shared.request_id(),
        })
        .await;
    let took = sent.elapsed();
    let code = released.map_or_else(|s| s.code(), |_| tonic::Code::Ok);
    let mut report = shared.report.lock().unwrap_or_else(|e| e.into_inner());
    report.release.record(code, took, None);
}

impl Shared {
    fn request_id(&self) -> String {
        if self.request_ids {
            uuid::Uuid::now_v7().to_string()
        } else {
            String::new()
        }
    }

    fn take_tenant(&self) -> Option<String> {
        self.idle_tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    fn give_back(&self, tenant: String) {
        self.idle_tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(tenant);
    }

    fn workload(&self, n: u64) -> &str {
        &self.workloads[(n % self.workloads.len() as u64) as usize]
    }
}

async fn closed_loop(shared: Arc<Shared>, concurrency: usize, until: Instant) {
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let shared = shared.clone();
        workers.push(tokio::spawn(async move {
            let mut n = w as u64;
            while Instant::now() < until {
                let Some(tenant) = shared.take_tenant() else {
                    return;
                };
                cycle(&shared, &tenant, shared.workload(n), None).await;
                if !shared.claims_only {
                    shared.give_back(tenant);
                }
                n += concurrency as u64;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

async fn open_loop(shared: Arc<Shared>, rate: f64, until: Instant) {
    let every = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut cycles = tokio::task::JoinSet::new();
    for n in 0u64.. {
        let due = start + every.mul_f64(n as f64);
        if due >= until {
            break;
        }
        tokio::time::sleep_until(due).await;
        let Some(tenant) = shared.take_tenant() else {
            shared
                .report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .skipped += 1;
            continue;
        };
        let shared = shared.clone();
        cycles.spawn(async move {
            cycle(&shared, &tenant, shared.workload(n), Some(due)).await;
            if !shared.claims_only {
                shared.give_back(tenant);
            }
        });
        // Reap finished cycles as we go, so the set stays small.
        while cycles.try_join_next().is_some() {}
    }
    while cycles.join_next().await.is_some() {}
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The probe is one tenant claiming: the load's options do not apply.
    if let Some(give_up) = args.until_granted {
        let channel = connect_as(&args, true).await?;
        let tenant = format!("{}-probe", args.tenant_prefix);
        let report = probe::until_granted(channel, &tenant, &args.workloads[0], give_up).await;
        println!("{}", serde_json::to_string_pretty(&report)?);
        anyhow::ensure!(
            report.granted_after_ms.is_some(),
            "no claim granted within {give_up:?}"
        );
        return Ok(());
    }
    anyhow::ensure!(args.tenants > 0, "--tenants: at least 1");
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate: a positive number of cycles per second"
        );
    }
    let concurrency = args.concurrency.unwrap_or(16);
    anyhow::ensure!(concurrency > 0, "--concurrency: at least 1");
    anyhow::ensure!(
        args.rate.is_some() || concurrency <= args.tenants,
        "--concurrency {concurrency} needs at least as many --tenants ({}): a tenant is in one cycle at a time",
        args.tenants
    );
    let channel = connect(&args).await?;
    let floor = floor(channel.clone(), args.floor_calls).await;
    anyhow::ensure!(args.connections > 0, "--connections: at least 1");
    let mut clients = vec![ClaimServiceClient::new(channel)];
    for _ in 1..args.connections {
        clients.push(ClaimServiceClient::new(connect(&args).await?));
    }
    let mode = match args.rate {
        Some(rate) => format!("open loop at {rate}/s"),
        None => format!("closed loop, concurrency {concurrency}"),
    };
    let shared = Arc::new(Shared {
        clients,
        next_client: std::sync::atomic::AtomicUsize::new(0),
        workloads: args.workloads.clone(),
        idle_tenants: Mutex::new(
            (0..args.tenants)
                .map(|n| format!("{}-{n}", args.tenant_prefix))
                .collect(),
        ),
        report: Mutex::new(Report {
            mode: format!(
                "{mode}{}, {} tenants, workloads {}, hold {:?}",
                if args.claims_only {
                    ", claims only"
                } else {
                    ""
                },
                args.tenants,
                args.workloads.join(","),
                args.hold
            ),
            ..Report::default()
        }),
        hold: args.hold,
        claims_only: args.claims_only,
        request_ids: args.request_ids,
    });
    shared
        .report
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .floor = floor;
    let started = Instant::now();
    let until = started + args.duration;
    match args.rate {
        Some(rate) => open_loop(shared.clone(), rate, until).await,
        None => closed_loop(shared.clone(), concurrency, until).await,
    }
    let mut report = std::mem::take(&mut *shared.report.lock().unwrap_or_else(|e| e.into_inner()));
    report.elapsed = started.elapsed();
    match args.json.as_deref() {
        Some(path) if path.as_os_str() == "-" => {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        }
        Some(path) => {
            std::fs::write(path, serde_json::to_string_pretty(&report.to_json())?)
                .with_context(|| format!("--json {}", path.display()))?;
            print!("{}", report.table());
        }
        None => print!("{}", report.table()),
    }
    Ok(())
}
