//! NodeService: nodes appear when their agents join.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use boilerhouse_core::node::Node;
use boilerhouse_proto::convert::{self, node_to_pb, resources_to_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::node_service_server::NodeService;

use super::{AppState, idempotency};
use crate::error::ApiError;

/// NodeService over the store and the live sessions.
pub struct Nodes(pub AppState);

impl Nodes {
    fn to_pb(&self, node: &Node) -> pb::Node {
        let session = self.0.agents.session(&node.id);
        let mut out = node_to_pb(node, session.is_some());
        if let Some(s) = session {
            out.usage = Some(resources_to_pb(&s.usage));
            out.container_count = s.container_count;
            out.last_heartbeat_at = Some(convert::timestamp_to_pb(
                s.last_heartbeat.max(node.last_heartbeat_at),
            ));
        }
        out
    }

    async fn set_cordoned(
        &self,
        node_id: &str,
        request_id: &str,
        cordoned: bool,
        method: &'static str,
    ) -> Result<pb::Node, Status> {
        let id = convert::node_id("node_id", node_id).map_err(ApiError::from)?;
        let request = pb::CordonNodeRequest {
            node_id: node_id.to_owned(),
            request_id: request_id.to_owned(),
        };
        let state = &self.0;
        let node = idempotency::once(
            &state.store,
            &state.idempotency,
            method,
            request_id,
            &request,
            || async {
                let node = state
                    .store
                    .set_cordoned(id.clone(), cordoned, crate::clock::now())
                    .await?
                    .ok_or_else(|| ApiError::NotFound {
                        what: "node",
                        id: id.to_string(),
                    })?;
                Ok(self.to_pb(&node))
            },
        )
        .await?;
        Ok(node)
    }
}

#[tonic::async_trait]
impl NodeService for Nodes {
    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.0.store.list_nodes().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(|n| self.to_pb(n)).collect(),
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::GetNodeResponse>, Status> {
        let id = convert::node_id("node_id", &request.get_ref().node_id).map_err(ApiError::from)?;
        let node = self
            .0
            .store
            .get_node(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound {
                what: "node",
                id: id.to_string(),
            })?;
        Ok(Response::new(pb::GetNodeResponse {
            node: Some(self.to_pb(&node)),
        }))
    }

    async fn cordon_node(
        &self,
        request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::CordonNodeResponse>, Status> {
        let req = request.into_inner();
        let node = self
            .set_cordoned(
                &req.node_id,
                &req.request_id,
                true,
                "boilerhouse.v1.NodeService/CordonNode",
            )
            .await?;
        Ok(Response::new(pb::CordonNodeResponse { node: Some(node) }))
    }

    async fn uncordon_node(
        &self,
        request: Request<pb::UncordonNodeRequest>,
    ) -> Result<Response<pb::UncordonNodeResponse>, Status> {
        let req = request.into_inner();
        let node = self
            .set_cordoned(
                &req.node_id,
                &req.request_id,
                false,
                "boilerhouse.v1.NodeService/UncordonNode",
            )
            .await?;
        Ok(Response::new(pb::UncordonNodeResponse { node: Some(node) }))
    }

    type DrainNodeStream =
        Pin<Box<dyn Stream<Item = Result<pb::DrainNodeResponse, Status>> + Send>>;

    async fn drain_node(
        &self,
        _request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<Self::DrainNodeStream>, Status> {
        Err(
            ApiError::Unimplemented("node drain (it moves claims, which arrive with warm pools)")
                .into(),
        )
    }
}
