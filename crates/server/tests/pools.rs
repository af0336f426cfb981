//! Warm pools and claims against the real Docker engine, with boilerhoused
//! and an agent as real processes: filling, claiming under concurrency,
//! limits, health checks, failing creates and the operator's `bh` commands.

mod pool_support;

use std::collections::{HashMap, HashSet};

use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::{stderr, stdout};

use pool_support::{claim_request, demo};

#[tokio::test]
async fn the_pool_fills_and_a_claim_is_served_from_it_and_recorded_in_the_state_file() {
    let Some(c) = demo("{min_size: 2, max_size: 6, fill_concurrency: 4}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 2).await;

    let out = c.bh(&["claim", "t1", "demo", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let claim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claim["source"], "POOL");
    assert_eq!(claim["tenant"], "t1");
    assert_eq!(claim["generation"], 1);
    let container = claim["container"].as_str().unwrap().to_owned();
    let state_path = claim["state_path"].as_str().unwrap().to_owned();
    assert!(
        std::path::Path::new(&state_path).is_dir(),
        "the state volume's host path exists: {state_path}"
    );
    assert!(claim["comm_path"].as_str().unwrap().ends_with("/comm"));

    // The agent records the tenant in the container's state file.
    let state_file = std::path::Path::new(&state_path)
        .parent()
        .unwrap()
        .join("boilerhouse-state.json");
    c.eventually("the state file to name t1", || {
        let path = state_file.clone();
        async move {
            let text = std::fs::read_to_string(&path).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            (json["tenant_id"] == "t1").then_some(())
        }
    })
    .await;

    // Claiming again returns the existing claim; the pool refills.
    let again = c
        .claims()
        .await
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(again.source, pb::ClaimSource::Existing as i32);
    assert_eq!(again.container_id, container);
    let pool = c.wait_idle("demo", 2).await;
    assert_eq!(pool.counts.unwrap().claimed, 1);

    // The container really runs, with the claimed Docker id.
    let docker_id = claim["docker_id"].as_str().unwrap();
    let inspect = c.docker().inspect_container(docker_id, None).await.unwrap();
    assert_eq!(inspect.state.unwrap().running, Some(true));

    // A retried request id returns the original answer, not EXISTING.
    let mut claims = c.claims().await;
    let with_id = pb::ClaimRequest {
        request_id: "claim-t2-1".into(),
        ..claim_request("t2")
    };
    let first = claims.claim(with_id.clone()).await.unwrap().into_inner();
    let retry = claims.claim(with_id).await.unwrap().into_inner();
    assert_eq!(retry, first, "the same answer, latency included");
    assert_eq!(first.claim.unwrap().source, pb::ClaimSource::Pool as i32);

    let out = c.bh(&["claims", "list"]);
    assert!(
        stdout(&out).contains("t1") && stdout(&out).contains("t2"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn concurrent_claims_never_share_a_container() {
    let Some(c) = demo("{min_size: 10, max_size: 60, fill_concurrency: 8}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 10).await;
    let channel = c.channel().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let tenant = format!("tenant-{}", i % 50);
            // 50 tenants and a min_size of 10 fill max_size 60 exactly: a
            // claim that meets the refiller's creates at the cap is told
            // RESOURCE_EXHAUSTED with a RetryInfo, and retries as a
            // client must. What may never happen is two tenants on one
            // container.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let response = ClaimServiceClient::new(channel.clone())
                    .claim(pb::ClaimRequest {
                        acquire_timeout: Some(prost_types::Duration {
                            seconds: 60,
                            nanos: 0,
                        }),
                        ..claim_request(&tenant)
                    })
                    .await;
                match response {
                    Err(s)
                        if s.code() == tonic::Code::ResourceExhausted
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    response => break (tenant, response),
                }
            }
        }));
    }
    let mut by_tenant: HashMap<String, HashSet<String>> = HashMap::new();
    for t in tasks {
        let (tenant, response) = t.await.unwrap();
        let claim = response
            .unwrap_or_else(|s| panic!("{tenant}: {s:?}"))
            .into_inner()
            .claim
            .unwrap();
        by_tenant
            .entry(tenant)
            .or_default()
            .insert(claim.container_id);
    }
    assert_eq!(by_tenant.len(), 50);
    let mut owners: HashMap<String, String> = HashMap::new();
    for (tenant, containers) in &by_tenant {
        assert_eq!(containers.len(), 1, "{tenant} got {containers:?}");
        let container = containers.iter().next().unwrap().clone();
        if let Some(other) = owners.insert(container.clone(), tenant.clone()) {
            panic!("container {container} went to {other} and {tenant}");
        }
    }
    let claims = c
        .claims()
        .await
        .list_claims(pb::ListClaimsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .claims;
    assert_eq!(claims.len(), 50);
}

#[tokio::test]
async fn max_size_holds_under_a_burst() {
    let Some(c) = demo("{min_size: 1, max_size: 3}").start().await else {
        return;
    };
    c.wait_idle("demo", 1).await;
    let channel = c.channel().await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let channel = channel.clone();
            tokio::spawn(async move {
                ClaimServiceClient::new(channel)
                    .claim(claim_request(&format!("burst-{i}")))
                    .await
            })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => granted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let details = tonic_types::StatusExt::get_error_details(&status);
                assert!(
                    details.retry_info().is_some(),
                    "retry information is attached"
                );
            }
        }
    }
    assert_eq!(granted, 3, "exactly max_size claims succeed");
    let pool = c.pool("demo").await;
    assert!(pool.counts.unwrap().total <= 3, "{pool:?}");
    assert!(c.containers().await.len() <= 3);
}

