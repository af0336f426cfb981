//! Resource boosts.
//!
//! A boost and everything its admission decided (the boosts it preempted,
//! the request id, the events) commit in one [`BoostWrite`], so a crash
//! never leaves a boost admitted without its preemptions or the reverse.

use std::str::FromStr;

use futures::FutureExt as _;

use boilerhouse_core::boost::{Boost, BoostPriority, BoostResource, BoostStatus, BoostTarget};
use boilerhouse_core::event::NewEvent;
use boilerhouse_core::{BoostId, ContainerId, NodeId, TenantId, Timestamp, WorkloadId};

use super::events::insert_event;
use super::idempotency::insert_idempotent;
use super::lenient::{self, Lenient};
use super::sql;
use super::{IdempotentRecord, Store, StoreError};

/// One atomic change to boosts.
#[derive(Debug, Default)]
pub struct BoostWrite {
    /// Boosts to insert or update.
    pub boosts: Vec<Boost>,
    /// The request id this write answers.
    pub idempotency: Option<IdempotentRecord>,
    /// Events to record with it.
    pub events: Vec<NewEvent>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

#[derive(sqlx::FromRow)]
struct BoostRow {
    boost_id: String,
    target_node_id: Option<String>,
    target_container_id: Option<String>,
    target_tenant_id: Option<String>,
    target_workload_id: Option<String>,
    resource: String,
    amount: f64,
    priority: String,
    source_node_id: String,
    status: String,
    reason: String,
    requested_at: i64,
    allocated_at: Option<i64>,
    expires_at: i64,
    ended_at: Option<i64>,
}

macro_rules! select_boosts {
    ($tail:literal) => {
        concat!(
            "SELECT boost_id, target_node_id, target_container_id, target_tenant_id, \
             target_workload_id, resource, amount, priority, source_node_id, status, reason, \
             requested_at, allocated_at, expires_at, ended_at FROM boosts ",
            $tail
        )
    };
}

impl TryFrom<BoostRow> for Boost {
    type Error = StoreError;
    fn try_from(r: BoostRow) -> Result<Self, StoreError> {
        let container_id = r
            .target_container_id
            .as_deref()
            .map(ContainerId::from_str)
            .transpose()
            .map_err(|e| corrupt("boost container", e))?;
        let target = match (r.target_tenant_id, r.target_workload_id, r.target_node_id) {
            (Some(t), Some(w), _) => BoostTarget::Tenant(
                TenantId::new(t).map_err(|e| corrupt("boost tenant", e))?,
                WorkloadId::new(w).map_err(|e| corrupt("boost workload", e))?,
            ),
            (_, _, Some(n)) => {
                BoostTarget::Node(NodeId::new(n).map_err(|e| corrupt("boost node", e))?)
            }
            _ => BoostTarget::Container(
                container_id.ok_or_else(|| corrupt("boost target", "no target recorded"))?,
            ),
        };
        Ok(Boost {
            id: BoostId::from_str(&r.boost_id).map_err(|e| corrupt("boost id", e))?,
            target,
            container_id,
            resource: BoostResource::from_str(&r.resource).map_err(|e| corrupt("resource", e))?,
            amount: r.amount,
            priority: BoostPriority::from_str(&r.priority).map_err(|e| corrupt("priority", e))?,
            source_node: NodeId::new(r.source_node_id).map_err(|e| corrupt("source node", e))?,
            status: BoostStatus::from_str(&r.status).map_err(|e| corrupt("boost status", e))?,
            reason: r.reason,
            requested_at: Timestamp::from_millis(r.requested_at),
            allocated_at: r.allocated_at.map(Timestamp::from_millis),
            expires_at: Timestamp::from_millis(r.expires_at),
            ended_at: r.ended_at.map(Timestamp::from_millis),
        })
    }
}

impl Store {
    /// Commits one boost decision atomically.
    pub async fn apply_boost_write(&self, write: BoostWrite) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| {
                async move {
                    for b in &write.boosts {
                        let (node, tenant, workload) = match &b.target {
                            BoostTarget::Node(n) => (Some(n.as_str()), None, None),
                            BoostTarget::Container(_) => (None, None, None),
                            BoostTarget::Tenant(t, w) => (None, Some(t.as_str()), Some(w.as_str())),
                        };
                        sql::query(
                            "INSERT INTO boosts (boost_id, target_node_id, target_container_id, target_tenant_id, \
                             target_workload_id, resource, amount, priority, source_node_id, status, reason, \
                             requested_at, allocated_at, expires_at, ended_at) \
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                             ON CONFLICT (boost_id) DO UPDATE SET status = excluded.status, \
                             reason = excluded.reason, allocated_at = excluded.allocated_at, \
                             expires_at = excluded.expires_at, ended_at = excluded.ended_at"
                        )
                        .bind(b.id.to_string())
                        .bind(node)
                        .bind(b.container_id.map(|c| c.to_string()))
                        .bind(tenant)
                        .bind(workload)
                        .bind(b.resource.as_str())
                        .bind(b.amount)
                        .bind(b.priority.as_str())
                        .bind(b.source_node.as_str())
                        .bind(b.status.as_str())
                        .bind(&b.reason)
                        .bind(b.requested_at.as_millis())
                        .bind(b.allocated_at.map(Timestamp::as_millis))
                        .bind(b.expires_at.as_millis())
                        .bind(b.ended_at.map(Timestamp::as_millis))
                        .execute(tx.conn())
                        .await?;
                    }
                    if let Some(record) = &write.idempotency {
                        insert_idempotent(tx, record).await?;
                    }
                    for event in write.events {
                        insert_event(tx, event).await?;
                    }
                    Ok(())
                }
                .boxed()
            })
            .await
    }

    /// Pending and active boosts: what the ledger is rebuilt from.
    pub async fn live_boosts(&self) -> Result<Lenient<Boost>, StoreError> {
        let rows = sql::query(select_boosts!(
            "WHERE status IN ('pending', 'active') ORDER BY requested_at"
        ))
        .fetch_all(&self.reads)
        .await?;
        Ok(lenient::decode::<_, BoostRow, _>(rows, "boosts", |r| {
            lenient::text(r, "boost_id")
        }))
    }

    /// Boosts drawing from or raising `node` (all of them without a node),
    /// newest first; ended ones only when asked, and at most `limit`.
    pub async fn list_boosts(
        &self,
        node: Option<&NodeId>,
        include_ended: bool,
        limit: u32,
    ) -> Result<Vec<Boost>, StoreError> {
        // A container boost's node is its source: it draws from the host
        // its container runs on.
        let rows = sql::query(select_boosts!(
            "WHERE (?1 IS NULL OR source_node_id = ?1 OR target_node_id = ?1) \
             AND (?2 OR status IN ('pending', 'active')) ORDER BY requested_at DESC LIMIT ?3"
        ))
        .bind(node.map(NodeId::as_str))
        .bind(include_ended)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        // One unreadable boost (reported at startup) must not hide the rest.
        Ok(lenient::decode::<_, BoostRow, _>(rows, "boosts", |r| lenient::text(r, "boost_id")).0)
    }

    /// One boost.
    pub async fn get_boost(&self, id: &BoostId) -> Result<Option<Boost>, StoreError> {
        let row: Option<BoostRow> = sql::query_as(select_boosts!("WHERE boost_id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await?;
        row.map(Boost::try_from).transpose()
    }
}
