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

    /// Drains a node, as `kubectl drain` or a Nomad drain would: cordon
    /// it, upload every claimed container's files (the final upload),
    /// release those claims so their tenants' next claim lands elsewhere
    /// with their files, end its reservations and remove its idle
    /// containers. Progress streams until the node holds no container or
    /// the deadline (default 5 minutes) passes. A container whose upload
    /// fails is kept, never destroyed, and reported as remaining.
    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<Self::DrainNodeStream>, Status> {
        let req = request.into_inner();
        let id = convert::node_id("node_id", &req.node_id).map_err(ApiError::from)?;
        let now = crate::clock::now();
        let deadline = match &req.deadline {
            Some(t) => {
                let at = convert::timestamp_from_pb(t);
                if at <= now {
                    return Err(ApiError::invalid("deadline", "is in the past").into());
                }
                at.saturating_since(now)
            }
            None => std::time::Duration::from_secs(300),
        };
        self.0
            .store
            .set_cordoned(id.clone(), true, now)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound {
                what: "node",
                id: id.to_string(),
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let state = self.0.clone();
        tokio::spawn(async move {
            drain(state, id, deadline, tx).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

type DrainSink = tokio::sync::mpsc::Sender<Result<pb::DrainNodeResponse, Status>>;

/// What remains on `node`: containers, and of them the claimed ones.
fn remaining(state: &AppState, node: &boilerhouse_core::NodeId) -> (u32, u32) {
    let containers: Vec<_> = state
        .pools
        .containers()
        .into_iter()
        .filter(|c| &c.node_id == node)
        .collect();
    let claims = containers
        .iter()
        .filter(|c| c.state == boilerhouse_core::pool::ContainerState::Claimed)
        .count();
    (containers.len() as u32, claims as u32)
}

async fn progress(
    state: &AppState,
    node: &boilerhouse_core::NodeId,
    tx: &DrainSink,
    message: String,
    done: bool,
) -> bool {
    let (containers_remaining, claims_remaining) = remaining(state, node);
    tx.send(Ok(pb::DrainNodeResponse {
        containers_remaining,
        claims_remaining,
        message,
        done,
    }))
    .await
    .is_ok()
}

async fn drain(
    state: AppState,
    node: boilerhouse_core::NodeId,
    deadline: std::time::Duration,
    tx: DrainSink,
) {
    use boilerhouse_core::pool::ContainerState;
    let started = std::time::Instant::now();
    if !progress(&state, &node, &tx, format!("cordoned {node}"), false).await {
        return;
    }
    let finals = crate::syncs::final_uploads(
        &state.syncs,
        &state.pools,
        crate::syncs::SyncReason::Drain,
        Some(&node),
        deadline,
    )
    .await;
    let message = format!(
        "final uploads: {} done, {} failed, {} unfinished",
        finals.ok, finals.failed, finals.unfinished
    );
    if !progress(&state, &node, &tx, message, false).await {
        return;
    }
    for g in state
        .pools
        .active_claims()
        .into_iter()
        .filter(|g| g.container.node_id == node)
    {
        // Release runs the upload on release again (incremental: only what
        // changed since the final upload moves); if it fails the container
        // is kept for its tenant and the upload retried.
        let outcome = state
            .tenancy
            .release(
                &g.claim.tenant_id,
                &g.claim.workload_id,
                Some(g.claim.generation),
                &format!("node {node} drained"),
                None,
            )
            .await;
        let message = match outcome {
            Ok(_) => format!(
                "released {}'s claim of {}",
                g.claim.tenant_id, g.claim.workload_id
            ),
            Err(e) => format!(
                "cannot release {}'s claim of {}: {e}",
                g.claim.tenant_id, g.claim.workload_id
            ),
        };
        if !progress(&state, &node, &tx, message, false).await {
            return;
        }
    }
    for r in state
        .pools
        .reservations()
        .into_iter()
        .filter(|r| r.node_id == node)
    {
        if state.syncs.release_upload_owed(&r.container_id) {
            continue;
        }
        if let Err(e) = state
            .pools
            .end_reservation(
                &r.tenant_id,
                &r.workload_id,
                boilerhouse_core::pool::decide::ReservationEnd::Revoked,
            )
            .await
        {
            tracing::warn!(error = %e, "drain: cannot end a reservation");
        }
    }
    for c in state.pools.containers().into_iter().filter(|c| {
        c.node_id == node && matches!(c.state, ContainerState::Idle | ContainerState::Warming)
    }) {
        if let Err(e) = state
            .pools
            .drain(
                &c.id,
                boilerhouse_core::pool::decide::DrainScope::Unowned,
                &format!("node {node} drained"),
            )
            .await
        {
            tracing::warn!(error = %e, "drain: cannot remove an idle container");
        }
    }
    loop {
        let (containers, _) = remaining(&state, &node);
        if containers == 0 {
            let _ = progress(&state, &node, &tx, format!("node {node} is drained"), true).await;
            return;
        }
        if started.elapsed() >= deadline {
            let _ = progress(
                &state,
                &node,
                &tx,
                format!("deadline passed with {containers} containers left on {node} (owed uploads keep theirs)"),
                true,
            )
            .await;
            return;
        }
        tokio::select! {
            // Cancel-safe: closed() only watches the receiver.
            () = tx.closed() => return,
            // The poll period of the progress stream: removals are the
            // refiller's and the agent's, and report no completion of their
            // own. Cancel-safe: a sleep has no state to lose.
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}
