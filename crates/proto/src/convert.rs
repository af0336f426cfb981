//! The one place where proto messages and domain types meet.
//!
//! Inbound (`pb` → domain) conversions validate and return [`ConvertError`]
//! naming the offending field, which the server maps to INVALID_ARGUMENT
//! with a field violation. Outbound conversions cannot fail.

use std::time::Duration;

use boilerhouse_core::boost::{
    Boost, BoostPriority, BoostRequest, BoostResource, BoostStatus, BoostTarget, DEFAULT_DURATION,
    validate_duration,
};
use boilerhouse_core::event::{Event, EventFilter, EventSubject, Severity};
use boilerhouse_core::node::{Node, NodeStatus, Resources};
use boilerhouse_core::workload::{Limits, PoolPolicy, WorkloadRecord};
use boilerhouse_core::{NodeId, TenantId, Timestamp, WorkloadId};

use crate::pb;

/// Why a request could not be turned into domain values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field was empty.
    #[error("{0} is required")]
    MissingField(&'static str),
    /// A field held a value that is not allowed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field's name in the request.
        field: String,
        /// Why.
        reason: String,
    },
}

impl ConvertError {
    /// An invalid-field error.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConvertError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field this error is about.
    pub fn field(&self) -> &str {
        match self {
            ConvertError::MissingField(field) => field,
            ConvertError::Invalid { field, .. } => field,
        }
    }
}

// ---- scalars -------------------------------------------------------------

/// A domain timestamp as a protobuf one.
pub fn timestamp_to_pb(t: Timestamp) -> prost_types::Timestamp {
    let ms = t.as_millis();
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as a domain one, to the millisecond.
pub fn timestamp_from_pb(t: &prost_types::Timestamp) -> Timestamp {
    Timestamp::from_millis(
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos) / 1_000_000),
    )
}

/// A duration as a protobuf one.
pub fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf duration as a std one; negative durations are rejected.
pub fn duration_from_pb(field: &str, d: &prost_types::Duration) -> Result<Duration, ConvertError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ConvertError::invalid(field, "must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A required node id.
pub fn node_id(field: &'static str, s: &str) -> Result<NodeId, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::MissingField(field));
    }
    NodeId::new(s).map_err(|e| ConvertError::invalid(field, e.to_string()))
}

/// A required workload id.
pub fn workload_id(field: &'static str, s: &str) -> Result<WorkloadId, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::MissingField(field));
    }
    WorkloadId::new(s).map_err(|e| ConvertError::invalid(field, e.to_string()))
}

/// A required tenant id.
pub fn tenant_id(field: &'static str, s: &str) -> Result<TenantId, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::MissingField(field));
    }
    TenantId::new(s).map_err(|e| ConvertError::invalid(field, e.to_string()))
}

/// An optional request id: at most 128 printable ASCII characters.
pub fn request_id(s: &str) -> Result<Option<&str>, ConvertError> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConvertError::invalid(
            "request_id",
            "must be at most 128 printable ASCII characters",
        ));
    }
    Ok(Some(s))
}

