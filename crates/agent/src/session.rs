//! The agent's life: wait for Docker, connect to the server, say Hello,
//! report everything, then stream events, heartbeats and command results
//! until the stream breaks; then back off and do it again.
//!
//! Reconnection uses exponential backoff with full jitter and a random
//! initial delay, so a restarted server is not hit by every agent in the
//! same second. With several server addresses (replicas, one of which
//! leads) the agent goes through them in rounds, following a standby's
//! hint to the leader, and backs off between rounds only; see
//! [`boilerhouse_proto::servers`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use boilerhouse_core::container::ObservedContainer;
use boilerhouse_core::{ContainerId, Timestamp};
use boilerhouse_proto::convert::{duration_from_pb, timestamp_to_pb};
use boilerhouse_proto::leader::{is_standby, leader_hint};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::agent_service_client::AgentServiceClient;
use boilerhouse_proto::servers::{self, Rotation, Step};

use crate::backoff::Backoff;
use crate::commands::{Admission, Command, Executor, Outcome, decode_command};
use crate::config::AgentConfig;
use crate::docker::DockerRuntime;
use crate::heartbeat::{Heartbeats, Usage};
use crate::runtime::{ContainerRuntime, EngineInfo};
use crate::state_files::StateFiles;
use crate::volumes::VolumeLayout;

/// How long a session must last before its end resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Sleeps unless shutdown comes first; returns false on shutdown.
async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Runs the agent until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), config.max_backoff);
    let docker_endpoint = config
        .docker_host
        .clone()
        .unwrap_or_else(|| "the local default".to_owned());

    // Random initial delay: agents started together spread out.
    let initial = Duration::from_millis(rand::rng().random_range(0..=500));
    if !pause(initial, &shutdown).await {
        return Ok(());
    }

    let runtime: Arc<dyn ContainerRuntime> = loop {
        match DockerRuntime::connect(config.docker_host.as_deref()).await {
            Ok(r) => break Arc::new(r),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(endpoint = %docker_endpoint, error = %e, retry_in = ?delay, "docker engine unreachable; retrying");
                if !pause(delay, &shutdown).await {
                    return Ok(());
                }
            }
        }
    };
    backoff.reset();
    let (activity_tx, mut activity) = mpsc::channel(256);
    let _watcher = match crate::activity::watch(&config.state_root, activity_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch state directories; tenant activity will only come from Touch");
            None
        }
    };
    // Replays the state files' log (before any report reads them).
    let state_files = StateFiles::spawn(VolumeLayout::new(&config.state_root)).await?;
    let executor = Executor::new(
        runtime.clone(),
        state_files,
        config.node_id.clone(),
        config.container_labels.clone(),
        crate::sync::SyncRunner::with_credentials_file(config.s3_credentials_file.clone()),
        config.policy.clone(),
    );
    // Only a sync pauses a managed container, and only for its length: one
    // still paused now was left so by an agent that died mid-sync.
    executor.thaw_leftovers().await;

    let mut rotation = Rotation::new(config.servers.clone());
    loop {
        let engine = match runtime.engine().await {
            Ok(engine) => engine,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(endpoint = %docker_endpoint, error = %e, retry_in = ?delay, "docker engine unreachable; retrying");
                if !pause(delay, &shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        let server = rotation.current().to_owned();
        let began = std::time::Instant::now();
        let mut welcomed = false;
        let result = session(
            &config,
            &server,
            &engine,
            &executor,
            &mut activity,
            &shutdown,
            &mut welcomed,
        )
        .await;
        // Only a session that held counts as healthy: on a link that flaps
        // every few seconds, each short session keeps the backoff growing
        // instead of reconnecting at once.
        if welcomed && began.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        let attempt = match result {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Ended { reason, leader }) => {
                tracing::warn!(server = %server, reason = %reason, lasted = ?began.elapsed(), "session ended; reconnecting");
                Attempt::Ended(leader)
            }
            Ok(SessionEnd::Local(reason)) => {
                tracing::warn!(server = %server, reason = %reason, lasted = ?began.elapsed(), "session ended; reconnecting to the same server");
                Attempt::Local
            }
            Err(e) if welcomed => {
                tracing::warn!(server = %server, error = %format!("{e:#}"), lasted = ?began.elapsed(), "session failed; reconnecting");
                Attempt::Ended(None)
            }
            Err(e) => match e.downcast_ref::<tonic::Status>().filter(|s| is_standby(s)) {
                Some(status) => {
                    let leader = leader_hint(status);
                    tracing::info!(server = %server, leader = leader.as_deref().unwrap_or("unknown"), "a standby refused the session");
                    Attempt::Refused(leader)
                }
                None => {
                    tracing::warn!(server = %server, error = %format!("{e:#}"), "cannot hold a session with the server");
                    Attempt::Failed
                }
            },
        };
        let step = match attempt.outcome() {
            Some(outcome) => {
                if let servers::Outcome::Refused(Some(hint)) | servers::Outcome::Ended(Some(hint)) =
                    outcome
                    && !rotation.accepts(hint)
                {
                    tracing::warn!(server = %server, leader = %hint, "not following a leader of another scheme than --server");
                }
                rotation.record(outcome)
            }
            // The server was fine: back to it after the backoff, in a round
            // of its own.
            None => {
                rotation.begin();
                Step::Wait
            }
        };
        // Between addresses of one round the agent goes on at once; the
        // backoff is for a round in which none took it.
        if step == Step::Wait {
            let delay = backoff.next_delay();
            if !pause(delay, &shutdown).await {
                return Ok(());
            }
        }
    }
}

