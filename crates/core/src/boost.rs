//! Resource boosts: time-boxed grants of extra CPU, memory or GPU.
//!
//! Everything here is a rule, not an action: what a valid request is, how
//! much a node has free once boosts are counted, which source a boost draws
//! from, which lower-priority boosts make room for it, what limits a
//! boosted container should have, and which boosts are due to expire. The
//! server applies the answers; the tests prove them in microseconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{BoostId, ContainerId, NodeId, TenantId, WorkloadId};
use crate::node::Resources;
use crate::time::Timestamp;
use crate::workload::Limits;

/// Duration when the request names none, as in the original tool.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(3600);
/// Longest boost: a month-long "boost" is a capacity change, not a boost.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Largest CPU boost, in cores. More is not a real request.
pub const MAX_CPUS: f64 = 1024.0;
/// Smallest CPU boost: Docker's CPU limit has millicore resolution in practice.
pub const MIN_CPUS: f64 = 0.001;
/// Largest memory boost, in bytes (16 TiB).
pub const MAX_MEMORY_BYTES: f64 = (16u64 << 40) as f64;
/// Smallest memory boost: Docker refuses limits below this size.
pub const MIN_MEMORY_BYTES: f64 = (1u64 << 20) as f64;
/// Largest GPU boost.
pub const MAX_GPUS: f64 = 64.0;

/// Slack for comparing CPU amounts summed from floats.
const EPSILON: f64 = 1e-9;

/// What a boost raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoostResource {
    /// CPU cores.
    Cpu,
    /// Memory bytes.
    Memory,
    /// Whole GPUs.
    Gpu,
}

impl BoostResource {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            BoostResource::Cpu => "cpu",
            BoostResource::Memory => "memory",
            BoostResource::Gpu => "gpu",
        }
    }

    /// How much of this resource `r` holds.
    pub fn of(self, r: &Resources) -> f64 {
        match self {
            BoostResource::Cpu => r.cpus,
            BoostResource::Memory => r.memory_bytes as f64,
            BoostResource::Gpu => f64::from(r.gpus),
        }
    }

    /// Whether the host enforces it on a container (Docker can change CPU
    /// and memory limits of a running container; it cannot add devices).
    pub fn enforced_on_containers(self) -> bool {
        matches!(self, BoostResource::Cpu | BoostResource::Memory)
    }

    /// Checks an amount of this resource: finite, positive, whole where it
    /// must be, and within sane bounds.
    pub fn validate_amount(self, amount: f64) -> Result<(), String> {
        if !amount.is_finite() {
            return Err("must be a finite number".into());
        }
        if amount <= 0.0 {
            return Err(format!("must be greater than zero, not {amount}"));
        }
        match self {
            BoostResource::Cpu if amount < MIN_CPUS => {
                Err(format!("a cpu boost is at least {MIN_CPUS} cores"))
            }
            BoostResource::Cpu if amount > MAX_CPUS => Err(format!(
                "{amount} cores is more than the {MAX_CPUS} a boost may ask for"
            )),
            BoostResource::Memory if amount.fract() != 0.0 => {
                Err("memory is a whole number of bytes".into())
            }
            BoostResource::Memory if amount < MIN_MEMORY_BYTES => {
                Err("a memory boost is at least 1 MiB".into())
            }
            BoostResource::Memory if amount > MAX_MEMORY_BYTES => {
                Err("a memory boost is at most 16 TiB".into())
            }
            BoostResource::Gpu if amount.fract() != 0.0 => Err("GPUs are granted whole".into()),
            BoostResource::Gpu if amount > MAX_GPUS => {
                Err(format!("a gpu boost is at most {MAX_GPUS} GPUs"))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for BoostResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BoostResource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "cpus" => Ok(BoostResource::Cpu),
            "memory" | "mem" => Ok(BoostResource::Memory),
            "gpu" | "gpus" => Ok(BoostResource::Gpu),
            other => Err(format!(
                "unknown resource {other:?}; use cpu, memory or gpu"
            )),
        }
    }
}

/// Who wins when capacity is short. Ordered: `Low < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoostPriority {
    /// Preempted first.
    Low,
    /// The default.
    Normal,
    /// Preempts low and normal.
    High,
    /// Preempts everything below it.
    Critical,
}

impl BoostPriority {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            BoostPriority::Low => "low",
            BoostPriority::Normal => "normal",
            BoostPriority::High => "high",
            BoostPriority::Critical => "critical",
        }
    }
}

