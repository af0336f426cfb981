//! `AgentService.Connect`: the server's end of an agent's stream.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use boilerhouse_core::auth::Principal;
use boilerhouse_core::container::{ContainerEvent, ContainerEventKind, ObservedContainer};
use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::node::Resources;
use boilerhouse_core::{NodeId, Timestamp};
use boilerhouse_proto::convert::{self, duration_to_pb, timestamp_from_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::agent_service_server::AgentService;

use super::{NodeSignal, Registry};
use crate::error::ApiError;
use crate::store::{Arrival, NodeHello, Store};

/// How long an agent has to say Hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Timing the server hands every agent in its Welcome.
#[derive(Debug, Clone, Copy)]
pub struct AgentTiming {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// How often agents send an unrequested full report.
    pub full_report_interval: Duration,
}

/// The AgentService.
pub struct Agents {
    /// The database.
    pub store: Store,
    /// Live sessions.
    pub registry: Registry,
    /// Welcome timing.
    pub timing: AgentTiming,
    /// Ends every session at shutdown.
    pub shutdown: CancellationToken,
}

fn hello_from_pb(hello: &pb::Hello) -> Result<NodeHello, ApiError> {
    let id = convert::node_id("hello.node_id", &hello.node_id)?;
    let capacity = match &hello.capacity {
        Some(c) => convert::resources_from_pb("hello.capacity", c)?,
        None => Resources::default(),
    };
    Ok(NodeHello {
        id,
        boot_id: hello.boot_id.clone(),
        agent_version: hello.agent_version.clone(),
        engine_version: hello.engine_version.clone(),
        capacity,
        labels: hello.labels.clone().into_iter().collect(),
        state_root: hello.state_root.clone(),
    })
}

#[tonic::async_trait]
impl AgentService for Agents {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ConnectResponse, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // The auth layer admitted only a node certificate (or, with
        // --insecure, anyone): the certificate, not the Hello, names the node.
        let certified = match request.extensions().get::<Principal>() {
            Some(Principal::Node(node)) => Some(node.clone()),
            Some(Principal::Insecure) => None,
            _ => {
                return Err(Status::permission_denied(
                    "AgentService.Connect needs a node certificate",
                ));
            }
        };
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no Hello within 10s of opening the stream",
                ));
            }
            Ok(message) => message?,
        };
        let Some(pb::ConnectRequest {
            message: Some(pb::connect_request::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::failed_precondition(
                "the first message on the stream must be Hello",
            ));
        };
        let hello = hello_from_pb(&hello)?;
        let node = hello.id.clone();
        if let Some(certified) = certified
            && certified != node
        {
            let message = format!(
                "the client certificate is node {certified}'s, but Hello says {node}; refused"
            );
            record(
                &self.store,
                NewEvent::new(crate::clock::now(), EventKind::NodeImpersonation, &message)
                    .with_subject(EventSubject {
                        node_id: Some(node.to_string()),
                        ..Default::default()
                    })
                    .with_attribute("certificate_node", certified.to_string()),
            )
            .await;
            return Err(Status::permission_denied(message));
        }
        let now = crate::clock::now();
        let (record, arrival) = self
            .store
            .register_node(hello, now)
            .await
            .map_err(ApiError::from)?;

        let session_id = boilerhouse_core::ids::Uuid::now_v7().to_string();
        let (outbound, outbound_rx) = mpsc::channel(1024);
        let welcome = pb::ConnectResponse {
            message: Some(pb::connect_response::Message::Welcome(pb::Welcome {
                node_id: node.to_string(),
                session_id: session_id.clone(),
                heartbeat_interval: Some(duration_to_pb(self.timing.heartbeat_interval)),
                desired_generation: 0,
                full_report_interval: Some(duration_to_pb(self.timing.full_report_interval)),
            })),
        };
        outbound
            .send(Ok(welcome))
            .await
            .map_err(|_| Status::unavailable("the agent closed the stream"))?;
        let session_cancel = self
            .registry
            .attach(&node, session_id.clone(), outbound, now);
        match arrival {
            Arrival::Joined => {
                tracing::info!(node = %node, session = %session_id, cpus = record.capacity.cpus, "node joined")
            }
            Arrival::Returned(was) => {
                tracing::info!(node = %node, session = %session_id, %was, "node returned")
            }
            Arrival::Reconnected => {
                tracing::info!(node = %node, session = %session_id, "agent reconnected")
            }
        }

        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let store = self.store.clone();
        tokio::spawn(async move {
            let reason = read_loop(
                &node,
                &registry,
                &store,
                &mut inbound,
                &session_cancel,
                &shutdown,
            )
            .await;
            registry.detach(&node, &session_id);
            tracing::info!(node = %node, session = %session_id, reason = %reason, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound_rx))))
    }
}

