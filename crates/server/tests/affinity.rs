//! Affinity against the real Docker engine: a released container is kept
//! for its tenant, expires, survives a server restart, and a claim is
//! released once its tenant is idle (file changes count as activity).

mod pool_support;

use std::time::Duration;

use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::tls::AuthedChannel;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::stdout;

use pool_support::{claim_request, demo};

#[tokio::test]
async fn release_reserves_for_the_tenant_then_expiry_destroys_and_the_pool_refills() {
    let Some(c) = demo("{min_size: 1, max_size: 4, affinity_timeout: 3s}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 1).await;
    let mut claims = c.claims().await;
    let first = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();

    let stale = claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: first.generation + 1,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);

    let released = claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: first.generation,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.affinity_expires_at.is_some());
    let out = c.bh(&["affinity", "list"]);
    assert!(stdout(&out).contains("t1"), "{}", stdout(&out));

    // Back within the TTL: the same container, source AFFINITY, a new generation.
    let back = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(back.source, pb::ClaimSource::Affinity as i32);
    assert_eq!(back.container_id, first.container_id);
    assert_eq!(back.generation, first.generation + 1);
    // Another tenant never gets it.
    let other = claims
        .claim(claim_request("t2"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_ne!(other.container_id, first.container_id);

    // Release again and let the reservation expire: the container is gone
    // from Docker and the pool is back at min_size.
    claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: back.generation,
            request_id: String::new(),
        })
        .await
        .unwrap();
    let docker_id = first.docker_id.clone();
    c.wait_gone(&docker_id, "the expired container to be removed")
        .await;
    c.wait_idle("demo", 1).await;
    let fresh = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_ne!(
        fresh.container_id, first.container_id,
        "a container never passes on after expiry"
    );
    assert_eq!(fresh.source, pb::ClaimSource::Pool as i32);
}

#[tokio::test]
async fn the_idle_timeout_releases_a_forgotten_claim() {
    let Some(c) = demo("{min_size: 1, max_size: 3, idle_timeout: 2s}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 1).await;
    let mut claims = c.claims().await;
    claims.claim(claim_request("forgetful")).await.unwrap();
    c.eventually("the idle reaper to release the claim", || {
        let mut claims = claims.clone();
        async move {
            let err = claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "forgetful".into(),
                    workload_id: "demo".into(),
                })
                .await
                .err()?;
            (err.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    let out = c.bh(&["events", "--kind", "claim.released", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("idle since"),
        "{events}"
    );
}

#[tokio::test]
async fn file_changes_in_the_state_directory_count_as_activity() {
    let Some(c) = demo("{min_size: 1, max_size: 3, idle_timeout: 4s}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 1).await;
    let mut claims = c.claims().await;
    let claim = claims
        .claim(claim_request("busy"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    let started = std::time::Instant::now();
    // The tenant keeps writing inside its container for twice the idle
    // timeout; the claim must survive it.
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        ticks.tick().await;
        n += 1;
        c.exec(&claim.docker_id, &format!("echo {n} > /state/work-{n}.txt"))
            .await;
    }
    let still = claims
        .get_claim(pb::GetClaimRequest {
            tenant_id: "busy".into(),
            workload_id: "demo".into(),
        })
        .await;
    assert!(
        still.is_ok(),
        "an active tenant was reaped after {:?}: {still:?}",
        started.elapsed()
    );
    // Once the writing stops, the idle timeout applies.
    c.eventually("the idle claim to be released", || {
        let mut claims = claims.clone();
        async move {
            claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "busy".into(),
                    workload_id: "demo".into(),
                })
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;
}

/// `tenant`'s claim of demo, once the server grants one (after a restart,
/// once the agent is back and its node reconciled).
async fn claim_once_served(
    c: &Cluster,
    claims: &ClaimServiceClient<AuthedChannel>,
    tenant: &str,
) -> pb::ClaimInfo {
    c.eventually("a claim once the agent is back", || {
        let mut claims = claims.clone();
        async move {
            claims
                .claim(claim_request(tenant))
                .await
                .ok()
                .map(|r| r.into_inner().claim.unwrap())
        }
    })
    .await
}

#[tokio::test]
async fn reservations_survive_a_restart_and_expired_ones_end_as_it_starts() {
    let Some(mut c) = demo("{min_size: 1, max_size: 4, affinity_timeout: 4s}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 1).await;
    let mut claims = c.claims().await;
    let first = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: first.generation,
            request_id: String::new(),
        })
        .await
        .unwrap();

    // Restart at once: the reservation is still there and still honoured.
    c.stop_server().await;
    c.start_server().await;
    let out = c.bh(&["affinity", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["tenant"], "t1", "{listed}\n{}", c.server().log());
    c.wait_idle("demo", 1).await;
    let mut claims = c.claims().await;
    let back = claim_once_served(&c, &claims, "t1").await;
    assert_eq!(back.source, pb::ClaimSource::Affinity as i32);
    assert_eq!(back.container_id, first.container_id);
    let released = claims
        .release(pb::ReleaseRequest {
            tenant_id: "t1".into(),
            workload_id: "demo".into(),
            generation: back.generation,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let expires = released.affinity_expires_at.unwrap();

    // Stop the server until the reservation has expired, then start it.
    c.stop_server().await;
    c.eventually("the reservation's expiry to pass", || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now > expires.seconds).then_some(())
    })
    .await;
    // The expiry's first pass runs beside serving: the tenant's claim,
    // as soon as one is served, never goes through the expired
    // reservation, whichever of the two ends it.
    c.start_server().await;
    let again = claim_once_served(&c, &c.claims().await, "t1").await;
    assert_ne!(again.source, pb::ClaimSource::Affinity as i32, "{again:?}");
    assert_ne!(again.container_id, first.container_id, "{again:?}");
    let out = c.bh(&["affinity", "list", "-o", "json"]);
    assert_eq!(stdout(&out).trim(), "[]", "ended once the server serves");
    let out = c.bh(&["events", "--kind", "affinity.expired", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    let docker_id = first.docker_id.clone();
    c.wait_gone(
        &docker_id,
        "the expired container to be destroyed once the agent is back",
    )
    .await;
}

#[tokio::test]
async fn claiming_again_counts_as_activity_like_a_touch() {
    let Some(c) = demo("{min_size: 1, max_size: 3, idle_timeout: 2s}")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 1).await;
    let mut claims = c.claims().await;
    let first = claims
        .claim(claim_request("eager"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    // The tenant's client claims every 500 ms (each answer is EXISTING)
    // for twice the idle timeout, and does nothing else.
    let started = std::time::Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    while started.elapsed() < Duration::from_secs(4) {
        ticks.tick().await;
        let again = claims
            .claim(claim_request("eager"))
            .await
            .unwrap()
            .into_inner()
            .claim
            .unwrap();
        assert_eq!(
            (again.container_id.as_str(), again.source),
            (
                first.container_id.as_str(),
                pb::ClaimSource::Existing as i32
            ),
            "the same claim, not released and re-granted, after {:?}",
            started.elapsed()
        );
    }
    // Once the claims stop, the idle timeout applies.
    c.eventually("the idle claim to be released", || {
        let mut claims = claims.clone();
        async move {
            claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "eager".into(),
                    workload_id: "demo".into(),
                })
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;
}
