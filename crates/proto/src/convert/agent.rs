//! Containers and the agent protocol.

use super::*;

use boilerhouse_core::container::{
    ContainerEvent, ContainerEventKind, ContainerSpec, Healthcheck, ObservedContainer, StateFile,
    VolumeKind, VolumeMount,
};

fn limits_from_pb(r: Option<&pb::Resources>) -> Limits {
    let r = r.copied().unwrap_or_default();
    Limits {
        cpus: (r.cpus > 0.0 && r.cpus.is_finite()).then_some(r.cpus),
        memory_bytes: (r.memory_bytes > 0).then_some(r.memory_bytes),
    }
}

/// A limits value for the wire; zero means "no limit".
pub fn limits_to_pb_resources(l: &Limits) -> pb::Resources {
    limits_to_pb(l)
}

/// Limits from the wire; zero means "no limit".
pub fn limits_from_pb_resources(r: Option<&pb::Resources>) -> Limits {
    limits_from_pb(r)
}

/// Containers in one part of a full report (`FullReport.more`): ~5 KiB
/// on the wire with our labels. Why so few: a gRPC stream's receive
/// buffer holds the largest message plus an HTTP/2 frame (16 KiB) and
/// grows by doubling, for the stream's life; at 32 a part (~20 KiB) the
/// server's buffers averaged 78 KiB per agent, at 8 they stay at 32 KiB.
pub const REPORT_PART_CONTAINERS: usize = 8;

/// A full report as the parts it is sent in, `per_part` containers each
/// (`REPORT_PART_CONTAINERS`, or `usize::MAX` for a server that takes
/// reports whole): one for a node with few containers (or none), numbered
/// from 0, each but the last with `more` set.
pub fn full_report_parts(
    observed_at: prost_types::Timestamp,
    containers: Vec<pb::ObservedContainer>,
    command_id: String,
    per_part: usize,
) -> Vec<pb::FullReport> {
    let per_part = per_part.max(1);
    let mut parts: Vec<pb::FullReport> = Vec::with_capacity(containers.len() / per_part + 1);
    let mut containers = containers.into_iter().peekable();
    for part in 0u32.. {
        let these: Vec<_> = containers.by_ref().take(per_part).collect();
        let more = containers.peek().is_some();
        parts.push(pb::FullReport {
            observed_at: Some(observed_at),
            containers: these,
            command_id: command_id.clone(),
            more,
            part,
        });
        if !more {
            break;
        }
    }
    parts
}

/// How many containers an agent puts in each part of its full reports,
/// given what the server's Welcome said.
pub fn report_part_size(welcome: &pb::Welcome) -> usize {
    if welcome.report_parts {
        REPORT_PART_CONTAINERS
    } else {
        usize::MAX
    }
}

pub(super) fn optional_timestamp(t: Option<Timestamp>) -> Option<prost_types::Timestamp> {
    t.map(timestamp_to_pb)
}

fn tenant_or_none(field: &str, s: &str) -> Result<Option<TenantId>, ConvertError> {
    if s.is_empty() {
        return Ok(None);
    }
    TenantId::new(s)
        .map(Some)
        .map_err(|e| ConvertError::invalid(field, e.to_string()))
}

impl From<&StateFile> for pb::ContainerStateFile {
    fn from(f: &StateFile) -> Self {
        pb::ContainerStateFile {
            tenant_id: f
                .tenant_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            last_tenant_id: f
                .last_tenant_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            claimed_at: optional_timestamp(f.claimed_at),
            last_activity_at: optional_timestamp(f.last_activity_at),
            claim_generation: f.claim_generation,
        }
    }
}

impl TryFrom<&pb::ContainerStateFile> for StateFile {
    type Error = ConvertError;
    fn try_from(f: &pb::ContainerStateFile) -> Result<Self, ConvertError> {
        Ok(StateFile {
            tenant_id: tenant_or_none("state_file.tenant_id", &f.tenant_id)?,
            last_tenant_id: tenant_or_none("state_file.last_tenant_id", &f.last_tenant_id)?,
            claimed_at: f.claimed_at.as_ref().map(timestamp_from_pb),
            last_activity_at: f.last_activity_at.as_ref().map(timestamp_from_pb),
            claim_generation: f.claim_generation,
        })
    }
}

