//! One fake agent: the real agent's protocol over a real gRPC stream
//! (Hello, a full report, heartbeats, events, command results, periodic
//! reports), its reconnect backoff and its start-up spread, with an
//! in-memory [`Engine`] instead of Docker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use boilerhouse_agent::backoff::{Backoff, first_full_report};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::agent_service_client::AgentServiceClient;
use boilerhouse_proto::pb::connect_request::Message as Up;
use boilerhouse_proto::pb::connect_response::Message as Down;

use super::engine::{Engine, kind_name};
use super::stats::Stats;

/// What every fake agent shares.
pub struct FleetConfig {
    pub server: String,
    /// The PKI directory (`ca.pem`, `nodes/<node>.pem`, `.key`) for mTLS.
    pub pki: Option<std::path::PathBuf>,
    pub prefix: String,
    pub boot_id: String,
    pub cpus: f64,
    pub memory_bytes: u64,
    /// A simulated engine's time per command, before the answer.
    pub command_delay: Duration,
    /// Each agent sends a tenant-activity event this often (zero: never).
    pub activity_every: Duration,
    /// Agents start spread over this long, as real ones do.
    pub spread: Duration,
    pub max_backoff: Duration,
    /// Containers in each part of a full report, to a server that takes
    /// parts.
    pub report_part: usize,
}

/// How long a session must last before its end resets the backoff, as in
/// the real agent.
const STABLE_SESSION: Duration = Duration::from_secs(30);

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

pub fn node_name(prefix: &str, index: u32) -> String {
    format!("{prefix}-{index:04}")
}

/// Runs agent `index` until `shutdown`; its engine outlives its sessions,
/// so a reconnect reports what it held.
pub async fn run(
    config: Arc<FleetConfig>,
    index: u32,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    let node = node_name(&config.prefix, index);
    let engine = Arc::new(Mutex::new(Engine::new()));
    stats.set_engine(index as usize, engine.clone());
    let mut backoff = Backoff::new(Duration::from_millis(200), config.max_backoff);
    let spread = config.spread.as_millis() as u64;
    let first = Duration::from_millis(rand::rng().random_range(0..=spread));
    if !pause(first, &shutdown).await {
        return;
    }
    loop {
        let began = Instant::now();
        let mut welcomed = false;
        let end = session(&config, &node, &engine, &stats, &shutdown, &mut welcomed).await;
        if welcomed {
            stats.disconnected();
        }
        match end {
            Ok(()) => return,
            Err(reason) => stats.session_failed(welcomed, &reason),
        }
        if welcomed && began.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        if !pause(backoff.next_delay(), &shutdown).await {
            return;
        }
    }
}

async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

