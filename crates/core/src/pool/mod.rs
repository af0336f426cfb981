//! Pool rules: container states, how many containers to create, and where
//! to put them; the records the store keeps; and the pool's state machine:
//! [`write::PoolWrite`] (one atomic, conditional change), [`index::Index`]
//! (the in-memory mirror of what was committed, changed only by
//! `Index::apply`) and [`decide`] (every transition, as a pure function
//! from the index to the write that makes it). Pure functions; the pool
//! controller does the I/O.

pub mod decide;
pub mod index;
pub mod write;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::node::Resources;
use crate::workload::WorkloadSpec;

/// A managed container's life cycle, as the server records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    /// Created or starting; not yet healthy.
    Warming,
    /// Running, healthy, free to claim.
    Idle,
    /// Held by a tenant.
    Claimed,
    /// Released and kept for the same tenant until its affinity expires.
    Reserved,
    /// Being stopped and removed.
    Draining,
    /// On a node declared lost.
    Lost,
}

impl ContainerState {
    /// Every state.
    pub const ALL: [ContainerState; 6] = [
        ContainerState::Warming,
        ContainerState::Idle,
        ContainerState::Claimed,
        ContainerState::Reserved,
        ContainerState::Draining,
        ContainerState::Lost,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Warming => "warming",
            ContainerState::Idle => "idle",
            ContainerState::Claimed => "claimed",
            ContainerState::Reserved => "reserved",
            ContainerState::Draining => "draining",
            ContainerState::Lost => "lost",
        }
    }
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContainerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ContainerState::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown container state {s:?}"))
    }
}

/// How many containers of a pool are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCounts {
    /// Warming, in-flight creates included.
    pub warming: u32,
    /// Idle.
    pub idle: u32,
    /// Claimed.
    pub claimed: u32,
    /// Reserved for a returning tenant.
    pub reserved: u32,
    /// Draining.
    pub draining: u32,
    /// On lost nodes.
    pub lost: u32,
}

impl PoolCounts {
    /// Adds one container in `state`.
    pub fn add(&mut self, state: ContainerState) {
        match state {
            ContainerState::Warming => self.warming += 1,
            ContainerState::Idle => self.idle += 1,
            ContainerState::Claimed => self.claimed += 1,
            ContainerState::Reserved => self.reserved += 1,
            ContainerState::Draining => self.draining += 1,
            ContainerState::Lost => self.lost += 1,
        }
    }

    /// Takes away one container in `state`.
    pub fn remove(&mut self, state: ContainerState) {
        let n = match state {
            ContainerState::Warming => &mut self.warming,
            ContainerState::Idle => &mut self.idle,
            ContainerState::Claimed => &mut self.claimed,
            ContainerState::Reserved => &mut self.reserved,
            ContainerState::Draining => &mut self.draining,
            ContainerState::Lost => &mut self.lost,
        };
        *n = n.saturating_sub(1);
    }

    /// Containers that count toward `max_size`. Draining ones are on their
    /// way out but still hold resources until removed, so they count. Lost
    /// ones do not: they sit on a node that is gone, and counting them
    /// would stop the pool refilling on the nodes that remain.
    pub fn total(&self) -> u32 {
        self.warming + self.idle + self.claimed + self.reserved + self.draining
    }
}

/// How many containers to start creating now so the pool reaches
/// `min_size` idle, never exceeding `max_size` in total (in-flight creates
/// count as warming) nor `fill_concurrency` creates at once.
pub fn to_create(counts: &PoolCounts, min_size: u32, max_size: u32, fill_concurrency: u32) -> u32 {
    let ready_or_coming = counts.idle + counts.warming;
    let wanted = min_size.saturating_sub(ready_or_coming);
    let room = max_size.saturating_sub(counts.total());
    let slots = fill_concurrency.saturating_sub(counts.warming);
    wanted.min(room).min(slots)
}

/// A pool's containers of an older spec than its workload's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stale {
    /// Idle ones (busy ones, about to be claimed, included).
    pub idle: u32,
    /// Warming ones.
    pub warming: u32,
}