impl From<&ObservedContainer> for pb::ObservedContainer {
    fn from(c: &ObservedContainer) -> Self {
        pb::ObservedContainer {
            docker_id: c.docker_id.clone(),
            name: c.name.clone(),
            labels: c.labels.to_map(),
            docker_state: c.docker_state.clone(),
            health: c.health.clone().unwrap_or_default(),
            health_output: c.health_output.clone().unwrap_or_default(),
            exit_code: c.exit_code,
            started_at: optional_timestamp(c.started_at),
            state_file: c.state_file.as_ref().map(pb::ContainerStateFile::from),
            limits: Some(limits_to_pb(&c.limits)),
            oom_killed: c.oom_killed,
        }
    }
}

impl TryFrom<&pb::ObservedContainer> for ObservedContainer {
    type Error = ConvertError;
    fn try_from(c: &pb::ObservedContainer) -> Result<Self, ConvertError> {
        if c.docker_id.is_empty() {
            return Err(ConvertError::MissingField("docker_id"));
        }
        Ok(ObservedContainer {
            docker_id: c.docker_id.clone(),
            name: c.name.clone(),
            labels: c.labels.iter().collect(),
            docker_state: c.docker_state.clone(),
            health: optional(&c.health),
            health_output: optional(&c.health_output),
            exit_code: c.exit_code,
            started_at: c.started_at.as_ref().map(timestamp_from_pb),
            oom_killed: c.oom_killed,
            limits: limits_from_pb(c.limits.as_ref()),
            state_file: c.state_file.as_ref().map(StateFile::try_from).transpose()?,
        })
    }
}

fn event_kind_to_pb(k: ContainerEventKind) -> pb::ContainerEventKind {
    match k {
        ContainerEventKind::Start => pb::ContainerEventKind::Start,
        ContainerEventKind::Die => pb::ContainerEventKind::Die,
        ContainerEventKind::Oom => pb::ContainerEventKind::Oom,
        ContainerEventKind::Health => pb::ContainerEventKind::Health,
        ContainerEventKind::Destroy => pb::ContainerEventKind::Destroy,
        ContainerEventKind::Activity => pb::ContainerEventKind::Activity,
    }
}

impl From<&ContainerEvent> for pb::ContainerEvent {
    fn from(e: &ContainerEvent) -> Self {
        pb::ContainerEvent {
            kind: event_kind_to_pb(e.kind) as i32,
            docker_id: e.docker_id.clone(),
            container_id: e.container_id.map(|id| id.to_string()).unwrap_or_default(),
            at: Some(timestamp_to_pb(e.at)),
            health: e.health.clone().unwrap_or_default(),
            health_output: e.health_output.clone().unwrap_or_default(),
            exit_code: e.exit_code.unwrap_or_default(),
        }
    }
}

impl TryFrom<&pb::ContainerEvent> for ContainerEvent {
    type Error = ConvertError;
    fn try_from(e: &pb::ContainerEvent) -> Result<Self, ConvertError> {
        let kind = match pb::ContainerEventKind::try_from(e.kind) {
            Ok(pb::ContainerEventKind::Start) => ContainerEventKind::Start,
            Ok(pb::ContainerEventKind::Die) => ContainerEventKind::Die,
            Ok(pb::ContainerEventKind::Oom) => ContainerEventKind::Oom,
            Ok(pb::ContainerEventKind::Health) => ContainerEventKind::Health,
            Ok(pb::ContainerEventKind::Destroy) => ContainerEventKind::Destroy,
            Ok(pb::ContainerEventKind::Activity) => ContainerEventKind::Activity,
            _ => {
                return Err(ConvertError::invalid(
                    "kind",
                    format!("unknown container event kind {}", e.kind),
                ));
            }
        };
        let container_id = if e.container_id.is_empty() {
            None
        } else {
            Some(
                e.container_id
                    .parse::<ContainerId>()
                    .map_err(|err| ConvertError::invalid("container_id", err.to_string()))?,
            )
        };
        Ok(ContainerEvent {
            kind,
            docker_id: e.docker_id.clone(),
            container_id,
            at: e
                .at
                .as_ref()
                .map(timestamp_from_pb)
                .unwrap_or(Timestamp::EPOCH),
            health: optional(&e.health),
            health_output: optional(&e.health_output),
            exit_code: (e.kind == pb::ContainerEventKind::Die as i32).then_some(e.exit_code),
        })
    }
}

fn volume_kind_to_pb(kind: &VolumeKind) -> (String, String) {
    match kind {
        VolumeKind::State => ("state".into(), String::new()),
        VolumeKind::Secrets => ("secrets".into(), String::new()),
        VolumeKind::Comm => ("comm".into(), String::new()),
        VolumeKind::Custom(name) => ("custom".into(), name.clone()),
    }
}

