//! SystemService: what `bh status` shows.

use tonic::{Request, Response, Status};

use boilerhouse_core::Timestamp;
use boilerhouse_core::node::NodeStatus;
use boilerhouse_proto::convert::{duration_to_pb, timestamp_to_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::system_service_server::SystemService;

use super::AppState;
use crate::error::ApiError;

/// SystemService.
pub struct System(pub AppState);

#[tonic::async_trait]
impl SystemService for System {
    async fn get_system_status(
        &self,
        _request: Request<pb::GetSystemStatusRequest>,
    ) -> Result<Response<pb::GetSystemStatusResponse>, Status> {
        let state = &self.0;
        let workloads = state.store.list_workloads().await.map_err(ApiError::from)?;
        let nodes = state.store.list_nodes().await.map_err(ApiError::from)?;
        let last_event_id = state.store.last_event_id().await.map_err(ApiError::from)?;
        let tasks = state
            .driver
            .statuses()
            .into_iter()
            .map(|(name, s)| pb::BackgroundTaskStatus {
                name: name.to_owned(),
                period: Some(duration_to_pb(s.period)),
                activations: s.activations,
                last_started_at: s
                    .last_started_at
                    .map(|t| timestamp_to_pb(Timestamp::from_system_time(t))),
                last_duration: s.last_duration.map(duration_to_pb),
                last_status_json: s.last_status.to_string(),
                last_error: s.last_error.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::GetSystemStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Some(timestamp_to_pb(state.started_at)),
            database_path: state.store.location().to_string(),
            workloads_dir: state.workloads.dir().display().to_string(),
            workload_count: workloads.len() as u32,
            workload_load_errors: state.workloads.load_errors().len() as u32,
            node_count: nodes.len() as u32,
            nodes_ready: nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Ready)
                .count() as u32,
            agents_connected: state.agents.connected() as u32,
            tasks,
            last_event_id,
        }))
    }
}
