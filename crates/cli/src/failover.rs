//! Several server addresses behind one channel. Each call goes first to
//! the server that answered the last one, and on to the others (the leader
//! a standby names first, see [`boilerhouse_proto::servers`]) only when
//! that cannot do it twice:
//!
//! - a server that could not be connected to never saw the call;
//! - a standby's refusal ([`boilerhouse_proto::leader`]) did nothing;
//! - after a transport error or another UNAVAILABLE the call may have been
//!   carried out, so it goes elsewhere only if doing it again is harmless:
//!   a read, or a write with a `request_id` (marked by [`with_request_id`]),
//!   which the server answers a second time from its record of the first.
//!
//! Anything else is the answer. A call tries each address at most once;
//! when none took it, the error names every address tried and why.
//!
//! It works on the HTTP requests under tonic, so the commands build their
//! clients as on one channel. `bh` sends one message per call, so a
//! request body is read whole and can be sent again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use tonic::body::Body;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tower::ServiceExt as _;

use boilerhouse_proto::leader::{is_standby, leader_hint};
use boilerhouse_proto::servers::{Outcome, Rotation, Step};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The RPCs that change nothing, so any of them may be sent again
/// elsewhere. A read missing here is only sent again when it cannot have
/// arrived, which is safe too.
const READS: &[&str] = &[
    "/boilerhouse.v1.AffinityService/ListReservations",
    "/boilerhouse.v1.BoostService/GetBoost",
    "/boilerhouse.v1.BoostService/ListBoosts",
    "/boilerhouse.v1.ClaimService/GetClaim",
    "/boilerhouse.v1.ClaimService/ListClaims",
    "/boilerhouse.v1.ContainerService/GetContainer",
    "/boilerhouse.v1.ContainerService/ListContainers",
    "/boilerhouse.v1.EventService/ListEvents",
    "/boilerhouse.v1.EventService/WatchEvents",
    "/boilerhouse.v1.NodeService/GetNode",
    "/boilerhouse.v1.NodeService/ListNodes",
    "/boilerhouse.v1.PoolService/GetPool",
    "/boilerhouse.v1.PoolService/ListPools",
    "/boilerhouse.v1.ReconcileService/PlanReconcile",
    "/boilerhouse.v1.SyncService/GetSyncStatus",
    "/boilerhouse.v1.SyncService/WatchSyncStatus",
    "/boilerhouse.v1.SystemService/GetSystemStatus",
    "/boilerhouse.v1.WorkloadService/GetWorkload",
    "/boilerhouse.v1.WorkloadService/ListWorkloads",
    "/grpc.health.v1.Health/Check",
];

/// Marks a request that carries a non-empty `request_id`.
#[derive(Debug, Clone, Copy)]
struct RequestId;

/// `message` as a request that may be sent again after a broken
/// connection when `request_id` (the one in the message) is set.
pub fn with_request_id<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if !request_id.is_empty() {
        request.extensions_mut().insert(RequestId);
    }
    request
}

/// Why a call failed, beyond what a server answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No server took the call: each address tried, with the reason.
    #[error("no server took the call: {0:?}")]
    Unreachable(Vec<(String, String)>),
    /// The connection broke after the call was sent, and sending it again
    /// could do it twice.
    #[error("the connection to {addr} broke: {reason}")]
    Dropped {
        /// The server.
        addr: String,
        /// What broke.
        reason: String,
    },
}

/// How to reach any server of the list.
#[derive(Clone)]
pub struct Failover {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where the last call was answered, and the leader last named.
    rotation: Mutex<Rotation>,
    channels: Mutex<HashMap<String, Channel>>,
    tls: Option<ClientTlsConfig>,
}

impl Failover {
    /// Over `addresses` (checked URLs of one scheme), with `tls` for https.
    pub fn new(addresses: Vec<String>, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            shared: Arc::new(Shared {
                rotation: Mutex::new(Rotation::new(addresses)),
                channels: Mutex::new(HashMap::new()),
                tls,
            }),
        }
    }

    /// The server the last call went to (the first, before any call).
    pub fn current(&self) -> String {
        lock(&self.shared.rotation).current().to_owned()
    }

    /// A channel to `addr`, connected at its first call and kept.
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = lock(&self.shared.channels);
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let mut endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| format!("not a valid address: {e}"))?
            .connect_timeout(Duration::from_secs(3));
        if let Some(tls) = &self.shared.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS settings: {e}"))?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    async fn call(self, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        let repeatable =
            READS.contains(&parts.uri.path()) || parts.extensions.get::<RequestId>().is_some();
        // A round of its own, so concurrent calls cannot shorten each
        // other's; the shared rotation learns where a call was answered.
        let mut rotation = lock(&self.shared.rotation).clone();
        rotation.begin();
        let mut tried = Vec::new();
        loop {
            let addr = rotation.current().to_owned();
            let request =
                http::Request::from_parts(parts.clone(), Body::new(Full::new(body.clone())));
            let step = match self.attempt(&addr, request, repeatable).await? {
                Attempt::Answered(response) => {
                    *lock(&self.shared.rotation) = rotation;
                    return Ok(response);
                }
                Attempt::Refused { leader, message } => {
                    tried.push((addr, message));
                    rotation.record(Outcome::Refused(leader.as_deref()))
                }
                Attempt::Failed(reason) => {
                    tried.push((addr, reason));
                    rotation.record(Outcome::Failed)
                }
            };
            if step == Step::Wait {
                break;
            }
        }
        // The rotation stands where the round ended: at the leader last
        // named, if any, for the next call of this process.
        *lock(&self.shared.rotation) = rotation;
        Err(CallError::Unreachable(tried).into())
    }

    /// Sends `request` to `addr` and sorts out the answer.
    async fn attempt(
        &self,
        addr: &str,
        request: http::Request<Body>,
        repeatable: bool,
    ) -> Result<Attempt, CallError> {
        let channel = match self.channel(addr) {
            Ok(channel) => channel,
            Err(reason) => return Ok(Attempt::Failed(reason)),
        };
        match channel.oneshot(request).await {
            Ok(response) => {
                // A refusal is trailers-only: its status is in the headers.
                let Some(status) = Status::from_header_map(response.headers()) else {
                    return Ok(Attempt::Answered(response));
                };
                if is_standby(&status) {
                    Ok(Attempt::Refused {
                        leader: leader_hint(&status),
                        message: status.message().to_owned(),
                    })
                } else if status.code() == Code::Unavailable && repeatable {
                    Ok(Attempt::Failed(status.message().to_owned()))
                } else {
                    Ok(Attempt::Answered(response))
                }
            }
            Err(e) if repeatable || never_sent(&e) => Ok(Attempt::Failed(root_cause(&e))),
            Err(e) => Err(CallError::Dropped {
                addr: addr.to_owned(),
                reason: root_cause(&e),
            }),
        }
    }
}

enum Attempt {
    Answered(http::Response<Body>),
    /// A standby's refusal.
    Refused {
        leader: Option<String>,
        message: String,
    },
    /// Not taken, and safe to send elsewhere; why.
    Failed(String),
}

impl tower::Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call waits for its own channel.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().call(request))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the connection could not be made, so the request never left.
fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The innermost cause, which is the part a person can act on
/// ("Connection refused"), without the layers above it.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    // "Connection refused (os error 111)" -> "connection refused"
    let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().collect::<String>() + chars.as_str(),
        None => text,
    }
}

#[cfg(test)]
#[path = "failover_tests.rs"]
mod tests;