#[tokio::test]
async fn containers_become_idle_only_once_their_healthcheck_passes() {
    let Some(c) = Cluster::builder()
        .node("pool")
        .workload("demo", |image| {
            format!(
            "id: demo\nimage: {image}\ncommand: [sh, -c, 'sleep 2; touch /tmp/ready; sleep infinity']\n\
             healthcheck: {{test: [CMD, test, -f, /tmp/ready], interval: 500ms, timeout: 1s, retries: 30}}\n\
             read_only: false\npool: {{min_size: 1, max_size: 2}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    // While the container starts, the pool shows it warming, not idle.
    c.eventually("a warming container", || async {
        (c.pool("demo").await.counts.unwrap().warming == 1).then_some(())
    })
    .await;
    c.wait_idle("demo", 1).await;
    let containers = c.containers().await;
    let inspect = c
        .docker()
        .inspect_container(containers[0].id.as_deref().unwrap(), None)
        .await
        .unwrap();
    let health = inspect
        .state
        .unwrap()
        .health
        .unwrap()
        .status
        .unwrap()
        .to_string();
    assert_eq!(health, "healthy", "idle only once Docker says healthy");
}

#[tokio::test]
async fn failing_creates_back_off_with_events_and_do_not_stop_the_server() {
    let Some(c) = Cluster::builder()
        .node("pool")
        .workload("demo", |_| {
            "id: demo\nimage: boilerhouse-test/no-such-image:missing\npool: {min_size: 2, max_size: 4}\n"
                .to_owned()
        })
        .start()
        .await
    else {
        return;
    };
    let out = c
        .eventually("a pool.create_failed event", || async {
            let out = c.bh(&["events", "--kind", "pool.create_failed", "-o", "json"]);
            let events: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (!events.as_array()?.is_empty()).then_some(events)
        })
        .await;
    assert!(
        out[0]["message"].as_str().unwrap().contains("backing off"),
        "{out}"
    );
    // The failed containers are cleaned up and nothing stays half made.
    c.eventually("the failed creates to be cleaned up", || async {
        let counts = c.pool("demo").await.counts.unwrap();
        (counts.idle == 0 && counts.claimed == 0).then_some(())
    })
    .await;
    let out = c.bh(&["status"]);
    assert!(
        out.status.success(),
        "the server is still serving: {}",
        stderr(&out)
    );
    let err = c
        .claims()
        .await
        .claim(claim_request("t1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::ResourceExhausted),
        "{err:?}"
    );
}

#[tokio::test]
async fn operators_scale_drain_extend_revoke_and_destroy_with_bh() {
    let Some(c) = demo("{min_size: 1, max_size: 5, affinity_timeout: 1m}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 1).await;

    // Scale up: the pool refills to the new minimum.
    let out = c.bh(&["pool", "scale", "demo", "--min", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_idle("demo", 3).await;
    let out = c.bh(&["pool", "list"]);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("demo") && l.contains(" 3 ")),
        "{}",
        stdout(&out)
    );
    let out = c.bh(&["pool", "scale", "demo", "--min", "9", "--max", "2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("min_size"), "{}", stderr(&out));
    // Asking again for what is already so writes nothing and says nothing.
    for _ in 0..5 {
        c.bh_ok(&["pool", "scale", "demo", "--min", "3"]);
    }
    let events = c.bh_ok(&["events", "--kind", "pool.updated"]);
    assert_eq!(
        events
            .lines()
            .filter(|l| l.contains("scaled to min 3"))
            .count(),
        1,
        "{events}"
    );
    // A zero acquire timeout is refused, naming the field.
    let out = c.bh(&["claim", "t9", "demo", "--timeout", "0s"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("acquire_timeout"), "{}", stderr(&out));

    // Extend and revoke a reservation.
    let out = c.bh(&["claim", "t1", "demo", "-o", "json"]);
    let claim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = c.bh(&["release", "t1", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kept for t1"), "{}", stdout(&out));
    let out = c.bh(&["affinity", "extend", "t1", "demo", "--by", "10m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.bh(&["affinity", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed[0]["remaining"].as_str().unwrap().ends_with('m'),
        "{listed}"
    );
    let out = c.bh(&["affinity", "revoke", "t1", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let docker_id = claim["docker_id"].as_str().unwrap().to_owned();
    c.wait_gone(&docker_id, "the revoked reservation's container to go")
        .await;

    // A claimed container needs --force; its claim is then lost.
    let out = c.bh(&["claim", "t2", "demo", "-o", "json"]);
    let claim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = claim["container"].as_str().unwrap().to_owned();
    let out = c.bh(&["container", "destroy", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("force"), "{}", stderr(&out));
    let out = c.bh(&["container", "destroy", &id, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.bh(&["claims", "list", "--all", "-o", "json"]);
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        claims
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tenant"] == "t2" && c["status"] == "lost"),
        "{claims}"
    );

    // Drain: idle containers go, nothing refills.
    let out = c.bh(&["pool", "drain", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.eventually("the drained pool to empty", || async {
        let counts = c.pool("demo").await.counts.unwrap();
        (counts.total == 0).then_some(())
    })
    .await;
    let out = c.bh(&["claim", "t3", "demo"]);
    assert!(!out.status.success(), "a drained pool serves no new claims");
}
