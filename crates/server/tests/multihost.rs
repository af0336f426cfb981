//! Many hosts on one machine: boilerhoused and its agents each in a network
//! namespace of their own, at their own addresses, on a private network
//! that the tests break (see `boilerhouse_testkit::netns`). Skipped, loudly,
//! without root or iproute2/nftables/iptables, unless
//! BOILERHOUSE_REQUIRE_NETNS=1 (CI), where that is a failure.

use std::time::{Duration, Instant};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::node_service_client::NodeServiceClient;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::netns::{Network, require_netns};
use boilerhouse_testkit::{ServerOptions, ServerProcess, stderr};

/// Liveness windows short enough to see Suspect and Lost within seconds,
/// wide enough (15 heartbeats) that a loaded machine never trips them.
const LIVENESS: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "3s"
lost_grace = "2s"
restart_grace = "6s"
"#;

/// The agent's HTTP/2 keepalive (10 s interval, 5 s timeout) must notice a
/// silent link within this.
const NOTICE: Duration = Duration::from_secs(40);

/// The network namespace a process is in.
fn netns_of(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("read a process's netns")
}

#[tokio::test]
async fn a_server_on_a_host_listens_at_its_address_and_dies_by_kill_9() {
    if !require_netns() {
        return;
    }
    let net = Network::new(&["server"]).unwrap();
    let host = net.host("server").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("workloads")).unwrap();
    let mut server = ServerProcess::start_in(
        dir.path(),
        ServerOptions {
            netns: host.ns().map(str::to_owned),
            listen: Some(host.addr(0)),
            metrics_listen: Some(host.addr(0)),
            sans: vec![host.ip().to_string()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(server.addrs.grpc.ip(), host.ip());
    let pid = server.pid().unwrap();
    assert_eq!(
        server.addrs.pid, pid,
        "`ip netns exec` execs the program: the child is boilerhoused itself"
    );
    assert_ne!(netns_of(pid), netns_of(std::process::id()));

    // Over the client leg, with TLS: the certificate covers the address.
    let nodes = NodeServiceClient::new(server.channel().await.unwrap())
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert!(nodes.into_inner().nodes.is_empty());
    let out = server.bh(&["node", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Its loopback is its own: nothing listens on ours at its port.
    let port = server.addrs.grpc.port();
    assert!(
        std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_secs(1)
        )
        .is_err()
    );

    server.kill();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "kill -9 reached boilerhoused itself"
    );
}

/// A workload pinned to the host of the node added as `prefix`.
fn pinned(prefix: &'static str) -> impl FnOnce(&str) -> String + Send + 'static {
    move |image| {
        format!(
            "id: on-{prefix}\nimage: {image}\nnode_selector: {{host: {prefix}}}\npool: {{min_size: 1}}\n"
        )
    }
}

/// Node `id`'s events: (kind, time, message).
async fn node_events(c: &Cluster, id: &str) -> Vec<(String, String, String)> {
    c.events()
        .await
        .list_events(pb::ListEventsRequest {
            filter: Some(pb::EventFilter {
                node_id: id.to_owned(),
                ..Default::default()
            }),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| {
            let at =
                e.at.map(|t| format!("{}.{:03}", t.seconds, t.nanos / 1_000_000));
            (e.kind, at.unwrap_or_default(), e.message)
        })
        .collect()
}

/// Whether Docker runs container `id`, and since when.
async fn run_state(c: &Cluster, id: &str) -> Option<(bool, String)> {
    let state = c.docker().inspect_container(id, None).await.ok()?.state?;
    Some((state.running?, state.started_at?))
}

/// How often the agent of node `i` has connected so far.
fn connections(c: &Cluster, i: usize) -> usize {
    c.agent(i).log().matches("connected to the server").count()
}

#[tokio::test]
async fn an_agent_cut_off_from_the_server_goes_lost_keeps_its_containers_and_returns() {
    const HOSTS: [&str; 3] = ["mh-a", "mh-b", "mh-c"];
    let mut builder = Cluster::builder().multihost().config(LIVENESS);
    for prefix in HOSTS {
        builder = builder
            .node(prefix)
            .workload(&format!("on-{prefix}"), pinned(prefix));
    }
    let Some(c) = builder.start().await else {
        return;
    };
    let net = c.network();

    // Three nodes at three addresses, all Ready; a claim works on each.
    let mut addresses: Vec<_> = (0..3).map(|i| c.node_host(i).ip()).collect();
    addresses.push(c.server_host().ip());
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 4, "every process at its own address");
    assert!(c.url().contains(&c.server_host().ip().to_string()));
    for (i, prefix) in HOSTS.iter().enumerate() {
        let pid = c.agent(i).pid().unwrap();
        assert_ne!(netns_of(pid), netns_of(std::process::id()));
        c.wait_idle(&format!("on-{prefix}"), 1).await;
        let claim = c
            .claim(&format!("t-{prefix}"), &format!("on-{prefix}"))
            .await;
        assert_eq!(claim.node_id, c.node(i));
    }

    // Each pool refills after its claim: wait, so the containers counted
    // below are all there are.
    for prefix in HOSTS {
        c.wait_idle(&format!("on-{prefix}"), 1).await;
    }

    // Cut the third agent off from the server, silently (packets dropped).
    let (cut_node, cut_host) = (c.node(2).to_owned(), c.node_host(2).clone());
    let before = c.containers().await;
    let on_cut: Vec<_> = before
        .iter()
        .filter(|s| s.labels.as_ref().and_then(|l| l.get("boilerhouse.node-id")) == Some(&cut_node))
        .filter_map(|s| s.id.clone())
        .collect();
    assert!(!on_cut.is_empty());
    let mut first_start = Vec::new();
    for id in &on_cut {
        first_start.push(run_state(&c, id).await.expect("a running container"));
    }
    let connected_before = connections(&c, 2);
    let cut = net.partition(&[&cut_host], &[c.server_host()]).unwrap();
    let t0 = Instant::now();

    c.wait_node(&cut_node, pb::NodeStatus::Suspect, None).await;
    let suspect_after = t0.elapsed();
    c.wait_node(&cut_node, pb::NodeStatus::Lost, None).await;
    let lost_after = t0.elapsed();
    // The others carry on.
    for i in 0..2 {
        c.wait_node(c.node(i), pb::NodeStatus::Ready, Some(true))
            .await;
    }
    let claim = c.claim("t-during", "on-mh-a").await;
    assert_eq!(claim.node_id, c.node(0));

    // The agent's keepalive notices the dead link and ends its session.
    boilerhouse_testkit::eventually(NOTICE, "the agent to notice the dead link", || async {
        c.agent(2).log().contains("session ended").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", c.agent(2).log()));
    let noticed_after = t0.elapsed();
    for (id, first) in on_cut.iter().zip(&first_start) {
        let now = run_state(&c, id).await;
        assert_eq!(now.as_ref(), Some(first), "{id} runs on, untouched");
    }

    net.heal(cut).unwrap();
    let t1 = Instant::now();
    let back = c
        .wait_node(&cut_node, pb::NodeStatus::Ready, Some(true))
        .await;
    let rejoined_after = t1.elapsed();
    assert!(connections(&c, 2) > connected_before, "a new session");
    assert!(back.connected);
    let events = node_events(&c, &cut_node).await;
    for (kind, at, message) in &events {
        eprintln!("{at} {kind}: {message}");
    }
    let node_kinds: Vec<&str> = events
        .iter()
        .map(|(kind, _, _)| kind.as_str())
        .filter(|k| k.starts_with("node."))
        .collect();
    assert_eq!(
        node_kinds,
        ["node.joined", "node.suspect", "node.lost", "node.returned"]
    );
    for i in 0..2 {
        let kinds: Vec<String> = node_events(&c, c.node(i))
            .await
            .into_iter()
            .map(|(kind, _, _)| kind)
            .filter(|k| k.starts_with("node."))
            .collect();
        assert_eq!(kinds, ["node.joined"], "{} was never cut off", c.node(i));
    }
    // Nothing was destroyed: the same containers, never restarted.
    for (id, first) in on_cut.iter().zip(&first_start) {
        let now = run_state(&c, id).await;
        assert_eq!(now.as_ref(), Some(first), "{id} survived the partition");
    }
    c.eventually("the returned node to report its containers", || async {
        c.node_info(&cut_node)
            .await
            .filter(|n| n.container_count as usize == on_cut.len())
    })
    .await;
    // The tenant has its container (back: its claim was declared lost
    // with the node, or kept, depending on the server's policy).
    let claim = c
        .eventually("the cut node's claim to be resumed", || async {
            let claim = c
                .claims()
                .await
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "t-mh-c".into(),
                    workload_id: "on-mh-c".into(),
                })
                .await
                .ok()?
                .into_inner()
                .claim?;
            (claim.status() == pb::ClaimStatus::Active).then_some(claim)
        })
        .await;
    assert!(on_cut.contains(&claim.docker_id), "{claim:?}");
    eprintln!(
        "partition: Suspect after {suspect_after:?}, Lost after {lost_after:?}, \
         the agent noticed after {noticed_after:?}; healed: Ready again after {rejoined_after:?}; \
         the cut node's claim is at generation {}",
        claim.generation
    );
}
