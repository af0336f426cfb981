//! Waiting on a cluster and looking at what really runs: every wait polls
//! with the cluster's deadline (never a fixed sleep) and fails the test with
//! the server's log.

use std::future::Future;

use boilerhouse_proto::pb;

use super::Cluster;
use crate::docker::containers_with;
use crate::{eventually, stdout};

impl Cluster {
    /// Polls `check` until it returns `Some`, failing the test with the
    /// server's log when the cluster's timeout passes.
    pub async fn eventually<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        eventually(self.timeout, what, check)
            .await
            .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.server.log()))
    }

    /// Waits until every node of the cluster is ready and connected;
    /// returns them in the cluster's order.
    pub async fn wait_ready(&self) -> Vec<pb::Node> {
        self.wait_nodes_ready(self.node_names()).await
    }

    /// Waits until each named node is ready and connected (agents the
    /// cluster did not start, such as a simulated fleet's, included);
    /// returns them in the order given.
    pub async fn wait_nodes_ready(&self, names: Vec<String>) -> Vec<pb::Node> {
        let nodes = self.nodes().await;
        self.eventually("every node ready", || {
            let mut nodes = nodes.clone();
            let names = names.clone();
            async move {
                let listed = nodes
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .nodes;
                names
                    .iter()
                    .map(|name| {
                        listed
                            .iter()
                            .find(|n| {
                                &n.node_id == name
                                    && n.connected
                                    && n.status == pb::NodeStatus::Ready as i32
                            })
                            .cloned()
                    })
                    .collect()
            }
        })
        .await
    }

    /// Node `id` as the server has it, if it knows it.
    pub async fn node_info(&self, id: &str) -> Option<pb::Node> {
        self.nodes()
            .await
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .unwrap_or_else(|e| panic!("list nodes: {e}\n{}", self.server.log()))
            .into_inner()
            .nodes
            .into_iter()
            .find(|n| n.node_id == id)
    }

    /// Waits until node `id` has `status` (and, if given, that connection
    /// state).
    pub async fn wait_node(
        &self,
        id: &str,
        status: pb::NodeStatus,
        connected: Option<bool>,
    ) -> pb::Node {
        self.eventually(&format!("{id} to be {status:?}"), || async {
            self.node_info(id)
                .await
                .filter(|n| n.status == status as i32 && connected.is_none_or(|c| n.connected == c))
        })
        .await
    }

    /// Waits until the pool of `workload` has exactly `idle` idle
    /// containers; on failure, shows the last pool seen and the containers.
    pub async fn wait_idle(&self, workload: &str, idle: u32) -> pb::Pool {
        let last = std::sync::Mutex::new(None);
        eventually(self.timeout, &format!("{idle} idle containers"), || async {
            let pool = self.pool(workload).await;
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(pool.clone());
            (pool.counts?.idle == idle).then_some(pool)
        })
        .await
        .unwrap_or_else(|e| {
            let containers = stdout(&self.bh(&["container", "list"]));
            panic!(
                "{e}\nlast: {:?}\n{containers}\nserver:\n{}",
                last.lock().unwrap_or_else(|e| e.into_inner()),
                self.server.log()
            )
        })
    }

    /// Waits until Docker no longer has the container.
    pub async fn wait_gone(&self, docker_id: &str, what: &str) {
        self.eventually(what, || async {
            (!self.exists(docker_id).await).then_some(())
        })
        .await;
    }

    /// Whether Docker has the container.
    pub async fn exists(&self, docker_id: &str) -> bool {
        self.docker.inspect_container(docker_id, None).await.is_ok()
    }

    /// This run's containers on every node of the cluster, as Docker lists
    /// them.
    pub async fn containers(&self) -> Vec<bollard::models::ContainerSummary> {
        let mut all = Vec::new();
        for node in self.node_names() {
            all.extend(
                containers_with(&self.docker, "boilerhouse.node-id", &node)
                    .await
                    .expect("list containers"),
            );
        }
        all
    }

    /// Runs a shell script in a container and returns its output once it
    /// has finished.
    pub async fn exec(&self, docker_id: &str, script: &str) -> String {
        crate::docker::exec(&self.docker, docker_id, script)
            .await
            .unwrap_or_else(|e| panic!("exec in {docker_id}: {e}"))
    }
}
