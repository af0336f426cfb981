//! NodeService. Nodes appear when agents join; cordon and drain arrive
//! with the agent protocol.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use boilerhouse_proto::convert::{self, node_to_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::node_service_server::NodeService;

use super::AppState;
use crate::error::ApiError;

/// NodeService over the store.
pub struct Nodes(pub AppState);

const AGENTS: &str = "the agent protocol (node cordon, uncordon and drain)";

#[tonic::async_trait]
impl NodeService for Nodes {
    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.0.store.list_nodes().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListNodesResponse {
            // No agent sessions exist yet, so no node is connected.
            nodes: nodes.iter().map(|n| node_to_pb(n, false)).collect(),
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
            node: Some(node_to_pb(&node, false)),
        }))
    }

    async fn cordon_node(
        &self,
        _request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::CordonNodeResponse>, Status> {
        Err(ApiError::Unimplemented(AGENTS).into())
    }

    async fn uncordon_node(
        &self,
        _request: Request<pb::UncordonNodeRequest>,
    ) -> Result<Response<pb::UncordonNodeResponse>, Status> {
        Err(ApiError::Unimplemented(AGENTS).into())
    }

    type DrainNodeStream =
        Pin<Box<dyn Stream<Item = Result<pb::DrainNodeResponse, Status>> + Send>>;

    async fn drain_node(
        &self,
        _request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<Self::DrainNodeStream>, Status> {
        Err(ApiError::Unimplemented(AGENTS).into())
    }
}