impl fmt::Display for BoostPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BoostPriority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(BoostPriority::Low),
            "normal" => Ok(BoostPriority::Normal),
            "high" => Ok(BoostPriority::High),
            "critical" => Ok(BoostPriority::Critical),
            other => Err(format!(
                "unknown priority {other:?}; use low, normal, high or critical"
            )),
        }
    }
}

/// Where a boost is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoostStatus {
    /// Admitted and recorded; the host has not confirmed it yet.
    Pending,
    /// In force until it expires.
    Active,
    /// Ended by an operator, or because its container went away.
    Released,
    /// Its time ran out.
    Expired,
    /// Ended to make room for a higher-priority boost.
    Preempted,
    /// The host could not apply it.
    Failed,
}

impl BoostStatus {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            BoostStatus::Pending => "pending",
            BoostStatus::Active => "active",
            BoostStatus::Released => "released",
            BoostStatus::Expired => "expired",
            BoostStatus::Preempted => "preempted",
            BoostStatus::Failed => "failed",
        }
    }

    /// Pending and active boosts hold capacity; the others are history.
    pub fn is_live(self) -> bool {
        matches!(self, BoostStatus::Pending | BoostStatus::Active)
    }
}

impl fmt::Display for BoostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BoostStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(BoostStatus::Pending),
            "active" => Ok(BoostStatus::Active),
            "released" => Ok(BoostStatus::Released),
            "expired" => Ok(BoostStatus::Expired),
            "preempted" => Ok(BoostStatus::Preempted),
            "failed" => Ok(BoostStatus::Failed),
            other => Err(format!("unknown boost status {other:?}")),
        }
    }
}

/// What a boost raises, as the operator named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BoostTarget {
    /// A node's schedulable capacity.
    Node(NodeId),
    /// One container's limits.
    Container(ContainerId),
    /// The container a tenant holds of a workload.
    Tenant(TenantId, WorkloadId),
}

impl fmt::Display for BoostTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoostTarget::Node(n) => write!(f, "node/{n}"),
            BoostTarget::Container(c) => write!(f, "container/{c}"),
            BoostTarget::Tenant(t, w) => write!(f, "tenant/{t}/{w}"),
        }
    }
}

/// A boost as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Boost {
    /// Its id.
    pub id: BoostId,
    /// What the operator asked to raise.
    pub target: BoostTarget,
    /// The container whose limits it raises: the target container, or the
    /// one the tenant held when the boost was granted. None for a node.
    pub container_id: Option<ContainerId>,
    /// What it raises.
    pub resource: BoostResource,
    /// Cores, bytes or GPUs.
    pub amount: f64,
    /// Who wins when capacity is short.
    pub priority: BoostPriority,
    /// The node whose capacity it draws from.
    pub source_node: NodeId,
    /// Where it is in its life.
    pub status: BoostStatus,
    /// Why it is in that status.
    pub reason: String,
    /// Asked for.
    pub requested_at: Timestamp,
    /// Confirmed in force.
    pub allocated_at: Option<Timestamp>,
    /// When it ends. While pending, `requested_at + duration`; it is
    /// moved to `allocated_at + duration` when the boost becomes active, so
    /// the operator gets the whole duration they asked for.
    pub expires_at: Timestamp,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
}

impl Boost {
    /// The duration asked for.
    pub fn duration(&self) -> Duration {
        let start = self.allocated_at.unwrap_or(self.requested_at);
        self.expires_at.saturating_since(start)
    }

    /// Time left before expiry; None once ended.
    pub fn remaining(&self, now: Timestamp) -> Option<Duration> {
        self.status
            .is_live()
            .then(|| self.expires_at.saturating_since(now))
    }

    /// Whether it raises a container's limits on the host.
    pub fn raises_container_limits(&self) -> bool {
        self.container_id.is_some() && self.resource.enforced_on_containers()
    }

    /// Moves it to `Active` as of `now`, restarting its clock.
    pub fn activate(&mut self, now: Timestamp) {
        let duration = self.duration();
        self.status = BoostStatus::Active;
        self.allocated_at = Some(now);
        self.expires_at = now.saturating_add(duration);
    }

    /// Ends it with `status` and `reason` as of `now`.
    pub fn end(&mut self, status: BoostStatus, reason: impl Into<String>, now: Timestamp) {
        debug_assert!(!status.is_live());
        self.status = status;
        self.reason = reason.into();
        self.ended_at = Some(now);
    }
}

