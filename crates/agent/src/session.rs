//! The agent's life: wait for Docker, connect to the server, say Hello,
//! report everything, then stream events, heartbeats and command results
//! until the stream breaks; then back off and do it again.
//!
//! Reconnection uses exponential backoff with full jitter and a random
//! initial delay, so a restarted server is not hit by every agent in the
//! same second.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use boilerhouse_core::container::{ContainerSpec, ObservedContainer, StateFile};
use boilerhouse_core::workload::SyncDirection;
use boilerhouse_core::{ContainerId, Timestamp};
use boilerhouse_proto::convert::{self, duration_from_pb, timestamp_to_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::agent_service_client::AgentServiceClient;

use crate::backoff::Backoff;
use crate::commands::{Admission, Command, Executor, Outcome};
use crate::config::AgentConfig;
use crate::docker::DockerRuntime;
use crate::runtime::{ContainerRuntime, EngineInfo};
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
    let executor = Executor::new(
        runtime.clone(),
        VolumeLayout::new(&config.state_root),
        config.node_id.clone(),
        config.container_labels.clone(),
        crate::sync::SyncRunner::with_credentials_file(config.s3_credentials_file.clone()),
        config.policy.clone(),
    );
    // Only a sync pauses a managed container, and only for its length: one
    // still paused now was left so by an agent that died mid-sync.
    executor.thaw_leftovers().await;

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
        let began = std::time::Instant::now();
        match session(&config, &engine, &executor, &mut activity, &shutdown).await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Welcomed(reason)) => {
                tracing::warn!(reason = %reason, lasted = ?began.elapsed(), "session ended; reconnecting");
                // Only a session that held counts as healthy: on a link
                // that flaps every few seconds, each short session keeps
                // the backoff growing instead of reconnecting at once.
                if began.elapsed() >= STABLE_SESSION {
                    backoff.reset();
                }
            }
            Err(e) => {
                tracing::warn!(server = %config.server, error = %format!("{e:#}"), "cannot hold a session with the server");
            }
        }
        let delay = backoff.next_delay();
        if !pause(delay, &shutdown).await {
            return Ok(());
        }
    }
}

enum SessionEnd {
    Shutdown,
    /// The session was established and later ended for this reason.
    Welcomed(String),
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
        })),
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// The node's containers as last seen, by Docker id: replaced by each full
/// report and kept current between reports by events and command results,
/// so heartbeats never carry a stale picture.
type Snapshot = std::collections::BTreeMap<String, ObservedContainer>;

fn snapshot(containers: Vec<ObservedContainer>) -> Snapshot {
    containers
        .into_iter()
        .map(|c| (c.docker_id.clone(), c))
        .collect()
}

/// What the node's running containers reserve.
fn usage_of(containers: &Snapshot) -> (pb::Resources, u32) {
    let running: Vec<_> = containers.values().filter(|c| c.is_running()).collect();
    let usage = pb::Resources {
        cpus: running.iter().filter_map(|c| c.limits.cpus).sum(),
        memory_bytes: running.iter().filter_map(|c| c.limits.memory_bytes).sum(),
        gpus: 0,
    };
    (usage, running.len() as u32)
}

