//! A local S3-compatible server for tests: `moto_server` from the PyPI
//! package `moto[server]`, on a loopback port of its own.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A running `moto_server`; killed on drop.
pub struct MotoServer {
    child: Child,
    port: u16,
}

/// Starts `moto_server`, or `None` (with a loud message) when it is not
/// installed. With `BOILERHOUSE_REQUIRE_S3=1`, as in CI, a missing server
/// is a failure instead.
pub fn moto_server() -> anyhow::Result<Option<MotoServer>> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = match Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            if std::env::var("BOILERHOUSE_REQUIRE_S3").as_deref() == Ok("1") {
                bail!("moto_server is required (BOILERHOUSE_REQUIRE_S3=1) but cannot start: {e}");
            }
            eprintln!(
                "\n*** SKIPPING: moto_server is not installed; `pip install 'moto[server]'` ***\n"
            );
            return Ok(None);
        }
    };
    let server = MotoServer { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.request("GET", "/").is_err() {
        if Instant::now() > deadline {
            bail!("moto_server did not answer on port {port} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(server))
}

impl MotoServer {
    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let status = self.request("PUT", &format!("/{name}"))?;
        if status != 200 {
            bail!("creating bucket {name}: HTTP {status}");
        }
        Ok(())
    }

    fn request(&self, method: &str, path: &str) -> anyhow::Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .context("empty HTTP response")?;
        Ok(status.parse()?)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
