//! Regressions of issue 12 against the real Docker engine, with
//! boilerhoused and an agent as processes. Each reproduced its defect
//! before the fix. (Defects 3, 4 and 5 are also replayed step by step in
//! the simulation's scripted schedules.)

use std::time::Duration;

use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::affinity_service_client::AffinityServiceClient;
use boilerhouse_testkit::cluster::Cluster;

async fn start(config: &str, body: &str, pool: &str) -> Option<Cluster> {
    let (body, pool) = (body.to_owned(), pool.to_owned());
    Cluster::builder()
        .node("defects")
        .config(config)
        .workload("demo.yaml", move |image| {
            format!("id: demo\nimage: {image}\n{body}pool: {pool}\n")
        })
        .start()
        .await
}

const SLEEP: &str = "command: [sleep, infinity]\n";

async fn reservations(c: &Cluster) -> Vec<pb::Reservation> {
    AffinityServiceClient::new(c.channel().await)
        .list_reservations(pb::ListReservationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .reservations
}

fn request(tenant: &str, request_id: Option<&str>) -> pb::ClaimRequest {
    pb::ClaimRequest {
        tenant_id: tenant.into(),
        workload_id: "demo".into(),
        request_id: request_id.unwrap_or_default().into(),
        ..Default::default()
    }
}

/// Defect 6: after `docker rm -f` of a claimed container, Claim kept
/// answering EXISTING with the removed Docker id until reconciliation's
/// grace passed. The engine's destroy event now ends the claim at once
/// (the grace here is ten minutes, so reconciliation cannot be what acts).
#[tokio::test]
async fn a_claimed_container_removed_from_the_engine_is_never_answered_again() {
    let config = "reconcile_lost_grace = \"10m\"\n";
    let Some(c) = start(config, SLEEP, "{min_size: 1, max_size: 3}").await else {
        return;
    };
    let first = c.claim("t0", "demo").await;
    c.docker()
        .remove_container(
            &first.docker_id,
            Some(bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let second = c
        .eventually("a claim on another container", || async {
            let claim = c.try_claim("t0", "demo").await.ok()?;
            (claim.docker_id != first.docker_id).then_some(claim)
        })
        .await;
    assert_ne!(second.container_id, first.container_id);
    assert!(second.generation >= 1);
    let ended = c
        .claims()
        .await
        .list_claims(pb::ListClaimsRequest {
            include_ended: true,
            tenant_id: "t0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .claims;
    let lost = ended
        .iter()
        .find(|cl| cl.container_id == first.container_id)
        .expect("the first claim is recorded");
    assert_eq!(lost.status, pb::ClaimStatus::Lost as i32, "{ended:?}");
}

/// Defect 2: a claim whose client gave up during a cold start left the
/// warming container holding the pool's only `max_size` slot forever, and
/// the tenant's retry with the same request id could not be answered. The
/// handler now runs to completion: the retry replays the claim that was
/// made, and once released the slot serves the next tenant.
#[tokio::test]
async fn a_claim_whose_client_gave_up_mid_cold_start_completes_and_leaks_nothing() {
    // Ready two seconds after it starts: every cold start outlasts the
    // client's patience below.
    let body = "command: [sh, -c, 'sleep 2; touch /tmp/ready; sleep infinity']\n\
                healthcheck: {test: [CMD, test, -f, /tmp/ready], interval: 200ms, timeout: 1s, retries: 60}\n\
                read_only: false\n";
    let Some(c) = start("", body, "{min_size: 0, max_size: 1, reuse: false}").await else {
        return;
    };
    let mut claims = c.claims().await;
    let mut impatient = tonic::Request::new(request("t0", Some("claim-t0-1")));
    impatient.set_timeout(Duration::from_millis(500));
    let gave_up = claims.claim(impatient).await.unwrap_err();
    assert!(
        matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{gave_up:?}"
    );
    // Nobody is waiting for it any more, yet the claim is made.
    let made = c
        .eventually("the abandoned claim to complete", || {
            let mut claims = claims.clone();
            async move {
                claims
                    .get_claim(pb::GetClaimRequest {
                        tenant_id: "t0".into(),
                        workload_id: "demo".into(),
                    })
                    .await
                    .ok()
                    .map(|r| r.into_inner().claim.unwrap())
            }
        })
        .await;
    // The retry with the same request id gets that very claim.
    let replayed = claims
        .claim(request("t0", Some("claim-t0-1")))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        (replayed.container_id.as_str(), replayed.generation),
        (made.container_id.as_str(), 1)
    );
    assert_eq!(
        replayed.source,
        pb::ClaimSource::Cold as i32,
        "{replayed:?}"
    );
    // Only one container was made for it, and t1 must wait for it.
    let busy = c.try_claim("t1", "demo").await.unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");

    claims
        .release(pb::ReleaseRequest {
            tenant_id: "t0".into(),
            workload_id: "demo".into(),
            generation: replayed.generation,
            ..Default::default()
        })
        .await
        .unwrap();
    let next = c
        .eventually("t1's claim once t0 released", || async {
            c.try_claim("t1", "demo").await.ok()
        })
        .await;
    assert_ne!(next.container_id, replayed.container_id);
}

/// Defect 1 (and 4): a released, reserved container whose node was lost
/// and came back went Idle, and the next tenant's POOL claim received the
/// first tenant's files; the lost node's reservation came back after a
/// server restart. Now the reservation ends for good and the container is
/// destroyed when it comes back.
#[tokio::test]
async fn a_reserved_container_back_from_a_lost_node_is_destroyed_not_pooled() {
    let config = "suspect_after = \"2s\"\nlost_grace = \"1s\"\nreconcile_interval = \"500ms\"\n";
    let Some(mut c) = start(config, SLEEP, "{min_size: 1, max_size: 3}").await else {
        return;
    };
    let first = c.claim("t0", "demo").await;
    c.claims()
        .await
        .release(pb::ReleaseRequest {
            tenant_id: "t0".into(),
            workload_id: "demo".into(),
            generation: first.generation,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reservations(&c).await.len(), 1);

    c.kill_agent(0);
    let node = c.node(0).to_owned();
    c.wait_node(&node, pb::NodeStatus::Lost, None).await;
    c.eventually("the lost node's reservation to end", || async {
        reservations(&c).await.is_empty().then_some(())
    })
    .await;
    // In the database too: a restart does not bring it back.
    c.kill_server();
    c.start_server().await;
    let after = reservations(&c).await;
    assert!(after.is_empty(), "{after:?}");

    c.restart_agent(0);
    c.wait_gone(&first.docker_id, "t0's old container to be destroyed")
        .await;
    let other = c.claim("t1", "demo").await;
    assert_ne!(other.container_id, first.container_id);
}
