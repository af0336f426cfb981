//! Replicas of `boilerhoused` on one PostgreSQL database, with real agents
//! given every replica's address, for tests that kill, pause and restart
//! the leader (or the database) under load.
//!
//! Every replica shares one directory (workloads, PKI, admin token), so
//! one CA verifies them all and an agent's certificate is good at any of
//! them. A replica started again keeps its slot and its address, so the
//! agents' `--server` list stays right. Dropping it kills every process
//! and removes the containers of its nodes that carry this test run's
//! label.

use std::path::Path;
use std::time::Duration;

use boilerhouse_proto::tls::{AuthedChannel, BearerToken};
use bollard::Docker;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::service::interceptor::InterceptedService;

use crate::docker::{remove_node_containers_blocking, unique_node};
use crate::{AgentOptions, AgentProcess, ServerOptions, ServerProcess, eventually};

/// Replicas and their agents; see the module documentation.
pub struct Replicas {
    docker: Docker,
    database: String,
    config: String,
    names: Vec<String>,
    servers: Vec<ServerProcess>,
    agents: Vec<AgentProcess>,
    dir: tempfile::TempDir,
}

impl Replicas {
    /// Starts one replica per name on `database` (a `postgres://` URL)
    /// with `config` (TOML) and `workloads` (file stem, YAML), and returns
    /// once every one listens, as leader or standby.
    pub async fn start(
        docker: &Docker,
        database: &str,
        names: &[&str],
        config: &str,
        workloads: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("workloads"))?;
        for (file, yaml) in workloads {
            std::fs::write(dir.path().join(format!("workloads/{file}.yaml")), yaml)?;
        }
        let mut replicas = Self {
            docker: docker.clone(),
            database: database.to_owned(),
            config: config.to_owned(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            servers: Vec::new(),
            agents: Vec::new(),
            dir,
        };
        for i in 0..names.len() {
            let server = replicas.spawn(i, None).await?;
            replicas.servers.push(server);
        }
        Ok(replicas)
    }

    async fn spawn(
        &self,
        i: usize,
        listen: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<ServerProcess> {
        ServerProcess::start_in(
            self.dir.path(),
            ServerOptions {
                args: vec!["--database".into(), self.database.clone()],
                config_toml: Some(self.config.clone()),
                replica: Some(self.names[i].clone()),
                listen,
                ..Default::default()
            },
        )
        .await
    }

    /// The directory they share.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How many replicas there are (running or not).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The `i`th replica.
    pub fn server(&self, i: usize) -> &ServerProcess {
        &self.servers[i]
    }

    /// A channel to the `i`th replica presenting the admin token, lazy:
    /// it connects when first used and again by itself after the replica
    /// comes back (on the same address).
    pub fn lazy_channel(&self, i: usize) -> anyhow::Result<AuthedChannel> {
        let server = &self.servers[i];
        Ok(InterceptedService::new(
            server.endpoint()?.connect_lazy(),
            BearerToken::new(server.admin_token()).map_err(anyhow::Error::msg)?,
        ))
    }

    /// Every replica's client URL, in slot order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(ServerProcess::url).collect()
    }

    /// The running replicas that say they lead, besides those in `except`
    /// (a paused one still says so).
    pub fn leaders(&self, except: &[usize]) -> Vec<usize> {
        (0..self.servers.len())
            .filter(|i| !except.contains(i))
            .filter(|&i| self.servers[i].pid().is_some() && self.servers[i].role() == "leader")
            .collect()
    }

    /// Waits until exactly one running replica besides those in `except`
    /// leads, and returns it.
    pub async fn leader(&self, except: &[usize], timeout: Duration) -> anyhow::Result<usize> {
        eventually(timeout, "exactly one leader", || async {
            let leaders = self.leaders(except);
            (leaders.len() == 1).then(|| leaders[0])
        })
        .await
    }

    /// Whether the `i`th replica's process is still running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.servers[i].is_running()
    }

    /// kill -9 the `i`th replica.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts the (killed or stopped) `i`th replica again on its address.
    pub async fn start_again(&mut self, i: usize) -> anyhow::Result<()> {
        let listen = self.servers[i].addrs.grpc;
        self.servers[i] = self.spawn(i, Some(listen)).await?;
        Ok(())
    }

    /// SIGSTOP the `i`th replica: it keeps its sockets and its lease row
    /// but does nothing, as in a long stall.
    pub fn pause(&self, i: usize) -> anyhow::Result<()> {
        self.signal(i, Signal::SIGSTOP)
    }

    /// SIGCONT a paused replica.
    pub fn resume(&self, i: usize) -> anyhow::Result<()> {
        self.signal(i, Signal::SIGCONT)
    }

    fn signal(&self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let pid = self.servers[i]
            .pid()
            .ok_or_else(|| anyhow::anyhow!("replica {i} is not running"))?;
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Starts an agent for a new node (named `prefix` plus a unique
    /// suffix) given every replica's address, and returns its index. It
    /// connects on its own.
    pub fn add_agent(&mut self, prefix: &str) -> anyhow::Result<usize> {
        let node = unique_node(prefix);
        let mut options = AgentOptions::new(
            &node,
            self.urls().join(","),
            self.dir.path().join("agents").join(&node),
        );
        options.tls = self.servers[0].node_tls(&node)?;
        self.agents.push(AgentProcess::start(options)?);
        Ok(self.agents.len() - 1)
    }

    /// The `i`th agent: its log and state root.
    pub fn agent(&self, i: usize) -> &AgentProcess {
        &self.agents[i]
    }

    /// Every agent's node name, in the order they were added.
    pub fn node_names(&self) -> Vec<String> {
        self.agents
            .iter()
            .map(|a| a.options.node_name.clone())
            .collect()
    }

    /// Every replica's log, headed by its slot and role, for failures.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- replica {i} ({}):\n{}", s.role(), s.log()))
            .collect()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        // SIGKILL ends a stopped process too.
        for server in &mut self.servers {
            server.kill();
        }
        remove_node_containers_blocking(&self.docker, &self.node_names());
    }
}