/// What the refiller does now for a pool whose workload may have changed:
/// `(create, drain)`, containers to create of the current spec and stale
/// idle ones to drain. Stale containers do not count toward `min_size`,
/// so current ones are created (within `max_size` and `fill_concurrency`,
/// as [`to_create`]); stale idle ones go once current ones reach
/// `min_size`, so the pool never empties for a rollout, or one at a time
/// when `max_size` leaves no room to create a replacement. Claimed and
/// reserved containers keep their spec until they are released.
pub fn roll(
    counts: &PoolCounts,
    stale: Stale,
    min_size: u32,
    max_size: u32,
    fill_concurrency: u32,
) -> (u32, u32) {
    let stale_idle = stale.idle.min(counts.idle);
    let current_idle = counts.idle - stale_idle;
    let current_warming = counts.warming.saturating_sub(stale.warming);
    let wanted = min_size.saturating_sub(current_idle + current_warming);
    let room = max_size.saturating_sub(counts.total());
    let slots = fill_concurrency.saturating_sub(counts.warming);
    let create = wanted.min(room).min(slots);
    let drain = if current_idle >= min_size {
        stale_idle
    } else if wanted > 0 && room == 0 && slots > 0 {
        stale_idle.min(1)
    } else {
        0
    };
    (create, drain)
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCandidate {
    /// The node.
    pub id: NodeId,
    /// Ready, connected, and heartbeating.
    pub live: bool,
    /// Kept free of new containers.
    pub cordoned: bool,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// What it offers (boosts drawn from or to it included).
    pub capacity: Resources,
    /// What its containers' limits already take.
    pub allocated: Resources,
}

impl NodeCandidate {
    fn free_cpus(&self) -> f64 {
        self.capacity.cpus - self.allocated.cpus
    }

    fn free_memory(&self) -> i128 {
        i128::from(self.capacity.memory_bytes) - i128::from(self.allocated.memory_bytes)
    }
}

/// Where a new container of `workload` should go: a live, uncordoned node
/// whose labels satisfy `node_selector` and that has room for the
/// workload's limits, preferring the one with the most free memory, then
/// CPU, then the name (so the choice is deterministic).
pub fn choose_node<'a>(
    candidates: &'a [NodeCandidate],
    workload: &WorkloadSpec,
) -> Option<&'a NodeCandidate> {
    let need_cpus = workload.limits.cpus.unwrap_or(0.0);
    let need_memory = i128::from(workload.limits.memory_bytes.unwrap_or(0));
    candidates
        .iter()
        .filter(|n| n.live && !n.cordoned)
        .filter(|n| {
            workload
                .node_selector
                .iter()
                .all(|(k, v)| n.labels.get(k) == Some(v))
        })
        .filter(|n| n.free_cpus() + 1e-9 >= need_cpus && n.free_memory() >= need_memory)
        .max_by(|a, b| {
            a.free_memory()
                .cmp(&b.free_memory())
                .then(a.free_cpus().total_cmp(&b.free_cpus()))
                .then(b.id.cmp(&a.id))
        })
}

/// Why [`choose_node`] found no node for a new container of `workload`,
/// in the words an operator needs: which constraint excluded the nodes,
/// and for capacity, what the workload needs against the roomiest
/// eligible node. Meant for a pool that cannot reach its `min_size`.
pub fn why_no_node(candidates: &[NodeCandidate], workload: &WorkloadSpec) -> String {
    if candidates.is_empty() {
        return "no node has joined".into();
    }
    let live: Vec<&NodeCandidate> = candidates.iter().filter(|n| n.live).collect();
    if live.is_empty() {
        return format!(
            "none of the {} node(s) is Ready and connected",
            candidates.len()
        );
    }
    let open: Vec<&NodeCandidate> = live.iter().copied().filter(|n| !n.cordoned).collect();
    if open.is_empty() {
        return format!("every Ready node ({}) is cordoned", live.len());
    }
    let matching: Vec<&NodeCandidate> = open
        .iter()
        .copied()
        .filter(|n| {
            workload
                .node_selector
                .iter()
                .all(|(k, v)| n.labels.get(k) == Some(v))
        })
        .collect();
    let Some(best) = matching.iter().max_by(|a, b| {
        a.free_memory()
            .cmp(&b.free_memory())
            .then(a.free_cpus().total_cmp(&b.free_cpus()))
    }) else {
        let selector: Vec<String> = workload
            .node_selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return format!("no Ready node matches node_selector {}", selector.join(","));
    };
    let mut needs = Vec::new();
    if let Some(cpus) = workload.limits.cpus.filter(|c| *c > 0.0) {
        needs.push(format!("{cpus} cpu"));
    }
    if let Some(memory) = workload.limits.memory_bytes.filter(|m| *m > 0) {
        needs.push(format!("{} memory", crate::units::format_size(memory)));
    }
    let free_memory = u64::try_from(best.free_memory().max(0)).unwrap_or(u64::MAX);
    format!(
        "needs {}; the roomiest node, {}, has {:.2} cpu and {} free",
        needs.join(" and "),
        best.id,
        best.free_cpus().max(0.0),
        crate::units::format_size(free_memory),
    )
}