/// A boost request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct BoostRequest {
    /// What to raise.
    pub target: BoostTarget,
    /// Which resource.
    pub resource: BoostResource,
    /// How much.
    pub amount: f64,
    /// Its priority.
    pub priority: BoostPriority,
    /// For how long once in force.
    pub duration: Duration,
    /// The node to draw from, if the operator chose one.
    pub source: Option<NodeId>,
}

/// Checks a boost duration.
pub fn validate_duration(d: Duration) -> Result<(), String> {
    if d < Duration::from_secs(1) {
        return Err("must be at least one second".into());
    }
    if d > MAX_DURATION {
        return Err("must be at most 30 days".into());
    }
    Ok(())
}

/// One node as the capacity ledger sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLedger {
    /// The node.
    pub id: NodeId,
    /// What its agent reported.
    pub capacity: Resources,
    /// What its containers' limits reserve.
    pub allocated: Resources,
    /// Connected and heartbeating: only live nodes are chosen as sources.
    pub live: bool,
}

/// What a node gains from node boosts targeting it, minus what live boosts
/// draw from it, in `resource`.
pub fn boost_balance(node: &NodeId, resource: BoostResource, live: &[Boost]) -> f64 {
    live.iter()
        .filter(|b| b.status.is_live() && b.resource == resource)
        .map(|b| {
            let gained = matches!(&b.target, BoostTarget::Node(n) if n == node);
            let drawn = &b.source_node == node;
            match (gained, drawn) {
                (true, false) => b.amount,
                (false, true) => -b.amount,
                _ => 0.0,
            }
        })
        .sum()
}

/// A node's capacity with boosts counted: what the scheduler places against.
pub fn effective_capacity(node: &NodeId, capacity: Resources, live: &[Boost]) -> Resources {
    let adjust =
        |resource: BoostResource| resource.of(&capacity) + boost_balance(node, resource, live);
    Resources {
        cpus: adjust(BoostResource::Cpu).max(0.0),
        memory_bytes: adjust(BoostResource::Memory).max(0.0).round() as u64,
        gpus: adjust(BoostResource::Gpu).max(0.0).round() as u32,
    }
}

/// Capacity minus container reservations minus boosts drawn from it (plus
/// node boosts granted to it).
pub fn free(node: &NodeLedger, resource: BoostResource, live: &[Boost]) -> f64 {
    resource.of(&node.capacity) - resource.of(&node.allocated)
        + boost_balance(&node.id, resource, live)
}

/// The target once resolved against the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolvedTarget {
    /// A node, which gains capacity.
    Node(NodeId),
    /// A container on a node, whose limits rise.
    Container {
        /// The container.
        id: ContainerId,
        /// Where it runs.
        node: NodeId,
    },
}

/// A request, validated and resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BoostAsk {
    /// What it raises.
    pub target: ResolvedTarget,
    /// Which resource.
    pub resource: BoostResource,
    /// How much.
    pub amount: f64,
    /// Its priority.
    pub priority: BoostPriority,
    /// The node to draw from, if the operator chose one.
    pub source: Option<NodeId>,
}

/// What admission decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// The node the boost draws from.
    pub source: NodeId,
    /// Boosts to preempt first, in the order chosen.
    pub preempt: Vec<BoostId>,
}

/// Why a boost cannot be admitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmitError {
    /// The named source node is not known.
    #[error("source node {0} is not known")]
    UnknownSource(NodeId),
    /// A node boost cannot draw from the node it raises.
    #[error("a node boost draws from another node, not from {0} itself")]
    SourceIsTarget(NodeId),
    /// A container's extra limits can only come from its own host.
    #[error(
        "container {container} runs on {node}; a container boost draws from its own node, not {asked}"
    )]
    SourceNotContainerNode {
        /// The container.
        container: ContainerId,
        /// Its node.
        node: NodeId,
        /// The source asked for.
        asked: NodeId,
    },
    /// No live node other than the target exists to draw from.
    #[error("no live node other than {0} to draw {1} from")]
    NoSource(NodeId, BoostResource),
    /// The source is short even after preempting every lower-priority boost.
    #[error(
        "node {node} has {free:.3} {resource} free; the boost needs {needed:.3} and preempting lower-priority boosts would free only {preemptible:.3}"
    )]
    Short {
        /// The node drawn from.
        node: NodeId,
        /// The resource.
        resource: BoostResource,
        /// Needed.
        needed: f64,
        /// Free now.
        free: f64,
        /// What preempting every lower-priority boost would add.
        preemptible: f64,
    },
}

