//! Helpers shared by the API tests that run boilerhoused as a process.

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::workload_service_client::WorkloadServiceClient;
use boilerhouse_testkit::{ServerOptions, ServerProcess};

/// Copies the example workloads and their admission policy under
/// `server_root`; returns the options that start a server with that policy,
/// as dev/run does.
pub fn copy_examples(server_root: &std::path::Path) -> ServerOptions {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let dest = server_root.join("workloads");
    std::fs::create_dir_all(&dest).unwrap();
    for entry in std::fs::read_dir(examples.join("workloads")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dest.join(path.file_name().unwrap())).unwrap();
    }
    let policy = server_root.join("policy.toml");
    std::fs::copy(examples.join("policy.toml"), &policy).unwrap();
    ServerOptions {
        args: vec!["--policy-file".into(), policy.display().to_string()],
        ..Default::default()
    }
}

pub async fn list(server: &ServerProcess) -> pb::ListWorkloadsResponse {
    WorkloadServiceClient::new(server.channel().await.unwrap())
        .list_workloads(pb::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner()
}