enum SessionEnd {
    Shutdown,
    /// The session was established and later ended for this reason; a
    /// standby's refusal (the server lost the lead) may name the leader.
    Ended {
        reason: String,
        leader: Option<String>,
    },
    /// The session was established and ended for a reason on this side
    /// (the Docker engine's), so the server is still the one to go to.
    Local(String),
}

/// How one attempt went: a [`servers::Outcome`] that owns the leader's name.
enum Attempt {
    Failed,
    Refused(Option<String>),
    Ended(Option<String>),
    /// Nothing learnt about the server.
    Local,
}

impl Attempt {
    fn outcome(&self) -> Option<servers::Outcome<'_>> {
        Some(match self {
            Attempt::Failed => servers::Outcome::Failed,
            Attempt::Refused(leader) => servers::Outcome::Refused(leader.as_deref()),
            Attempt::Ended(leader) => servers::Outcome::Ended(leader.as_deref()),
            Attempt::Local => return None,
        })
    }
}

fn hello(config: &AgentConfig, engine: &EngineInfo) -> pb::ConnectRequest {
    pb::ConnectRequest {
        message: Some(pb::connect_request::Message::Hello(pb::Hello {
            node_id: config.node_id.to_string(),
            boot_id: crate::host::boot_id(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            engine_version: engine.version.clone(),
            capacity: Some(pb::Resources {
                cpus: engine.cpus,
                memory_bytes: engine.memory_bytes,
                gpus: crate::host::gpu_count(),
            }),
            labels: config.labels.clone().into_iter().collect(),
            state_root: std::path::absolute(&config.state_root)
                .unwrap_or_else(|_| config.state_root.clone())
                .display()
                .to_string(),
            state_file_batches: true,
        })),
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// The node's containers as last seen, by Docker id: replaced by each full
/// report and kept current between reports by events and command results,
/// so heartbeats never carry a stale picture.
pub type Snapshot = std::collections::BTreeMap<String, ObservedContainer>;

fn snapshot(containers: Vec<ObservedContainer>) -> Snapshot {
    containers
        .into_iter()
        .map(|c| (c.docker_id.clone(), c))
        .collect()
}

/// How long a full report owed for a container this agent did not make
/// waits for others: a burst of such containers (an engine restored, an
/// operator's script) costs one report, not one each.
const REPORT_DEBOUNCE: Duration = Duration::from_secs(1);

/// A command's outcome on its way back to the session.
struct Finished {
    command_id: String,
    /// The container a Create made, to clear from
    /// [`Executor::creating`] once the snapshot holds it.
    created: Option<ContainerId>,
    outcome: Outcome,
}

async fn session(
    config: &AgentConfig,
    server: &str,
    engine: &EngineInfo,
    executor: &Executor,
    activity: &mut mpsc::Receiver<ContainerId>,
    shutdown: &CancellationToken,
    welcomed: &mut bool,
) -> anyhow::Result<SessionEnd> {
    let mut endpoint = Endpoint::from_shared(server.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        endpoint = endpoint.tls_config(tls.client_config()?)?;
    }
    let channel = endpoint.connect().await?;
    let mut client = AgentServiceClient::new(channel);
    let (out, out_rx) = mpsc::channel::<pb::ConnectRequest>(1024);
    out.send(hello(config, engine)).await?;
    let mut inbound = client
        .connect(ReceiverStream::new(out_rx))
        .await?
        .into_inner();

    let welcome = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
        Err(_) => anyhow::bail!("no Welcome within 10s"),
        Ok(message) => match message?.and_then(|m| m.message) {
            Some(pb::connect_response::Message::Welcome(w)) => w,
            other => anyhow::bail!("expected Welcome, got {other:?}"),
        },
    };
    let heartbeat_every = welcome
        .heartbeat_interval
        .as_ref()
        .map(|d| duration_from_pb("heartbeat_interval", d))
        .transpose()?
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(2));
    *welcomed = true;
    let part_size = boilerhouse_proto::convert::report_part_size(&welcome);
    tracing::info!(
        node = %config.node_id,
        server = %server,
        session = %welcome.session_id,
        heartbeat = ?heartbeat_every,
        engine = %engine.version,
        "connected to the server"
    );

    let mut last_report = snapshot(executor.full_report().await?);
    send_report(&out, &last_report, String::new(), part_size).await?;
    let heartbeats = Heartbeats::start(out.clone(), heartbeat_every, Usage::of(&last_report));

    let mut events = executor.runtime().events(&config.node_id);
    let mut resync = tokio::time::interval_at(
        tokio::time::Instant::now()
            + crate::backoff::first_full_report(config.full_report_interval),
        config.full_report_interval,
    );
    // When a full report is owed for a container someone else made.
    let mut report_due: Option<tokio::time::Instant> = None;
    let (results, mut result_rx) = mpsc::channel::<Finished>(256);

    loop {
        heartbeats.update(&last_report);
        tokio::select! {
            // Cancel-safe: observing the token loses nothing.
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            // Cancel-safe: Streaming::message loses no message when dropped
            // before it completes.
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(SessionEnd::Ended { reason: "the server closed the stream".into(), leader: None }),
                    Err(status) => return Ok(SessionEnd::Ended {
                        reason: format!("stream error: {status}"),
                        leader: if is_standby(&status) { leader_hint(&status) } else { None },
                    }),
                };
                if let Some(pb::connect_response::Message::Command(command)) = message.message {
                    let _busy = heartbeats.busy();
                    handle_command(command, executor, &out, &results, &mut last_report, part_size).await?;
                }
            }
            // Cancel-safe: the events stream buffers undelivered items.
            event = events.next() => match event {
                Some(Ok(mut event)) => {
                    let _busy = heartbeats.busy();
                    // Inspected first, so a health event carries what the
                    // check printed: the engine's reason for "unhealthy".
                    let new = refresh(executor, &mut last_report, &event.docker_id).await;
                    if event.kind == boilerhouse_core::container::ContainerEventKind::Health {
                        event.health_output = last_report
                            .get(&event.docker_id)
                            .and_then(|c| c.health_output.clone());
                    }
                    let message = pb::ConnectRequest {
                        message: Some(pb::connect_request::Message::ContainerEvent(pb::ContainerEvent::from(&event))),
                    };
                    out.send(message).await?;
                    // The server learns of a container only from a report
                    // or a command's result: one this agent is making comes
                    // with its Create's result; for any other one a report
                    // is owed, and one report serves a burst of them.
                    if new && !event.container_id.is_some_and(|id| executor.creating(&id)) {
                        report_due.get_or_insert_with(|| tokio::time::Instant::now() + REPORT_DEBOUNCE);
                    }
                }
                Some(Err(e)) => return Ok(SessionEnd::Local(format!("docker events stream failed: {e}"))),
                None => return Ok(SessionEnd::Local("docker events stream ended".into())),
            },
            // Cancel-safe: a lost tick is taken on the next poll, and a
            // sleep that did not finish is made again from `report_due`.
            _ = resync.tick() => {
                let _busy = heartbeats.busy();
                report_due = None;
                last_report = snapshot(executor.full_report().await?);
                send_report(&out, &last_report, String::new(), part_size).await?;
            }
            () = sleep_until_due(report_due), if report_due.is_some() => {
                let _busy = heartbeats.busy();
                report_due = None;
                last_report = snapshot(executor.full_report().await?);
                send_report(&out, &last_report, String::new(), part_size).await?;
            }
            // Cancel-safe: mpsc::Receiver::recv loses nothing when dropped.
            Some(container_id) = activity.recv() => {
                let docker_id = last_report
                    .values()
                    .find(|c| c.container_id() == Some(container_id))
                    .map(|c| c.docker_id.clone())
                    .unwrap_or_default();
                let event = boilerhouse_core::container::ContainerEvent {
                    kind: boilerhouse_core::container::ContainerEventKind::Activity,
                    docker_id,
                    container_id: Some(container_id),
                    at: now(),
                    health: None,
                    health_output: None,
                    exit_code: None,
                };
                out.send(pb::ConnectRequest {
                    message: Some(pb::connect_request::Message::ContainerEvent(pb::ContainerEvent::from(&event))),
                })
                .await?;
            }
            // Cancel-safe: mpsc::Receiver::recv loses nothing when dropped.
            Some(Finished { command_id, created, mut outcome }) = result_rx.recv() => {
                if let Some(c) = &outcome.container {
                    last_report.insert(c.docker_id.clone(), c.clone());
                }
                if let Some(id) = created {
                    // The server learns of this container from this result,
                    // and ignored its events until then (it did not know
                    // it): so the result carries the container as it is
                    // now, not as the create left it, and later events find
                    // it known.
                    if let Some(docker_id) = outcome.container.as_ref().map(|c| c.docker_id.clone()) {
                        let _busy = heartbeats.busy();
                        refresh(executor, &mut last_report, &docker_id).await;
                        if let Some(current) = last_report.get(&docker_id) {
                            let mut current = current.clone();
                            current.state_file = outcome.container.as_ref().and_then(|c| c.state_file.clone());
                            outcome.container = Some(current);
                        }
                    }
                    executor.created(&id);
                }
                out.send(result_message(command_id, &outcome)).await?;
            }
        }
    }
}

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Re-inspects one container after an event; a container that is gone
/// leaves the snapshot. Returns whether the container was new to it (made
/// by someone other than this agent), which the server can only learn from
/// a full report.
async fn refresh(executor: &Executor, snapshot: &mut Snapshot, docker_id: &str) -> bool {
    match executor.runtime().inspect(docker_id).await {
        Ok(Some(c)) => snapshot.insert(c.docker_id.clone(), c).is_none(),
        Ok(None) => {
            snapshot.remove(docker_id);
            false
        }
        // The engine hiccuped; the next full report corrects the picture.
        Err(e) => {
            tracing::debug!(docker_id, error = %e, "cannot refresh a container after an event");
            false
        }
    }
}

