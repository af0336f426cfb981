//! A fake control plane: an `AgentService` server inside the test process,
//! so a test can drive a real `boilerhouse-agent` with exact commands and
//! see exactly what it reports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use boilerhouse_proto::convert::duration_to_pb;
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::agent_service_server::{AgentService, AgentServiceServer};

type Outbound = mpsc::UnboundedSender<Result<pb::ConnectResponse, Status>>;

/// What an agent sent, with the node it came from.
pub type Received = (String, pb::connect_request::Message);

/// Everything received so far, in order, and a wake-up for waiters.
#[derive(Default)]
struct History {
    messages: Mutex<Vec<Received>>,
    grew: tokio::sync::Notify,
}

impl History {
    fn push(&self, item: Received) {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(item);
        self.grew.notify_waiters();
    }
}

#[derive(Clone)]
struct Service {
    inbound: Arc<History>,
    outbound: Arc<Mutex<HashMap<String, Outbound>>>,
}

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ConnectResponse, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut stream = request.into_inner();
        let Some(pb::ConnectRequest {
            message: Some(pb::connect_request::Message::Hello(hello)),
        }) = stream.message().await?
        else {
            return Err(Status::failed_precondition("expected Hello"));
        };
        let node = hello.node_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let welcome = pb::Welcome {
            node_id: node.clone(),
            session_id: uuid::Uuid::now_v7().to_string(),
            heartbeat_interval: Some(duration_to_pb(Duration::from_millis(500))),
            desired_generation: 0,
            full_report_interval: Some(duration_to_pb(Duration::from_secs(30))),
            // As a server before report parts: each report comes whole,
            // which the agent tests read one message at a time.
            report_parts: false,
        };
        let _ = tx.send(Ok(pb::ConnectResponse {
            message: Some(pb::connect_response::Message::Welcome(welcome)),
        }));
        self.outbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), tx);
        self.inbound
            .push((node.clone(), pb::connect_request::Message::Hello(hello)));
        let inbound = self.inbound.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(m) = message.message {
                    inbound.push((node.clone(), m));
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// The fake server.
pub struct FakeControlPlane {
    /// Where it listens.
    pub addr: SocketAddr,
    inbound: Arc<History>,
    outbound: Arc<Mutex<HashMap<String, Outbound>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeControlPlane {
    /// Starts it on a loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inbound = Arc::new(History::default());
        let outbound = Arc::new(Mutex::new(HashMap::new()));
        let service = Service {
            inbound: inbound.clone(),
            outbound: outbound.clone(),
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Ok(Self {
            addr,
            inbound,
            outbound,
            _server: server,
        })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A position in the history: messages received from now on are
    /// after it.
    pub fn cursor(&self) -> usize {
        self.inbound
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The first message since the start that `pick` accepts, waiting for
    /// it if need be.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        pick: impl FnMut(&str, &pb::connect_request::Message) -> Option<T>,
    ) -> anyhow::Result<T> {
        self.wait_for_after(0, timeout, what, pick).await
    }

    /// The first message after `cursor` that `pick` accepts.
    pub async fn wait_for_after<T>(
        &self,
        cursor: usize,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&str, &pb::connect_request::Message) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut next = cursor;
        loop {
            let grew = self.inbound.grew.notified();
            {
                let messages = self
                    .inbound
                    .messages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                while next < messages.len() {
                    let (node, message) = &messages[next];
                    next += 1;
                    if let Some(value) = pick(node, message) {
                        return Ok(value);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, grew).await.is_err() {
                anyhow::bail!("timed out after {timeout:?} waiting for {what}");
            }
        }
    }

    /// Sends a command to `node`'s current session.
    pub fn send(&self, node: &str, command: pb::Command) -> anyhow::Result<()> {
        let outbound = self.outbound.lock().unwrap_or_else(|e| e.into_inner());
        let tx = outbound
            .get(node)
            .ok_or_else(|| anyhow::anyhow!("{node} is not connected"))?;
        tx.send(Ok(pb::ConnectResponse {
            message: Some(pb::connect_response::Message::Command(command)),
        }))
        .map_err(|_| anyhow::anyhow!("{node}'s session is closed"))
    }

    /// Sends `command` and waits for its result.
    pub async fn run(
        &self,
        node: &str,
        command: pb::Command,
        timeout: Duration,
    ) -> anyhow::Result<pb::CommandResult> {
        let id = command.command_id.clone();
        let cursor = self.cursor();
        self.send(node, command)?;
        self.wait_for_after(
            cursor,
            timeout,
            &format!("the result of {id}"),
            |from, m| match m {
                pb::connect_request::Message::CommandResult(r)
                    if from == node && r.command_id == id =>
                {
                    Some(r.clone())
                }
                _ => None,
            },
        )
        .await
    }
}
