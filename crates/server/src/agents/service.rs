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
        let features = super::AgentFeatures {
            state_file_batches: hello.state_file_batches,
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
                report_parts: true,
            })),
        };
        outbound
            .send(Box::new(welcome))
            .await
            .map_err(|_| Status::unavailable("the agent closed the stream"))?;
        let session_cancel =
            self.registry
                .attach_agent(&node, session_id.clone(), outbound, now, features);
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
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            ReceiverStream::new(outbound_rx),
            |message| Ok(*message),
        ))))
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
    let mut report = ReportParts::default();
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
            pb::connect_request::Message::FullReport(part) => {
                let Some((observed_at, containers)) = report.add(node, part) else {
                    continue;
                };
                let (containers, foreign): (Vec<_>, Vec<_>) = containers
                    .into_iter()
                    .partition(|c| c.node_id() == Some(node.as_str()));
                let foreign: Vec<String> = foreign.into_iter().map(|c| c.docker_id).collect();
                // Each agent reports only its own node's containers.
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

/// Most containers one node's report may hold, and most bytes its parts
/// may take on the wire: beyond either is a misbehaving agent, not a host,
/// and its report is dropped, never taken in part. (Before parts, one
/// report was one message, under gRPC's 4 MiB.)
const MOST_REPORTED: usize = 65_536;
const MOST_REPORT_BYTES: usize = 64 << 20;

/// The parts of a full report received so far on one session.
#[derive(Default)]
struct ReportParts {
    /// The report being put together, if any.
    pending: Option<Pending>,
}

struct Pending {
    observed_at: Timestamp,
    /// The part expected next.
    next: u32,
    bytes: usize,
    containers: Vec<ObservedContainer>,
}

impl ReportParts {
    /// Takes in one part; the whole report, and when it was taken, once
    /// its last part is in. Only a report whose parts all came, in order,
    /// from part 0 is ever taken: a part out of place drops the report
    /// being put together (it was cut short), and parts after it are
    /// ignored until the next part 0.
    fn add(
        &mut self,
        node: &NodeId,
        part: pb::FullReport,
    ) -> Option<(Timestamp, Vec<ObservedContainer>)> {
        let whole = part.part == 0 && !part.more;
        let observed_at = match part.observed_at.as_ref().map(timestamp_from_pb) {
            Some(at) => at,
            // A report in one message, as before parts, may leave it out.
            None if whole => crate::clock::now(),
            None => {
                tracing::warn!(node = %node, "a part of a full report without observed_at is ignored");
                self.pending = None;
                return None;
            }
        };
        if part.part == 0 {
            if self.pending.take().is_some() {
                tracing::warn!(node = %node, "a full report was cut short by the next one; the partial one is dropped");
            }
            self.pending = Some(Pending {
                observed_at,
                next: 0,
                bytes: 0,
                containers: Vec::with_capacity(part.containers.len()),
            });
        }
        let Some(pending) = self
            .pending
            .as_mut()
            .filter(|p| p.observed_at == observed_at && p.next == part.part)
        else {
            if self.pending.take().is_some() {
                tracing::warn!(node = %node, part = part.part, "a part of a full report came out of place; the report is dropped");
            }
            return None;
        };
        pending.next += 1;
        pending.bytes += prost::Message::encoded_len(&part);
        for c in &part.containers {
            match ObservedContainer::try_from(c) {
                Ok(c) => pending.containers.push(c),
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "unreadable container in report")
                }
            }
        }
        if pending.containers.len() > MOST_REPORTED || pending.bytes > MOST_REPORT_BYTES {
            tracing::warn!(
                node = %node,
                most_containers = MOST_REPORTED,
                most_bytes = MOST_REPORT_BYTES,
                "a full report is larger than any node's; it is dropped"
            );
            self.pending = None;
            return None;
        }
        if part.more {
            return None;
        }
        self.pending.take().map(|p| (p.observed_at, p.containers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(n: usize) -> pb::ObservedContainer {
        pb::ObservedContainer {
            docker_id: format!("docker-{n}"),
            name: format!("c{n}"),
            labels: [(
                boilerhouse_core::container::labels::NODE_ID.to_owned(),
                "node-a".to_owned(),
            )]
            .into_iter()
            .collect(),
            docker_state: "running".into(),
            ..Default::default()
        }
    }

    fn parts(at: i64, n: usize) -> Vec<pb::FullReport> {
        convert::full_report_parts(
            convert::timestamp_to_pb(Timestamp::from_millis(at)),
            (0..n).map(container).collect(),
            String::new(),
            convert::REPORT_PART_CONTAINERS,
        )
    }

    fn node() -> NodeId {
        NodeId::new("node-a").unwrap()
    }

    /// Feeds `parts` in; what was taken, by the number of containers.
    fn feed(report: &mut ReportParts, parts: Vec<pb::FullReport>) -> Vec<usize> {
        parts
            .into_iter()
            .filter_map(|p| report.add(&node(), p))
            .map(|(_, c)| c.len())
            .collect()
    }

    /// A report is taken whole once its last part is in, never before,
    /// with every container in order.
    #[test]
    fn a_full_report_is_taken_only_whole() {
        let mut report = ReportParts::default();
        let whole = parts(1_000, 100);
        assert_eq!(
            whole.len(),
            100usize.div_ceil(convert::REPORT_PART_CONTAINERS),
            "100 containers in parts"
        );
        assert!(whole.len() > 1, "a report of 100 comes in parts");
        let mut taken = None;
        for (i, part) in whole.into_iter().enumerate() {
            assert!(taken.is_none(), "taken before part {i}");
            taken = report.add(&node(), part);
        }
        let (at, taken) = taken.expect("the last part completes the report");
        assert_eq!(at, Timestamp::from_millis(1_000));
        assert_eq!(
            taken
                .iter()
                .map(|c| c.docker_id.as_str())
                .collect::<Vec<_>>(),
            (0..100).map(|i| format!("docker-{i}")).collect::<Vec<_>>()
        );
        // No containers: one part, taken.
        assert_eq!(feed(&mut report, parts(2_000, 0)), vec![0]);
        // A report in one message from an agent that sends them whole.
        let one = convert::full_report_parts(
            convert::timestamp_to_pb(Timestamp::from_millis(3_000)),
            (0..100).map(container).collect(),
            String::new(),
            usize::MAX,
        );
        assert_eq!(feed(&mut report, one), vec![100]);
    }

    /// What is cut short, out of order or too large is dropped whole,
    /// never taken in part: a partial report would make every container
    /// it leaves out look gone.
    #[test]
    fn a_report_cut_short_out_of_order_or_too_large_is_never_taken_in_part() {
        let mut report = ReportParts::default();
        // Two parts of a report, then a newer report of three containers.
        let mut cut = parts(1_000, 64);
        cut.truncate(1);
        let mut next = parts(2_000, 3);
        cut.append(&mut next);
        assert_eq!(
            feed(&mut report, cut),
            vec![3],
            "nothing of the report cut short"
        );

        // A part missing from the middle: the rest of that report is
        // ignored, the next report is taken.
        let mut gap = parts(3_000, 100);
        gap.remove(1);
        gap.extend(parts(4_000, 5));
        assert_eq!(feed(&mut report, gap), vec![5]);

        // Parts of two reports interleaved: neither is taken.
        let a = parts(5_000, 64);
        let b = parts(6_000, 64);
        let mixed = vec![a[0].clone(), b[1].clone(), a[1].clone()];
        assert!(feed(&mut report, mixed).is_empty());

        // A part with no observed_at: dropped with its report.
        let mut unstamped = parts(7_000, 64);
        unstamped[1].observed_at = None;
        assert!(feed(&mut report, unstamped).is_empty());

        // Past the limit, the report is dropped and its later parts,
        // the last among them, do not make a report of their own.
        let huge = parts(8_000, MOST_REPORTED + 100);
        assert!(feed(&mut report, huge).is_empty());
        assert_eq!(feed(&mut report, parts(9_000, 40)), vec![40]);
    }
}