impl From<&ContainerSpec> for pb::ContainerSpec {
    fn from(s: &ContainerSpec) -> Self {
        pb::ContainerSpec {
            container_id: s.container_id.to_string(),
            image: s.image.clone(),
            labels: s.labels.clone().into_iter().collect(),
            environment: s.environment.clone().into_iter().collect(),
            volumes: s
                .volumes
                .iter()
                .map(|v| {
                    let (kind, name) = volume_kind_to_pb(&v.kind);
                    pb::VolumeMount {
                        kind,
                        name,
                        target: v.target.clone(),
                        read_only: v.read_only,
                    }
                })
                .collect(),
            limits: Some(limits_to_pb(&s.limits)),
            healthcheck: s.healthcheck.as_ref().map(|h| pb::Healthcheck {
                test: h.test.clone(),
                interval: Some(duration_to_pb(h.interval)),
                timeout: Some(duration_to_pb(h.timeout)),
                retries: h.retries,
                start_period: Some(duration_to_pb(h.start_period)),
            }),
            user: s.user.clone().unwrap_or_default(),
            read_only: s.read_only,
            network_mode: s.network_mode.clone().unwrap_or_default(),
            no_new_privileges: s.no_new_privileges,
            cap_drop: s.cap_drop.clone(),
            cap_add: s.cap_add.clone(),
            pids_limit: s.pids_limit,
            command: s.command.clone(),
        }
    }
}

impl TryFrom<&pb::ContainerSpec> for ContainerSpec {
    type Error = ConvertError;
    fn try_from(s: &pb::ContainerSpec) -> Result<Self, ConvertError> {
        if s.container_id.is_empty() {
            return Err(ConvertError::MissingField("spec.container_id"));
        }
        let container_id = s
            .container_id
            .parse::<ContainerId>()
            .map_err(|e| ConvertError::invalid("spec.container_id", e.to_string()))?;
        if s.image.is_empty() {
            return Err(ConvertError::MissingField("spec.image"));
        }
        let mut volumes = Vec::new();
        for (i, v) in s.volumes.iter().enumerate() {
            let kind = match v.kind.as_str() {
                "state" => VolumeKind::State,
                "secrets" => VolumeKind::Secrets,
                "comm" => VolumeKind::Comm,
                "custom" => {
                    let valid = !v.name.is_empty()
                        && v.name.len() <= 63
                        && v.name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !valid {
                        return Err(ConvertError::invalid(
                            format!("spec.volumes[{i}].name"),
                            "invalid custom volume name",
                        ));
                    }
                    VolumeKind::Custom(v.name.clone())
                }
                other => {
                    return Err(ConvertError::invalid(
                        format!("spec.volumes[{i}].kind"),
                        format!("unknown volume kind {other:?}"),
                    ));
                }
            };
            if !v.target.starts_with('/') {
                return Err(ConvertError::invalid(
                    format!("spec.volumes[{i}].target"),
                    "must be an absolute path",
                ));
            }
            volumes.push(VolumeMount {
                kind,
                target: v.target.clone(),
                read_only: v.read_only,
            });
        }
        let healthcheck = match &s.healthcheck {
            None => None,
            Some(h) => Some(Healthcheck {
                test: h.test.clone(),
                interval: h
                    .interval
                    .as_ref()
                    .map(|d| duration_from_pb("spec.healthcheck.interval", d))
                    .transpose()?
                    .unwrap_or_default(),
                timeout: h
                    .timeout
                    .as_ref()
                    .map(|d| duration_from_pb("spec.healthcheck.timeout", d))
                    .transpose()?
                    .unwrap_or_default(),
                retries: h.retries,
                start_period: h
                    .start_period
                    .as_ref()
                    .map(|d| duration_from_pb("spec.healthcheck.start_period", d))
                    .transpose()?
                    .unwrap_or_default(),
            }),
        };
        Ok(ContainerSpec {
            container_id,
            image: s.image.clone(),
            command: s.command.clone(),
            labels: s.labels.clone().into_iter().collect(),
            environment: s.environment.clone().into_iter().collect(),
            volumes,
            limits: limits_from_pb(s.limits.as_ref()),
            healthcheck,
            user: optional(&s.user),
            read_only: s.read_only,
            network_mode: optional(&s.network_mode),
            no_new_privileges: s.no_new_privileges,
            cap_drop: s.cap_drop.clone(),
            cap_add: s.cap_add.clone(),
            pids_limit: s.pids_limit,
        })
    }
}
