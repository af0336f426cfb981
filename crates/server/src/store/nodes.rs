//! Nodes. Agents write them (join, heartbeats, liveness); operators cordon.

use std::collections::BTreeMap;

use boilerhouse_core::node::{Node, NodeStatus, Resources};
use boilerhouse_core::{NodeId, Timestamp};

use super::{Store, StoreError};

#[derive(sqlx::FromRow)]
struct NodeRow {
    node_id: String,
    status: String,
    cordoned: bool,
    boot_id: String,
    agent_version: String,
    engine_version: String,
    capacity_cpus: f64,
    capacity_memory: i64,
    capacity_gpus: i64,
    labels_json: String,
    first_seen_at: i64,
    last_heartbeat_at: i64,
}

impl TryFrom<NodeRow> for Node {
    type Error = StoreError;
    fn try_from(row: NodeRow) -> Result<Self, StoreError> {
        let corrupt = |what: String| StoreError::Corrupt(format!("node {}: {what}", row.node_id));
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&row.labels_json).map_err(|e| corrupt(e.to_string()))?;
        Ok(Node {
            id: NodeId::new(row.node_id.clone()).map_err(|e| corrupt(e.to_string()))?,
            status: row.status.parse::<NodeStatus>().map_err(corrupt)?,
            cordoned: row.cordoned,
            boot_id: row.boot_id,
            agent_version: row.agent_version,
            engine_version: row.engine_version,
            capacity: Resources {
                cpus: row.capacity_cpus,
                memory_bytes: row.capacity_memory.max(0) as u64,
                gpus: row.capacity_gpus.clamp(0, i64::from(u32::MAX)) as u32,
            },
            labels,
            first_seen_at: Timestamp::from_millis(row.first_seen_at),
            last_heartbeat_at: Timestamp::from_millis(row.last_heartbeat_at),
        })
    }
}

macro_rules! select_node {
    ($rest:literal) => {
        concat!(
            "SELECT node_id, status, cordoned, boot_id, agent_version, engine_version, \
             capacity_cpus, capacity_memory, capacity_gpus, labels_json, first_seen_at, \
             last_heartbeat_at FROM nodes ",
            $rest
        )
    };
}

impl Store {
    /// Every known node, by name.
    pub async fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        let rows: Vec<NodeRow> = sqlx::query_as(select_node!("ORDER BY node_id"))
            .fetch_all(&self.reads)
            .await?;
        rows.into_iter().map(Node::try_from).collect()
    }

    /// One node.
    pub async fn get_node(&self, id: &NodeId) -> Result<Option<Node>, StoreError> {
        let row: Option<NodeRow> = sqlx::query_as(select_node!("WHERE node_id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.reads)
            .await?;
        row.map(Node::try_from).transpose()
    }
}
