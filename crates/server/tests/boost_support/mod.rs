//! What the boost tests share: a cluster serving `demo` with CPU and
//! memory limits, claims on it, and Docker's view of a container's limits.

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;

/// Base CPU limit of the test workload, in nano CPUs.
pub const BASE_NANO_CPUS: i64 = 250_000_000;
/// Base memory limit of the test workload, in bytes.
pub const BASE_MEMORY: i64 = 64 << 20;

/// The `demo` workload, limited to BASE_NANO_CPUS and BASE_MEMORY.
pub fn workload(image: &str, pool: &str) -> String {
    format!(
        "id: demo\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\n\
         deploy: {{resources: {{limits: {{cpus: \"0.25\", memory: 64M}}}}}}\n\
         pool: {pool}\n"
    )
}

/// A server and one agent per entry of `nodes` (prefixes made unique),
/// serving `demo` with this `pool:` section; every node is ready.
pub async fn start(nodes: &[&str], pool: &'static str) -> Option<Cluster> {
    start_with(nodes, pool, "").await
}

/// As [`start`], with these lines added to the server's configuration.
pub async fn start_with(nodes: &[&str], pool: &'static str, config: &str) -> Option<Cluster> {
    let mut builder = Cluster::builder()
        .workload("demo", move |image| workload(image, pool))
        .config(config);
    for node in nodes {
        builder = builder.node(node);
    }
    builder.start().await
}

/// Claims for `tenant` and returns (container id, docker id).
pub async fn claim(c: &Cluster, tenant: &str) -> (String, String) {
    let claim = c.claim(tenant, "demo").await;
    (claim.container_id, claim.docker_id)
}

/// (NanoCpus, Memory) as Docker has them.
pub async fn limits(c: &Cluster, docker_id: &str) -> (i64, i64) {
    let host = c
        .docker()
        .inspect_container(docker_id, None)
        .await
        .unwrap()
        .host_config
        .unwrap();
    (host.nano_cpus.unwrap_or(0), host.memory.unwrap_or(0))
}

/// Waits until Docker shows exactly these limits.
pub async fn wait_limits(c: &Cluster, docker_id: &str, want: (i64, i64), what: &str) {
    let last = std::sync::Mutex::new((0, 0));
    boilerhouse_testkit::eventually(c.timeout(), what, || async {
        let seen = limits(c, docker_id).await;
        *last.lock().unwrap() = seen;
        (seen == want).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: docker has {:?}, want {want:?}\nserver:\n{}",
            last.lock().unwrap(),
            c.server().log()
        )
    });
}

/// The boost `id` as the server has it.
pub async fn get_boost(c: &Cluster, id: &str) -> pb::Boost {
    c.boosts()
        .await
        .get_boost(pb::GetBoostRequest {
            boost_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .boost
        .unwrap()
}

/// The first line of `s`, trimmed: the id `bh boost request` prints.
pub fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}