async fn send_report(
    out: &mpsc::Sender<pb::ConnectRequest>,
    containers: &Snapshot,
    command_id: String,
    part_size: usize,
) -> anyhow::Result<()> {
    let parts = boilerhouse_proto::convert::full_report_parts(
        timestamp_to_pb(now()),
        containers
            .values()
            .map(pb::ObservedContainer::from)
            .collect(),
        command_id,
        part_size,
    );
    for part in parts {
        out.send(pb::ConnectRequest {
            message: Some(pb::connect_request::Message::FullReport(part)),
        })
        .await?;
    }
    Ok(())
}

fn result_message(command_id: String, outcome: &Outcome) -> pb::ConnectRequest {
    pb::ConnectRequest {
        message: Some(pb::connect_request::Message::CommandResult(
            pb::CommandResult {
                command_id,
                ok: outcome.ok,
                error: outcome.error.clone(),
                container: outcome.container.as_ref().map(pb::ObservedContainer::from),
                sync: outcome.sync.as_ref().map(|reports| pb::SyncReport {
                    mappings: reports
                        .iter()
                        .map(|r| pb::MappingSyncReport {
                            path: r.path.clone(),
                            uploaded: r.uploaded,
                            downloaded: r.downloaded,
                            deleted: r.deleted,
                            unchanged: r.unchanged,
                            bytes: r.bytes,
                            pending: r.pending,
                            errors: r.errors.clone(),
                            warning: r.warning.clone().unwrap_or_default(),
                            skipped: r.skipped.clone(),
                            skipped_count: r.skipped_count,
                            paused: r.paused,
                            pause_error: r.pause_error.clone().unwrap_or_default(),
                        })
                        .collect(),
                }),
            },
        )),
    }
}

