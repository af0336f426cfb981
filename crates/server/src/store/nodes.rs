//! Nodes. Agents write them (join, heartbeats, liveness); operators cordon.

use std::collections::BTreeMap;

use futures::FutureExt as _;

use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::node::{Node, NodeStatus, Resources};
use boilerhouse_core::{NodeId, Timestamp};

use super::events::insert_event;
use super::lenient::{self, Lenient};
use super::sql;
use super::{Store, StoreError};

#[derive(sqlx::FromRow)]
struct NodeRow {
    node_id: String,
    status: String,
    cordoned: sql::Flag,
    boot_id: String,
    agent_version: String,
    engine_version: String,
    capacity_cpus: f64,
    capacity_memory: i64,
    capacity_gpus: i64,
    labels_json: String,
    state_root: String,
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
            cordoned: row.cordoned.0,
            boot_id: row.boot_id,
            agent_version: row.agent_version,
            engine_version: row.engine_version,
            capacity: Resources {
                cpus: row.capacity_cpus,
                memory_bytes: row.capacity_memory.max(0) as u64,
                gpus: row.capacity_gpus.clamp(0, i64::from(u32::MAX)) as u32,
            },
            labels,
            state_root: row.state_root,
            first_seen_at: Timestamp::from_millis(row.first_seen_at),
            last_heartbeat_at: Timestamp::from_millis(row.last_heartbeat_at),
        })
    }
}

macro_rules! select_node {
    ($rest:literal) => {
        concat!(
            "SELECT node_id, status, cordoned, boot_id, agent_version, engine_version, \
             capacity_cpus, capacity_memory, capacity_gpus, labels_json, state_root, first_seen_at, \
             last_heartbeat_at FROM nodes ",
            $rest
        )
    };
}

/// How long a read of every node may be reused. Every write to `nodes`
/// through this store drops the copy at once; the limit bounds how stale
/// it can be after a write this process did not make (another replica
/// that led meanwhile).
const NODE_LIST_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The last read of every node. Placement reads the node list for each
/// container it creates: at a thousand nodes, reading them from the
/// database each time capped filling a pool at ~40 containers/s.
#[derive(Default)]
pub(super) struct NodeListCache {
    state: std::sync::Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Bumped by every write: a read that began before it is not kept.
    generation: u64,
    copy: Option<(std::time::Instant, std::sync::Arc<Lenient<Node>>)>,
}

impl NodeListCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called after every committed write to `nodes`.
    pub(super) fn invalidate(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.copy = None;
    }
}

impl Store {
    /// Every known node that can be read, by name.
    pub async fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        Ok(self.list_nodes_lenient().await?.0)
    }

    /// Every known node, by name, and the rows that cannot be read.
    pub async fn list_nodes_lenient(&self) -> Result<Lenient<Node>, StoreError> {
        let generation = {
            let state = self.node_list.lock();
            if let Some((at, copy)) = &state.copy
                && at.elapsed() < NODE_LIST_TTL
            {
                return Ok((**copy).clone());
            }
            state.generation
        };
        let rows = sql::query(select_node!("ORDER BY node_id"))
            .fetch_all(&self.reads)
            .await?;
        let read = lenient::decode::<_, NodeRow, _>(rows, "nodes", |r| lenient::text(r, "node_id"));
        let mut state = self.node_list.lock();
        if state.generation == generation {
            state.copy = Some((std::time::Instant::now(), std::sync::Arc::new(read.clone())));
        }
        Ok(read)
    }

    /// One node.
    pub async fn get_node(&self, id: &NodeId) -> Result<Option<Node>, StoreError> {
        let row: Option<NodeRow> = sql::query_as(select_node!("WHERE node_id = ?"))
            .bind(id.as_str())
            .fetch_optional(&self.reads)
            .await?;
        row.map(Node::try_from).transpose()
    }
}

/// What a Hello told us about a node.
#[derive(Debug, Clone)]
pub struct NodeHello {
    /// The node.
    pub id: NodeId,
    /// Host boot id.
    pub boot_id: String,
    /// Agent version.
    pub agent_version: String,
    /// Engine version.
    pub engine_version: String,
    /// Capacity.
    pub capacity: Resources,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Root of the agent's container directories.
    pub state_root: String,
}

