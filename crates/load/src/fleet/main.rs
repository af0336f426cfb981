//! boilerhouse-fleet: a thousand agents in one process, for loading the
//! server without a thousand Docker hosts.
//!
//! Each fake agent speaks the real protocol over its own gRPC stream
//! (mTLS with its own node certificate when `--pki` is given): Hello, a
//! full report of everything it holds, heartbeats at the server's
//! interval, periodic full reports, engine events and command results,
//! with the real agent's start-up spread and reconnect backoff. Its
//! containers live in memory: a create answers at once (or after
//! `--command-delay`) with a running container, healthy if it has a check.
//! The server cannot tell it from a fleet of real agents, so its own costs
//! (planning, writing, holding sessions) are measured alone.
//!
//! The run: start every agent, wait until all have a session, optionally
//! wait until the fleet holds `--wait-containers` containers (the server's
//! pools filled), then measure for `--duration`: the server's CPU and
//! memory when `--server-pid` is given, and every outage (agents losing the
//! server, say to a restart) until all were back.
//!
//!   boilerhoused pki init --node fleet-0000 ... ; boilerhouse-fleet --agents 1000 --pki data/pki
//!   boilerhouse-fleet --server http://127.0.0.1:7600 --agents 1000 --server-pid $(pidof boilerhoused)

mod agent;
mod engine;
mod procstat;
mod stats;

/// jemalloc, as the server uses: the fleet shares the server's cores, so
/// what it spends in malloc is taken from what is measured.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use agent::FleetConfig;
use stats::Stats;

