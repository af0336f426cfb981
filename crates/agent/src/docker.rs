//! The container runtime over the Docker Engine API, through bollard.
//!
//! The API version is always negotiated: engines in the field are often
//! older than the version bollard speaks by default (ours run API 1.41).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerUpdateBody, HealthConfig, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, ListContainersOptions, RemoveContainerOptions,
    StopContainerOptions,
};
use futures::StreamExt as _;
use futures::stream::BoxStream;

use boilerhouse_core::container::{
    ContainerEvent, ContainerEventKind, ContainerSpec, ObservedContainer, labels,
};
use boilerhouse_core::workload::Limits;
use boilerhouse_core::{NodeId, Timestamp};

use crate::runtime::{Bind, ContainerRuntime, EngineInfo, RuntimeError};

/// Docker through bollard.
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

/// Inspecting many containers at once is faster than one by one, but an
/// engine under load should not get hundreds of requests in one burst.
const INSPECT_CONCURRENCY: usize = 16;

fn classify(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code: 404,
            message,
        } => RuntimeError::NotFound(message),
        BollardError::DockerResponseServerError {
            status_code: 409,
            message,
        } => RuntimeError::Conflict(message),
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => RuntimeError::Failed(format!("docker answered {status_code}: {message}")),
        BollardError::SocketNotFoundError(path) => {
            RuntimeError::Unavailable(format!("no socket at {path}"))
        }
        other => {
            let text = other.to_string();
            // Connection-level failures mean the engine is gone; anything
            // else is a failed request.
            if matches!(
                other,
                BollardError::HyperResponseError { .. }
                    | BollardError::IOError { .. }
                    | BollardError::RequestTimeoutError
            ) {
                RuntimeError::Unavailable(text)
            } else {
                RuntimeError::Failed(text)
            }
        }
    }
}

fn ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn nano_cpus(cpus: f64) -> i64 {
    (cpus * 1e9).round() as i64
}

fn parse_docker_time(s: &str) -> Option<Timestamp> {
    // Docker reports "0001-01-01T00:00:00Z" for "never".
    if s.starts_with("0001-") {
        return None;
    }
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .ok()
        .map(Timestamp::from_system_time)
}

/// Bytes of a healthcheck's output kept: enough for an error message.
const HEALTH_OUTPUT_MAX: usize = 512;