#[cfg(test)]
impl NodeHello {
    /// A plain node's Hello, for tests.
    pub(crate) fn for_tests(id: NodeId) -> Self {
        Self {
            id,
            boot_id: "boot".into(),
            agent_version: "test".into(),
            engine_version: "test".into(),
            capacity: Default::default(),
            labels: BTreeMap::new(),
            state_root: "/var/lib/boilerhouse".into(),
        }
    }
}

/// How a node arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Never seen before.
    Joined,
    /// Known, and was Suspect or Lost.
    Returned(NodeStatus),
    /// Known and Ready (an agent restart or a quick reconnect).
    Reconnected,
}

fn node_subject(id: &NodeId) -> EventSubject {
    EventSubject {
        node_id: Some(id.to_string()),
        ..Default::default()
    }
}

impl Store {
    /// Records an agent's Hello: creates or refreshes the node, marks it
    /// Ready, and records `node.joined` or `node.returned`.
    pub async fn register_node(
        &self,
        hello: NodeHello,
        now: Timestamp,
    ) -> Result<(Node, Arrival), StoreError> {
        let written = self
            .writer
            .write(move |tx| {
                async move {
                    let previous: Option<NodeRow> = sql::query_as(select_node!("WHERE node_id = ?"))
                        .bind(hello.id.as_str())
                        .fetch_optional(tx.conn())
                        .await?;
                    // A row that cannot be read is overwritten below with
                    // what the agent says, which heals it.
                    let unreadable = previous.is_some();
                    let previous = previous.and_then(|row| {
                        Node::try_from(row)
                            .inspect_err(|e| tracing::warn!(node = %hello.id, error = %e, "the node's row could not be read; the agent's Hello replaces it"))
                            .ok()
                    });
                    let unreadable = unreadable && previous.is_none();
                    let labels = serde_json::to_string(&hello.labels).map_err(|e| StoreError::Internal(e.to_string()))?;
                    sql::query(
                        "INSERT INTO nodes (node_id, status, cordoned, boot_id, agent_version, engine_version, \
                         capacity_cpus, capacity_memory, capacity_gpus, labels_json, state_root, first_seen_at, \
                         last_heartbeat_at, updated_at) VALUES (?, 'ready', FALSE, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                         ON CONFLICT (node_id) DO UPDATE SET status = 'ready', boot_id = excluded.boot_id, \
                         agent_version = excluded.agent_version, engine_version = excluded.engine_version, \
                         capacity_cpus = excluded.capacity_cpus, capacity_memory = excluded.capacity_memory, \
                         capacity_gpus = excluded.capacity_gpus, labels_json = excluded.labels_json, \
                         state_root = excluded.state_root, \
                         last_heartbeat_at = excluded.last_heartbeat_at, updated_at = excluded.updated_at",
                    )
                    .bind(hello.id.as_str())
                    .bind(&hello.boot_id)
                    .bind(&hello.agent_version)
                    .bind(&hello.engine_version)
                    .bind(hello.capacity.cpus)
                    .bind(i64::try_from(hello.capacity.memory_bytes).unwrap_or(i64::MAX))
                    .bind(i64::from(hello.capacity.gpus))
                    .bind(labels)
                    .bind(&hello.state_root)
                    .bind(now.as_millis())
                    .bind(now.as_millis())
                    .bind(now.as_millis())
                    .execute(tx.conn())
                    .await?;
                    let arrival = match &previous {
                        None if unreadable => Arrival::Reconnected,
                        None => Arrival::Joined,
                        Some(p) if p.status != NodeStatus::Ready => Arrival::Returned(p.status),
                        Some(_) => Arrival::Reconnected,
                    };
                    let message = match arrival {
                        Arrival::Joined => Some((EventKind::NodeJoined, format!(
                            "node {} joined: {} cpus, {} memory, {} gpus, engine {}",
                            hello.id,
                            hello.capacity.cpus,
                            boilerhouse_core::units::format_size(hello.capacity.memory_bytes),
                            hello.capacity.gpus,
                            hello.engine_version
                        ))),
                        Arrival::Returned(was) => {
                            Some((EventKind::NodeReturned, format!("node {} is back (was {was})", hello.id)))
                        }
                        Arrival::Reconnected => None,
                    };
                    if let Some((kind, message)) = message {
                        let event = NewEvent::new(now, kind, message)
                            .with_subject(node_subject(&hello.id))
                            .with_attribute("boot_id", hello.boot_id.clone())
                            .with_attribute("agent_version", hello.agent_version.clone());
                        insert_event(tx, event).await?;
                    }
                    let row: NodeRow = sql::query_as(select_node!("WHERE node_id = ?"))
                        .bind(hello.id.as_str())
                        .fetch_one(tx.conn())
                        .await?;
                    Ok((Node::try_from(row)?, arrival))
                }
                .boxed()
            })
            .await;
        // Committed or not, the next read of every node goes to the
        // database.
        self.node_list.invalidate();
        written
    }

