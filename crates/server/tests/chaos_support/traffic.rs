//! The tenants' side of the chaos tests: claim, touch and release traffic
//! through the real API, to one server or to replicas (following the
//! leader as a client must), recording what each tenant asked and was told
//! and every call with its times and its answer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boilerhouse_proto::leader::{is_standby, leader_hint};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::tls::AuthedChannel as Channel;
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
