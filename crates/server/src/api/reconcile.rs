//! ReconcileService: the plan (a dry run) and applying it.

use std::collections::{HashMap, HashSet};

use tonic::{Request, Response, Status};

use boilerhouse_core::ContainerId;
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::reconcile::{Action, ActionKind, Desired};
use boilerhouse_proto::convert::{self, timestamp_to_pb};
use boilerhouse_proto::pb;

use super::{AppState, idempotency};
use crate::error::ApiError;
use crate::reconcile::Outcome;

/// ReconcileService.
pub struct Reconcile(pub AppState);

/// The rows the actions name, by id: one pass over the rows for all of
/// them. Looking each up in the rows was a scan per action, and a fresh
/// database under a big fleet plans an adoption per container: 100,000
/// scans of 100,000 rows.
type Rows<'a> = HashMap<ContainerId, &'a ContainerRecord>;

fn rows_named<'a>(actions: impl Iterator<Item = &'a Action>, desired: &'a Desired) -> Rows<'a> {
    let named: HashSet<ContainerId> = actions.filter_map(Action::container_id).collect();
    if named.is_empty() {
        return Rows::new();
    }
    desired
        .containers
        .iter()
        .filter(|c| named.contains(&c.id))
        .map(|c| (c.id, &**c))
        .collect()
}

fn action_to_pb(a: &Action, rows: &Rows<'_>) -> pb::ReconcileAction {
    let (kind, docker_id, workload) = match &a.kind {
        ActionKind::MarkLost { .. } => ("mark_lost", String::new(), String::new()),
        ActionKind::Drain { .. } => ("drain", String::new(), String::new()),
        ActionKind::Resume { .. } => ("resume", String::new(), String::new()),
        ActionKind::Reclaim { .. } => ("reclaim", String::new(), String::new()),
        ActionKind::Adopt { observed } => (
            "adopt",
            observed.docker_id.clone(),
            observed
                .workload_id()
                .map(|w| w.to_string())
                .unwrap_or_default(),
        ),
        ActionKind::Destroy { docker_id, .. } => ("destroy", docker_id.clone(), String::new()),
    };
    let container = a.container_id();
    let row = container.and_then(|id| rows.get(&id).copied());
    let tenant = match &a.kind {
        ActionKind::Adopt { observed } => observed
            .state_file
            .as_ref()
            .and_then(|s| s.tenant_id.clone()),
        ActionKind::Reclaim { state, .. } => state
            .tenant_id
            .clone()
            .or_else(|| state.last_tenant_id.clone()),
        _ => row.and_then(|r| r.tenant_id.clone()),
    };
    pb::ReconcileAction {
        kind: kind.to_owned(),
        node_id: a.node_id.to_string(),
        container_id: container.map(|c| c.to_string()).unwrap_or_default(),
        docker_id: if docker_id.is_empty() {
            row.and_then(|r| r.docker_id.clone()).unwrap_or_default()
        } else {
            docker_id
        },
        workload_id: if workload.is_empty() {
            row.map(|r| r.workload_id.to_string()).unwrap_or_default()
        } else {
            workload
        },
        tenant_id: tenant.map(|t| t.to_string()).unwrap_or_default(),
        reason: a.reason.clone(),
        not_before: a.not_before.map(timestamp_to_pb),
    }
}

#[tonic::async_trait]
impl pb::reconcile_service_server::ReconcileService for Reconcile {
    async fn plan_reconcile(
        &self,
        request: Request<pb::PlanReconcileRequest>,
    ) -> Result<Response<pb::PlanReconcileResponse>, Status> {
        let req = request.into_inner();
        let only = if req.node_id.is_empty() {
            None
        } else {
            Some(std::collections::BTreeSet::from([convert::node_id(
                "node_id",
                &req.node_id,
            )
            .map_err(ApiError::from)?]))
        };
        let now = crate::clock::now();
        let (actions, desired) = self
            .0
            .reconciler
            .plan(only.as_ref(), now)
            .await
            .map_err(ApiError::from)?;
        let rows = rows_named(actions.iter(), &desired);
        Ok(Response::new(pb::PlanReconcileResponse {
            actions: actions.iter().map(|a| action_to_pb(a, &rows)).collect(),
            planned_at: Some(timestamp_to_pb(now)),
        }))
    }