    /// Records heartbeats: one write for a whole batch of nodes.
    pub async fn record_heartbeats(
        &self,
        beats: Vec<(NodeId, Timestamp)>,
    ) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let written = self
            .writer
            .write(move |tx| {
                async move {
                    for (node, at) in beats {
                        // Only ever forward; no scalar max() on PostgreSQL.
                        sql::query("UPDATE nodes SET last_heartbeat_at = ?1 WHERE node_id = ?2 AND last_heartbeat_at < ?1")
                            .bind(at.as_millis())
                            .bind(node.as_str())
                            .execute(tx.conn())
                            .await?;
                    }
                    Ok(())
                }
                .boxed()
            })
            .await;
        // Committed or not, the next read of every node goes to the
        // database.
        self.node_list.invalidate();
        written
    }

    /// Moves a node to `status`, recording the matching event.
    pub async fn set_node_status(
        &self,
        id: NodeId,
        status: NodeStatus,
        reason: String,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let written = self
            .writer
            .write(move |tx| {
                async move {
                    let previous: Option<(String,)> =
                        sql::query_as("SELECT status FROM nodes WHERE node_id = ?")
                            .bind(id.as_str())
                            .fetch_optional(tx.conn())
                            .await?;
                    let Some((previous,)) = previous else {
                        return Ok(());
                    };
                    if previous == status.as_str() {
                        return Ok(());
                    }
                    sql::query("UPDATE nodes SET status = ?, updated_at = ? WHERE node_id = ?")
                        .bind(status.as_str())
                        .bind(now.as_millis())
                        .bind(id.as_str())
                        .execute(tx.conn())
                        .await?;
                    let kind = match status {
                        NodeStatus::Ready => EventKind::NodeReturned,
                        NodeStatus::Suspect => EventKind::NodeSuspect,
                        NodeStatus::Lost => EventKind::NodeLost,
                    };
                    let event =
                        NewEvent::new(now, kind, format!("node {id} is {status}: {reason}"))
                            .with_subject(node_subject(&id))
                            .with_attribute("previous", previous);
                    insert_event(tx, event).await?;
                    Ok(())
                }
                .boxed()
            })
            .await;
        // Committed or not, the next read of every node goes to the
        // database.
        self.node_list.invalidate();
        written
    }

    /// Cordons or uncordons a node; records an event when it changes.
    /// `None` when the node is unknown.
    pub async fn set_cordoned(
        &self,
        id: NodeId,
        cordoned: bool,
        now: Timestamp,
    ) -> Result<Option<Node>, StoreError> {
        let written = self
            .writer
            .write(move |tx| {
                async move {
                    let row: Option<NodeRow> = sql::query_as(select_node!("WHERE node_id = ?"))
                        .bind(id.as_str())
                        .fetch_optional(tx.conn())
                        .await?;
                    let Some(row) = row else { return Ok(None) };
                    let mut node = Node::try_from(row)?;
                    if node.cordoned != cordoned {
                        sql::query(
                            "UPDATE nodes SET cordoned = ?, updated_at = ? WHERE node_id = ?",
                        )
                        .bind(cordoned)
                        .bind(now.as_millis())
                        .bind(id.as_str())
                        .execute(tx.conn())
                        .await?;
                        let (kind, verb) = if cordoned {
                            (
                                EventKind::NodeCordoned,
                                "cordoned: no new containers will be placed on it",
                            )
                        } else {
                            (EventKind::NodeUncordoned, "uncordoned")
                        };
                        insert_event(
                            tx,
                            NewEvent::new(now, kind, format!("node {id} {verb}"))
                                .with_subject(node_subject(&id)),
                        )
                        .await?;
                        node.cordoned = cordoned;
                    }
                    Ok(Some(node))
                }
                .boxed()
            })
            .await;
        // Committed or not, the next read of every node goes to the
        // database.
        self.node_list.invalidate();
        written
    }
}