fn non_empty(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn optional(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

// ---- boosts --------------------------------------------------------------

/// A boost resource for the wire.
pub fn boost_resource_to_pb(r: BoostResource) -> pb::ResourceKind {
    match r {
        BoostResource::Cpu => pb::ResourceKind::Cpu,
        BoostResource::Memory => pb::ResourceKind::Memory,
        BoostResource::Gpu => pb::ResourceKind::Gpu,
    }
}

/// A required boost resource.
pub fn boost_resource_from_pb(
    field: &'static str,
    value: i32,
) -> Result<BoostResource, ConvertError> {
    match pb::ResourceKind::try_from(value) {
        Ok(pb::ResourceKind::Cpu) => Ok(BoostResource::Cpu),
        Ok(pb::ResourceKind::Memory) => Ok(BoostResource::Memory),
        Ok(pb::ResourceKind::Gpu) => Ok(BoostResource::Gpu),
        Ok(pb::ResourceKind::Unspecified) => Err(ConvertError::MissingField(field)),
        Err(_) => Err(ConvertError::invalid(
            field,
            format!("unknown resource {value}; use cpu, memory or gpu"),
        )),
    }
}

/// A boost priority for the wire.
pub fn boost_priority_to_pb(p: BoostPriority) -> pb::BoostPriority {
    match p {
        BoostPriority::Low => pb::BoostPriority::Low,
        BoostPriority::Normal => pb::BoostPriority::Normal,
        BoostPriority::High => pb::BoostPriority::High,
        BoostPriority::Critical => pb::BoostPriority::Critical,
    }
}

/// A boost priority; unspecified means normal.
pub fn boost_priority_from_pb(
    field: &'static str,
    value: i32,
) -> Result<BoostPriority, ConvertError> {
    match pb::BoostPriority::try_from(value) {
        Ok(pb::BoostPriority::Unspecified | pb::BoostPriority::Normal) => Ok(BoostPriority::Normal),
        Ok(pb::BoostPriority::Low) => Ok(BoostPriority::Low),
        Ok(pb::BoostPriority::High) => Ok(BoostPriority::High),
        Ok(pb::BoostPriority::Critical) => Ok(BoostPriority::Critical),
        Err(_) => Err(ConvertError::invalid(
            field,
            format!("unknown priority {value}; use low, normal, high or critical"),
        )),
    }
}

/// A boost status for the wire.
pub fn boost_status_to_pb(s: BoostStatus) -> pb::BoostStatus {
    match s {
        BoostStatus::Pending => pb::BoostStatus::Pending,
        BoostStatus::Active => pb::BoostStatus::Active,
        BoostStatus::Released => pb::BoostStatus::Released,
        BoostStatus::Expired => pb::BoostStatus::Expired,
        BoostStatus::Preempted => pb::BoostStatus::Preempted,
        BoostStatus::Failed => pb::BoostStatus::Failed,
    }
}

/// A boost target for the wire.
pub fn boost_target_to_pb(t: &BoostTarget) -> pb::BoostTarget {
    use pb::boost_target::Target;
    let target = match t {
        BoostTarget::Node(n) => Target::NodeId(n.to_string()),
        BoostTarget::Container(c) => Target::ContainerId(c.to_string()),
        BoostTarget::Tenant(tenant, workload) => Target::Tenant(pb::TenantTarget {
            tenant_id: tenant.to_string(),
            workload_id: workload.to_string(),
        }),
    };
    pb::BoostTarget {
        target: Some(target),
    }
}

/// A required boost target.
pub fn boost_target_from_pb(t: Option<&pb::BoostTarget>) -> Result<BoostTarget, ConvertError> {
    use pb::boost_target::Target;
    match t.and_then(|t| t.target.as_ref()) {
        None => Err(ConvertError::MissingField("target")),
        Some(Target::NodeId(n)) => Ok(BoostTarget::Node(node_id("target.node_id", n)?)),
        Some(Target::ContainerId(c)) => {
            if c.is_empty() {
                return Err(ConvertError::MissingField("target.container_id"));
            }
            c.parse::<ContainerId>()
                .map(BoostTarget::Container)
                .map_err(|e| ConvertError::invalid("target.container_id", e.to_string()))
        }
        Some(Target::Tenant(t)) => Ok(BoostTarget::Tenant(
            tenant_id("target.tenant.tenant_id", &t.tenant_id)?,
            workload_id("target.tenant.workload_id", &t.workload_id)?,
        )),
    }
}

/// A boost for the wire, with its remaining time as of `now`.
pub fn boost_to_pb(b: &Boost, now: Timestamp) -> pb::Boost {
    pb::Boost {
        boost_id: b.id.to_string(),
        target: Some(boost_target_to_pb(&b.target)),
        resource: boost_resource_to_pb(b.resource) as i32,
        amount: b.amount,
        priority: boost_priority_to_pb(b.priority) as i32,
        source_node_id: b.source_node.to_string(),
        status: boost_status_to_pb(b.status) as i32,
        reason: b.reason.clone(),
        requested_at: Some(timestamp_to_pb(b.requested_at)),
        allocated_at: optional_timestamp(b.allocated_at),
        expires_at: Some(timestamp_to_pb(b.expires_at)),
        ended_at: optional_timestamp(b.ended_at),
        container_id: b.container_id.map(|c| c.to_string()).unwrap_or_default(),
        remaining: b.remaining(now).map(duration_to_pb),
        enforced_on_host: b.raises_container_limits(),
    }
}

/// A boost request, validated: every field is checked and named.
pub fn boost_request_from_pb(r: &pb::RequestBoostRequest) -> Result<BoostRequest, ConvertError> {
    let target = boost_target_from_pb(r.target.as_ref())?;
    let resource = boost_resource_from_pb("resource", r.resource)?;
    resource
        .validate_amount(r.amount)
        .map_err(|reason| ConvertError::invalid("amount", reason))?;
    let priority = boost_priority_from_pb("priority", r.priority)?;
    let duration = match &r.duration {
        None => DEFAULT_DURATION,
        Some(d) => duration_from_pb("duration", d)?,
    };
    validate_duration(duration).map_err(|reason| ConvertError::invalid("duration", reason))?;
    let source = if r.source_node_id.is_empty() {
        None
    } else {
        Some(node_id("source_node_id", &r.source_node_id)?)
    };
    Ok(BoostRequest {
        target,
        resource,
        amount: r.amount,
        priority,
        duration,
        source,
    })
}

// ---- workloads -----------------------------------------------------------

/// A pool policy for the wire.
pub fn pool_policy_to_pb(p: &PoolPolicy) -> pb::PoolPolicy {
    pb::PoolPolicy {
        min_size: p.min_size,
        max_size: p.max_size,
        idle_timeout: p.idle_timeout.map(duration_to_pb),
        affinity_timeout: Some(duration_to_pb(p.affinity_timeout)),
        fill_concurrency: p.fill_concurrency,
        reuse: p.reuse,
    }
}

fn limits_to_pb(l: &Limits) -> pb::Resources {
    pb::Resources {
        cpus: l.cpus.unwrap_or(0.0),
        memory_bytes: l.memory_bytes.unwrap_or(0),
        gpus: 0,
    }
}

impl From<&WorkloadRecord> for pb::Workload {
    fn from(w: &WorkloadRecord) -> Self {
        let spec = &w.spec;
        pb::Workload {
            id: spec.id.to_string(),
            name: spec.name.clone(),
            image: spec.image.clone(),
            pool: Some(pool_policy_to_pb(&spec.pool)),
            limits: Some(limits_to_pb(&spec.limits)),
            source_path: w.source_path.clone(),
            spec_hash: w.spec_hash.clone(),
            yaml: w.yaml.clone(),
            created_at: Some(timestamp_to_pb(w.created_at)),
            updated_at: Some(timestamp_to_pb(w.updated_at)),
            sync_mappings: spec
                .sync
                .iter()
                .flat_map(|s| s.mappings.iter().map(|m| m.id()))
                .collect(),
            node_selector: spec.node_selector.clone().into_iter().collect(),
        }
    }
}

// ---- events --------------------------------------------------------------

/// A severity for the wire.
pub fn severity_to_pb(s: Severity) -> pb::EventSeverity {
    match s {
        Severity::Info => pb::EventSeverity::Info,
        Severity::Warning => pb::EventSeverity::Warning,
        Severity::Error => pb::EventSeverity::Error,
    }
}

/// A severity from the wire; UNSPECIFIED means "no minimum".
pub fn severity_from_pb(field: &str, value: i32) -> Result<Option<Severity>, ConvertError> {
    match pb::EventSeverity::try_from(value) {
        Ok(pb::EventSeverity::Unspecified) => Ok(None),
        Ok(pb::EventSeverity::Info) => Ok(Some(Severity::Info)),
        Ok(pb::EventSeverity::Warning) => Ok(Some(Severity::Warning)),
        Ok(pb::EventSeverity::Error) => Ok(Some(Severity::Error)),
        Err(_) => Err(ConvertError::invalid(
            field,
            format!("unknown severity {value}"),
        )),
    }
}

impl From<&Event> for pb::Event {
    fn from(e: &Event) -> Self {
        let s = &e.event.subject;
        pb::Event {
            id: e.id,
            at: Some(timestamp_to_pb(e.event.at)),
            kind: e.event.kind.clone(),
            severity: severity_to_pb(e.event.severity) as i32,
            message: e.event.message.clone(),
            node_id: non_empty(&s.node_id),
            workload_id: non_empty(&s.workload_id),
            container_id: non_empty(&s.container_id),
            tenant_id: non_empty(&s.tenant_id),
            boost_id: non_empty(&s.boost_id),
            attributes: e.event.attributes.clone().into_iter().collect(),
        }
    }
}

impl TryFrom<&pb::Event> for Event {
    type Error = ConvertError;
    fn try_from(e: &pb::Event) -> Result<Self, ConvertError> {
        let severity = severity_from_pb("severity", e.severity)?.unwrap_or(Severity::Info);
        Ok(Event {
            id: e.id,
            event: boilerhouse_core::event::NewEvent {
                at: e
                    .at
                    .as_ref()
                    .map(timestamp_from_pb)
                    .unwrap_or(Timestamp::EPOCH),
                kind: e.kind.clone(),
                severity,
                message: e.message.clone(),
                subject: EventSubject {
                    node_id: optional(&e.node_id),
                    workload_id: optional(&e.workload_id),
                    container_id: optional(&e.container_id),
                    tenant_id: optional(&e.tenant_id),
                    boost_id: optional(&e.boost_id),
                },
                attributes: e.attributes.clone().into_iter().collect(),
            },
        })
    }
}

/// An event filter from the wire; an absent filter matches everything.
pub fn event_filter_from_pb(f: Option<&pb::EventFilter>) -> Result<EventFilter, ConvertError> {
    {
        let Some(f) = f else {
            return Ok(EventFilter::default());
        };
        for (i, kind) in f.kinds.iter().enumerate() {
            let valid = !kind.is_empty()
                && kind.len() <= 64
                && kind.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_'
                });
            if !valid {
                return Err(ConvertError::invalid(
                    format!("filter.kinds[{i}]"),
                    "must be a dotted kind such as node.lost, or a prefix such as node.",
                ));
            }
        }
        Ok(EventFilter {
            kinds: f.kinds.clone(),
            subject: EventSubject {
                node_id: optional(&f.node_id),
                workload_id: optional(&f.workload_id),
                container_id: optional(&f.container_id),
                tenant_id: optional(&f.tenant_id),
                boost_id: optional(&f.boost_id),
            },
            min_severity: severity_from_pb("filter.min_severity", f.min_severity)?,
        })
    }
}

