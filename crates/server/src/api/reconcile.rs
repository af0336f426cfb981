//! ReconcileService: the plan (a dry run) and applying it.

use tonic::{Request, Response, Status};

use boilerhouse_core::reconcile::{Action, ActionKind, Desired};
use boilerhouse_proto::convert::{self, timestamp_to_pb};
use boilerhouse_proto::pb;

use super::{AppState, idempotency};
use crate::error::ApiError;
use crate::reconcile::Outcome;

/// ReconcileService.
pub struct Reconcile(pub AppState);

fn action_to_pb(a: &Action, desired: &Desired) -> pb::ReconcileAction {
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
    let row = container.and_then(|id| desired.containers.iter().find(|c| c.id == id));
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
        Ok(Response::new(pb::PlanReconcileResponse {
            actions: actions.iter().map(|a| action_to_pb(a, &desired)).collect(),
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
                Ok(pb::ApplyReconcileResponse {
                    results: applied
                        .iter()
                        .map(|a| pb::ReconcileActionResult {
                            action: Some(action_to_pb(&a.action, &desired)),
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