async fn endpoint(config: &FleetConfig, node: &str) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::from_shared(config.server.clone())
        .map_err(|e| format!("--server: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(pki) = &config.pki {
        let read =
            |p: std::path::PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
        let ca = read(pki.join("ca.pem"))?;
        let cert = read(pki.join("nodes").join(format!("{node}.pem")))?;
        let key = read(pki.join("nodes").join(format!("{node}.key")))?;
        let tls = boilerhouse_proto::tls::client_tls(&ca, Some((&cert, &key)), None);
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    Ok(endpoint)
}

fn up(message: Up) -> pb::ConnectRequest {
    pb::ConnectRequest {
        message: Some(message),
    }
}

/// One session; `Ok` only at shutdown, else why it ended.
async fn session(
    config: &FleetConfig,
    node: &str,
    engine: &Arc<Mutex<Engine>>,
    stats: &Arc<Stats>,
    shutdown: &CancellationToken,
    welcomed: &mut bool,
) -> Result<(), String> {
    let attempt = Instant::now();
    let channel = endpoint(config, node)
        .await?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = AgentServiceClient::new(channel);
    let (out, out_rx) = mpsc::channel::<pb::ConnectRequest>(1024);
    let hello = pb::Hello {
        node_id: node.to_owned(),
        boot_id: config.boot_id.clone(),
        agent_version: concat!("fleet-", env!("CARGO_PKG_VERSION")).to_owned(),
        engine_version: "fleet".to_owned(),
        capacity: Some(pb::Resources {
            cpus: config.cpus,
            memory_bytes: config.memory_bytes,
            gpus: 0,
        }),
        labels: Default::default(),
        state_root: format!("/fleet/{node}"),
        state_file_batches: true,
    };
    out.send(up(Up::Hello(hello)))
        .await
        .map_err(|e| e.to_string())?;
    let mut inbound = client
        .connect(ReceiverStream::new(out_rx))
        .await
        .map_err(|s| status_reason(&s))?
        .into_inner();
    let welcome = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
        Err(_) => return Err("no Welcome within 10s".to_owned()),
        Ok(Err(s)) => return Err(status_reason(&s)),
        Ok(Ok(Some(pb::ConnectResponse {
            message: Some(Down::Welcome(w)),
        }))) => w,
        Ok(Ok(other)) => return Err(format!("expected Welcome, got {other:?}")),
    };
    *welcomed = true;
    stats.connected(attempt.elapsed());
    let interval = |d: Option<prost_types::Duration>, default: Duration| {
        d.and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(default)
    };
    let heartbeat_every = interval(welcome.heartbeat_interval, Duration::from_secs(2));
    let report_every = interval(welcome.full_report_interval, Duration::from_secs(60));
    let part_size = if welcome.report_parts {
        config.report_part
    } else {
        usize::MAX
    };

    send_report(&out, engine, stats, String::new(), part_size).await?;
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = tokio::time::Instant::now();
    // As the real agent: agents connected together do not report together.
    let mut resync =
        tokio::time::interval_at(start + first_full_report(report_every), report_every);
    let activity_every = if config.activity_every.is_zero() {
        Duration::from_secs(86_400 * 365)
    } else {
        config.activity_every
    };
    let mut activity = tokio::time::interval_at(start + activity_every, activity_every);
    activity.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut activity_n = 0usize;
    let (delayed, mut delayed_rx) = mpsc::channel::<Vec<pb::ConnectRequest>>(256);

    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = inbound.message() => match message {
                Ok(Some(pb::ConnectResponse { message: Some(Down::Command(command)) })) => {
                    stats.command(kind_name(&command));
                    if config.command_delay.is_zero() {
                        let messages = answer(engine, stats, &command);
                        deliver(&out, engine, stats, messages, part_size).await?;
                    } else {
                        // The engine's time: answered later, other commands
                        // meanwhile, as the real agent runs them in tasks.
                        let engine = engine.clone();
                        let delayed = delayed.clone();
                        let delay = config.command_delay;
                        let stats = stats.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let messages = answer(&engine, &stats, &command);
                            let _ = delayed.send(messages).await;
                        });
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err("the server closed the stream".to_owned()),
                Err(s) => return Err(status_reason(&s)),
            },
            Some(messages) = delayed_rx.recv() => deliver(&out, engine, stats, messages, part_size).await?,
            _ = heartbeat.tick() => {
                let (usage, count) = lock(engine).usage();
                out.send(up(Up::Heartbeat(pb::Heartbeat {
                    at: Some(now()),
                    usage: Some(usage),
                    container_count: count,
                })))
                .await
                .map_err(|e| e.to_string())?;
                stats.heartbeat();
            }
            _ = resync.tick() => send_report(&out, engine, stats, String::new(), part_size).await?,
            _ = activity.tick() => {
                activity_n += 1;
                let target = lock(engine).nth_running(activity_n);
                if let Some((docker_id, container_id)) = target {
                    out.send(up(Up::ContainerEvent(pb::ContainerEvent {
                        kind: pb::ContainerEventKind::Activity as i32,
                        docker_id,
                        container_id,
                        at: Some(now()),
                        ..Default::default()
                    })))
                    .await
                    .map_err(|e| e.to_string())?;
                    stats.events(1);
                }
            }
        }
    }
}

/// The messages that answer `command`, events first; a full report is a
/// marker the session fills in with the engine's containers when it sends.
fn answer(engine: &Mutex<Engine>, stats: &Stats, command: &pb::Command) -> Vec<pb::ConnectRequest> {
    let a = lock(engine).execute(command, now());
    if !a.result.ok {
        stats.command_failed(&a.result.error);
    }
    stats.events(a.events.len() as u64);
    let mut messages: Vec<_> = a
        .events
        .into_iter()
        .map(|e| up(Up::ContainerEvent(e)))
        .collect();
    if a.full_report {
        messages.push(up(Up::FullReport(pb::FullReport {
            command_id: command.command_id.clone(),
            ..Default::default()
        })));
    }
    messages.push(up(Up::CommandResult(a.result)));
    messages
}

/// Sends `messages` in order, filling a full report marker in as it goes.
async fn deliver(
    out: &mpsc::Sender<pb::ConnectRequest>,
    engine: &Mutex<Engine>,
    stats: &Stats,
    messages: Vec<pb::ConnectRequest>,
    part_size: usize,
) -> Result<(), String> {
    for m in messages {
        if let Some(Up::FullReport(marker)) = m.message {
            send_report(out, engine, stats, marker.command_id, part_size).await?;
        } else {
            out.send(m).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

async fn send_report(
    out: &mpsc::Sender<pb::ConnectRequest>,
    engine: &Mutex<Engine>,
    stats: &Stats,
    command_id: String,
    part_size: usize,
) -> Result<(), String> {
    let parts = lock(engine).report(now(), command_id, part_size);
    stats.report(parts.iter().map(|p| p.containers.len()).sum());
    for part in parts {
        out.send(up(Up::FullReport(part)))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn lock(engine: &Mutex<Engine>) -> std::sync::MutexGuard<'_, Engine> {
    engine.lock().unwrap_or_else(|e| e.into_inner())
}

/// A status as a short reason for the counts: its code, and for a
/// standby's refusal that it was one.
fn status_reason(status: &tonic::Status) -> String {
    if boilerhouse_proto::leader::is_standby(status) {
        return "refused by a standby".to_owned();
    }
    format!("{:?}", status.code())
}
