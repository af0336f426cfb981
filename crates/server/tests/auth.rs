//! The trust model against real processes, real TLS and the real engine:
//! callers need scoped bearer tokens, agents are who their certificate
//! says, and a node cannot speak for another node's containers.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::agent_service_client::AgentServiceClient;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::{
    ServerOptions, ServerProcess, eventually, grpcurl_available, stderr, stdout,
};

async fn cluster() -> Option<Cluster> {
    Cluster::builder()
        .node("auth")
        .workload("demo", |image| {
            format!(
                "id: demo\nimage: {image}\ncommand: [sleep, infinity]\npool: {{min_size: 1, max_size: 6}}\n"
            )
        })
        .start()
        .await
}

fn claim_request(tenant: &str) -> pb::ClaimRequest {
    pb::ClaimRequest {
        tenant_id: tenant.into(),
        workload_id: "demo".into(),
        acquire_timeout: Some(boilerhouse_proto::convert::duration_to_pb(
            Duration::from_secs(60),
        )),
        ..Default::default()
    }
}

/// A token made while the server runs is accepted within its reload
/// period; wait for that rather than guess.
async fn accepted(c: &Cluster, token: &str) {
    let server = c.server();
    eventually(
        Duration::from_secs(10),
        "the new token to be accepted",
        || async {
            let channel = server.channel_as(Some(token)).await.ok()?;
            let answer = ClaimServiceClient::new(channel)
                .list_claims(pb::ListClaimsRequest::default())
                .await;
            answer
                .err()
                .is_none_or(|s| s.code() != Code::Unauthenticated)
                .then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn callers_need_a_token_and_tenants_reach_only_their_own_claims() {
    let Some(c) = cluster().await else { return };
    c.wait_idle("demo", 1).await;
    let server = c.server();

    // No token: UNAUTHENTICATED, through bh, grpcurl and a Rust client.
    let err = stderr(&server.bh_as(None, &["claims", "list"]));
    assert!(
        err.contains("unauthenticated") && err.contains("BOILERHOUSE_TOKEN"),
        "{err}"
    );
    if grpcurl_available() {
        let out = server
            .grpcurl_as(
                None,
                &[
                    "-d",
                    r#"{"tenant_id":"acme","workload_id":"demo"}"#,
                    "boilerhouse.v1.ClaimService/Claim",
                ],
            )
            .unwrap();
        assert!(!out.status.success());
        assert!(stderr(&out).contains("Unauthenticated"), "{}", stderr(&out));
    }
    let anonymous = ClaimServiceClient::new(server.channel_as(None).await.unwrap())
        .claim(claim_request("acme"))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let forged = ClaimServiceClient::new(server.channel_as(Some("bht_0000")).await.unwrap())
        .claim(claim_request("acme"))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated, "{forged:?}");

    // The admin claims for another tenant first.
    let other = c.claim("other", "demo").await;

    let acme = server.create_token("acme-app", "tenant:acme").unwrap();
    accepted(&c, &acme).await;
    if grpcurl_available() {
        let out = server
            .grpcurl_as(
                Some(&acme),
                &[
                    "-d",
                    r#"{"tenant_id":"acme","workload_id":"demo","acquire_timeout":"60s"}"#,
                    "boilerhouse.v1.ClaimService/Claim",
                ],
            )
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("\"tenantId\": \"acme\""),
            "{}",
            stdout(&out)
        );
    }
    let mut tenant_client = ClaimServiceClient::new(server.channel_as(Some(&acme)).await.unwrap());
    let mine = tenant_client
        .claim(claim_request("acme"))
        .await
        .expect("a tenant claims for itself")
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(mine.tenant_id, "acme");

    // Another tenant's claim: neither taken, released, touched nor read.
    let denied = tenant_client
        .claim(claim_request("other"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("tenant:acme"), "{denied:?}");
    let release = tenant_client
        .release(pb::ReleaseRequest {
            tenant_id: "other".into(),
            workload_id: "demo".into(),
            generation: other.generation,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(release.code(), Code::PermissionDenied);
    let touch = tenant_client
        .touch(pb::TouchRequest {
            tenant_id: "other".into(),
            workload_id: "demo".into(),
            generation: other.generation,
        })
        .await
        .unwrap_err();
    assert_eq!(touch.code(), Code::PermissionDenied);
    let get = tenant_client
        .get_claim(pb::GetClaimRequest {
            tenant_id: "other".into(),
            workload_id: "demo".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::PermissionDenied);
    // Listing without a filter shows only its own tenant's claims.
    let listed = tenant_client
        .list_claims(pb::ListClaimsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .claims;
    assert!(!listed.is_empty());
    assert!(listed.iter().all(|c| c.tenant_id == "acme"), "{listed:?}");
    assert_eq!(
        c.claim("other", "demo").await.container_id,
        other.container_id,
        "untouched"
    );

    // Operator work is refused, naming the scope it needs.
    let err = stderr(&server.bh_as(Some(&acme), &["node", "cordon", c.node(0)]));
    assert!(
        err.contains("permission denied") && err.contains("operator"),
        "{err}"
    );
    let err = stderr(&server.bh_as(Some(&acme), &["pool", "scale", "demo", "--min", "0"]));
    assert!(err.contains("permission denied"), "{err}");

    // An operator token may do it; events name who did what.
    let ops = server.create_token("ops", "operator").unwrap();
    accepted(&c, &ops).await;
    let out = server.bh_as(Some(&ops), &["node", "cordon", c.node(0)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = c.bh_ok(&["events", "--kind", "node.cordoned", "-o", "json"]);
    assert!(events.contains("token:ops (operator)"), "{events}");
    let events = c.bh_ok(&["events", "--tenant", "acme", "-o", "json"]);
    assert!(events.contains("token:acme-app (tenant:acme)"), "{events}");
}

/// Opens `Connect` with `tls` (a node's certificate, or none) and `token`,
/// says Hello as `hello_node`, and returns the first answer.
async fn connect_as(
    c: &Cluster,
    identity: Option<&str>,
    token: Option<&str>,
    hello_node: &str,
) -> Result<
    (
        mpsc::Sender<pb::ConnectRequest>,
        tonic::Streaming<pb::ConnectResponse>,
    ),
    tonic::Status,
> {
    let server = c.server();
    let ca = std::fs::read(server.credentials().unwrap().ca()).unwrap();
    let node_files = identity.map(|n| server.node_tls(n).unwrap().unwrap());
    let pems = node_files.as_ref().map(|t| {
        (
            std::fs::read(&t.cert).unwrap(),
            std::fs::read(&t.key).unwrap(),
        )
    });
    let tls = boilerhouse_proto::tls::client_tls(
        &ca,
        pems.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        None,
    );
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let channel = tonic::service::interceptor::InterceptedService::new(
        channel,
        boilerhouse_proto::tls::BearerToken::new(token).unwrap(),
    );
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::ConnectRequest {
        message: Some(pb::connect_request::Message::Hello(pb::Hello {
            node_id: hello_node.into(),
            boot_id: "test-boot".into(),
            agent_version: "test".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let inbound = AgentServiceClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

async fn events_of(c: &Cluster, kind: &str) -> String {
    c.bh_ok(&["events", "--kind", kind, "-o", "json"])
}

#[tokio::test]
async fn agents_are_who_their_certificate_says_and_touch_only_their_own_containers() {
    let Some(c) = cluster().await else { return };
    c.wait_idle("demo", 1).await;
    let real = c.node(0).to_owned();

    // Node A's certificate cannot say Hello as node B, nor take over the
    // real node's session.
    let intruder = format!("intruder-{}", &real[real.len() - 6..]);
    let err = connect_as(&c, Some(&intruder), None, &real)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(&intruder), "{err:?}");
    let impersonations = events_of(&c, "node.impersonation").await;
    assert!(impersonations.contains(&intruder), "{impersonations}");
    // Without a node certificate, Connect is closed to everyone, even an
    // admin token.
    let err = connect_as(&c, None, None, &real).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let admin = c.server().admin_token().unwrap().to_owned();
    let err = connect_as(&c, None, Some(&admin), &real).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // And the real node's session survived all of it.
    let node = c
        .nodes()
        .await
        .get_node(pb::GetNodeRequest {
            node_id: real.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert!(node.connected, "{node:?}");

    // A node with its own valid certificate reports the real node's
    // container as its own, and says the engine destroyed it.
    let idle = c.bh_ok(&["container", "list", "-o", "json"]);
    let containers: serde_json::Value = serde_json::from_str(&idle).unwrap();
    let victim = containers
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_else(|| panic!("no container in {idle}"));
    let docker_id = victim["docker_id"].as_str().unwrap().to_owned();
    let container_id = victim["container_id"]
        .as_str()
        .or(victim["id"].as_str())
        .unwrap()
        .to_owned();
    let (tx, mut inbound) = connect_as(&c, Some(&intruder), None, &intruder)
        .await
        .expect("a node connects as itself");
    let welcome = inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        welcome.message,
        Some(pb::connect_response::Message::Welcome(_))
    ));
    let labels = [
        (boilerhouse_core::container::labels::MANAGED, "true"),
        (boilerhouse_core::container::labels::NODE_ID, real.as_str()),
        (
            boilerhouse_core::container::labels::CONTAINER_ID,
            container_id.as_str(),
        ),
        (boilerhouse_core::container::labels::WORKLOAD_ID, "demo"),
        (boilerhouse_core::container::labels::POOL_ID, "demo"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    tx.send(pb::ConnectRequest {
        message: Some(pb::connect_request::Message::FullReport(pb::FullReport {
            observed_at: None,
            containers: vec![pb::ObservedContainer {
                docker_id: docker_id.clone(),
                name: "forged".into(),
                labels,
                docker_state: "exited".into(),
                ..Default::default()
            }],
            command_id: String::new(),
            more: false,
            part: 0,
        })),
    })
    .await
    .unwrap();
    tx.send(pb::ConnectRequest {
        message: Some(pb::connect_request::Message::ContainerEvent(
            pb::ContainerEvent {
                kind: pb::ContainerEventKind::Destroy as i32,
                docker_id: docker_id.clone(),
                container_id: container_id.clone(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "both refusals recorded",
        || async {
            let events = events_of(&c, "node.restricted").await;
            (events.contains("a full report") && events.contains("a destroy event")).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server().log()));
    // Nothing changed: the container is still idle on its real node and
    // is the one a tenant gets.
    let pool = c.pool("demo").await;
    let counts = pool.counts.unwrap();
    assert_eq!((counts.idle, counts.lost), (1, 0), "{counts:?}");
    let claim = c.claim("t1", "demo").await;
    assert_eq!(claim.docker_id, docker_id);
    assert_eq!(claim.node_id, real);
    drop(tx);
}

#[tokio::test]
async fn an_agent_whose_name_differs_from_its_certificate_does_not_start() {
    let Some(c) = cluster().await else { return };
    let server = c.server();
    let tls = server.node_tls("cert-node").unwrap().unwrap();
    let out = std::process::Command::new(boilerhouse_testkit::binary("boilerhouse-agent"))
        .args(["--server", &server.url(), "--node-name", "other-node"])
        .arg("--ca")
        .arg(&tls.ca)
        .arg("--cert")
        .arg(&tls.cert)
        .arg("--key")
        .arg(&tls.key)
        .arg("--state-root")
        .arg(c.dir().join("never"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("other-node") && err.contains("cert-node"),
        "{err}"
    );
}

#[tokio::test]
async fn plaintext_off_loopback_needs_the_insecure_flag_and_reflection_can_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(boilerhouse_testkit::binary("boilerhoused"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "0.0.0.0:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("refusing to serve 0.0.0.0:0 without TLS") && err.contains("--insecure"),
        "{err}"
    );

    let server = ServerProcess::start_in(
        dir.path(),
        ServerOptions {
            config_toml: Some("reflection = false\n".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    if grpcurl_available() {
        let out = server.grpcurl(&["list"]).unwrap();
        assert!(!out.status.success(), "{}", stdout(&out));
        assert!(stderr(&out).contains("reflection"), "{}", stderr(&out));
    }
    // The API itself is unaffected.
    let out = server.bh(&["workload", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
