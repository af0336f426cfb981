//! One test cluster for every multi-process test: a real boilerhoused with
//! its SQLite data in a temp directory, real agents (one per named node) on
//! the local Docker engine, and the workload files the test asks for.
//!
//! Tests say what they need, not how to start it:
//!
//! ```ignore
//! let Some(c) = Cluster::builder()
//!     .node("pool")
//!     .config("lost_grace = \"2s\"")
//!     .workload("demo", |image| format!("id: demo\nimage: {image}\npool: {{min_size: 1}}\n"))
//!     .start()
//!     .await
//! else {
//!     return; // no Docker engine: the test skipped loudly
//! };
//! c.wait_idle("demo", 1).await;
//! ```
//!
//! With [`ClusterBuilder::multihost`] every process runs on a host of its
//! own on a private network the test can break (see `multihost.rs` and
//! [`crate::netns`]).
//!
//! Admission is on, as in production, with one allowance: local sync sinks
//! anywhere in the cluster's directory (the server's policy file and every
//! agent's `--allow-sink-root`). [`ClusterBuilder::policy`] replaces the
//! server's policy and [`ClusterBuilder::agent_args`] adds agent flags.
//!
//! The server keeps its data directory and address across `restart_server`,
//! so agents find it again on their own. Dropping the cluster kills every
//! process and removes the containers of its nodes that carry this test
//! run's label (see [`crate::docker::TEST_RUN_LABEL`]); the run's image is
//! shared by every test of the run and is removed by `dev/test` at the end.

mod database;
mod multihost;
pub use multihost::HOST_LABEL;
mod offline;
mod waits;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Output};
use std::time::Duration;

use boilerhouse_proto::tls::AuthedChannel;
use bollard::Docker;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::boost_service_client::BoostServiceClient;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::pb::event_service_client::EventServiceClient;
use boilerhouse_proto::pb::node_service_client::NodeServiceClient;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;
use boilerhouse_proto::pb::sync_service_client::SyncServiceClient;

use crate::docker::{remove_node_containers_blocking, require_docker, test_image, unique_node};
use crate::{AgentOptions, AgentProcess, ServerOptions, ServerProcess, stderr, stdout};

/// How long wait helpers poll before they fail the test, unless the
/// builder says otherwise.
pub const WAIT: Duration = Duration::from_secs(60);

/// Server configuration every cluster starts from: heartbeats fast enough
/// that tests see nodes join quickly, a Suspect window (25 heartbeats)
/// that a loaded machine never trips on a healthy node, and on PostgreSQL
/// a short leader lease, so a server killed and started again leads soon.
pub const DEFAULT_CONFIG: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "5s"
leader_lease = "2s"
"#;

/// Makes a workload's YAML from the test image's reference.
type WorkloadYaml = Box<dyn FnOnce(&str) -> String + Send>;

/// What a [`Cluster`] should be made of; [`ClusterBuilder::start`] makes it.
pub struct ClusterBuilder {
    dir: tempfile::TempDir,
    nodes: Vec<String>,
    labels: Vec<(String, String)>,
    workloads: Vec<(String, WorkloadYaml)>,
    config: toml::Table,
    timeout: Duration,
    policy: Option<String>,
    agent_args: Vec<String>,
    insecure: bool,
    multihost: bool,
    /// `--database`, when the cluster names its own (see
    /// [`ClusterBuilder::database`]).
    database: Option<String>,
}

