//! The history checker shared by the chaos tests: tenants drive claim,
//! touch and release traffic through the real API (to one server, or to
//! replicas, following the leader as a client must) and record what they
//! asked and what they were told, and every call with its times and its
//! answer; after the faults stop and the system converges, [`check`]
//! holds the record against the database, the state files and the
//! engine:
//! - no container ever served two tenants (client history, database, state
//!   files);
//! - every acknowledged claim and release is reflected;
//! - no managed container is orphaned (every one has a row);
//! - `PRAGMA integrity_check` is ok.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boilerhouse_proto::leader::{is_standby, leader_hint};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::tls::AuthedChannel as Channel;
use boilerhouse_server::store::{Backend, DatabaseLocation, sql};
use boilerhouse_testkit::docker::containers_with;
use boilerhouse_testkit::eventually;
use tonic::Code;

/// What one tenant did and was told, in order. A call a standby refused
/// did nothing and is not here.
#[derive(Debug, Clone)]
pub enum Op {
    ClaimAttempt,
    ClaimAck { container: String, generation: u64 },
    ReleaseAttempt,
    ReleaseAck { container: String },
}

/// Which RPC a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Claim,
    Touch,
    Release,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// A standby refused it: it did nothing.
    Standby,
    /// Any other error the server (or the transport) answered.
    Failed(Code),
    /// No answer within the client's deadline.
    TimedOut,
}

/// One RPC: to which server, when it was sent and answered, and how.
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: CallKind,
    /// The index of the server in [`Servers`].
    pub server: usize,
    pub started: Instant,
    pub ended: Instant,
    pub answer: Answer,
}

/// Everything the tenants did: each one's operations, and every call.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub ops: BTreeMap<String, Vec<Op>>,
    pub calls: Vec<Call>,
}

impl Recorded {
    /// Claims acknowledged so far.
    pub fn claims_acked(&self) -> usize {
        self.ops
            .values()
            .flatten()
            .filter(|op| matches!(op, Op::ClaimAck { .. }))
            .count()
    }

    /// The calls by kind and answer, the calls each server answered, and
    /// the slowest answer, in a line.
    pub fn tally(&self) -> String {
        let mut by_answer: BTreeMap<String, usize> = BTreeMap::new();
        let mut by_server: BTreeMap<usize, usize> = BTreeMap::new();
        let mut slowest = Duration::ZERO;
        for call in &self.calls {
            let answer = match call.answer {
                Answer::Failed(code) => format!("{code:?}"),
                other => format!("{other:?}"),
            };
            *by_answer
                .entry(format!("{:?} {answer}", call.kind))
                .or_default() += 1;
            if call.answer != Answer::TimedOut {
                *by_server.entry(call.server).or_default() += 1;
            }
            slowest = slowest.max(call.ended - call.started);
        }
        format!(
            "{} calls {by_answer:?}, answered by server {by_server:?}, slowest {slowest:.1?}",
            self.calls.len()
        )
    }
}

type History = Arc<Mutex<Recorded>>;

fn record(history: &History, tenant: &str, op: Op) {
    history
        .lock()
        .unwrap()
        .ops
        .entry(tenant.to_owned())
        .or_default()
        .push(op);
}

/// The servers tenants send to: one, or replicas of which one leads.
#[derive(Clone)]
pub struct Servers {
    urls: Vec<String>,
    channels: Vec<Channel>,
}

impl Servers {
    /// Each server's client URL (what a standby names as the leader) and
    /// a channel to it (lazy, so it reconnects by itself when the server
    /// comes back).
    pub fn new(servers: impl IntoIterator<Item = (String, Channel)>) -> Self {
        let (urls, channels) = servers.into_iter().unzip();
        Self { urls, channels }
    }
}

/// How tenants call.
#[derive(Debug, Clone, Copy)]
pub struct TrafficOptions {
    /// How long a claim waits for an idle container.
    pub acquire_timeout: Duration,
    /// How long a call may take before the tenant gives up on it (its
    /// outcome unknown) and moves to the next server.
    pub deadline: Duration,
}

impl Default for TrafficOptions {
    fn default() -> Self {
        Self {
            acquire_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
        }
    }
}

/// One tenant's way to the leader: the server that answered last, the
/// leader a standby names, or else the next one.
struct Route {
    servers: Servers,
    current: usize,
    deadline: Duration,
    history: History,
}

