//! ReconcileService: the dry run. `PlanReconcile` shows what the planner
//! in `core::reconcile` would do right now, with reasons and due times.
//! Applying the plan arrives with crash recovery; `ApplyReconcile` says so.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::{Request, Response, Status};

use boilerhouse_core::reconcile::{ActionKind, Desired, Evidence, PlanConfig, plan};
use boilerhouse_proto::convert::{self, timestamp_to_pb};
use boilerhouse_proto::pb;

use super::AppState;
use crate::error::ApiError;

/// Grace periods of the planner. A row must miss from fresh reports this
/// long before it is lost; an unknown container must be this old before it
/// is destroyed.
pub const PLAN_CONFIG: PlanConfig = PlanConfig {
    lost_grace: Duration::from_secs(30),
    creation_grace: Duration::from_secs(60),
};

/// ReconcileService.
pub struct Reconcile(pub AppState);

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
            Some(convert::node_id("node_id", &req.node_id).map_err(ApiError::from)?)
        };
        let state = &self.0;
        let now = crate::clock::now();
        let workloads = state.store.list_workloads().await.map_err(ApiError::from)?;
        let desired = Desired {
            containers: state.pools.containers(),
            workloads: workloads
                .iter()
                .map(|w| (w.spec.id.clone(), w.spec_hash.clone()))
                .collect(),
        };
        let mut observed = BTreeMap::new();
        for node in state.store.list_nodes().await.map_err(ApiError::from)? {
            // Evidence only from a connected agent that has sent a full
            // report: anything else is missing evidence.
            let evidence = match (
                state.agents.session(&node.id),
                state.agents.report(&node.id),
            ) {
                (Some(_), Some(report)) => match report.observed_at {
                    Some(observed_at) => Evidence::Known {
                        observed_at,
                        containers: report.containers.into_values().collect(),
                    },
                    None => Evidence::Unknown,
                },
                _ => Evidence::Unknown,
            };
            observed.insert(node.id, evidence);
        }
        let tenants: BTreeMap<_, _> = desired
            .containers
            .iter()
            .map(|c| (c.id, c.tenant_id.clone()))
            .collect();
        let actions = plan(&desired, &observed, now, &PLAN_CONFIG)
            .into_iter()
            .filter(|a| only.as_ref().is_none_or(|n| &a.node_id == n))
            .map(|a| {
                let (kind, docker_id, workload) = match &a.kind {
                    ActionKind::MarkLost { .. } => ("mark_lost", String::new(), String::new()),
                    ActionKind::Drain { .. } => ("drain", String::new(), String::new()),
                    ActionKind::Adopt { observed } => (
                        "adopt",
                        observed.docker_id.clone(),
                        observed
                            .workload_id()
                            .map(|w| w.to_string())
                            .unwrap_or_default(),
                    ),
                    ActionKind::Destroy { docker_id, .. } => {
                        ("destroy", docker_id.clone(), String::new())
                    }
                };
                let container = a.container_id();
                let row = container.and_then(|id| desired.containers.iter().find(|c| c.id == id));
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
                    tenant_id: container
                        .and_then(|id| tenants.get(&id).cloned().flatten())
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    reason: a.reason.clone(),
                    not_before: a.not_before.map(timestamp_to_pb),
                }
            })
            .collect();
        Ok(Response::new(pb::PlanReconcileResponse {
            actions,
            planned_at: Some(timestamp_to_pb(now)),
        }))
    }

    async fn apply_reconcile(
        &self,
        _: Request<pb::ApplyReconcileRequest>,
    ) -> Result<Response<pb::ApplyReconcileResponse>, Status> {
        Err(
            ApiError::Unimplemented("applying a reconciliation plan (PlanReconcile shows it)")
                .into(),
        )
    }
}
