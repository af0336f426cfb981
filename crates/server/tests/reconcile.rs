//! Reconciliation against the real Docker engine: a stray managed
//! container is destroyed after its grace, every claim is rebuilt after the
//! database is lost, a lost node's claims are resumed or replaced when
//! it returns, and a database restored from an older backup never hands a
//! container claimed after the backup to another tenant.

mod pool_support;

use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_testkit::stdout;

use pool_support::{claim_request, demo};

#[tokio::test]
async fn a_stray_managed_container_is_shown_pending_then_destroyed_after_the_grace() {
    let extra = "reconcile_interval = \"500ms\"\nreconcile_creation_grace = \"4s\"\n";
    let Some(c) = demo("{min_size: 1, max_size: 2}")
        .config(extra)
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 1).await;
    // A managed container made by hand, with our labels, for an unknown pool.
    let spec = boilerhouse_testkit::docker::managed_spec(
        c.image(),
        c.node(0),
        "nobody-knows",
        boilerhouse_core::Timestamp::from_system_time(std::time::SystemTime::now()),
    );
    let runtime = boilerhouse_agent::docker::DockerRuntime::connect(None)
        .await
        .unwrap();
    use boilerhouse_agent::runtime::ContainerRuntime as _;
    let docker_id = runtime.create(&spec, &[]).await.unwrap();
    runtime.start(&docker_id).await.unwrap();

    let plan = c
        .eventually("the stray to appear in the plan", || async {
            let out = c.bh(&["reconcile", "plan", "-o", "json"]);
            let plan: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            plan.as_array()?
                .iter()
                .find(|a| a["container"] == spec.container_id.to_string())
                .cloned()
        })
        .await;
    assert_eq!(plan["action"], "destroy");
    assert!(
        plan["reason"]
            .as_str()
            .unwrap()
            .contains("nobody-knows is not configured"),
        "{plan}"
    );
    assert!(
        plan["due"].as_str().unwrap().starts_with("in "),
        "pending until the creation grace passes: {plan}"
    );
    // The pool's own containers are in agreement: nothing else is planned.
    let out = c.bh(&["reconcile", "plan"]);
    assert_eq!(
        stdout(&out)
            .lines()
            .filter(|l| l.starts_with("destroy")
                || l.starts_with("mark_lost")
                || l.starts_with("adopt"))
            .count(),
        1,
        "{}",
        stdout(&out)
    );

    // Once the creation grace has passed, reconciliation destroys it.
    c.wait_gone(&docker_id, "the stray to be destroyed").await;
    let out = c.bh(&["events", "--kind", "reconcile.destroyed", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("nobody-knows is not configured"),
        "{events}"
    );
}

#[tokio::test]
async fn after_the_database_is_deleted_every_tenant_keeps_its_container() {
    let Some(mut c) = demo("{min_size: 2, max_size: 6}").start().await else {
        return;
    };
    c.wait_idle("demo", 2).await;
    let mut claims = c.claims().await;
    let mut before = Vec::new();
    for tenant in ["t1", "t2"] {
        before.push(
            claims
                .claim(claim_request(tenant))
                .await
                .unwrap()
                .into_inner()
                .claim
                .unwrap(),
        );
    }
    // The agent has recorded each tenant in its container's state file.
    for claim in &before {
        let state_file = std::path::Path::new(&claim.state_path)
            .parent()
            .unwrap()
            .join("boilerhouse-state.json");
        let tenant = claim.tenant_id.clone();
        c.eventually("the state file", || {
            let path = state_file.clone();
            let tenant = tenant.clone();
            async move {
                let json: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
                (json["tenant_id"] == tenant.as_str()).then_some(())
            }
        })
        .await;
    }

    // Stop, delete the database, start again on the same address, asking
    // for the rebuild (without the flag the server refuses to start: see
    // database_recovery.rs).
    c.stop_server().await;
    c.lose_database().await;
    c.extend_config("reconcile_interval = \"500ms\"");
    c.start_server_with(&["--rebuild-from-agents"]).await;

    let mut claims = c.claims().await;
    for old in &before {
        let back = c
            .eventually(&format!("{}'s claim to be rebuilt", old.tenant_id), || {
                let mut claims = claims.clone();
                let tenant = old.tenant_id.clone();
                async move {
                    claims
                        .get_claim(pb::GetClaimRequest {
                            tenant_id: tenant,
                            workload_id: "demo".into(),
                        })
                        .await
                        .ok()
                        .and_then(|r| r.into_inner().claim)
                }
            })
            .await;
        assert_eq!(back.container_id, old.container_id, "the same container");
        assert_eq!(back.docker_id, old.docker_id);
        assert_eq!(back.generation, old.generation);
    }
    // Claiming again returns the same container, not a new one.
    let again = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(again.source, pb::ClaimSource::Existing as i32);
    assert_eq!(again.container_id, before[0].container_id);
    let out = c.bh(&["claims", "list"]);
    assert!(
        stdout(&out).contains("t1") && stdout(&out).contains("t2"),
        "{}",
        stdout(&out)
    );
    let out = c.bh(&["events", "--kind", "reconcile.rebuilt", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !events.as_array().unwrap().is_empty(),
        "one event summarises the rebuild"
    );
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("2 tenant claims"),
        "{events}"
    );
}

