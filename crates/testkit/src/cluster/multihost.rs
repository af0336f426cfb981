//! A cluster spread over hosts: with [`ClusterBuilder::multihost`] the
//! server and every agent run on a host of their own on a private
//! [`Network`] (network namespaces; see [`crate::netns`]), each at its own
//! address, and the test can break the network between them:
//!
//! ```ignore
//! let Some(c) = Cluster::builder().multihost().node("a").node("b").start().await else {
//!     return; // no Docker, or not root / no `ip`: skipped loudly
//! };
//! let net = c.network();
//! let cut = net.partition(&[c.node_host(0)], &[c.server_host()]).unwrap();
//! c.wait_node(c.node(0), pb::NodeStatus::Suspect, None).await;
//! net.heal(cut).unwrap();
//! ```
//!
//! Each agent also reports the label `host=<prefix>` (the name given to
//! [`ClusterBuilder::node`]), so a workload can be pinned to one host with
//! `node_selector: {host: <prefix>}`.
//!
//! The server listens on its host's address (its certificate covers it,
//! metrics too); the test process, `bh` and `grpcurl` reach it over the
//! client leg. Agents still share the machine's Docker engine through its
//! unix socket, so containers are where they always are.

use crate::ServerOptions;
use crate::netns::{Host, Network, require_netns};

use super::{Cluster, ClusterBuilder};

/// The label each agent of a multi-host cluster reports: the prefix its
/// node was added with.
pub const HOST_LABEL: &str = "host";

/// The network of a multi-host cluster and who runs where.
pub(super) struct Hosts {
    network: Network,
    server: Host,
    /// The agents' hosts, in the cluster's node order.
    agents: Vec<Host>,
}

impl Hosts {
    /// A network with the server's host; `None` (the test skips, loudly)
    /// when this machine cannot make one.
    pub(super) fn new() -> Option<Self> {
        if !require_netns() {
            return None;
        }
        let network = Network::new(&["server"]).expect("make the test network");
        let server = network.host("server").expect("the server's host");
        Some(Self {
            network,
            server,
            agents: Vec::new(),
        })
    }

    /// Runs the server on its host: listening on the host's address (the
    /// port chosen at the first start, kept by restarts), its certificate
    /// covering that address.
    pub(super) fn place_server(&self, options: &mut ServerOptions) {
        options.netns = self.server.ns().map(str::to_owned);
        options.listen.get_or_insert(self.server.addr(0));
        options.metrics_listen = Some(self.server.addr(0));
        options.sans.push(self.server.ip().to_string());
    }

    /// A new host for the agent of `node`.
    pub(super) fn add_agent_host(&mut self, node: &str) -> &Host {
        let host = self
            .network
            .add_host(node)
            .unwrap_or_else(|e| panic!("add a host for {node}: {e}"));
        self.agents.push(host);
        self.agents.last().expect("just added")
    }
}

impl ClusterBuilder {
    /// Runs the server and each agent on a host of its own, at its own
    /// address, on a private network the test can break; see
    /// [`Cluster::network`]. Needs root and iproute2, nftables and
    /// iptables: without them the cluster does not start (`None`: the test
    /// skips, loudly) unless `BOILERHOUSE_REQUIRE_NETNS=1`, which makes it a
    /// failure.
    pub fn multihost(mut self) -> Self {
        self.multihost = true;
        self
    }
}

impl Cluster {
    fn hosts(&self) -> &Hosts {
        self.hosts
            .as_ref()
            .expect("a multi-host cluster (ClusterBuilder::multihost)")
    }

    /// The network of a [`ClusterBuilder::multihost`] cluster: its hosts
    /// and its faults.
    pub fn network(&self) -> &Network {
        &self.hosts().network
    }

    /// The server's host.
    pub fn server_host(&self) -> &Host {
        &self.hosts().server
    }

    /// The host of the `i`th node's agent.
    pub fn node_host(&self, i: usize) -> &Host {
        &self.hosts().agents[i]
    }
}
