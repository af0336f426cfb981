//! A PostgreSQL server of one test's own, for tests that stop, crash and
//! restart the database under a running `boilerhoused` — which they must
//! never do to the server the rest of the suite shares (dev/postgres's).
//!
//! It runs Debian's binaries (`apt-get install postgresql`, or the
//! directory in `BOILERHOUSE_PG_BIN`) as dev/postgres does: `initdb` into
//! a temporary directory, a free port on 127.0.0.1, the socket in the same
//! directory, fsync on; as the `postgres` user when the test runs as root,
//! since PostgreSQL refuses to run as root. Dropping it stops the server at
//! once and removes the directory.
//!
//! Without the binaries [`PrivatePostgres::start`] returns `None` and the
//! test skips loudly, unless `BOILERHOUSE_REQUIRE_POSTGRES=1`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};

/// How `pg_ctl` stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `-m fast`: every session is ended (SQLSTATE 57P01), open
    /// transactions roll back, a checkpoint is written.
    Fast,
    /// `-m immediate`: the server quits at once, like a crash; the next
    /// start recovers from the WAL.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A running private PostgreSQL server; see the module documentation.
pub struct PrivatePostgres {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
}

/// The directory of `initdb`, `pg_ctl` and `postgres`: `BOILERHOUSE_PG_BIN`,
/// else the newest `/usr/lib/postgresql/<version>/bin`.
fn binaries() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("BOILERHOUSE_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A command running `program` as the owner of the data directory.
fn as_owner(program: &Path) -> tokio::process::Command {
    if rustix::process::geteuid().is_root() {
        let mut command = tokio::process::Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        tokio::process::Command::new(program)
    }
}

/// Runs `command` to completion; its output is the error when it fails.
async fn run(mut command: tokio::process::Command, what: &str) -> anyhow::Result<()> {
    let out = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl PrivatePostgres {
    /// Makes and starts a server. `None` (after a loud note) when
    /// PostgreSQL is not installed, unless `BOILERHOUSE_REQUIRE_POSTGRES=1`,
    /// which makes that an error.
    pub async fn start() -> anyhow::Result<Option<Self>> {
        let Some(bin) = binaries().filter(|b| b.join("initdb").exists()) else {
            if std::env::var("BOILERHOUSE_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                bail!(
                    "BOILERHOUSE_REQUIRE_POSTGRES=1 but PostgreSQL is not installed (apt-get install postgresql)"
                );
            }
            eprintln!(
                "\n*** SKIPPING: PostgreSQL is not installed (apt-get install postgresql); \
                 set BOILERHOUSE_REQUIRE_POSTGRES=1 to make this a failure ***\n"
            );
            return Ok(None);
        };
        let dir = tempfile::Builder::new().prefix("bh-postgres-").tempdir()?;
        if rustix::process::geteuid().is_root() {
            let mut chown = tokio::process::Command::new("chown");
            chown.arg("postgres:").arg(dir.path());
            run(chown, "chown").await?;
        }
        let mut initdb = as_owner(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "--auth=trust", "--no-instructions"])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"]);
        run(initdb, "initdb").await?;
        let mut server = Self { bin, port: 0, dir };
        // A free port may be taken between the check and the start: try
        // another.
        let mut attempts = 0;
        loop {
            server.port = free_port()?;
            match server.start_again().await {
                Ok(()) => return Ok(Some(server)),
                Err(e) if attempts < 3 => {
                    attempts += 1;
                    eprintln!("private PostgreSQL did not start on {}: {e:#}", server.port);
                }
                Err(e) => return Err(e.context(server.log())),
            }
        }
    }

    /// The admin URL: `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn pg_ctl(&self) -> tokio::process::Command {
        let mut command = as_owner(&self.bin.join("pg_ctl"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-t", "60"]);
        command
    }

    /// Starts the (stopped) server on its port, and returns once it
    /// accepts connections.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let mut start = self.pg_ctl();
        start
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100",
                self.port,
                self.dir.path().display()
            ))
            .arg("start");
        run(start, "pg_ctl start").await
    }

    /// Stops the server (`pg_ctl stop -m <mode>`), waiting until it has.
    pub async fn stop(&self, mode: StopMode) -> anyhow::Result<()> {
        let mut stop = self.pg_ctl();
        stop.args(["-m", mode.as_arg(), "stop"]);
        run(stop, "pg_ctl stop").await
    }

    /// `pg_ctl restart -m <mode>`: stops the server and starts it again
    /// with the same options, and returns once it accepts connections.
    pub async fn restart(&self, mode: StopMode) -> anyhow::Result<()> {
        let mut restart = self.pg_ctl();
        restart
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-m", mode.as_arg(), "restart"]);
        run(restart, "pg_ctl restart").await
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Blocking on purpose: the directory goes right after, and the
        // server must be gone first. Immediate: there is nothing to keep.
        let pg_ctl = self.bin.join("pg_ctl");
        let mut stop = if rustix::process::geteuid().is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(pg_ctl);
            command
        } else {
            std::process::Command::new(pg_ctl)
        };
        let _ = stop
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-t", "30", "-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