impl ClusterBuilder {
    /// Runs the server with `--insecure` (plaintext, no tokens, agents
    /// without certificates), to compare against the secure default.
    pub fn insecure(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// The directory the cluster will live in (data, workloads, agents'
    /// state roots), for paths a workload must name before it starts.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds an agent for a node named `prefix` plus a unique suffix, so tests
    /// side by side on one engine never see each other's containers.
    pub fn node(mut self, prefix: &str) -> Self {
        self.nodes.push(prefix.to_owned());
        self
    }

    /// A label every agent of the cluster reports for its node.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Writes `workloads/<file>.yaml` before the server starts; `yaml` gets
    /// the test image's reference.
    pub fn workload(
        mut self,
        file: &str,
        yaml: impl FnOnce(&str) -> String + Send + 'static,
    ) -> Self {
        self.workloads.push((file.to_owned(), Box::new(yaml)));
        self
    }

    /// Server configuration (TOML) merged over [`DEFAULT_CONFIG`]: a key
    /// given here replaces the default's.
    pub fn config(mut self, toml: &str) -> Self {
        merge_config(&mut self.config, toml);
        self
    }

    /// How long wait helpers poll before they fail the test ([`WAIT`] by
    /// default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The server's admission policy file (TOML), instead of the default
    /// that allows local sinks anywhere in the cluster's directory. It is
    /// [`Cluster::policy_file`]; rewrite it and restart the server to
    /// change the policy.
    pub fn policy(mut self, toml: &str) -> Self {
        self.policy = Some(toml.to_owned());
        self
    }

    /// Extra flags for every agent, e.g. `--allow-host-network`.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Starts the server and the agents and waits until every node is ready
    /// and connected. `None` when there is no Docker engine (the test then
    /// skips, loudly); any other failure panics with the logs.
    pub async fn start(self) -> Option<Cluster> {
        let docker = require_docker().await?;
        let hosts = if self.multihost {
            Some(multihost::Hosts::new()?)
        } else {
            None
        };
        let image = test_image(&docker).await.expect("import the test image");
        let root = self.dir.path();
        let workloads = root.join("workloads");
        std::fs::create_dir_all(&workloads).expect("create the workload directory");
        for (file, yaml) in self.workloads {
            std::fs::write(workloads.join(format!("{file}.yaml")), yaml(&image))
                .expect("write a workload file");
        }
        let policy_file = root.join(POLICY_FILE);
        let policy = self
            .policy
            .unwrap_or_else(|| format!("local_sink_roots = [{:?}]\n", root.display().to_string()));
        std::fs::write(&policy_file, policy).expect("write the admission policy");
        let mut config = self.config;
        config
            .entry("policy_file")
            .or_insert_with(|| policy_file.display().to_string().into());
        let options = server_options(
            &config,
            None,
            self.insecure,
            hosts.as_ref(),
            self.database.as_deref(),
        );
        let server = ServerProcess::start_in(root, options)
            .await
            .expect("start boilerhoused");
        let mut cluster = Cluster {
            docker,
            image,
            listen: server.addrs.grpc,
            server,
            agents: Vec::new(),
            config,
            insecure: self.insecure,
            labels: self.labels,
            agent_args: self.agent_args,
            timeout: self.timeout,
            dir: self.dir,
            hosts,
            database: self.database,
        };
        for prefix in &self.nodes {
            cluster.spawn_agent(prefix, None);
        }
        cluster.wait_ready().await;
        Some(cluster)
    }
}

/// A running server and its agents; see the module documentation.
pub struct Cluster {
    docker: Docker,
    image: String,
    server: ServerProcess,
    listen: SocketAddr,
    agents: Vec<AgentProcess>,
    config: toml::Table,
    insecure: bool,
    labels: Vec<(String, String)>,
    timeout: Duration,
    dir: tempfile::TempDir,
    agent_args: Vec<String>,
    /// The network, when every process runs on a host of its own; dropped
    /// after the processes.
    hosts: Option<multihost::Hosts>,
    database: Option<String>,
}

/// The server's admission policy file, in the cluster's directory.
const POLICY_FILE: &str = "policy.toml";

impl Cluster {
    /// A cluster with no nodes, no workloads and [`DEFAULT_CONFIG`].
    pub fn builder() -> ClusterBuilder {
        let mut config = toml::Table::new();
        merge_config(&mut config, DEFAULT_CONFIG);
        ClusterBuilder {
            dir: tempfile::tempdir().expect("create the cluster's directory"),
            nodes: Vec::new(),
            labels: Vec::new(),
            workloads: Vec::new(),
            config,
            timeout: WAIT,
            policy: None,
            agent_args: Vec::new(),
            insecure: false,
            multihost: false,
            database: None,
        }
    }

    /// The Docker engine.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The test image's reference.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The directory everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's admission policy file; see [`ClusterBuilder::policy`].
    pub fn policy_file(&self) -> std::path::PathBuf {
        self.dir.path().join(POLICY_FILE)
    }

    /// How long wait helpers poll.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The server process: its log, addresses and database file.
    pub fn server(&self) -> &ServerProcess {
        &self.server
    }

    /// `https://host:port` of the server's gRPC API.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The name of the `i`th node, in the order they were added.
    pub fn node(&self, i: usize) -> &str {
        &self.agents[i].options.node_name
    }