impl Route {
    /// Sends one call to the current server and records it.
    async fn call<T, F, Fut>(&mut self, kind: CallKind, rpc: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let server = self.current;
        let started = Instant::now();
        let answered =
            tokio::time::timeout(self.deadline, rpc(self.servers.channels[server].clone())).await;
        let ended = Instant::now();
        let (result, answer) = match answered {
            Ok(Ok(response)) => (Ok(response.into_inner()), Answer::Ok),
            Ok(Err(status)) if is_standby(&status) => (Err(status), Answer::Standby),
            Ok(Err(status)) => {
                let code = status.code();
                (Err(status), Answer::Failed(code))
            }
            Err(_) => (
                Err(tonic::Status::deadline_exceeded(
                    "no answer within the client's deadline",
                )),
                Answer::TimedOut,
            ),
        };
        self.history.lock().unwrap().calls.push(Call {
            kind,
            server,
            started,
            ended,
            answer,
        });
        let next = (server + 1) % self.servers.urls.len();
        self.current = match (&result, answer) {
            (Err(s), Answer::Standby) => leader_hint(s)
                .and_then(|hint| self.servers.urls.iter().position(|u| *u == hint))
                .unwrap_or(next),
            (_, Answer::TimedOut | Answer::Failed(Code::Unavailable)) => next,
            _ => server,
        };
        result
    }
}

/// One tenant's traffic until `stop`: claim, touch, release, again. A
/// tenant that `holds` keeps each claim for a few seconds, touching it, so
/// that faults find claims in place (a node lost under them, a server
/// restarted); the others release at once, for throughput.
async fn tenant_traffic(
    mut route: Route,
    options: TrafficOptions,
    tenant: String,
    holds: bool,
    stop: tokio_util::sync::CancellationToken,
) {
    use rand::Rng as _;
    let history = route.history.clone();
    let mut pace = tokio::time::interval(Duration::from_millis(40));
    let mut generation = None;
    let mut held_until = Instant::now();
    while !stop.is_cancelled() {
        pace.tick().await;
        match generation {
            None => {
                let request = pb::ClaimRequest {
                    tenant_id: tenant.clone(),
                    workload_id: "demo".into(),
                    acquire_timeout: Some(boilerhouse_proto::convert::duration_to_pb(
                        options.acquire_timeout,
                    )),
                    ..Default::default()
                };
                let answer = route
                    .call(CallKind::Claim, |ch| async move {
                        ClaimServiceClient::new(ch).claim(request).await
                    })
                    .await;
                // Recorded once answered: a tenant's operations are only
                // ever read in its own order.
                if matches!(&answer, Err(s) if is_standby(s)) {
                    continue;
                }
                record(&history, &tenant, Op::ClaimAttempt);
                if let Ok(r) = answer {
                    let claim = r.claim.unwrap();
                    record(
                        &history,
                        &tenant,
                        Op::ClaimAck {
                            container: claim.container_id.clone(),
                            generation: claim.generation,
                        },
                    );
                    generation = Some(claim.generation);
                    if holds {
                        held_until = Instant::now()
                            + Duration::from_millis(rand::rng().random_range(2_000..15_000));
                    }
                }
            }
            Some(g) => {
                let touch = pb::TouchRequest {
                    tenant_id: tenant.clone(),
                    workload_id: "demo".into(),
                    generation: g,
                };
                let _ = route
                    .call(CallKind::Touch, |ch| async move {
                        ClaimServiceClient::new(ch).touch(touch).await
                    })
                    .await;
                if Instant::now() < held_until {
                    continue;
                }
                let request = pb::ReleaseRequest {
                    tenant_id: tenant.clone(),
                    workload_id: "demo".into(),
                    generation: g,
                    request_id: String::new(),
                };
                let answer = route
                    .call(CallKind::Release, |ch| async move {
                        ClaimServiceClient::new(ch).release(request).await
                    })
                    .await;
                if matches!(&answer, Err(s) if is_standby(s)) {
                    continue;
                }
                record(&history, &tenant, Op::ReleaseAttempt);
                match answer {
                    Ok(r) => {
                        let claim = r.claim.unwrap();
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

/// Tenants' traffic under way.
pub struct Traffic {
    history: History,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Starts `tenants` tenants (`tenant-0`, ...) claiming, touching and
    /// releasing `demo` on `servers`, each starting at the first.
    pub fn start(servers: &Servers, tenants: usize, options: TrafficOptions) -> Self {
        let history: History = Arc::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = (0..tenants)
            .map(|i| {
                let route = Route {
                    servers: servers.clone(),
                    current: 0,
                    deadline: options.deadline,
                    history: history.clone(),
                };
                tokio::spawn(tenant_traffic(
                    route,
                    options,
                    format!("tenant-{i}"),
                    i % 2 == 1,
                    stop.clone(),
                ))
            })
            .collect();
        Self {
            history,
            stop,
            tasks,
        }
    }

    /// What the tenants did and were told so far.
    pub fn recorded(&self) -> Recorded {
        self.history.lock().unwrap().clone()
    }

    /// Stops every tenant and returns what they did.
    pub async fn stop(mut self) -> Recorded {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            t.await.unwrap();
        }
        self.recorded()
    }
}

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
