//! A standby: it serves health checks (NOT_SERVING, so a load balancer
//! or a Kubernetes Service sends nobody here) and reflection, and refuses
//! every other call with UNAVAILABLE naming the leader (in the message,
//! and in the `boilerhouse-leader` metadata for clients that follow it),
//! while it stands for leader. Reads are refused too rather than served
//! from a copy that may be behind: a client that follows the hint reads
//! from the leader, which is never behind. Between campaigns it keeps its
//! warm copy of the pool's rows up to date, for the day it is elected.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use super::{Campaign, Lease, campaign_interval};
use crate::config::Config;
use crate::store::WarmPool;

/// Serves as a standby on `listener` and campaigns until elected
/// (`Some`) or stopped (`None`).
pub(super) async fn stand_by(
    config: &Config,
    listener: TcpListener,
    campaign: &mut Campaign,
    warm: &mut WarmPool,
    stop: CancellationToken,
) -> anyhow::Result<Option<Lease>> {
    let (leader_tx, leader_rx) = watch::channel::<Option<String>>(None);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let (builder, _authenticator) = crate::listener::secure_builder(config)?;
    let serving = CancellationToken::new();
    let grpc_addr = listener.local_addr()?;
    let reflection_v1 =
        crate::server::reflection(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET).build_v1()?;
    let reflection_v1alpha =
        crate::server::reflection(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET).build_v1alpha()?;
    let server = tokio::spawn(
        builder
            .layer(RefuseLayer { leader: leader_rx })
            .add_service(health_service)
            .add_optional_service(config.reflection.then_some(reflection_v1))
            .add_optional_service(config.reflection.then_some(reflection_v1alpha))
            .serve_with_incoming_shutdown(
                crate::listener::incoming_nodelay(listener),
                serving.clone().cancelled_owned(),
            ),
    );
    crate::server::announce(config, grpc_addr, None, "standby")?;

    let interval = campaign_interval(config.leader_lease);
    let mut last_leader: Option<String> = None;
    let elected = loop {
        match campaign.try_acquire().await {
            Ok(Some(lease)) => break Some(lease),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "standing for leader failed; retrying"),
        }
        if let Ok(leader) = campaign.leader().await {
            let address = leader.map(|l| l.address);
            if address != last_leader {
                match &address {
                    Some(a) => tracing::info!(leader = %a, "standing by"),
                    None => tracing::info!("standing by; no leader yet"),
                }
                last_leader.clone_from(&address);
            }
            leader_tx.send_replace(address);
        }
        // Between campaigns, so that an election finds the copy at most
        // one interval behind. A failed read leaves it as it was.
        match campaign.refresh(warm).await {
            Ok(refreshed) if refreshed.full => tracing::info!(
                version = refreshed.version,
                rows = refreshed.rows,
                "standby: read the pool's rows for a warm copy"
            ),
            Ok(refreshed) => tracing::debug!(
                version = refreshed.version,
                rows = refreshed.rows,
                "standby: warm copy brought up to date"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "standby: could not bring the warm copy up to date; retrying")
            }
        }
        tokio::select! {
            () = stop.cancelled() => break None,
            () = tokio::time::sleep(interval) => {}
        }
    };
    // Stop refusing; the leader (or nobody) serves on the same socket next.
    serving.cancel();
    if tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .is_err()
    {
        tracing::warn!("the standby's connections did not close in time");
    }
    Ok(elected)
}

/// Refuses every call but health checks.
#[derive(Clone)]
struct RefuseLayer {
    leader: watch::Receiver<Option<String>>,
}

impl<S> tower::Layer<S> for RefuseLayer {
    type Service = Refuse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Refuse {
            inner,
            leader: self.leader.clone(),
        }
    }
}

#[derive(Clone)]
struct Refuse<S> {
    inner: S,
    leader: watch::Receiver<Option<String>>,
}

impl<S, B> tower::Service<http::Request<B>> for Refuse<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Health checks, and reflection so that grpcurl can ask a standby
        // anything and read its refusal.
        let path = request.uri().path();
        if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
            return Box::pin(self.inner.call(request));
        }
        let status = boilerhouse_proto::leader::standby_status(self.leader.borrow().as_deref());
        Box::pin(async move { Ok(status.into_http()) })
    }
}
