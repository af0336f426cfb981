//! boilerhouse-agent as a real child process.

use std::path::PathBuf;
use std::process::{Child, Stdio};

use anyhow::Context as _;

use crate::binary;

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Node name.
    pub node_name: String,
    /// Server URL.
    pub server: String,
    /// Where its container directories live.
    pub state_root: PathBuf,
    /// Docker endpoint; None for the default.
    pub docker_host: Option<String>,
    /// Node labels.
    pub labels: Vec<(String, String)>,
    /// Extra flags.
    pub args: Vec<String>,
    /// Its certificate, for a secure server.
    pub tls: Option<AgentTls>,
    /// Run it in this network namespace (`ip netns exec`); see
    /// [`crate::netns`].
    pub netns: Option<String>,
}

/// The files an agent presents to a secure server.
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// The CA of the server's certificate.
    pub ca: PathBuf,
    /// The node's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl AgentOptions {
    /// An agent for `node_name` against `server`, labelling every container
    /// with this test run's label.
    pub fn new(
        node_name: impl Into<String>,
        server: impl Into<String>,
        state_root: impl Into<PathBuf>,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            server: server.into(),
            state_root: state_root.into(),
            docker_host: None,
            labels: Vec::new(),
            args: Vec::new(),
            tls: None,
            netns: None,
        }
    }
}

/// A boilerhouse-agent process.
pub struct AgentProcess {
    child: Option<Child>,
    /// How it was started, to restart it the same way.
    pub options: AgentOptions,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts an agent. It connects on its own; poll the server to see it.
    pub fn start(options: AgentOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.state_root)?;
        let log = options.state_root.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd =
            crate::netns::command_in(options.netns.as_deref(), binary("boilerhouse-agent"));
        cmd.arg("--server")
            .arg(&options.server)
            .arg("--node-name")
            .arg(&options.node_name)
            .arg("--state-root")
            .arg(&options.state_root)
            .arg("--container-label")
            .arg(format!(
                "{}={}",
                crate::docker::TEST_RUN_LABEL,
                crate::docker::test_run_id()
            ))
            .args(["--max-backoff", "1s"]);
        if let Some(host) = &options.docker_host {
            cmd.arg("--docker-host").arg(host);
        }
        if let Some(tls) = &options.tls {
            cmd.arg("--ca")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
        }
        for (k, v) in &options.labels {
            cmd.arg("--label").arg(format!("{k}={v}"));
        }
        let child = cmd
            .args(&options.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("BOILERHOUSE_ADDR")
            .env_remove("BOILERHOUSE_CA")
            .env_remove("BOILERHOUSE_CERT")
            .env_remove("BOILERHOUSE_KEY")
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary("boilerhouse-agent").display()))?;
        Ok(Self {
            child: Some(child),
            options,
            log,
        })
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id of the running agent (the program's own, also when
    /// it runs in a network namespace).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same options (and state root).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let again = Self::start(self.options.clone())?;
        *self = again;
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
