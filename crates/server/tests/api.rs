//! boilerhoused as a real process on loopback port 0: the API, reflection,
//! health, and workloads (loading, validation, apply). Restarts, watches,
//! shutdown and bh over the process's life are in lifecycle.rs.

use std::time::Duration;

use tokio_stream::StreamExt as _;
use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::workload_service_client::WorkloadServiceClient;
use boilerhouse_testkit::{ServerProcess, eventually, grpcurl_available, stderr, stdout};

mod api_support;
use api_support::{copy_examples, list};

fn ids(resp: &pb::ListWorkloadsResponse) -> Vec<String> {
    resp.workloads.iter().map(|w| w.id.clone()).collect()
}

const SERVICES: &[&str] = &[
    "boilerhouse.v1.AffinityService",
    "boilerhouse.v1.AgentService",
    "boilerhouse.v1.BoostService",
    "boilerhouse.v1.ClaimService",
    "boilerhouse.v1.ContainerService",
    "boilerhouse.v1.EventService",
    "boilerhouse.v1.NodeService",
    "boilerhouse.v1.PoolService",
    "boilerhouse.v1.ReconcileService",
    "boilerhouse.v1.SyncService",
    "boilerhouse.v1.SystemService",
    "boilerhouse.v1.WorkloadService",
];

#[tokio::test]
async fn grpcurl_lists_describes_and_health_checks_every_service() {
    if !grpcurl_available() {
        return;
    }
    let server = ServerProcess::start().await.unwrap();
    let out = server.grpcurl(&["list"]).unwrap();
    assert!(
        out.status.success(),
        "grpcurl list failed: {}",
        stderr(&out)
    );
    let listed = stdout(&out);
    for service in SERVICES {
        assert!(
            listed.lines().any(|l| l == *service),
            "{service} missing from:\n{listed}"
        );
    }
    for extra in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            listed.lines().any(|l| l == extra),
            "{extra} missing from:\n{listed}"
        );
    }
    for service in SERVICES {
        let out = server.grpcurl(&["describe", service]).unwrap();
        assert!(out.status.success(), "describe {service}: {}", stderr(&out));
        assert!(
            stdout(&out).contains(&format!("{service} is a service")),
            "{}",
            stdout(&out)
        );
    }
    let out = server
        .grpcurl(&["-d", "{}", "grpc.health.v1.Health/Check"])
        .unwrap();
    assert!(stdout(&out).contains("SERVING"), "{}", stdout(&out));
    let out = server
        .grpcurl(&[
            "-d",
            r#"{"service":"boilerhouse.v1.WorkloadService"}"#,
            "grpc.health.v1.Health/Check",
        ])
        .unwrap();
    assert!(stdout(&out).contains("\"SERVING\""), "{}", stdout(&out));

    // A call through grpcurl, with field violations decoded via reflection.
    let out = server
        .grpcurl(&[
            "-d",
            r#"{"workload_id":"Not Valid"}"#,
            "boilerhouse.v1.WorkloadService/GetWorkload",
        ])
        .unwrap();
    let text = stderr(&out) + &stdout(&out);
    assert!(text.contains("InvalidArgument"), "{text}");
    assert!(
        text.contains("fieldViolations") && text.contains("workload_id"),
        "{text}"
    );
}

