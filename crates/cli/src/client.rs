//! The connection to boilerhoused and one method per command.

use serde::Serialize;
use tonic::service::interceptor::InterceptedService;

use boilerhouse_proto::tls::BearerToken;
use tonic::{Code, Status};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::node_service_client::NodeServiceClient;
use boilerhouse_proto::pb::system_service_client::SystemServiceClient;

use crate::failover::{CallError, Failover};
use crate::output::{self, Format, print_structured, print_table, table};

/// A failed command, in one sentence.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No server could be reached, or none that would take the call.
    #[error(
        "cannot reach boilerhoused at {}. Is it running? Set --server or BOILERHOUSE_ADDR.",
        tried_text(.tried)
    )]
    Unreachable {
        /// Each address tried, with why it failed, briefly.
        tried: Vec<(String, String)>,
    },
    /// The connection broke after a call that is not safe to repeat was
    /// sent.
    #[error(
        "the connection to boilerhoused at {addr} broke after the request was sent ({reason}), so it may or may not have taken effect; check before running the command again"
    )]
    Dropped {
        /// The server.
        addr: String,
        /// What broke.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{0}")]
    Server(String),
    /// A local input problem.
    #[error("{0}")]
    Input(String),
    /// Output could not be written.
    #[error("cannot print the result: {0}")]
    Output(String),
}

impl CliError {
    /// 2 for usage and input errors, 1 otherwise, like most CLIs.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            _ => 1,
        }
    }
}

/// "at ADDR: REASON", or "at any of its addresses: A (why); B (why)".
fn tried_text(tried: &[(String, String)]) -> String {
    match tried {
        [(addr, reason)] => format!("{addr}: {reason}"),
        _ => {
            let each: Vec<String> = tried
                .iter()
                .map(|(addr, reason)| format!("{addr} ({reason})"))
                .collect();
            format!("any of its addresses: {}", each.join("; "))
        }
    }
}

/// A URL from `host:port` too: https when a CA is given, as with grpcurl's
/// `-cacert`.
fn normalise(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// How `bh` proves who it is and checks whom it talks to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The bearer token.
    pub token: Option<&'a str>,
    /// The CA of an https:// server.
    pub ca: Option<&'a std::path::Path>,
    /// The server's name in its certificate, if not the URL's host.
    pub server_name: Option<&'a str>,
}

/// A client of the servers of `--server`; see [`crate::failover`].
pub struct Client {
    channel: InterceptedService<Failover, BearerToken>,
    failover: Failover,
}

impl Client {
    /// Checks the addresses and TLS settings; the servers are connected to
    /// by the first call.
    pub fn connect(addrs: &[String], credentials: Credentials<'_>) -> Result<Self, CliError> {
        let tls = credentials.ca.is_some();
        let addrs: Vec<String> = boilerhouse_proto::servers::split_addresses(addrs)
            .iter()
            .map(|a| normalise(a, tls))
            .collect();
        let https = boilerhouse_proto::servers::check_schemes("--server", &addrs)
            .map_err(CliError::Input)?;
        for addr in &addrs {
            tonic::transport::Endpoint::from_shared(addr.clone()).map_err(|e| {
                CliError::Input(format!("--server {addr:?} is not a valid address: {e}"))
            })?;
        }
        let tls = if https {
            let ca_path = credentials.ca.ok_or_else(|| {
                CliError::Input(format!(
                    "{} is https: set --ca or BOILERHOUSE_CA to the installation's ca.pem (./dev/run writes data/bh.env, which sets it)",
                    addrs.join(",")
                ))
            })?;
            let ca = std::fs::read(ca_path)
                .map_err(|e| CliError::Input(format!("--ca {}: {e}", ca_path.display())))?;
            Some(boilerhouse_proto::tls::client_tls(
                &ca,
                None,
                credentials.server_name,
            ))
        } else {
            None
        };
        let token = BearerToken::new(credentials.token)
            .map_err(|e| CliError::Input(format!("--token: {e}")))?;
        let failover = Failover::new(addrs, tls);
        Ok(Self {
            channel: InterceptedService::new(failover.clone(), token),
            failover,
        })
    }

    /// The server the last call was answered by.
    pub fn server(&self) -> String {
        self.failover.current()
    }

    /// The channel, for command modules.
    pub fn channel(&self) -> InterceptedService<Failover, BearerToken> {
        self.channel.clone()
    }

