//! Many hosts on one machine: a private IPv4 network made of Linux network
//! namespaces, for tests that need the server and each agent at its own
//! address, and faults between them (see [`faults`]).
//!
//! ```text
//!   root namespace (the test process)          switch namespace
//!   bh-XXYY 10.X.Y.1/24  ───── veth ─────  root ┐
//!                                                ├─ br0 (Linux bridge)
//!   host namespace "server": eth0 10.X.Y.10 ── p0 ┤
//!   host namespace "n0":     eth0 10.X.Y.11 ── p1 ┘ ...
//! ```
//!
//! The bridge lives in a namespace of its own because Docker sets the root
//! namespace's iptables FORWARD policy to DROP (and loads br_netfilter), so
//! a bridge there would drop what it should forward. The test process talks
//! to the hosts over its own leg, the root-side end `bh-XXYY`, which is the
//! [`Network::client`] host. Processes run inside a host with
//! [`Host::command`] (`ip netns exec`); they all still share the one Docker
//! engine through its unix socket.
//!
//! Names carry this test run's id and the creating process's id
//! (`bh-<run>.<pid>-<XXYY>-<host>`), the root-side leg an alias with the
//! run's label, so concurrent tests and runs never collide and
//! [`clean_run`] removes exactly one run's leftovers. Dropping the
//! [`Network`] deletes its namespaces (and with them every veth) and the
//! root-side leg.
//!
//! Everything needs root, `ip` (iproute2), `nft` (nftables) and `iptables`;
//! [`require_netns`] says whether a test can run.

pub mod delay;
pub mod faults;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::docker::{TEST_RUN_LABEL, test_run_id};

pub use faults::Fault;

/// The table and chain, in the switch namespace, that hold every fault
/// rule (nftables, bridge family).
const NFT_TABLE: &str = "bh";
const NFT_CHAIN: &str = "faults";

/// The last octet of the first host's address; the client leg is `.1`.
const FIRST_HOST: u8 = 10;

/// Whether this machine can build test networks: root, and `ip`, `nft` and
/// `iptables` installed. Otherwise tests skip, loudly, unless
/// `BOILERHOUSE_REQUIRE_NETNS=1` (CI), where they fail.
pub fn require_netns() -> bool {
    let missing = missing_requirement();
    match missing {
        None => true,
        Some(why) => {
            if std::env::var("BOILERHOUSE_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("BOILERHOUSE_REQUIRE_NETNS=1 but network namespaces are unusable: {why}");
            }
            eprintln!(
                "\n*** SKIPPING: network namespaces are unusable ({why}); set BOILERHOUSE_REQUIRE_NETNS=1 to make this a failure ***\n"
            );
            false
        }
    }
}

fn missing_requirement() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".to_owned());
    }
    for (tool, arg) in [("ip", "-V"), ("nft", "-v"), ("iptables", "-V")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!(
                "`{tool}` is missing: apt-get install iproute2 nftables iptables"
            ));
        }
    }
    None
}

/// Runs a command and fails with its stderr when it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip <args>`.
fn ip(args: &[&str]) -> anyhow::Result<Output> {
    run("ip", args)
}

/// A host on a [`Network`]: a network namespace with one interface,
/// `eth0`, at [`Host::ip`] — or the client leg, which is the test
/// process's own (root) namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    name: String,
    ns: Option<String>,
    ip: Ipv4Addr,
    /// Its port on the bridge, in the switch namespace.
    port: String,
}

impl Host {
    /// The name it was added with (`client` for the client leg).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its network namespace (`ip netns` name); `None` for the client leg.
    pub fn ns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    /// Its address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip:port` on this host.
    pub fn addr(&self, port: u16) -> SocketAddr {
        (self.ip, port).into()
    }