/// Decides where `ask` draws from and which boosts make room for it.
///
/// With no source named, a container boost draws from the container's own
/// node (extra limits can only come from the host running it), and a node
/// boost from the live node, other than the target, with the most free of
/// that resource. When the source is short, live boosts of the same
/// resource drawn from it with a lower priority are preempted, lowest
/// priority first and, within a priority, newest first, until the boost
/// fits. If it cannot fit even then, nothing is preempted.
pub fn admit(
    ask: &BoostAsk,
    nodes: &[NodeLedger],
    live: &[Boost],
) -> Result<Admission, AdmitError> {
    let source = match (&ask.target, &ask.source) {
        (ResolvedTarget::Container { id, node }, Some(asked)) if asked != node => {
            return Err(AdmitError::SourceNotContainerNode {
                container: *id,
                node: node.clone(),
                asked: asked.clone(),
            });
        }
        (ResolvedTarget::Container { node, .. }, _) => node.clone(),
        (ResolvedTarget::Node(target), Some(asked)) if asked == target => {
            return Err(AdmitError::SourceIsTarget(target.clone()));
        }
        (ResolvedTarget::Node(_), Some(asked)) => asked.clone(),
        (ResolvedTarget::Node(target), None) => nodes
            .iter()
            .filter(|n| n.live && &n.id != target)
            .max_by(|a, b| {
                free(a, ask.resource, live)
                    .total_cmp(&free(b, ask.resource, live))
                    .then(b.id.cmp(&a.id))
            })
            .map(|n| n.id.clone())
            .ok_or_else(|| AdmitError::NoSource(target.clone(), ask.resource))?,
    };
    let node = nodes
        .iter()
        .find(|n| n.id == source)
        .ok_or_else(|| AdmitError::UnknownSource(source.clone()))?;
    let available = free(node, ask.resource, live);
    if available + EPSILON >= ask.amount {
        return Ok(Admission {
            source,
            preempt: Vec::new(),
        });
    }
    let mut candidates: Vec<&Boost> = live
        .iter()
        .filter(|b| {
            b.status.is_live()
                && b.source_node == source
                && b.resource == ask.resource
                && b.priority < ask.priority
        })
        .collect();
    candidates.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.requested_at.cmp(&a.requested_at))
            .then(b.id.cmp(&a.id))
    });
    let mut freed = 0.0;
    let mut preempt = Vec::new();
    for b in &candidates {
        if available + freed + EPSILON >= ask.amount {
            break;
        }
        freed += b.amount;
        preempt.push(b.id);
    }
    if available + freed + EPSILON >= ask.amount {
        Ok(Admission { source, preempt })
    } else {
        Err(AdmitError::Short {
            node: source,
            resource: ask.resource,
            needed: ask.amount,
            free: available,
            preemptible: freed,
        })
    }
}

/// The limits a container should have: its workload's base limits raised
/// by the live boosts on it. A limit the base leaves unset stays unset.
pub fn boosted_limits(base: &Limits, container: &ContainerId, live: &[Boost]) -> Limits {
    let extra = |resource: BoostResource| -> f64 {
        live.iter()
            .filter(|b| {
                b.status.is_live()
                    && b.resource == resource
                    && b.container_id.as_ref() == Some(container)
            })
            .map(|b| b.amount)
            .sum()
    };
    Limits {
        cpus: base.cpus.map(|c| c + extra(BoostResource::Cpu)),
        memory_bytes: base
            .memory_bytes
            .map(|m| m + extra(BoostResource::Memory).round() as u64),
    }
}

/// Whether two limits are the same as far as Docker can tell (CPU is
/// stored in billionths of a core).
pub fn limits_match(a: &Limits, b: &Limits) -> bool {
    let cpus = match (a.cpus, b.cpus) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-6,
        (None, None) => true,
        _ => false,
    };
    cpus && a.memory_bytes == b.memory_bytes
}

/// Active boosts whose time is up at `now`, soonest first.
pub fn due(live: &[Boost], now: Timestamp) -> Vec<BoostId> {
    let mut due: Vec<&Boost> = live
        .iter()
        .filter(|b| b.status == BoostStatus::Active && b.expires_at <= now)
        .collect();
    due.sort_by_key(|b| (b.expires_at, b.id));
    due.into_iter().map(|b| b.id).collect()
}

/// When the next active boost expires.
pub fn next_expiry(live: &[Boost]) -> Option<Timestamp> {
    live.iter()
        .filter(|b| b.status == BoostStatus::Active)
        .map(|b| b.expires_at)
        .min()
}

#[cfg(test)]
mod tests;
