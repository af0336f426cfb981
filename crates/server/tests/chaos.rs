//! The chaos harness: tenants drive claim, touch and release traffic through
//! the real API while the server and the agents are killed with SIGKILL at
//! random moments and restarted. After the load stops and the system
//! converges, a history checker asserts that:
//! - no container ever served two tenants (client history, database, state
//!   files);
//! - every acknowledged claim and release is reflected;
//! - no managed container is orphaned (every one has a row; the
//!   reconciliation plan is empty);
//! - `PRAGMA integrity_check` is ok.
//!
//! `BOILERHOUSE_CHAOS_ITERATIONS` sets the number of kills (20 by default,
//! which CI runs); set it high for a long run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boilerhouse_proto::tls::{AuthedChannel as Channel, BearerToken};
use rand::Rng as _;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::docker::containers_with;
use boilerhouse_testkit::eventually;

const TENANTS: usize = 12;

const CONFIG: &str = r#"
restart_grace = "10s"
reconcile_interval = "500ms"
reconcile_lost_grace = "5s"
reconcile_creation_grace = "3s"
"#;

#[derive(Debug, Clone)]
enum Op {
    ClaimAttempt,
    ClaimAck { container: String, generation: u64 },
    ReleaseAttempt,
    ReleaseAck { container: String },
}

type History = Arc<Mutex<BTreeMap<String, Vec<Op>>>>;

fn record(history: &History, tenant: &str, op: Op) {
    history
        .lock()
        .unwrap()
        .entry(tenant.to_owned())
        .or_default()
        .push(op);
}