// ---- nodes ---------------------------------------------------------------

/// A node status for the wire.
pub fn node_status_to_pb(s: NodeStatus) -> pb::NodeStatus {
    match s {
        NodeStatus::Ready => pb::NodeStatus::Ready,
        NodeStatus::Suspect => pb::NodeStatus::Suspect,
        NodeStatus::Lost => pb::NodeStatus::Lost,
    }
}

/// Resources for the wire.
pub fn resources_to_pb(r: &Resources) -> pb::Resources {
    pb::Resources {
        cpus: r.cpus,
        memory_bytes: r.memory_bytes,
        gpus: r.gpus,
    }
}

/// Resources from the wire, rejecting negative or non-finite CPU.
pub fn resources_from_pb(field: &str, r: &pb::Resources) -> Result<Resources, ConvertError> {
    if !r.cpus.is_finite() || r.cpus < 0.0 {
        return Err(ConvertError::invalid(
            format!("{field}.cpus"),
            "must be a finite, non-negative number",
        ));
    }
    Ok(Resources {
        cpus: r.cpus,
        memory_bytes: r.memory_bytes,
        gpus: r.gpus,
    })
}

/// A node for the wire; `connected` comes from the live session registry.
pub fn node_to_pb(n: &Node, connected: bool) -> pb::Node {
    pb::Node {
        node_id: n.id.to_string(),
        status: node_status_to_pb(n.status) as i32,
        cordoned: n.cordoned,
        connected,
        boot_id: n.boot_id.clone(),
        agent_version: n.agent_version.clone(),
        engine_version: n.engine_version.clone(),
        capacity: Some(resources_to_pb(&n.capacity)),
        labels: n.labels.clone().into_iter().collect(),
        first_seen_at: Some(timestamp_to_pb(n.first_seen_at)),
        last_heartbeat_at: Some(timestamp_to_pb(n.last_heartbeat_at)),
        usage: None,
        container_count: 0,
    }
}