#[tokio::test]
async fn a_lost_nodes_claims_are_lost_then_resumed_or_replaced_when_it_returns() {
    let extra = "lost_grace = \"2s\"\nreconcile_interval = \"500ms\"\n";
    // Claims given up when their node is lost (the default keeps them:
    // see disconnect.rs).
    let Some(mut c) = demo("{min_size: 2, max_size: 8}\ndisconnect: {replace: true}")
        .config(extra)
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 2).await;
    let mut claims = c.claims().await;
    let t1 = claims
        .claim(claim_request("t1"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    let t2 = claims
        .claim(claim_request("t2"))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        (t1.node_id.as_str(), t2.node_id.as_str()),
        (c.node(0), c.node(0))
    );

    // A second node joins, then the first one's agent dies.
    let b = c.add_node("pool-b").await;
    let other = c.node(b).to_owned();
    c.kill_agent(0);
    c.eventually("t1's claim to be lost with its node", || {
        let mut claims = claims.clone();
        async move {
            let err = claims
                .get_claim(pb::GetClaimRequest {
                    tenant_id: "t1".into(),
                    workload_id: "demo".into(),
                })
                .await
                .err()?;
            (err.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    let out = c.bh(&["events", "--kind", "claim.lost", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 2, "{events}");

    // The pool refills on the node that remains; t2 claims again there.
    let t2_again = c
        .eventually("a container for t2 on the other node", || {
            let mut claims = claims.clone();
            async move {
                claims
                    .claim(claim_request("t2"))
                    .await
                    .ok()
                    .map(|r| r.into_inner().claim.unwrap())
            }
        })
        .await;
    assert_eq!(t2_again.node_id, other);
    assert_ne!(t2_again.container_id, t2.container_id);

    // The first node returns: t1 gets its container back; t2's old one is
    // destroyed, since t2 holds another.
    c.restart_agent(0);
    let back = c
        .eventually("t1's claim to resume", || {
            let mut claims = claims.clone();
            async move {
                claims
                    .get_claim(pb::GetClaimRequest {
                        tenant_id: "t1".into(),
                        workload_id: "demo".into(),
                    })
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().claim)
            }
        })
        .await;
    assert_eq!(back.container_id, t1.container_id, "the same container");
    assert!(back.generation > t1.generation, "a new fencing generation");
    let old_docker_id = t2.docker_id.clone();
    c.wait_gone(&old_docker_id, "t2's returning container to be destroyed")
        .await;
    let current = claims
        .get_claim(pb::GetClaimRequest {
            tenant_id: "t2".into(),
            workload_id: "demo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        current.container_id, t2_again.container_id,
        "t2 never holds two containers"
    );
}

/// A database restored from a backup older than the containers: a
/// container claimed after the backup is idle in the restored database,
/// but its state file remembers its tenant.
#[tokio::test]
async fn a_container_claimed_after_the_backup_never_goes_to_another_tenant() {
    let Some(mut c) = demo("{min_size: 2, max_size: 6}")
        .config("reconcile_interval = \"500ms\"\n")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 2).await;
    // The backup: taken with the server stopped (a file copy, or pg_dump).
    c.stop_server().await;
    c.save_database("backup");
    c.start_server().await;
    let node = c.node(0).to_owned();
    c.wait_node(&node, pb::NodeStatus::Ready, Some(true)).await;

    let t2 = c.claim("t2", "demo").await;
    // The agent records the claim in the container's state file just
    // after it is acknowledged; a backup restored over a claim the agent
    // had not recorded yet has nothing left that remembers it.
    let state_file = c
        .agent(0)
        .options
        .state_root
        .join("containers")
        .join(&t2.container_id)
        .join("boilerhouse-state.json");
    c.eventually("the agent to record t2's claim", || async {
        std::fs::read_to_string(&state_file)
            .ok()?
            .contains("\"t2\"")
            .then_some(())
    })
    .await;
    c.stop_server().await;
    c.restore_database("backup").await;
    c.start_server().await;
    c.wait_node(&node, pb::NodeStatus::Ready, Some(true)).await;

    // Whatever t3 is given, it is never t2's container.
    let t3 = c.claim("t3", "demo").await;
    assert_ne!(t3.container_id, t2.container_id, "{}", c.server().log());
    // Reconciliation gives t2 its container back and says why: with a
    // newer fencing token when the backup knew the container (as idle),
    // or rebuilt from its labels and state file when t2's claim came
    // before the node was reconciled after the restart and so went to a
    // container created after the backup.
    let resumed = c
        .eventually("the reclaim to be recorded", || async {
            let events = c.bh_ok(&["events", "--kind", "claim.resumed", "-o", "json"]);
            if events.contains("older than the container") {
                return Some(true);
            }
            c.server()
                .log()
                .contains("and 1 tenant claims from the labels and state files")
                .then_some(false)
        })
        .await;
    let back = c.claim("t2", "demo").await;
    assert_eq!(back.container_id, t2.container_id);
    if resumed {
        assert!(back.generation > t2.generation, "{back:?} after {t2:?}");
    } else {
        assert!(back.generation >= t2.generation, "{back:?} after {t2:?}");
    }
    // At max_size while replacements still warm, a claim is refused
    // "retry shortly" (RESOURCE_EXHAUSTED), and a client retries: under a
    // loaded machine the replacements can still be warming here.
    let t4 = c
        .eventually("a container for t4", || async {
            c.try_claim("t4", "demo").await.ok()
        })
        .await;
    assert_ne!(t4.container_id, t2.container_id);
}
