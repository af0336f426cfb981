//! WorkloadService.

use tonic::{Request, Response, Status};

use boilerhouse_proto::convert::{self, timestamp_to_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::workload_service_server::WorkloadService;

use super::AppState;
use super::idempotency;
use crate::error::ApiError;
use crate::store::WorkloadChange;
use crate::workloads::EditError;

/// WorkloadService over the workload directory.
pub struct Workloads(pub AppState);

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::Invalid(err) => {
                let field = if err.field.is_empty() {
                    "yaml".to_owned()
                } else {
                    format!("yaml.{}", err.field)
                };
                ApiError::invalid(field, err.reason)
            }
            EditError::Refused(refusals) => ApiError::InvalidFields(
                refusals
                    .into_iter()
                    .map(|r| {
                        (
                            format!("yaml.{}", r.field),
                            format!("refused by the admission policy: {}", r.reason),
                        )
                    })
                    .collect(),
            ),
            EditError::NotFound(id) => ApiError::NotFound {
                what: "workload",
                id: id.to_string(),
            },
            EditError::Conflict(message) => ApiError::FailedPrecondition(message),
            EditError::Io { path, source } => {
                tracing::error!(path = %path.display(), error = %source, "cannot write workload file");
                ApiError::Unavailable(format!("cannot write the workload file: {source}"))
            }
            EditError::Store(e) => e.into(),
        }
    }
}

#[tonic::async_trait]
impl WorkloadService for Workloads {
    async fn list_workloads(
        &self,
        _request: Request<pb::ListWorkloadsRequest>,
    ) -> Result<Response<pb::ListWorkloadsResponse>, Status> {
        let workloads = self
            .0
            .store
            .list_workloads()
            .await
            .map_err(ApiError::from)?;
        let load_errors = self
            .0
            .workloads
            .load_errors()
            .into_iter()
            .map(|e| pb::WorkloadLoadError {
                path: e.error.file,
                field: e.error.field,
                reason: e.error.reason,
                observed_at: Some(timestamp_to_pb(e.observed_at)),
            })
            .collect();
        Ok(Response::new(pb::ListWorkloadsResponse {
            workloads: workloads.iter().map(pb::Workload::from).collect(),
            load_errors,
        }))
    }

    async fn get_workload(
        &self,
        request: Request<pb::GetWorkloadRequest>,
    ) -> Result<Response<pb::GetWorkloadResponse>, Status> {
        let id = convert::workload_id("workload_id", &request.get_ref().workload_id)
            .map_err(ApiError::from)?;
        let record = self
            .0
            .store
            .get_workload(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound {
                what: "workload",
                id: id.to_string(),
            })?;
        Ok(Response::new(pb::GetWorkloadResponse {
            workload: Some(pb::Workload::from(&record)),
        }))
    }

    async fn apply_workload(
        &self,
        request: Request<pb::ApplyWorkloadRequest>,
    ) -> Result<Response<pb::ApplyWorkloadResponse>, Status> {
        let req = request.into_inner();
        if req.yaml.trim().is_empty() {
            return Err(ApiError::invalid("yaml", "is required").into());
        }
        let state = &self.0;
        let response = idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.WorkloadService/ApplyWorkload",
            &req.request_id,
            &req,
            || async {
                let (record, change) = state
                    .workloads
                    .apply(&req.yaml, req.dry_run, crate::clock::now())
                    .await?;
                let outcome = match change {
                    None => pb::ApplyOutcome::Valid,
                    Some(WorkloadChange::Created) => pb::ApplyOutcome::Created,
                    Some(WorkloadChange::Updated) => pb::ApplyOutcome::Updated,
                    Some(WorkloadChange::Unchanged) => pb::ApplyOutcome::Unchanged,
                };
                Ok(pb::ApplyWorkloadResponse {
                    workload: Some(pb::Workload::from(&record)),
                    outcome: outcome as i32,
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn delete_workload(
        &self,
        request: Request<pb::DeleteWorkloadRequest>,
    ) -> Result<Response<pb::DeleteWorkloadResponse>, Status> {
        let req = request.into_inner();
        let id = convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let state = &self.0;
        let response = idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.WorkloadService/DeleteWorkload",
            &req.request_id,
            &req,
            || async {
                let record = state.workloads.delete(&id, crate::clock::now()).await?;
                Ok(pb::DeleteWorkloadResponse {
                    workload: Some(pb::Workload::from(&record)),
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }
}