/// Runs N fake agents against a server over real gRPC.
#[derive(Debug, Parser)]
#[command(name = "boilerhouse-fleet", version)]
struct Args {
    /// The server.
    #[arg(
        long,
        env = "BOILERHOUSE_ADDR",
        default_value = "https://127.0.0.1:7600"
    )]
    server: String,
    /// How many agents.
    #[arg(long, default_value_t = 10)]
    agents: u32,
    /// Node names are `<prefix>-NNNN`.
    #[arg(long, default_value = "fleet")]
    prefix: String,
    /// A PKI directory (`boilerhoused pki init --node ...` makes one):
    /// ca.pem and nodes/<node>.pem and .key; required for https.
    #[arg(long)]
    pki: Option<PathBuf>,
    /// CPUs each fake host offers.
    #[arg(long, default_value_t = 64.0)]
    cpus: f64,
    /// Memory each fake host offers, in GiB.
    #[arg(long, default_value_t = 256)]
    memory_gib: u64,
    /// The simulated engine's time per command (a real create + start is
    /// ~0.2 s).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    command_delay: Duration,
    /// Each agent reports tenant activity on one of its running containers
    /// this often (0s: never).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    activity_every: Duration,
    /// Agents start spread over this long, as real ones do (0 to 500 ms).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    spread: Duration,
    /// The longest reconnect backoff (the agent's default).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
    /// Containers in each part of a full report (the real agent's
    /// number by default), to compare message sizes.
    #[arg(long, default_value_t = boilerhouse_proto::convert::REPORT_PART_CONTAINERS, value_parser = clap::value_parser!(usize))]
    report_part: usize,
    /// Give up waiting for every agent's session after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Before the window, wait until the fleet holds this many containers.
    #[arg(long, default_value_t = 0)]
    wait_containers: usize,
    /// Give up waiting for the containers after this long.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
    /// How long to measure.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The server's process, whose CPU and memory are measured.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A line of progress on standard error this often.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    progress: Duration,
    /// Write the report as JSON to this file (`-`: standard output,
    /// instead of the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the window, write its report (--json) and keep the agents
    /// running until SIGINT or SIGTERM, then write a second report, of the
    /// whole run (its outages: a server restart's, say), to this file.
    #[arg(long, requires = "json")]
    hold_then: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct FleetReport {
    agents: u32,
    server: String,
    /// Seconds until the fleet held the containers asked for.
    containers_ready_after_s: Option<f64>,
    /// Whether every agent had a session when the run ended.
    all_connected: bool,
    server_usage: Option<procstat::Usage>,
    fleet_usage: Option<procstat::Usage>,
    #[serde(flatten)]
    counts: stats::Counts,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.agents == 0 {
        anyhow::bail!("--agents: at least one");
    }
    if args.server.starts_with("https://") && args.pki.is_none() {
        anyhow::bail!("--server is https: give --pki (a directory with ca.pem and nodes/)");
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("a tokio runtime")?;
    let report = runtime.block_on(run(&args, &|report| write(&args.json, report)))?;
    if let Some(path) = &args.hold_then {
        write(&Some(path.clone()), &report)?;
    }
    if !report.all_connected {
        anyhow::bail!("not every agent had a session at the end");
    }
    Ok(())
}

fn write(to: &Option<PathBuf>, report: &FleetReport) -> anyhow::Result<()> {
    match to {
        Some(path) if path.as_os_str() == "-" => {
            println!("{}", serde_json::to_string_pretty(report)?);
        }
        Some(path) => {
            // Written whole, then renamed: a script waiting for the file
            // never reads half of it.
            let partial = path.with_extension("partial");
            std::fs::write(&partial, serde_json::to_vec_pretty(report)?)
                .and_then(|()| std::fs::rename(&partial, path))
                .with_context(|| format!("writing {}", path.display()))?;
            print_table(report);
        }
        None => print_table(report),
    }
    Ok(())
}

/// Runs the fleet; `window_done` gets the window's report. With
/// `--hold-then` the agents go on until a signal and the report returned
/// is the whole run's; otherwise it is the window's.
async fn run(
    args: &Args,
    window_done: &dyn Fn(&FleetReport) -> anyhow::Result<()>,
) -> anyhow::Result<FleetReport> {
    let config = Arc::new(FleetConfig {
        server: args.server.clone(),
        pki: args.pki.clone(),
        prefix: args.prefix.clone(),
        boot_id: uuid::Uuid::now_v7().to_string(),
        cpus: args.cpus,
        memory_bytes: args.memory_gib << 30,
        command_delay: args.command_delay,
        activity_every: args.activity_every,
        spread: args.spread,
        max_backoff: args.max_backoff,
        report_part: args.report_part.max(1),
    });
    // SIGINT or SIGTERM ends the window early, with the report; taken
    // from the start, so one sent while filling ends the window at once.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    let stats = Arc::new(Stats::new(args.agents as usize));
    let shutdown = CancellationToken::new();
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..args.agents {
        agents.spawn(agent::run(
            config.clone(),
            i,
            stats.clone(),
            shutdown.clone(),
        ));
    }
    let began = Instant::now();
    let progress = |phase: &str| {
        let c = stats.counts();
        eprintln!(
            "fleet {:>6.1}s {phase}: {}/{} connected, {} containers, {} commands, {} failed attempts",
            began.elapsed().as_secs_f64(),
            c.connected,
            args.agents,
            c.containers,
            c.commands.values().sum::<u64>(),
            c.failed_attempts.values().sum::<u64>(),
        );
    };
    let mut ticker = tokio::time::interval(args.progress);
    ticker.tick().await;

    // Every agent with a session.
    let deadline = began + args.connect_timeout;
    while stats.connected_now() < args.agents as usize && Instant::now() < deadline {
        tokio::select! {
            _ = ticker.tick() => progress("connecting"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    progress("connected");

    let mut containers_ready_after = None;
    if args.wait_containers > 0 {
        let deadline = Instant::now() + args.wait_timeout;
        while stats.containers() < args.wait_containers && Instant::now() < deadline {
            tokio::select! {
                _ = ticker.tick() => progress("filling"),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if stats.containers() >= args.wait_containers {
            containers_ready_after = Some(began.elapsed().as_secs_f64());
        }
        progress("filled");
    }

    let mut server = args
        .server_pid
        .map(|pid| procstat::Window::begin(Some(pid)));
    let mut fleet = procstat::Window::begin(None);
    let end = tokio::time::Instant::now() + args.duration;
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = ticker.tick() => progress("measuring"),
            _ = sample.tick() => {
                if let Some(s) = server.as_mut() {
                    s.tick();
                }
                fleet.tick();
            }
        }
    }
    if let Some(s) = server.as_mut() {
        s.tick();
    }
    fleet.tick();
    let counts = stats.counts();
    let mut report = FleetReport {
        agents: args.agents,
        server: args.server.clone(),
        containers_ready_after_s: containers_ready_after,
        all_connected: counts.connected == args.agents as usize,
        server_usage: server.and_then(|s| s.usage()),
        fleet_usage: fleet.usage(),
        counts,
    };
    if args.hold_then.is_some() {
        window_done(&report)?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = terminate.recv() => break,
                _ = ticker.tick() => progress("holding"),
            }
        }
        report.counts = stats.counts();
        report.all_connected = report.counts.connected == args.agents as usize;
    }
    shutdown.cancel();
    while agents.join_next().await.is_some() {}
    if args.hold_then.is_none() {
        window_done(&report)?;
    }
    Ok(report)
}

fn print_table(r: &FleetReport) {
    let c = &r.counts;
    println!(
        "boilerhouse-fleet: {} agents against {}",
        r.agents, r.server
    );
    println!(
        "  sessions        {} ({} connected at the end); connect to Welcome p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        c.sessions,
        c.connected,
        c.connect_to_welcome_ms.p50,
        c.connect_to_welcome_ms.p99,
        c.connect_to_welcome_ms.max
    );
    if let Some(s) = c.all_connected_after_s {
        println!("  all connected   after {s:.2} s");
    }
    if let Some(s) = r.containers_ready_after_s {
        println!("  containers      {} (ready after {s:.1} s)", c.containers);
    } else {
        println!("  containers      {}", c.containers);
    }
    println!(
        "  sent            {} heartbeats, {} full reports ({} containers), {} events",
        c.heartbeats, c.full_reports, c.reported_containers, c.events
    );
    println!("  commands        {:?}", c.commands);
    if !c.command_failures.is_empty() {
        println!("  failed commands {:?}", c.command_failures);
    }
    if !c.failed_attempts.is_empty() {
        println!("  failed attempts {:?}", c.failed_attempts);
    }
    if !c.sessions_ended.is_empty() {
        println!("  sessions ended  {:?}", c.sessions_ended);
    }
    for o in &c.outages {
        println!(
            "  outage at {:.1} s: {} agents lost at most, all back after {:.2} s, {} failed attempts",
            o.at_s, o.most_lost, o.all_back_after_s, o.failed_attempts
        );
    }
    for (who, usage) in [("server", &r.server_usage), ("fleet", &r.fleet_usage)] {
        if let Some(u) = usage {
            println!(
                "  {who:<15} {:.3} cores over {:.1} s, RSS {:.1} MiB (max {:.1} MiB)",
                u.cpu_cores, u.window_s, u.rss_mib_end, u.rss_mib_max
            );
        }
    }
}