#[tokio::test]
async fn reflection_v1_serves_every_service_too() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = ServerProcess::start().await.unwrap();
    let mut client = ServerReflectionClient::new(server.channel().await.unwrap());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn sync_requests_name_the_bad_field_and_unknown_workloads() {
    let server = ServerProcess::start().await.unwrap();
    let mut syncs =
        pb::sync_service_client::SyncServiceClient::new(server.channel().await.unwrap());
    let err = syncs
        .trigger_sync(pb::TriggerSyncRequest {
            tenant_id: "not a tenant".into(),
            workload_id: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tenant_id"), "{}", err.message());
    let err = syncs
        .trigger_sync(pb::TriggerSyncRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            direction: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("direction"), "{}", err.message());
    let err = syncs
        .trigger_sync(pb::TriggerSyncRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let statuses = syncs
        .get_sync_status(pb::GetSyncStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .statuses;
    assert!(statuses.is_empty(), "{statuses:?}");
}

#[tokio::test]
async fn examples_load_and_a_malformed_file_is_reported_without_stopping_the_rest() {
    let temp = tempfile::tempdir().unwrap();
    let options = copy_examples(temp.path());
    let server = ServerProcess::start_in(temp.path(), options).await.unwrap();
    assert_eq!(ids(&list(&server).await), ["agent", "notebook", "sandbox"]);

    let out = server.bh(&["workload", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for id in ["agent", "notebook", "sandbox"] {
        assert!(stdout(&out).contains(id), "{}", stdout(&out));
    }

    // Drop a broken file in while the server runs, plus a new valid one.
    let dir = server.workloads_dir();
    std::fs::write(
        dir.join("broken.yaml"),
        "id: broken\nimage: busybox\npool:\n  max_size: lots\n",
    )
    .unwrap();
    std::fs::write(dir.join("extra.yaml"), "id: extra\nimage: busybox\n").unwrap();
    let resp = eventually(
        Duration::from_secs(20),
        "the reload to notice both files",
        || async {
            let resp = list(&server).await;
            (resp.load_errors.len() == 1 && ids(&resp).contains(&"extra".to_owned()))
                .then_some(resp)
        },
    )
    .await
    .unwrap();
    let error = &resp.load_errors[0];
    assert!(error.path.ends_with("broken.yaml"), "{error:?}");
    assert_eq!(error.field, "pool.max_size");
    assert!(!error.reason.is_empty());
    assert_eq!(
        ids(&resp),
        ["agent", "extra", "notebook", "sandbox"],
        "the others still load"
    );

    // One clear line in the server log and one event, naming file and field.
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("broken.yaml")).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one log line for the broken file:\n{log}"
    );
    assert!(lines[0].contains("pool.max_size"), "{}", lines[0]);
    let out = server.bh(&["events", "--kind", "workload.invalid", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("broken.yaml")
    );

    // bh shows the failure too, on stderr.
    let out = server.bh(&["workload", "list"]);
    assert!(
        stderr(&out).contains("broken.yaml") && stderr(&out).contains("pool.max_size"),
        "{}",
        stderr(&out)
    );

    // Breaking a valid file keeps its last good version in force.
    std::fs::write(dir.join("extra.yaml"), "id: extra\nimage: [oops\n").unwrap();
    let resp = eventually(
        Duration::from_secs(20),
        "the second broken file",
        || async {
            let resp = list(&server).await;
            (resp.load_errors.len() == 2).then_some(resp)
        },
    )
    .await
    .unwrap();
    assert!(
        ids(&resp).contains(&"extra".to_owned()),
        "a typo must not remove a workload"
    );

    // Fixing it clears the error; deleting a file removes its workload.
    std::fs::write(dir.join("broken.yaml"), "id: broken\nimage: busybox\n").unwrap();
    std::fs::remove_file(dir.join("extra.yaml")).unwrap();
    eventually(
        Duration::from_secs(20),
        "the fix and the removal",
        || async {
            let resp = list(&server).await;
            (resp.load_errors.is_empty()
                && ids(&resp) == ["agent", "broken", "notebook", "sandbox"])
            .then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn apply_writes_the_file_and_honours_request_ids() {
    let server = ServerProcess::start().await.unwrap();
    let mut client = WorkloadServiceClient::new(server.channel().await.unwrap());
    let yaml = "id: web\nimage: busybox\npool: {min_size: 1, max_size: 2}\n";
    let apply = |request_id: &str, yaml: &str| pb::ApplyWorkloadRequest {
        yaml: yaml.into(),
        dry_run: false,
        request_id: request_id.into(),
    };

    let first = client
        .apply_workload(apply("req-1", yaml))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.outcome, pb::ApplyOutcome::Created as i32);
    let on_disk = std::fs::read_to_string(server.workloads_dir().join("web.yaml")).unwrap();
    assert_eq!(on_disk, yaml, "the directory stays the source of truth");

    // The same request id and body: the first answer, not "unchanged".
    let again = client
        .apply_workload(apply("req-1", yaml))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    // Without an id, a second apply is a real second apply.
    let plain = client
        .apply_workload(apply("", yaml))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.outcome, pb::ApplyOutcome::Unchanged as i32);
    // The same id for a different body is refused.
    let err = client
        .apply_workload(apply("req-1", "id: web\nimage: busybox:2\n"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Invalid YAML over the API: INVALID_ARGUMENT naming the field.
    let err = client
        .apply_workload(apply("", "id: web\nimage: busybox\npool: {min_size: -1}\n"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("pool.min_size"), "{}", err.message());
    let err = client.apply_workload(apply("", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("yaml"), "{}", err.message());

    // Dry run validates without writing.
    let dry = client
        .apply_workload(pb::ApplyWorkloadRequest {
            yaml: "id: dry\nimage: x\n".into(),
            dry_run: true,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.outcome, pb::ApplyOutcome::Valid as i32);
    assert!(!server.workloads_dir().join("dry.yaml").exists());

    // Delete removes the file and the workload.
    client
        .delete_workload(pb::DeleteWorkloadRequest {
            workload_id: "web".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    assert!(!server.workloads_dir().join("web.yaml").exists());
    let err = client
        .get_workload(pb::GetWorkloadRequest {
            workload_id: "web".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