/// `s` cut to at most `max` bytes, on a character boundary.
fn bounded(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn observed_from_inspect(c: ContainerInspectResponse) -> Option<ObservedContainer> {
    let docker_id = c.id?;
    let state = c.state.unwrap_or_default();
    let labels = c
        .config
        .and_then(|cfg| cfg.labels)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let host = c.host_config.unwrap_or_default();
    let (health, health_output) = match state.health {
        Some(h) => (
            h.status
                .map(|s| s.to_string())
                .filter(|s| !s.is_empty() && s != "none"),
            h.log
                .and_then(|log| log.into_iter().last())
                .and_then(|entry| entry.output)
                .map(|out| bounded(out.trim(), HEALTH_OUTPUT_MAX))
                .filter(|out| !out.is_empty()),
        ),
        None => (None, None),
    };
    Some(ObservedContainer {
        docker_id,
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        labels,
        docker_state: state.status.map(|s| s.to_string()).unwrap_or_default(),
        health,
        health_output,
        exit_code: state.exit_code.unwrap_or_default(),
        started_at: state.started_at.as_deref().and_then(parse_docker_time),
        oom_killed: state.oom_killed.unwrap_or(false),
        limits: Limits {
            cpus: host.nano_cpus.filter(|n| *n > 0).map(|n| n as f64 / 1e9),
            memory_bytes: host.memory.filter(|m| *m > 0).map(|m| m as u64),
        },
        state_file: None,
    })
}

impl DockerRuntime {
    /// Connects to `endpoint` (`unix:///path`, `tcp://host:port`, or the
    /// local default when `None`) and negotiates the API version.
    pub async fn connect(endpoint: Option<&str>) -> Result<Self, RuntimeError> {
        let docker = match endpoint {
            None => Docker::connect_with_local_defaults(),
            Some(e) if e.starts_with("unix://") || e.starts_with('/') => {
                Docker::connect_with_unix(e, 120, bollard::API_DEFAULT_VERSION)
            }
            Some(e) => Docker::connect_with_http(e, 120, bollard::API_DEFAULT_VERSION),
        }
        .map_err(classify)?;
        let docker = docker.negotiate_version().await.map_err(classify)?;
        Ok(Self { docker })
    }

    /// The underlying client, for tests and tools.
    pub fn client(&self) -> &Docker {
        &self.docker
    }
}

#[async_trait::async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn engine(&self) -> Result<EngineInfo, RuntimeError> {
        let version = self.docker.version().await.map_err(classify)?;
        let info = self.docker.info().await.map_err(classify)?;
        Ok(EngineInfo {
            version: version.version.unwrap_or_default(),
            api_version: self.docker.client_version().to_string(),
            cpus: info.ncpu.unwrap_or(0) as f64,
            memory_bytes: info.mem_total.unwrap_or(0).max(0) as u64,
        })
    }

    async fn list_managed(&self, node: &NodeId) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{}=true", labels::MANAGED),
                format!("{}={node}", labels::NODE_ID),
            ],
        )]);
        let summaries = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                size: false,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(classify)?;
        let ids: Vec<String> = summaries.into_iter().filter_map(|s| s.id).collect();
        let inspected: Vec<Result<Option<ObservedContainer>, RuntimeError>> =
            futures::stream::iter(ids)
                .map(|id| async move { self.inspect(&id).await })
                .buffer_unordered(INSPECT_CONCURRENCY)
                .collect()
                .await;
        let mut observed = Vec::new();
        for result in inspected {
            // A container removed between list and inspect is simply gone.
            if let Some(c) = result? {
                observed.push(c);
            }
        }
        observed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(observed)
    }

    async fn inspect(&self, name_or_id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        match self.docker.inspect_container(name_or_id, None).await {
            Ok(c) => Ok(observed_from_inspect(c)),
            Err(e) => match classify(e) {
                RuntimeError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn create(&self, spec: &ContainerSpec, binds: &[Bind]) -> Result<String, RuntimeError> {
        let binds: Vec<String> = binds
            .iter()
            .map(|b| {
                format!(
                    "{}:{}:{}",
                    b.host_path,
                    b.target,
                    if b.read_only { "ro" } else { "rw" }
                )
            })
            .collect();
        let mut security_opt = Vec::new();
        if spec.no_new_privileges {
            security_opt.push("no-new-privileges".to_owned());
        }
        let memory = spec.limits.memory_bytes.map(|m| m as i64);
        let host_config = HostConfig {
            binds: Some(binds),
            nano_cpus: spec.limits.cpus.map(nano_cpus),
            memory,
            // No swap beyond the memory limit: a limit that swaps is no limit.
            memory_swap: memory,
            readonly_rootfs: Some(spec.read_only),
            network_mode: spec.network_mode.clone(),
            security_opt: Some(security_opt),
            cap_drop: Some(spec.cap_drop.clone()),
            cap_add: Some(spec.cap_add.clone()),
            pids_limit: (spec.pids_limit > 0).then_some(spec.pids_limit),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(
                spec.environment
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            labels: Some(spec.labels.clone().into_iter().collect()),
            user: spec.user.clone(),
            healthcheck: spec.healthcheck.as_ref().map(|h| HealthConfig {
                test: Some(h.test.clone()),
                interval: Some(ns(h.interval)),
                timeout: Some(ns(h.timeout)),
                retries: Some(i64::from(h.retries)),
                start_period: Some(ns(h.start_period)),
                ..Default::default()
            }),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.container_id.docker_name()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(classify)?;
        Ok(created.id)
    }

    async fn start(&self, name_or_id: &str) -> Result<(), RuntimeError> {
        match self.docker.start_container(name_or_id, None).await {
            Ok(()) => Ok(()),
            // 304: already started.
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    async fn stop(&self, name_or_id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let t = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                name_or_id,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    async fn remove(&self, name_or_id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match self
            .docker
            .remove_container(name_or_id, Some(options))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => match classify(e) {
                RuntimeError::NotFound(_) => Ok(()),
                // 409 "removal already in progress": it is going away.
                RuntimeError::Conflict(m) if m.contains("in progress") => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn pause(&self, name_or_id: &str) -> Result<(), RuntimeError> {
        match self.docker.pause_container(name_or_id).await {
            Ok(()) => Ok(()),
            Err(e) => match classify(e) {
                RuntimeError::Conflict(m) if m.contains("already paused") => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn unpause(&self, name_or_id: &str) -> Result<(), RuntimeError> {
        match self.docker.unpause_container(name_or_id).await {
            Ok(()) => Ok(()),
            Err(e) => match classify(e) {
                RuntimeError::Conflict(m) if m.contains("not paused") => Ok(()),
                RuntimeError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn update_limits(&self, name_or_id: &str, limits: &Limits) -> Result<(), RuntimeError> {
        let memory = limits.memory_bytes.map(|m| m as i64);
        let body = ContainerUpdateBody {
            nano_cpus: Some(limits.cpus.map(nano_cpus).unwrap_or(0)),
            memory,
            memory_swap: memory,
            ..Default::default()
        };
        self.docker
            .update_container(name_or_id, body)
            .await
            .map_err(classify)
    }

    fn events(&self, node: &NodeId) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            (
                "label".to_owned(),
                vec![
                    format!("{}=true", labels::MANAGED),
                    format!("{}={node}", labels::NODE_ID),
                ],
            ),
            (
                "event".to_owned(),
                ["start", "die", "oom", "health_status", "destroy"]
                    .map(String::from)
                    .to_vec(),
            ),
        ]);
        let docker = self.docker.clone();
        docker
            .events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .filter_map(|item| async move {
                match item {
                    Err(e) => Some(Err(classify(e))),
                    Ok(message) => {
                        let action = message.action.unwrap_or_default();
                        let actor = message.actor.unwrap_or_default();
                        let attributes = actor.attributes.unwrap_or_default();
                        let (kind, health) = match action.as_str() {
                            "start" => (ContainerEventKind::Start, None),
                            "die" => (ContainerEventKind::Die, None),
                            "oom" => (ContainerEventKind::Oom, None),
                            "destroy" => (ContainerEventKind::Destroy, None),
                            a if a.starts_with("health_status") => (
                                ContainerEventKind::Health,
                                a.split_once(": ").map(|(_, s)| s.trim().to_owned()),
                            ),
                            _ => return None,
                        };
                        let at = message
                            .time_nano
                            .map(|n| Timestamp::from_millis(n / 1_000_000))
                            .or_else(|| message.time.map(|s| Timestamp::from_millis(s * 1000)))
                            .unwrap_or(Timestamp::EPOCH);
                        Some(Ok(ContainerEvent {
                            kind,
                            docker_id: actor.id.unwrap_or_default(),
                            container_id: attributes
                                .get(labels::CONTAINER_ID)
                                .and_then(|v| v.parse().ok()),
                            at,
                            health,
                            // Filled in by the session, which inspects the
                            // container after each event.
                            health_output: None,
                            exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
                        }))
                    }
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_times_parse_and_never_means_none() {
        assert!(parse_docker_time("0001-01-01T00:00:00Z").is_none());
        let t = parse_docker_time("2026-11-22T03:43:43.123456789Z").unwrap();
        assert_eq!(t.as_millis() % 1000, 123);
    }

    #[test]
    fn cpus_become_nano_cpus() {
        assert_eq!(nano_cpus(0.5), 500_000_000);
        assert_eq!(nano_cpus(2.0), 2_000_000_000);
    }
}