async fn handle_command(
    command: pb::Command,
    executor: &Executor,
    out: &mpsc::Sender<pb::ConnectRequest>,
    results: &mpsc::Sender<Finished>,
    last_report: &mut Snapshot,
    part_size: usize,
) -> anyhow::Result<()> {
    let id = command.command_id.clone();
    let decoded = match decode_command(&command) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(command = %id, error = %e, "rejected a command");
            let outcome = Outcome {
                ok: false,
                error: e,
                container: None,
                sync: None,
            };
            out.send(result_message(id, &outcome)).await?;
            return Ok(());
        }
    };
    if decoded == Command::FullReport {
        *last_report = snapshot(executor.full_report().await?);
        send_report(out, last_report, id.clone(), part_size).await?;
        out.send(result_message(
            id,
            &Outcome {
                ok: true,
                error: String::new(),
                container: None,
                sync: None,
            },
        ))
        .await?;
        return Ok(());
    }
    match executor.admit(&id) {
        Admission::Answered(outcome) => out.send(result_message(id, &outcome)).await?,
        Admission::InFlight => {}
        Admission::Run => {
            let executor = executor.clone();
            let results = results.clone();
            let created = match &decoded {
                Command::Create { spec, .. } => Some(spec.container_id),
                _ => None,
            };
            tokio::spawn(async move {
                let outcome = executor.execute(decoded).await;
                if !outcome.ok {
                    tracing::warn!(command = %id, error = %outcome.error, "command failed");
                }
                executor.finish(&id, &outcome);
                // If the session is gone the server resends the command
                // and gets this result from memory, and the next session
                // begins with a full report.
                let finished = Finished {
                    command_id: id,
                    created,
                    outcome,
                };
                if let Err(mpsc::error::SendError(finished)) = results.send(finished).await
                    && let Some(id) = finished.created
                {
                    executor.created(&id);
                }
            });
        }
    }
    Ok(())
}