    /// Every node's name, in the order they were added.
    pub fn node_names(&self) -> Vec<String> {
        self.agents
            .iter()
            .map(|a| a.options.node_name.clone())
            .collect()
    }

    /// The `i`th node's agent: its log and state root.
    pub fn agent(&self, i: usize) -> &AgentProcess {
        &self.agents[i]
    }

    /// Starts an agent for a new node (named like [`ClusterBuilder::node`])
    /// and waits until it is ready; returns its index.
    pub async fn add_node(&mut self, prefix: &str) -> usize {
        self.spawn_agent(prefix, None);
        self.wait_ready().await;
        self.agents.len() - 1
    }

    /// [`Cluster::add_node`] with an agent given `server` as its
    /// `--server` (a list, say, of which this cluster's server is one),
    /// and the cluster's TLS settings for all of it.
    pub async fn add_node_via(&mut self, prefix: &str, server: &str) -> usize {
        self.spawn_agent(prefix, Some(server));
        self.wait_ready().await;
        self.agents.len() - 1
    }

    /// kill -9 the `i`th agent.
    pub fn kill_agent(&mut self, i: usize) {
        self.agents[i].kill();
    }

    /// kill -9 the `i`th agent (if it runs) and start it again with the same
    /// node name and state root. It reconnects on its own.
    pub fn restart_agent(&mut self, i: usize) {
        self.agents[i].restart().expect("restart an agent");
    }

    /// kill -9 the server.
    pub fn kill_server(&mut self) {
        self.server.kill();
    }

    /// SIGTERM the server and wait for it to exit.
    pub async fn stop_server(&mut self) -> ExitStatus {
        self.server
            .signal_and_wait(nix::sys::signal::Signal::SIGTERM, self.timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.server.log()))
    }

    /// Starts the server again on the same address, data and workloads,
    /// with the configuration as it is now. Call it once the old one is
    /// stopped or killed.
    pub async fn start_server(&mut self) {
        self.server = ServerProcess::start_in(
            self.dir.path(),
            server_options(
                &self.config,
                Some(self.listen),
                self.insecure,
                self.hosts.as_ref(),
                self.database.as_deref(),
            ),
        )
        .await
        .expect("start boilerhoused again");
    }

    /// kill -9 the server and start it again.
    pub async fn restart_server(&mut self) {
        self.kill_server();
        self.start_server().await;
    }

    /// Merges more configuration (TOML) in, from the server's next start.
    pub fn extend_config(&mut self, toml: &str) {
        merge_config(&mut self.config, toml);
    }

    /// Writes (or replaces) `workloads/<file>.yaml`; the server watches the
    /// directory.
    pub fn write_workload(&self, file: &str, yaml: &str) {
        std::fs::write(
            self.server.workloads_dir().join(format!("{file}.yaml")),
            yaml,
        )
        .expect("write a workload file");
    }

    /// A gRPC channel to the server, presenting the admin token.
    pub async fn channel(&self) -> AuthedChannel {
        self.server
            .channel()
            .await
            .unwrap_or_else(|e| panic!("connect to the server: {e}\n{}", self.server.log()))
    }

    /// A ClaimService client.
    pub async fn claims(&self) -> ClaimServiceClient<AuthedChannel> {
        ClaimServiceClient::new(self.channel().await)
    }

    /// A PoolService client.
    pub async fn pools(&self) -> PoolServiceClient<AuthedChannel> {
        PoolServiceClient::new(self.channel().await)
    }

    /// A NodeService client.
    pub async fn nodes(&self) -> NodeServiceClient<AuthedChannel> {
        NodeServiceClient::new(self.channel().await)
    }

    /// A BoostService client.
    pub async fn boosts(&self) -> BoostServiceClient<AuthedChannel> {
        BoostServiceClient::new(self.channel().await)
    }

    /// A SyncService client.
    pub async fn syncs(&self) -> SyncServiceClient<AuthedChannel> {
        SyncServiceClient::new(self.channel().await)
    }

    /// An EventService client.
    pub async fn events(&self) -> EventServiceClient<AuthedChannel> {
        EventServiceClient::new(self.channel().await)
    }

