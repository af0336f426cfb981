//! The server's database from outside: starts with extra flags (such as
//! `--rebuild-from-agents`), starts that are refused, and the offline
//! `boilerhoused` subcommands (`restore`) against the cluster's data.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{Cluster, server_options};
use crate::{ServerProcess, binary};

impl Cluster {
    /// Starts the server again (once the old one is stopped or killed)
    /// with `args` added for this start only.
    pub async fn start_server_with(&mut self, args: &[&str]) {
        let mut options = server_options(
            &self.config,
            Some(self.listen),
            self.insecure,
            self.hosts.as_ref(),
            self.database.as_deref(),
        );
        options.args.extend(args.iter().map(|a| (*a).to_owned()));
        self.server = ServerProcess::start_in(self.dir.path(), options)
            .await
            .unwrap_or_else(|e| panic!("start boilerhoused with {args:?}: {e:#}"));
    }

    /// Runs boilerhoused as [`Cluster::start_server`] would, plus `args`,
    /// expecting it to exit (a start that is refused): its output, once it
    /// has. Fails the test if it is still running after the cluster's
    /// timeout.
    pub fn run_server_to_exit(&self, args: &[&str]) -> Output {
        let root = self.dir.path();
        let mut command = Command::new(binary("boilerhoused"));
        command
            .arg("--data-dir")
            .arg(root.join("data"))
            .arg("--workloads-dir")
            .arg(root.join("workloads"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--database", &self.server.database_value()])
            .arg("--config")
            .arg(root.join("boilerhoused.toml"))
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("BOILERHOUSE_CONFIG");
        if self.insecure {
            command.arg("--insecure");
        }
        run_to_exit(command, self.timeout)
    }

    /// Runs `boilerhoused --data-dir <the cluster's> <args>` to completion:
    /// the offline subcommands, such as `restore --from <file>`.
    pub fn boilerhoused(&self, args: &[&str]) -> Output {
        let mut command = Command::new(binary("boilerhoused"));
        command
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(args)
            .env_remove("BOILERHOUSE_CONFIG")
            .env_remove("BOILERHOUSE_DATABASE");
        run_to_exit(command, self.timeout)
    }
}

/// Runs `command` until it exits, killing it after `timeout` (and then
/// failing the test).
fn run_to_exit(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run boilerhoused");
    // Read the pipes on threads, so a chatty process never blocks on them.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || read_all(&mut stdout));
    let err = std::thread::spawn(move || read_all(&mut stderr));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for boilerhoused") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!("boilerhoused was still running after {timeout:?}; it printed:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn read_all(from: &mut impl std::io::Read) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = from.read_to_end(&mut bytes);
    bytes
}