/// Reads the agent's messages until the stream ends; returns why.
async fn read_loop(
    node: &NodeId,
    registry: &Registry,
    store: &Store,
    inbound: &mut Streaming<pb::ConnectRequest>,
    session_cancel: &CancellationToken,
    shutdown: &CancellationToken,
) -> String {
    loop {
        let message = tokio::select! {
            // Cancel-safe: observing a token loses nothing.
            () = shutdown.cancelled() => return "server shutting down".into(),
            () = session_cancel.cancelled() => return "replaced by a newer session".into(),
            // Cancel-safe: Streaming::message keeps partial frames buffered.
            message = inbound.message() => message,
        };
        let message = match message {
            Ok(Some(m)) => m,
            Ok(None) => return "stream closed by the agent".into(),
            Err(status) => return format!("stream error: {}", status.message()),
        };
        let Some(message) = message.message else {
            continue;
        };
        match message {
            pb::connect_request::Message::Hello(_) => {
                tracing::warn!(node = %node, "ignoring a second Hello on one stream");
            }
            pb::connect_request::Message::Heartbeat(beat) => {
                let at = beat
                    .at
                    .as_ref()
                    .map(timestamp_from_pb)
                    .unwrap_or_else(crate::clock::now);
                // The agent's clock may be off; never record a heartbeat
                // from the future.
                let at = at.min(crate::clock::now());
                let usage = beat
                    .usage
                    .as_ref()
                    .and_then(|u| convert::resources_from_pb("usage", u).ok())
                    .unwrap_or_default();
                registry.heartbeat(node, at, usage, beat.container_count);
            }
            pb::connect_request::Message::FullReport(report) => {
                let observed_at: Timestamp = report
                    .observed_at
                    .as_ref()
                    .map(timestamp_from_pb)
                    .unwrap_or_else(crate::clock::now);
                let mut containers = Vec::with_capacity(report.containers.len());
                let mut foreign = Vec::new();
                for c in &report.containers {
                    match ObservedContainer::try_from(c) {
                        // Each agent reports only its own node's containers.
                        Ok(c) if c.node_id() == Some(node.as_str()) => containers.push(c),
                        Ok(c) => foreign.push(c.docker_id),
                        Err(e) => {
                            tracing::warn!(node = %node, error = %e, "unreadable container in report")
                        }
                    }
                }
                if !foreign.is_empty() {
                    restricted(store, node, "a full report", &foreign).await;
                }
                tracing::debug!(node = %node, containers = containers.len(), "full report");
                registry.full_report(node, observed_at, containers);
            }
            pb::connect_request::Message::ContainerEvent(event) => {
                match ContainerEvent::try_from(&event) {
                    Ok(event) => {
                        registry.container_event(node, &event);
                        match event.kind {
                            ContainerEventKind::Activity => {
                                if let Some(container) = event.container_id {
                                    registry.publish(NodeSignal::Activity {
                                        node: node.clone(),
                                        container,
                                        at: event.at.min(crate::clock::now()),
                                    });
                                }
                            }
                            ContainerEventKind::Destroy => {
                                registry.publish(NodeSignal::ContainerGone {
                                    node: node.clone(),
                                    docker_id: event.docker_id.clone(),
                                    container: event.container_id,
                                })
                            }
                            _ => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "unreadable container event")
                    }
                }
            }
            pb::connect_request::Message::CommandResult(result) => {
                if let Some(foreign) = registry.complete(node, result) {
                    restricted(store, node, "a command result", &[foreign]).await;
                }
            }
        }
    }
}

/// Records that `node`'s agent spoke, in `what`, of containers labelled
/// with another node, and that it was ignored.
async fn restricted(store: &Store, node: &NodeId, what: &str, docker_ids: &[String]) {
    tracing::warn!(node = %node, what, containers = docker_ids.len(), "refused what an agent said about another node's containers");
    let shown: Vec<&str> = docker_ids
        .iter()
        .take(5)
        .map(|d| &d[..d.len().min(12)])
        .collect();
    record(
        store,
        NewEvent::new(
            crate::clock::now(),
            EventKind::NodeRestricted,
            format!(
                "node {node} sent {what} about {} container(s) of other nodes; ignored",
                docker_ids.len()
            ),
        )
        .with_subject(EventSubject {
            node_id: Some(node.to_string()),
            ..Default::default()
        })
        .with_attribute("docker_ids", shown.join(",")),
    )
    .await;
}

async fn record(store: &Store, event: NewEvent) {
    if let Err(e) = store.append_event(event).await {
        tracing::warn!(error = %e, "cannot record an agent's refused message");
    }
}
