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
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp, WorkloadId};

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

mod agent;
use agent::optional_timestamp;
pub use agent::{
    REPORT_PART_CONTAINERS, full_report_parts, limits_from_pb_resources, limits_to_pb_resources,
    report_part_size,
};

#[cfg(test)]
mod tests;