    /// A command that runs `program` on this host (`ip netns exec <ns>`,
    /// which execs the program: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(self.ns.as_deref(), program)
    }

    /// Runs `f` on a thread inside this host's namespace, so the sockets it
    /// makes belong to the host (and stay there when handed back).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let Some(ns) = &self.ns else {
            return f();
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(ns).unwrap_or_else(|e| panic!("enter network namespace {ns}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// A TCP listener on this host's address (port 0: any free port).
    pub fn tcp_listen(&self, port: u16) -> io::Result<TcpListener> {
        let addr = self.addr(port);
        self.run(|| TcpListener::bind(addr))
    }

    /// A TCP connection from this host to `to`, giving up after `timeout`.
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&to, timeout))
    }

    /// A UDP socket on this host's address.
    pub fn udp_bind(&self, port: u16) -> io::Result<UdpSocket> {
        let addr = self.addr(port);
        self.run(|| UdpSocket::bind(addr))
    }
}

/// A command running `program` in network namespace `ns`, or in this
/// process's namespace when `ns` is `None`.
pub fn command_in(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) -> io::Result<()> {
    use std::os::fd::AsFd as _;
    let file = std::fs::File::open(Path::new("/run/netns").join(ns))?;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// A private network of hosts; see the module documentation.
pub struct Network {
    /// `bh-<run>.<pid>-<XXYY>`: every namespace name starts with it.
    prefix: String,
    switch: String,
    /// The root-side end of the client leg.
    root_leg: String,
    /// The first three octets of the /24.
    subnet: [u8; 3],
    client: Host,
    hosts: Mutex<Vec<Host>>,
    faults: Mutex<faults::Faults>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("prefix", &self.prefix)
            .field("subnet", &self.subnet())
            .finish_non_exhaustive()
    }
}

/// Networks made by this process so far, to tell them apart.
static MADE: AtomicU32 = AtomicU32::new(0);