/// One tenant's traffic until `stop`: claim, touch, release, again.
async fn tenant_traffic(
    channel: Channel,
    tenant: String,
    history: History,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut client = ClaimServiceClient::new(channel);
    let mut pace = tokio::time::interval(Duration::from_millis(40));
    let mut generation = None;
    while !stop.is_cancelled() {
        pace.tick().await;
        match generation {
            None => {
                record(&history, &tenant, Op::ClaimAttempt);
                let request = pb::ClaimRequest {
                    tenant_id: tenant.clone(),
                    workload_id: "demo".into(),
                    acquire_timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                    ..Default::default()
                };
                if let Ok(r) = client.claim(request).await {
                    let claim = r.into_inner().claim.unwrap();
                    record(
                        &history,
                        &tenant,
                        Op::ClaimAck {
                            container: claim.container_id.clone(),
                            generation: claim.generation,
                        },
                    );
                    generation = Some(claim.generation);
                }
            }
            Some(g) => {
                let _ = client
                    .touch(pb::TouchRequest {
                        tenant_id: tenant.clone(),
                        workload_id: "demo".into(),
                        generation: g,
                    })
                    .await;
                record(&history, &tenant, Op::ReleaseAttempt);
                let request = pb::ReleaseRequest {
                    tenant_id: tenant.clone(),
                    workload_id: "demo".into(),
                    generation: g,
                    request_id: String::new(),
                };
                match client.release(request).await {
                    Ok(r) => {
                        let claim = r.into_inner().claim.unwrap();
                        record(
                            &history,
                            &tenant,
                            Op::ReleaseAck {
                                container: claim.container_id,
                            },
                        );
                        generation = None;
                    }
                    // The claim is gone (lost, or released by an earlier
                    // attempt whose answer never arrived): start over.
                    Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                        generation = None
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

#[tokio::test]
async fn chaos_kill9_server_and_agents_under_claim_traffic() {
    let iterations: usize = std::env::var("BOILERHOUSE_CHAOS_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Some(mut c) = Cluster::builder()
        .config(CONFIG)
        .node("chaos-a")
        .node("chaos-b")
        .workload("demo", |image| {
            format!(
                "id: demo\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}}}\n\
                 pool: {{min_size: 3, max_size: 12, affinity_timeout: 2s, fill_concurrency: 4}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    let nodes = c.node_names();
    // Lazy, so it reconnects by itself each time the server comes back;
    // over TLS with the admin token, as every client of a real server.
    let channel = InterceptedService::new(
        c.server().endpoint().unwrap().connect_lazy(),
        BearerToken::new(c.server().admin_token()).unwrap(),
    );

    let history: History = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic: Vec<_> = (0..TENANTS)
        .map(|i| {
            tokio::spawn(tenant_traffic(
                channel.clone(),
                format!("tenant-{i}"),
                history.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let (mut server_kills, mut agent_kills) = (0, 0);
    for _ in 0..iterations {
        let wait = Duration::from_millis(rand::rng().random_range(200..1200));
        // Deliberate: chaos strikes at a random moment, not on a condition.
        tokio::time::sleep(wait).await;
        let victim = rand::rng().random_range(0..3);
        if victim == 0 {
            c.restart_server().await;
            server_kills += 1;
        } else {
            c.restart_agent(victim - 1);
            agent_kills += 1;
        }
    }
    stop.cancel();
    for t in traffic {
        t.await.unwrap();
    }

    // Convergence: both agents back, nothing left for reconciliation.
    let nodes_client = pb::node_service_client::NodeServiceClient::new(channel.clone());
    let reconcile = pb::reconcile_service_client::ReconcileServiceClient::new(channel.clone());
    eventually(Duration::from_secs(90), "the system to converge", || {
        let mut nodes_client = nodes_client.clone();
        let mut reconcile = reconcile.clone();
        async move {
            let listed = nodes_client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            let all_back = listed.len() == 2
                && listed
                    .iter()
                    .all(|n| n.connected && n.status == pb::NodeStatus::Ready as i32);
            let plan = reconcile
                .plan_reconcile(pb::PlanReconcileRequest::default())
                .await
                .ok()?
                .into_inner()
                .actions;
            (all_back && plan.is_empty()).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server().log()));

    let history = history.lock().unwrap().clone();
    let mut violations = Vec::new();

    // No container ever served two tenants: client history...
    let mut tenants_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut claims_acked, mut releases_acked) = (0, 0);
    for (tenant, ops) in &history {
        for op in ops {
            match op {
                Op::ClaimAck { container, .. } => {
                    claims_acked += 1;
                    tenants_of
                        .entry(container.clone())
                        .or_default()
                        .insert(tenant.clone());
                }
                Op::ReleaseAck { .. } => releases_acked += 1,
                _ => {}
            }
        }
    }
    for (container, tenants) in &tenants_of {
        if tenants.len() > 1 {
            violations.push(format!("history: container {container} served {tenants:?}"));
        }
    }
    // ...the database...
    let db = c.server().database();
    let mut conn = boilerhouse_server::store::open_raw(&db).await.unwrap();
    let shared: Vec<(String, i64)> = sqlx::query_as(
        "SELECT container_id, COUNT(DISTINCT tenant_id) FROM claims GROUP BY container_id HAVING COUNT(DISTINCT tenant_id) > 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (container, n) in shared {
        violations.push(format!(
            "database: container {container} has claims of {n} tenants"
        ));
    }
    // ...and the state files.
    for i in 0..nodes.len() {
        let dir = c.agent(i).options.state_root.join("containers");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let container = entry.file_name().to_string_lossy().into_owned();
            let Ok(text) = std::fs::read_to_string(entry.path().join("boilerhouse-state.json"))
            else {
                continue;
            };
            let state: serde_json::Value = serde_json::from_str(&text).unwrap();
            for key in ["tenant_id", "last_tenant_id"] {
                if let (Some(t), Some(known)) = (state[key].as_str(), tenants_of.get(&container))
                    && !known.contains(t)
                {
                    violations.push(format!(
                        "state file: container {container} names {t}, history says {known:?}"
                    ));
                }
            }
        }
    }

    // Every acknowledged claim and release is reflected.
    let mut claims = ClaimServiceClient::new(channel.clone());
    for (tenant, ops) in &history {
        for op in ops {
            let (container, statuses): (&String, &[&str]) = match op {
                Op::ClaimAck { container, .. } => (container, &["active", "released", "lost"]),
                Op::ReleaseAck { container } => (container, &["released", "lost"]),
                _ => continue,
            };
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM claims WHERE tenant_id = ? AND container_id = ? AND status IN (?, ?, ?)",
            )
            .bind(tenant)
            .bind(container)
            .bind(statuses[0])
            .bind(statuses[1])
            .bind(statuses.get(2).copied().unwrap_or(statuses[1]))
            .fetch_one(&mut conn)
            .await
            .unwrap();
            if n == 0 {
                violations.push(format!(
                    "{tenant}: acknowledged {op:?} is not in the database"
                ));
            }
        }
        // The last acknowledged operation decides the present, unless an
        // unanswered attempt came after it (it may or may not have happened).
        let Some(last) = ops
            .iter()
            .rposition(|o| matches!(o, Op::ClaimAck { .. } | Op::ReleaseAck { .. }))
        else {
            continue;
        };
        if ops[last + 1..]
            .iter()
            .any(|o| matches!(o, Op::ClaimAttempt | Op::ReleaseAttempt))
        {
            continue;
        }
        let current = claims
            .get_claim(pb::GetClaimRequest {
                tenant_id: tenant.clone(),
                workload_id: "demo".into(),
            })
            .await;
        match (&ops[last], current) {
            (
                Op::ClaimAck {
                    container,
                    generation,
                },
                Ok(c),
            ) => {
                let c = c.into_inner().claim.unwrap();
                if &c.container_id != container || c.generation < *generation {
                    violations.push(format!(
                        "{tenant}: acknowledged claim of {container} but holds {}",
                        c.container_id
                    ));
                }
            }
            (Op::ClaimAck { container, .. }, Err(e)) => violations.push(format!(
                "{tenant}: acknowledged claim of {container} is gone: {}",
                e.message()
            )),
            (Op::ReleaseAck { container }, Ok(c)) => violations.push(format!(
                "{tenant}: released {container} but still holds {}",
                c.into_inner().claim.unwrap().container_id
            )),
            _ => {}
        }
    }

    // No orphans: every managed container in Docker has a row.
    let rows: BTreeSet<String> =
        pb::container_service_client::ContainerServiceClient::new(channel.clone())
            .list_containers(pb::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.container_id)
            .collect();
    for node in &nodes {
        for container in containers_with(c.docker(), "boilerhouse.node-id", node)
            .await
            .unwrap()
        {
            let id = container
                .labels
                .unwrap_or_default()
                .get("boilerhouse.container-id")
                .cloned()
                .unwrap_or_default();
            if !rows.contains(&id) {
                violations.push(format!("orphan: container {id} on {node} has no row"));
            }
        }
    }

    // The database file is sound.
    let (integrity,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    if integrity != "ok" {
        violations.push(format!("integrity_check: {integrity}"));
    }

    eprintln!(
        "chaos: {iterations} iterations, {server_kills} server kills, {agent_kills} agent kills, \
         {claims_acked} claims and {releases_acked} releases acknowledged, {} violations",
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    assert!(
        claims_acked > iterations,
        "the traffic made progress: {claims_acked} claims"
    );
}