    async fn apply_reconcile(
        &self,
        request: Request<pb::ApplyReconcileRequest>,
    ) -> Result<Response<pb::ApplyReconcileResponse>, Status> {
        let req = request.into_inner();
        let only = if req.node_id.is_empty() {
            None
        } else {
            Some(std::collections::BTreeSet::from([convert::node_id(
                "node_id",
                &req.node_id,
            )
            .map_err(ApiError::from)?]))
        };
        let state = &self.0;
        let response = idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.ReconcileService/ApplyReconcile",
            &req.request_id,
            &req,
            || async {
                let desired = Desired {
                    containers: state.pools.containers_shared(),
                    ..Default::default()
                };
                let applied = state.reconciler.apply(only.as_ref()).await?;
                let rows = rows_named(applied.iter().map(|a| &a.action), &desired);
                Ok(pb::ApplyReconcileResponse {
                    results: applied
                        .iter()
                        .map(|a| pb::ReconcileActionResult {
                            action: Some(action_to_pb(&a.action, &rows)),
                            ok: a.result.is_ok(),
                            moot: a.result == Ok(Outcome::Moot),
                            error: a.result.clone().err().unwrap_or_default(),
                        })
                        .collect(),
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use boilerhouse_core::pool::ContainerState;
    use boilerhouse_core::workload::Limits;
    use boilerhouse_core::{NodeId, TenantId, Timestamp, WorkloadId};

    use super::*;

    fn row(n: u128, tenant: Option<&str>) -> Arc<ContainerRecord> {
        Arc::new(ContainerRecord {
            id: ContainerId::from_uuid(uuid::Uuid::from_u128(n)),
            workload_id: WorkloadId::new(format!("w{n}")).unwrap(),
            node_id: NodeId::new("n1").unwrap(),
            docker_id: Some(format!("docker-{n}")),
            state: ContainerState::Claimed,
            spec_hash: "h".into(),
            tenant_id: tenant.map(|t| TenantId::new(t).unwrap()),
            last_tenant_id: None,
            claim_generation: 1,
            revision: 1,
            limits: Limits::default(),
            state_path: String::new(),
            comm_path: String::new(),
            created_at: Timestamp::from_millis(1),
            updated_at: Timestamp::from_millis(1),
        })
    }

    #[test]
    fn each_action_shows_its_own_rows_docker_id_workload_and_tenant() {
        let desired = Desired {
            containers: (0..50)
                .map(|n| row(n, (n % 2 == 0).then_some("t-even")))
                .collect(),
            ..Default::default()
        };
        let actions: Vec<Action> = [7u128, 12, 999]
            .iter()
            .map(|n| Action {
                kind: ActionKind::MarkLost {
                    container_id: ContainerId::from_uuid(uuid::Uuid::from_u128(*n)),
                },
                node_id: NodeId::new("n1").unwrap(),
                reason: "gone".into(),
                not_before: None,
            })
            .collect();
        let rows = rows_named(actions.iter(), &desired);
        assert_eq!(rows.len(), 2, "only the rows the actions name");
        let shown: Vec<_> = actions.iter().map(|a| action_to_pb(a, &rows)).collect();
        assert_eq!(
            (
                shown[0].docker_id.as_str(),
                shown[0].workload_id.as_str(),
                shown[0].tenant_id.as_str()
            ),
            ("docker-7", "w7", "")
        );
        assert_eq!(
            (
                shown[1].docker_id.as_str(),
                shown[1].workload_id.as_str(),
                shown[1].tenant_id.as_str()
            ),
            ("docker-12", "w12", "t-even")
        );
        // A container with no row says so by its empty fields.
        assert_eq!(
            shown[2].container_id,
            actions[2].container_id().unwrap().to_string()
        );
        assert_eq!(
            (shown[2].docker_id.as_str(), shown[2].workload_id.as_str()),
            ("", "")
        );
    }
}
