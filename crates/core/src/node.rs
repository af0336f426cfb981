//! Nodes: Docker hosts, each with one agent.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::time::Timestamp;

/// Amounts of schedulable resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU cores.
    pub cpus: f64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Whole GPUs.
    pub gpus: u32,
}

/// Liveness, driven by heartbeats: Ready → Suspect → Lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Heartbeats arrive.
    Ready,
    /// Heartbeats stopped; nothing new goes there.
    Suspect,
    /// Past the grace period; its claims are lost.
    Lost,
}

impl NodeStatus {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Lost => "lost",
        }
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ready" => Ok(NodeStatus::Ready),
            "suspect" => Ok(NodeStatus::Suspect),
            "lost" => Ok(NodeStatus::Lost),
            other => Err(format!("unknown node status {other:?}")),
        }
    }
}

/// A node as the server records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Its name.
    pub id: NodeId,
    /// Liveness.
    pub status: NodeStatus,
    /// Whether new containers are kept off it.
    pub cordoned: bool,
    /// Changes when the host reboots.
    pub boot_id: String,
    /// The agent's version.
    pub agent_version: String,
    /// The Docker engine's version.
    pub engine_version: String,
    /// What the host offers.
    pub capacity: Resources,
    /// Labels for `node_selector`.
    pub labels: BTreeMap<String, String>,
    /// Root of the agent's container directories.
    pub state_root: String,
    /// First contact.
    pub first_seen_at: Timestamp,
    /// Last heartbeat.
    pub last_heartbeat_at: Timestamp,
}