/// A run id made safe for namespace names.
fn run_slug(run: &str) -> String {
    run.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Every namespace of run `run` starts with this (a slug never holds a
/// dot, so one run's prefix is never another's).
fn run_prefix(run: &str) -> String {
    format!("bh-{}.", run_slug(run))
}

impl Network {
    /// Makes a network with the switch, the client leg and one host per
    /// name in `hosts`. Removes leftovers of this run's dead processes
    /// first.
    pub fn new(hosts: &[&str]) -> anyhow::Result<Self> {
        Self::new_in_run(&test_run_id(), hosts)
    }

    /// [`Network::new`] labelled with run `run` instead of this test run:
    /// for tests of the cleanup itself.
    pub fn new_in_run(run: &str, hosts: &[&str]) -> anyhow::Result<Self> {
        let run = run.to_owned();
        sweep_dead(&run);
        let pid = std::process::id();
        let mut last_error = None;
        for attempt in 0..64u32 {
            let made = MADE.fetch_add(1, Ordering::Relaxed);
            let subnet = candidate_subnet(pid, made, attempt);
            if overlaps_local_routes(subnet)? {
                continue;
            }
            match Self::create(&run, pid, subnet) {
                Ok(network) => {
                    for name in hosts {
                        network.add_host(name)?;
                    }
                    return Ok(network);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no free 10.x.y.0/24 subnet")))
    }

    /// The switch and the client leg on `subnet`; fails if another network
    /// holds the subnet (its root-side leg has the same name).
    fn create(run: &str, pid: u32, subnet: [u8; 3]) -> anyhow::Result<Self> {
        let id = format!("{:02x}{:02x}", subnet[1], subnet[2]);
        let prefix = format!("{}{pid}-{id}", run_prefix(run));
        let switch = format!("{prefix}-switch");
        let root_leg = format!("bh-{id}");
        ip(&["netns", "add", &switch])?;
        let client = Host {
            name: "client".to_owned(),
            ns: None,
            ip: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1),
            port: "root".to_owned(),
        };
        // From here on, dropping it removes what exists.
        let network = Self {
            prefix,
            switch,
            root_leg: String::new(),
            subnet,
            client,
            hosts: Mutex::new(Vec::new()),
            faults: Mutex::new(faults::Faults::default()),
        };
        let switch = network.switch.clone();
        let sw = switch.as_str();
        ip(&["-n", sw, "link", "set", "lo", "up"])?;
        ip(&["-n", sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", "br0", "up"])?;
        // Claims the subnet: the name is taken if another network has it.
        ip(&[
            "link", "add", &root_leg, "type", "veth", "peer", "name", "root", "netns", sw,
        ])?;
        let mut network = network;
        network.root_leg = root_leg;
        let leg = network.root_leg.as_str();
        let alias = format!("{TEST_RUN_LABEL}={run} pid={pid}");
        ip(&["link", "set", "dev", leg, "alias", &alias])?;
        let cidr = format!("{}/24", network.client.ip);
        ip(&["addr", "add", &cidr, "dev", leg])?;
        ip(&["link", "set", leg, "up"])?;
        ip(&["-n", sw, "link", "set", "root", "master", "br0", "up"])?;
        let ruleset = format!(
            "add table bridge {NFT_TABLE}\n\
             add chain bridge {NFT_TABLE} {NFT_CHAIN} {{ type filter hook forward priority 0; policy accept; }}\n"
        );
        network.nft_script(&ruleset)?;
        Ok(network)
    }

    /// Adds a host named `name` (unique in this network) at the next free
    /// address.
    pub fn add_host(&self, name: &str) -> anyhow::Result<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        anyhow::ensure!(
            name != self.client.name && hosts.iter().all(|h| h.name != name),
            "host {name} exists"
        );
        let index = hosts.len();
        let octet = u8::try_from(usize::from(FIRST_HOST) + index)
            .ok()
            .filter(|o| *o < 255)
            .context("too many hosts")?;
        let ns = format!("{}-{name}", self.prefix);
        let port = format!("p{index}");
        let host = Host {
            name: name.to_owned(),
            ns: Some(ns.clone()),
            ip: Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], octet),
            port: port.clone(),
        };
        ip(&["netns", "add", &ns])?;
        hosts.push(host.clone());
        let sw = self.switch.as_str();
        ip(&[
            "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", sw, "link", "set", &port, "master", "br0", "up"])?;
        let cidr = format!("{}/24", host.ip);
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Option<Host> {
        if name == self.client.name {
            return Some(self.client.clone());
        }
        self.hosts().into_iter().find(|h| h.name == name)
    }

    /// Every host but the client, in the order they were added.
    pub fn hosts(&self) -> Vec<Host> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The test process's own leg onto the switch (address `.1`).
    pub fn client(&self) -> &Host {
        &self.client
    }

    /// `10.X.Y.0/24`.
    pub fn subnet(&self) -> String {
        let [a, b, c] = self.subnet;
        format!("{a}.{b}.{c}.0/24")
    }

    /// The switch's namespace.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// Every namespace of this network: the switch's and the hosts'.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.switch.clone()];
        all.extend(self.hosts().into_iter().filter_map(|h| h.ns));
        all
    }

    /// The root-side interface of the client leg.
    pub fn root_leg(&self) -> &str {
        &self.root_leg
    }

    /// Runs an nft script in the switch namespace.
    fn nft_script(&self, script: &str) -> anyhow::Result<Output> {
        nft_in(&self.switch, script, false)
    }
}

/// Runs an nft script (from stdin) in namespace `ns`; with `echo`, nft
/// prints what it added with its handles.
fn nft_in(ns: &str, script: &str, echo: bool) -> anyhow::Result<Output> {
    use std::io::Write as _;
    let mut cmd = command_in(Some(ns), "nft");
    if echo {
        cmd.args(["--echo", "--handle"]);
    }
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

impl Drop for Network {
    fn drop(&mut self) {
        faults::stop_all(self);
        for ns in self.namespaces().into_iter().rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
        if !self.root_leg.is_empty() {
            // Gone with the switch's namespace once the kernel frees it;
            // deleting it now makes the subnet free at once.
            let _ = ip(&["link", "del", &self.root_leg]);
        }
    }
}

/// A 10.X.Y.0/24 to try: X in 64..=127, from the pid, a per-process
/// counter and the attempt.
fn candidate_subnet(pid: u32, made: u32, attempt: u32) -> [u8; 3] {
    let mut h = u64::from(pid)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(made).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(u64::from(attempt).wrapping_mul(0x94D0_49BB_1331_11EB));
    h ^= h >> 31;
    let x = 64 + (h % 64) as u8;
    let y = ((h >> 8) % 256) as u8;
    [10, x, y]
}

/// Whether any address or route of the root namespace overlaps `subnet`.
fn overlaps_local_routes(subnet: [u8; 3]) -> anyhow::Result<bool> {
    let ours = u32::from(Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 0));
    let mut text =
        String::from_utf8_lossy(&ip(&["-4", "route", "show", "table", "all"])?.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(
        &ip(&["-4", "-o", "addr", "show"])?.stdout,
    ));
    for token in text.split_whitespace() {
        let (addr, len) = token.split_once('/').unwrap_or((token, "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
            continue;
        };
        if len == 0 {
            continue; // a default route
        }
        let shared = len.min(24);
        let mask = u32::MAX << (32 - shared);
        if u32::from(addr) & mask == ours & mask {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The names of every network namespace.
fn list_namespaces() -> Vec<String> {
    let Ok(out) = ip(&["netns", "list"]) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The root namespace's interfaces whose alias carries run `run`'s label,
/// with the pid in the alias.
fn root_legs_of(run: &str) -> Vec<(String, Option<u32>)> {
    let Ok(out) = ip(&["-o", "link", "show"]) else {
        return Vec::new();
    };
    let label = format!("{TEST_RUN_LABEL}={run} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let alias = line.split("alias ").nth(1)?;
            let pid = alias.strip_prefix(&label)?.strip_prefix("pid=")?;
            let name = line.split(": ").nth(1)?.split('@').next()?;
            Some((name.to_owned(), pid.trim().parse().ok()))
        })
        .collect()
}

/// Removes every namespace and client leg of run `run`, whoever made them;
/// returns how many it removed. For the end of a test run
/// (`boilerhouse-test-image clean`).
pub fn clean_run(run: &str) -> usize {
    remove_matching(run, |_| true)
}

/// Removes what this run's processes that no longer exist left behind (a
/// test killed before its `Drop` ran).
fn sweep_dead(run: &str) {
    remove_matching(run, |pid| {
        pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
}

/// Removes the namespaces and legs of run `run` whose creator's pid passes
/// `doomed`.
fn remove_matching(run: &str, doomed: impl Fn(Option<u32>) -> bool) -> usize {
    let prefix = run_prefix(run);
    let mut removed = 0;
    // Legs first: deleting a switch's namespace deletes its leg too, but
    // later, when the kernel gets to it.
    for (leg, pid) in root_legs_of(run) {
        if doomed(pid) && ip(&["link", "del", &leg]).is_ok() {
            removed += 1;
        }
    }
    for ns in list_namespaces() {
        let Some(rest) = ns.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse().ok());
        if doomed(pid) && ip(&["netns", "del", &ns]).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_subnets_stay_in_10_64_to_10_127() {
        for attempt in 0..1000 {
            let [a, b, _] = candidate_subnet(12345, 7, attempt);
            assert_eq!(a, 10);
            assert!((64..=127).contains(&b), "{b}");
        }
        assert_ne!(candidate_subnet(1, 0, 0), candidate_subnet(1, 1, 0));
    }

    #[test]
    fn run_ids_become_safe_namespace_names() {
        assert_eq!(run_prefix("run-17/x.y"), "bh-run-17_x_y.");
    }
}