// ---- containers and the agent protocol --------------------------------

use boilerhouse_core::ContainerId;
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

fn optional_timestamp(t: Option<Timestamp>) -> Option<prost_types::Timestamp> {
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
            labels: c.labels.clone().into_iter().collect(),
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
            labels: c.labels.clone().into_iter().collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            let t = Timestamp::from_millis(ms);
            assert_eq!(timestamp_from_pb(&timestamp_to_pb(t)), t, "{ms}");
            let pb = timestamp_to_pb(t);
            assert!(
                (0..1_000_000_000).contains(&pb.nanos),
                "nanos normalised for {ms}"
            );
        }
    }

    #[test]
    fn negative_durations_are_invalid() {
        let err = duration_from_pb(
            "acquire_timeout",
            &prost_types::Duration {
                seconds: -1,
                nanos: 0,
            },
        )
        .unwrap_err();
        assert_eq!(err.field(), "acquire_timeout");
        assert_eq!(
            duration_from_pb("d", &duration_to_pb(Duration::from_millis(1500))).unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn ids_name_their_field() {
        assert_eq!(
            tenant_id("tenant_id", "").unwrap_err(),
            ConvertError::MissingField("tenant_id")
        );
        assert_eq!(
            tenant_id("tenant_id", "a/b").unwrap_err().field(),
            "tenant_id"
        );
        assert_eq!(node_id("node_id", "Bad").unwrap_err().field(), "node_id");
        assert!(request_id("").unwrap().is_none());
        assert!(request_id("abc-123").unwrap().is_some());
        assert_eq!(request_id("has space").unwrap_err().field(), "request_id");
    }

    #[test]
    fn events_round_trip() {
        let event = Event {
            id: 7,
            event: boilerhouse_core::event::NewEvent::new(
                Timestamp::from_millis(5),
                boilerhouse_core::event::EventKind::NodeLost,
                "gone",
            )
            .with_attribute("why", "heartbeats")
            .with_subject(EventSubject {
                node_id: Some("a".into()),
                ..Default::default()
            }),
        };
        let back = Event::try_from(&pb::Event::from(&event)).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn container_specs_round_trip() {
        let workload = boilerhouse_core::workload::parse_workload(
            "w",
            "id: demo\nimage: busybox\nvolumes: {state: {target: /d}, custom: [{name: c, target: /c}]}\nhealthcheck: {test: [CMD, 'true']}\n",
        )
        .unwrap();
        let spec = ContainerSpec::for_workload(
            &workload,
            ContainerId::from_uuid(uuid_nil()),
            &NodeId::new("n").unwrap(),
            Timestamp::from_millis(1),
        );
        let back = ContainerSpec::try_from(&pb::ContainerSpec::from(&spec)).unwrap();
        assert_eq!(back, spec);
        let mut bad = pb::ContainerSpec::from(&spec);
        bad.volumes[0].target = "relative".into();
        assert_eq!(
            ContainerSpec::try_from(&bad).unwrap_err().field(),
            "spec.volumes[0].target"
        );
    }

    fn uuid_nil() -> boilerhouse_core::ids::Uuid {
        boilerhouse_core::ids::Uuid::nil()
    }

    #[test]
    fn event_filters_validate_kinds() {
        let f = pb::EventFilter {
            kinds: vec!["node.".into(), "BAD KIND".into()],
            ..Default::default()
        };
        assert_eq!(
            event_filter_from_pb(Some(&f)).unwrap_err().field(),
            "filter.kinds[1]"
        );
        let f = pb::EventFilter {
            min_severity: 99,
            ..Default::default()
        };
        assert_eq!(
            event_filter_from_pb(Some(&f)).unwrap_err().field(),
            "filter.min_severity"
        );
    }
}