/// Where a claimed container came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimSource {
    /// The tenant's current claim.
    Existing,
    /// The tenant's affinity reservation.
    Affinity,
    /// An idle pooled container.
    Pool,
    /// A container created for this claim.
    Cold,
}

impl ClaimSource {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimSource::Existing => "existing",
            ClaimSource::Affinity => "affinity",
            ClaimSource::Pool => "pool",
            ClaimSource::Cold => "cold",
        }
    }
}

impl FromStr for ClaimSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "existing" => Ok(ClaimSource::Existing),
            "affinity" => Ok(ClaimSource::Affinity),
            "pool" => Ok(ClaimSource::Pool),
            "cold" => Ok(ClaimSource::Cold),
            other => Err(format!("unknown claim source {other:?}")),
        }
    }
}

/// A claim's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimStatus {
    /// Held.
    Active,
    /// Released by the tenant, an operator or the idle reaper.
    Released,
    /// Its node was lost.
    Lost,
}

impl ClaimStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimStatus::Active => "active",
            ClaimStatus::Released => "released",
            ClaimStatus::Lost => "lost",
        }
    }
}

impl FromStr for ClaimStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(ClaimStatus::Active),
            "released" => Ok(ClaimStatus::Released),
            "lost" => Ok(ClaimStatus::Lost),
            other => Err(format!("unknown claim status {other:?}")),
        }
    }
}

/// A managed container as the server records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Its id.
    pub id: crate::ContainerId,
    /// Its workload, which is also its pool.
    pub workload_id: crate::WorkloadId,
    /// Where it runs.
    pub node_id: NodeId,
    /// Docker's id, once created.
    pub docker_id: Option<String>,
    /// Life-cycle state.
    pub state: ContainerState,
    /// The spec it was built from.
    pub spec_hash: String,
    /// The tenant holding it.
    pub tenant_id: Option<crate::TenantId>,
    /// The tenant that held it last.
    pub last_tenant_id: Option<crate::TenantId>,
    /// Fencing generation of its current or last claim.
    pub claim_generation: u64,
    /// Row version: bumped by every committed change, and what a
    /// conditional write expects to find.
    pub revision: u64,
    /// Limits in force.
    pub limits: crate::workload::Limits,
    /// Host path of the state volume ('' when none).
    pub state_path: String,
    /// Host path of the comm volume ('' when none).
    pub comm_path: String,
    /// Created.
    pub created_at: crate::Timestamp,
    /// Last changed.
    pub updated_at: crate::Timestamp,
}

impl ContainerRecord {
    /// Whether a tenant ever held it. A used container may go back only to
    /// that tenant, or be destroyed: it is never offered to anyone else.
    pub fn used(&self) -> bool {
        self.tenant_id.is_some() || self.last_tenant_id.is_some() || self.claim_generation > 0
    }

    /// The next version of this row, changed at `now`: what a conditional
    /// update starts from (it expects the stored row at `revision`).
    pub fn successor(&self, now: crate::Timestamp) -> Self {
        Self {
            revision: self.revision + 1,
            updated_at: now,
            ..self.clone()
        }
    }
}

/// A claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimRecord {
    /// Its id.
    pub claim_id: String,
    /// Who.
    pub tenant_id: crate::TenantId,
    /// Of what.
    pub workload_id: crate::WorkloadId,
    /// Which container.
    pub container_id: crate::ContainerId,
    /// On which node.
    pub node_id: NodeId,
    /// Fencing token.
    pub generation: u64,
    /// Where the container came from.
    pub source: ClaimSource,
    /// State.
    pub status: ClaimStatus,
    /// When.
    pub claimed_at: crate::Timestamp,
    /// Last activity.
    pub last_activity_at: crate::Timestamp,
    /// When it ended.
    pub released_at: Option<crate::Timestamp>,
    /// The tenant's files were restored into the container when it was
    /// claimed: its source reads `*_WITH_DATA` wherever it is shown.
    #[serde(default)]
    pub restored: bool,
}

/// A released container kept for its tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// For whom.
    pub tenant_id: crate::TenantId,
    /// Of what.
    pub workload_id: crate::WorkloadId,
    /// Which container.
    pub container_id: crate::ContainerId,
    /// On which node.
    pub node_id: NodeId,
    /// Since when.
    pub reserved_at: crate::Timestamp,
    /// Until when.
    pub expires_at: crate::Timestamp,
}

#[cfg(test)]
mod tests;