    /// Turns a status into one sentence, with field violations.
    pub fn fail(&self, status: Status) -> CliError {
        use std::error::Error as _;
        match status.source().and_then(|e| e.downcast_ref::<CallError>()) {
            Some(CallError::Unreachable(tried)) => {
                return CliError::Unreachable {
                    tried: tried.clone(),
                };
            }
            Some(CallError::Dropped { addr, reason }) => {
                return CliError::Dropped {
                    addr: addr.clone(),
                    reason: reason.clone(),
                };
            }
            None => {}
        }
        if status.code() == Code::Unavailable && status.message().contains("transport") {
            return CliError::Unreachable {
                tried: vec![(self.server(), "the connection dropped".into())],
            };
        }
        use tonic_types::StatusExt as _;
        let mut text = format!("{}: {}", code_name(status.code()), status.message());
        if status.code() == Code::Unauthenticated {
            text.push_str(" (set --token or BOILERHOUSE_TOKEN)");
        }
        if let Some(bad) = status.get_error_details().bad_request() {
            for v in &bad.field_violations {
                if !status.message().contains(&v.description) {
                    text.push_str(&format!("\n  {}: {}", v.field, v.description));
                }
            }
        }
        CliError::Server(text)
    }

    pub async fn node_list(&self, format: Format) -> Result<(), CliError> {
        let resp = NodeServiceClient::new(self.channel())
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let nodes: Vec<NodeView> = resp.nodes.iter().map(NodeView::from).collect();
        if format != Format::Table {
            return print_structured(format, &nodes).map_err(CliError::Output);
        }
        if nodes.is_empty() {
            out!("No nodes. Start boilerhouse-agent on a Docker host to add one.");
            return Ok(());
        }
        let mut t = table(&[
            "NAME",
            "STATUS",
            "CPUS",
            "MEMORY",
            "GPUS",
            "AGENT",
            "ENGINE",
            "LAST HEARTBEAT",
        ]);
        for (n, raw) in nodes.iter().zip(&resp.nodes) {
            let status = if n.cordoned {
                format!("{},cordoned", n.status)
            } else {
                n.status.clone()
            };
            t.add_row(vec![
                n.name.clone(),
                status,
                format!("{}", n.cpus),
                boilerhouse_core::units::format_size(n.memory_bytes),
                n.gpus.to_string(),
                n.agent_version.clone(),
                n.engine_version.clone(),
                format!("{} ago", output::age(raw.last_heartbeat_at.as_ref())),
            ]);
        }
        print_table(&t);
        Ok(())
    }

