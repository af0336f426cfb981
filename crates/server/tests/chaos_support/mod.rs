//! The history checker shared by the chaos tests: tenants drive claim,
//! touch and release traffic through the real API (to one server, or to
//! replicas, following the leader as a client must) and record what they
//! asked and what they were told, and every call with its times and its
//! answer ([`traffic`]); after the faults stop and the system converges, [`check`]
//! holds the record against the database, the state files and the
//! engine:
//! - no container ever served two tenants (client history, database, state
//!   files);
//! - every acknowledged claim and release is reflected;
//! - no managed container is orphaned (every one has a row);
//! - `PRAGMA integrity_check` is ok.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::tls::AuthedChannel as Channel;
use boilerhouse_server::store::{Backend, DatabaseLocation, sql};
use boilerhouse_testkit::docker::containers_with;
use boilerhouse_testkit::eventually;

pub mod traffic;

use traffic::{Op, Recorded};

/// Waits until `nodes` nodes are connected and Ready and reconciliation
/// has nothing left to do.
pub async fn converge(channel: &Channel, nodes: usize, timeout: Duration) -> anyhow::Result<()> {
    let nodes_client = pb::node_service_client::NodeServiceClient::new(channel.clone());
    let reconcile = pb::reconcile_service_client::ReconcileServiceClient::new(channel.clone());
    eventually(timeout, "the system to converge", || {
        let mut nodes_client = nodes_client.clone();
        let mut reconcile = reconcile.clone();
        async move {
            let listed = nodes_client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            let all_back = listed.len() == nodes
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
}

/// What the checker reads besides the history.
pub struct Subject<'a> {
    /// An authenticated channel to the server.
    pub channel: Channel,
    /// The server's SQLite file.
    /// What `--database` took: the SQLite file or a PostgreSQL URL.
    pub database: String,
    /// Each agent's state root.
    pub state_roots: Vec<PathBuf>,
    /// Every node's name.
    pub nodes: Vec<String>,
    /// The engine.
    pub docker: &'a bollard::Docker,
}

/// The checker's findings.
pub struct Verdict {
    /// Each broken invariant, in a sentence.
    pub violations: Vec<String>,
    /// Claims the tenants were told succeeded.
    pub claims_acked: usize,
    /// Releases the tenants were told succeeded.
    pub releases_acked: usize,
}

/// Holds `history` against the converged system.
pub async fn check(subject: &Subject<'_>, recorded: &Recorded) -> Verdict {
    let history = &recorded.ops;
    let mut violations = Vec::new();

    // No container ever served two tenants: client history...
    let mut tenants_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let claims_acked = recorded.claims_acked();
    let mut releases_acked = 0;
    for (tenant, ops) in history {
        for op in ops {
            match op {
                Op::ClaimAck { container, .. } => {
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
    let location = DatabaseLocation::parse(&subject.database).unwrap();
    let mut conn = boilerhouse_server::store::open_inspector(&location)
        .await
        .unwrap();
    let shared: Vec<(String, i64)> = sql::query_as(
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
    for root in &subject.state_roots {
        let dir = root.join("containers");
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
    let mut claims = ClaimServiceClient::new(subject.channel.clone());
    for (tenant, ops) in history {
        for op in ops {
            let (container, statuses): (&String, &[&str]) = match op {
                Op::ClaimAck { container, .. } => (container, &["active", "released", "lost"]),
                Op::ReleaseAck { container } => (container, &["released", "lost"]),
                _ => continue,
            };
            let (n,): (i64,) = sql::query_as(
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
        pb::container_service_client::ContainerServiceClient::new(subject.channel.clone())
            .list_containers(pb::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.container_id)
            .collect();
    for node in &subject.nodes {
        for container in containers_with(subject.docker, "boilerhouse.node-id", node)
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

    // The database file is sound (PostgreSQL checks its own pages).
    if location.backend() == Backend::Sqlite {
        let (integrity,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if integrity != "ok" {
            violations.push(format!("integrity_check: {integrity}"));
        }
    }

    Verdict {
        violations,
        claims_acked,
        releases_acked,
    }
}
