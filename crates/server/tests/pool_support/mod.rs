//! What the pool, affinity and reconcile tests share: a cluster of one node
//! serving the `demo` workload, and claims on it.

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::{Cluster, ClusterBuilder};

/// One node and the `demo` workload with this `pool:` section.
pub fn demo(pool: &'static str) -> ClusterBuilder {
    Cluster::builder()
        .node("pool")
        .workload("demo", move |image| workload(image, pool))
}

/// The `demo` workload: sleeps, has state and comm volumes.
pub fn workload(image: &str, pool: &str) -> String {
    format!(
        "id: demo\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}, comm: {{target: /comm}}}}\npool: {pool}\n"
    )
}

/// A claim of `demo` for `tenant`.
pub fn claim_request(tenant: &str) -> pb::ClaimRequest {
    pb::ClaimRequest {
        tenant_id: tenant.into(),
        workload_id: "demo".into(),
        ..Default::default()
    }
}
