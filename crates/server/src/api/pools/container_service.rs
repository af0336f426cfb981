//! ContainerService: listing, inspecting and destroying containers.

use tonic::{Request, Response, Status};

use boilerhouse_core::ContainerId;
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::pool::decide::Refusal;
use boilerhouse_proto::pb;

use super::conversions::{container_to_pb, state_to_pb};
use crate::api::{AppState, idempotency};
use crate::error::ApiError;
use crate::pools::PoolError;

/// ContainerService.
pub struct Containers(pub AppState);

#[tonic::async_trait]
impl pb::container_service_server::ContainerService for Containers {
    async fn list_containers(
        &self,
        request: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let req = request.into_inner();
        let mut containers: Vec<ContainerRecord> = self
            .0
            .pools
            .containers()
            .into_iter()
            .filter(|c| req.workload_id.is_empty() || c.workload_id.as_str() == req.workload_id)
            .filter(|c| req.node_id.is_empty() || c.node_id.as_str() == req.node_id)
            .filter(|c| {
                req.tenant_id.is_empty()
                    || c.tenant_id
                        .as_ref()
                        .is_some_and(|t| t.as_str() == req.tenant_id)
            })
            .filter(|c| req.state == 0 || state_to_pb(c.state) as i32 == req.state)
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(Response::new(pb::ListContainersResponse {
            containers: containers.iter().map(container_to_pb).collect(),
        }))
    }

    async fn get_container(
        &self,
        request: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::GetContainerResponse>, Status> {
        let id: ContainerId =
            request
                .get_ref()
                .container_id
                .parse()
                .map_err(|e: boilerhouse_core::IdError| {
                    ApiError::invalid("container_id", e.to_string())
                })?;
        let c = self
            .0
            .pools
            .container(&id)
            .ok_or_else(|| ApiError::from(PoolError::from(Refusal::UnknownContainer(id))))?;
        Ok(Response::new(pb::GetContainerResponse {
            container: Some(container_to_pb(&c)),
        }))
    }

    async fn destroy_container(
        &self,
        request: Request<pb::DestroyContainerRequest>,
    ) -> Result<Response<pb::DestroyContainerResponse>, Status> {
        let req = request.into_inner();
        let id: ContainerId =
            req.container_id
                .parse()
                .map_err(|e: boilerhouse_core::IdError| {
                    ApiError::invalid("container_id", e.to_string())
                })?;
        let state = &self.0;
        let response = idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.ContainerService/DestroyContainer",
            &req.request_id,
            &req,
            || async {
                let c = state
                    .tenancy
                    .destroy(&id, req.force, "destroyed by an operator")
                    .await?;
                Ok(pb::DestroyContainerResponse {
                    container: Some(container_to_pb(&c)),
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }
}