    /// Claims `workload` for `tenant`, waiting up to 60 s for a container.
    pub async fn try_claim(
        &self,
        tenant: &str,
        workload: &str,
    ) -> Result<pb::ClaimInfo, tonic::Status> {
        let response = self
            .claims()
            .await
            .claim(pb::ClaimRequest {
                tenant_id: tenant.into(),
                workload_id: workload.into(),
                acquire_timeout: Some(boilerhouse_proto::convert::duration_to_pb(
                    Duration::from_secs(60),
                )),
                ..Default::default()
            })
            .await?;
        Ok(response.into_inner().claim.expect("a claim in the answer"))
    }

    /// [`Cluster::try_claim`], failing the test (with the server log) when
    /// the claim fails.
    pub async fn claim(&self, tenant: &str, workload: &str) -> pb::ClaimInfo {
        self.try_claim(tenant, workload)
            .await
            .unwrap_or_else(|e| panic!("claim: {e}\n{}", self.server.log()))
    }

    /// The pool of `workload`.
    pub async fn pool(&self, workload: &str) -> pb::Pool {
        self.pools()
            .await
            .get_pool(pb::GetPoolRequest {
                pool_id: workload.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("get pool {workload}: {e}\n{}", self.server.log()))
            .into_inner()
            .pool
            .expect("a pool in the answer")
    }

    /// Runs the real `bh` against the server.
    pub fn bh(&self, args: &[&str]) -> Output {
        self.server.bh(args)
    }

    /// Runs `bh` and returns its stdout, failing the test if it fails.
    pub fn bh_ok(&self, args: &[&str]) -> String {
        let out = self.bh(args);
        assert!(
            out.status.success(),
            "bh {args:?} failed: {}\n{}",
            stderr(&out),
            self.server.log()
        );
        stdout(&out)
    }

    /// Runs `bh` expecting it to fail, and returns its stderr.
    pub fn bh_err(&self, args: &[&str]) -> String {
        let out = self.bh(args);
        assert!(
            !out.status.success(),
            "bh {args:?} should have failed; it printed {}",
            stdout(&out)
        );
        stderr(&out)
    }

    /// Runs the real `grpcurl` against the server, with the admin token; see
    /// [`crate::grpcurl_available`].
    pub fn grpcurl(&self, args: &[&str]) -> Output {
        self.server.grpcurl(args).expect("run grpcurl")
    }

    /// The server's Prometheus metrics, as text.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.server.addrs.metrics)
            .await
            .expect("connect to the metrics listener");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send a metrics request");
        let mut body = String::new();
        stream
            .read_to_string(&mut body)
            .await
            .expect("read the metrics");
        body
    }

    fn spawn_agent(&mut self, prefix: &str, server: Option<&str>) {
        let node = unique_node(prefix);
        let mut options = AgentOptions::new(
            &node,
            server.map_or_else(|| self.server.url(), str::to_owned),
            self.dir.path().join("agents").join(&node),
        );
        options.labels = self.labels.clone();
        options.tls = self
            .server
            .node_tls(&node)
            .expect("issue the node's certificate");
        options.args.push("--allow-sink-root".to_owned());
        options.args.push(self.dir.path().display().to_string());
        options.args.extend(self.agent_args.iter().cloned());
        if let Some(hosts) = &mut self.hosts {
            options.netns = hosts.add_agent_host(&node).ns().map(str::to_owned);
            options
                .labels
                .push((multihost::HOST_LABEL.to_owned(), prefix.to_owned()));
        }
        let agent = AgentProcess::start(options).expect("start an agent");
        self.agents.push(agent);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        self.server.kill();
        remove_node_containers_blocking(&self.docker, &self.node_names());
    }
}

fn server_options(
    config: &toml::Table,
    listen: Option<SocketAddr>,
    insecure: bool,
    hosts: Option<&multihost::Hosts>,
    database: Option<&str>,
) -> ServerOptions {
    let mut options = ServerOptions {
        config_toml: Some(toml::to_string(config).expect("serialise the server config")),
        listen,
        insecure,
        ..Default::default()
    };
    if let Some(hosts) = hosts {
        hosts.place_server(&mut options);
    }
    if let Some(database) = database {
        options
            .args
            .extend(["--database".to_owned(), database.to_owned()]);
    }
    options
}

/// Merges the keys of `toml` over `into`.
fn merge_config(into: &mut toml::Table, toml: &str) {
    let extra: toml::Table = toml
        .parse()
        .unwrap_or_else(|e| panic!("invalid server config {toml:?}: {e}"));
    into.extend(extra);
}