    pub async fn node_get(&self, id: &str, format: Format) -> Result<(), CliError> {
        let resp = NodeServiceClient::new(self.channel())
            .get_node(pb::GetNodeRequest {
                node_id: id.to_owned(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let view = NodeView::from(&resp.node.unwrap_or_default());
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        print_structured(Format::Yaml, &view).map_err(CliError::Output)
    }

    pub async fn node_cordon(
        &self,
        id: &str,
        cordon: bool,
        format: Format,
    ) -> Result<(), CliError> {
        let mut client = NodeServiceClient::new(self.channel());
        let node = if cordon {
            client
                .cordon_node(pb::CordonNodeRequest {
                    node_id: id.to_owned(),
                    request_id: String::new(),
                })
                .await
                .map_err(|s| self.fail(s))?
                .into_inner()
                .node
        } else {
            client
                .uncordon_node(pb::UncordonNodeRequest {
                    node_id: id.to_owned(),
                    request_id: String::new(),
                })
                .await
                .map_err(|s| self.fail(s))?
                .into_inner()
                .node
        };
        let view = NodeView::from(&node.unwrap_or_default());
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        out!(
            "node/{} {}",
            view.name,
            if cordon { "cordoned" } else { "uncordoned" }
        );
        Ok(())
    }

    pub async fn status(&self, format: Format) -> Result<(), CliError> {
        let s = SystemServiceClient::new(self.channel())
            .get_system_status(pb::GetSystemStatusRequest {})
            .await
            .map_err(|e| self.fail(e))?
            .into_inner();
        let view = StatusView::from(&s);
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        out!("Server:     {} (boilerhoused {})", self.server(), s.version);
        out!(
            "Up since:   {} ({})",
            output::time(s.started_at.as_ref()),
            output::age(s.started_at.as_ref())
        );
        out!("Database:   {}", s.database_path);
        out!(
            "Workloads:  {} loaded, {} failing, from {}",
            s.workload_count,
            s.workload_load_errors,
            s.workloads_dir
        );
        out!(
            "Nodes:      {} known, {} ready, {} agents connected",
            s.node_count,
            s.nodes_ready,
            s.agents_connected
        );
        out!("Last event: {}", s.last_event_id);
        out!();
        let mut t = table(&["TASK", "PERIOD", "RUNS", "LAST RUN", "TOOK", "RESULT"]);
        for task in &s.tasks {
            let result = if task.last_error.is_empty() {
                task.last_status_json.clone()
            } else {
                format!("error: {}", task.last_error)
            };
            t.add_row(vec![
                task.name.clone(),
                output::duration(task.period.as_ref()),
                task.activations.to_string(),
                if task.last_started_at.is_some() {
                    format!("{} ago", output::age(task.last_started_at.as_ref()))
                } else {
                    "never".into()
                },
                output::duration(task.last_duration.as_ref()),
                result,
            ]);
        }
        print_table(&t);
        Ok(())
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::Unavailable => "unavailable",
        Code::Unimplemented => "not implemented",
        Code::PermissionDenied => "permission denied",
        Code::Unauthenticated => "unauthenticated",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Aborted => "aborted",
        Code::Cancelled => "cancelled",
        _ => "error",
    }
}

#[derive(Serialize)]
struct NodeView {
    name: String,
    status: String,
    cordoned: bool,
    connected: bool,
    cpus: f64,
    memory_bytes: u64,
    gpus: u32,
    agent_version: String,
    engine_version: String,
    labels: std::collections::BTreeMap<String, String>,
    first_seen_at: String,
    last_heartbeat_at: String,
}

impl From<&pb::Node> for NodeView {
    fn from(n: &pb::Node) -> Self {
        let status = match pb::NodeStatus::try_from(n.status) {
            Ok(pb::NodeStatus::Ready) => "ready",
            Ok(pb::NodeStatus::Suspect) => "suspect",
            Ok(pb::NodeStatus::Lost) => "lost",
            _ => "unknown",
        };
        let capacity = n.capacity.unwrap_or_default();
        Self {
            name: n.node_id.clone(),
            status: status.to_owned(),
            cordoned: n.cordoned,
            connected: n.connected,
            cpus: capacity.cpus,
            memory_bytes: capacity.memory_bytes,
            gpus: capacity.gpus,
            agent_version: n.agent_version.clone(),
            engine_version: n.engine_version.clone(),
            labels: n.labels.clone().into_iter().collect(),
            first_seen_at: output::time(n.first_seen_at.as_ref()),
            last_heartbeat_at: output::time(n.last_heartbeat_at.as_ref()),
        }
    }
}

#[derive(Serialize)]
struct TaskView {
    name: String,
    period: String,
    activations: u64,
    last_started_at: String,
    last_duration: String,
    last_status: serde_json::Value,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
}

#[derive(Serialize)]
struct StatusView {
    version: String,
    started_at: String,
    database_path: String,
    workloads_dir: String,
    workload_count: u32,
    workload_load_errors: u32,
    node_count: u32,
    nodes_ready: u32,
    agents_connected: u32,
    last_event_id: u64,
    tasks: Vec<TaskView>,
}

impl From<&pb::GetSystemStatusResponse> for StatusView {
    fn from(s: &pb::GetSystemStatusResponse) -> Self {
        Self {
            version: s.version.clone(),
            started_at: output::time(s.started_at.as_ref()),
            database_path: s.database_path.clone(),
            workloads_dir: s.workloads_dir.clone(),
            workload_count: s.workload_count,
            workload_load_errors: s.workload_load_errors,
            node_count: s.node_count,
            nodes_ready: s.nodes_ready,
            agents_connected: s.agents_connected,
            last_event_id: s.last_event_id,
            tasks: s
                .tasks
                .iter()
                .map(|t| TaskView {
                    name: t.name.clone(),
                    period: output::duration(t.period.as_ref()),
                    activations: t.activations,
                    last_started_at: output::time(t.last_started_at.as_ref()),
                    last_duration: output::duration(t.last_duration.as_ref()),
                    last_status: serde_json::from_str(&t.last_status_json)
                        .unwrap_or(serde_json::Value::Null),
                    last_error: t.last_error.clone(),
                })
                .collect(),
        }
    }
}