async fn session(
    config: &AgentConfig,
    engine: &EngineInfo,
    executor: &Executor,
    activity: &mut mpsc::Receiver<ContainerId>,
    shutdown: &CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let mut endpoint = Endpoint::from_shared(config.server.clone())?
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
    tracing::info!(
        node = %config.node_id,
        session = %welcome.session_id,
        heartbeat = ?heartbeat_every,
        engine = %engine.version,
        "connected to the server"
    );

    let mut last_report = snapshot(executor.full_report().await?);
    send_report(&out, &last_report, String::new()).await?;

    let mut events = executor.runtime().events(&config.node_id);
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = tokio::time::interval_at(
        tokio::time::Instant::now() + config.full_report_interval,
        config.full_report_interval,
    );
    let (results, mut result_rx) = mpsc::channel::<(String, Outcome)>(256);

    loop {
        tokio::select! {
            // Cancel-safe: observing the token loses nothing.
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            // Cancel-safe: Streaming::message loses no message when dropped
            // before it completes.
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(SessionEnd::Welcomed("the server closed the stream".into())),
                    Err(status) => return Ok(SessionEnd::Welcomed(format!("stream error: {status}"))),
                };
                if let Some(pb::connect_response::Message::Command(command)) = message.message {
                    handle_command(command, executor, &out, &results, &mut last_report).await?;
                }
            }
            // Cancel-safe: the events stream buffers undelivered items.
            event = events.next() => match event {
                Some(Ok(mut event)) => {
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
                    if new {
                        last_report = snapshot(executor.full_report().await?);
                        send_report(&out, &last_report, String::new()).await?;
                    }
                }
                Some(Err(e)) => return Ok(SessionEnd::Welcomed(format!("docker events stream failed: {e}"))),
                None => return Ok(SessionEnd::Welcomed("docker events stream ended".into())),
            },
            // Cancel-safe: a lost tick is taken on the next poll.
            _ = heartbeat.tick() => {
                let (usage, count) = usage_of(&last_report);
                let message = pb::ConnectRequest {
                    message: Some(pb::connect_request::Message::Heartbeat(pb::Heartbeat {
                        at: Some(timestamp_to_pb(now())),
                        usage: Some(usage),
                        container_count: count,
                    })),
                };
                out.send(message).await?;
            }
            _ = resync.tick() => {
                last_report = snapshot(executor.full_report().await?);
                send_report(&out, &last_report, String::new()).await?;
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
            Some((command_id, outcome)) = result_rx.recv() => {
                if let Some(c) = &outcome.container {
                    last_report.insert(c.docker_id.clone(), c.clone());
                }
                out.send(result_message(command_id, &outcome)).await?;
            }
        }
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
) -> anyhow::Result<()> {
    let report = pb::FullReport {
        observed_at: Some(timestamp_to_pb(now())),
        containers: containers
            .values()
            .map(pb::ObservedContainer::from)
            .collect(),
        command_id,
    };
    out.send(pb::ConnectRequest {
        message: Some(pb::connect_request::Message::FullReport(report)),
    })
    .await?;
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

fn container_id(s: &str) -> Result<ContainerId, String> {
    s.parse()
        .map_err(|e: boilerhouse_core::IdError| e.to_string())
}

/// Turns a wire command into a domain one.
pub fn decode_command(command: &pb::Command) -> Result<Command, String> {
    use pb::command::Command as C;
    let Some(inner) = &command.command else {
        return Err("empty command".into());
    };
    Ok(match inner {
        C::Create(c) => {
            let spec = c.spec.as_ref().ok_or("create without a spec")?;
            Command::Create {
                spec: ContainerSpec::try_from(spec).map_err(|e| e.to_string())?,
                start: c.start,
            }
        }
        C::Start(s) => Command::Start(container_id(&s.container_id)?),
        C::Stop(s) => {
            let timeout = s
                .timeout
                .as_ref()
                .map(|d| duration_from_pb("timeout", d))
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or(Duration::from_secs(10));
            Command::Stop(container_id(&s.container_id)?, timeout)
        }
        C::Remove(r) => Command::Remove {
            id: container_id(&r.container_id)?,
            remove_volumes: r.remove_volumes,
        },
        C::UpdateResources(u) => Command::UpdateLimits(
            container_id(&u.container_id)?,
            convert::limits_from_pb_resources(u.limits.as_ref()),
        ),
        C::WriteStateFile(w) => {
            let state = w
                .state
                .as_ref()
                .map(StateFile::try_from)
                .transpose()
                .map_err(|e| e.to_string())?;
            Command::WriteState(container_id(&w.container_id)?, state.unwrap_or_default())
        }
        C::RequestFullReport(_) => Command::FullReport,
        C::RunSync(r) => {
            let spec: boilerhouse_core::workload::SyncSpec =
                serde_json::from_str(&r.sync_spec_json)
                    .map_err(|e| format!("sync_spec_json: {e}"))?;
            let force = match pb::SyncDirection::try_from(r.force_direction) {
                Ok(pb::SyncDirection::Upload) => Some(SyncDirection::Upload),
                Ok(pb::SyncDirection::Download) => Some(SyncDirection::Download),
                Ok(pb::SyncDirection::Bidirectional) => Some(SyncDirection::Bidirectional),
                Ok(pb::SyncDirection::Unspecified) => None,
                Err(_) => return Err(format!("unknown force_direction {}", r.force_direction)),
            };
            Command::Sync(
                container_id(&r.container_id)?,
                crate::sync::SyncJob {
                    tenant: boilerhouse_core::TenantId::new(&r.tenant_id)
                        .map_err(|e| format!("tenant_id: {e}"))?,
                    spec,
                    phase: crate::sync::Phase::parse(&r.direction)?,
                    force,
                    pause: r.pause,
                },
            )
        }
    })
}

async fn handle_command(
    command: pb::Command,
    executor: &Executor,
    out: &mpsc::Sender<pb::ConnectRequest>,
    results: &mpsc::Sender<(String, Outcome)>,
    last_report: &mut Snapshot,
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
        send_report(out, last_report, id.clone()).await?;
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
            tokio::spawn(async move {
                let outcome = executor.execute(decoded).await;
                if !outcome.ok {
                    tracing::warn!(command = %id, error = %outcome.error, "command failed");
                }
                executor.finish(&id, &outcome);
                // If the session is gone the server resends the command
                // and gets this result from memory.
                let _ = results.send((id, outcome)).await;
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_or_empty_commands_are_rejected_with_a_reason() {
        let empty = pb::Command {
            command_id: "c1".into(),
            generation: 0,
            command: None,
        };
        assert!(decode_command(&empty).is_err());
        let bad_id = pb::Command {
            command_id: "c2".into(),
            generation: 0,
            command: Some(pb::command::Command::Start(pb::StartContainer {
                container_id: "nope".into(),
            })),
        };
        assert!(
            decode_command(&bad_id)
                .unwrap_err()
                .contains("container id")
        );
    }
}
