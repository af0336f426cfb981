//! A stand-in for a standby `boilerhoused`: a gRPC server in the test
//! process that refuses every call of every Boilerhouse service (the
//! agent's Connect included) with [`standby_status`], naming the leader it
//! is given. Clients cannot tell it from a real standby, so tests of
//! leader-following run before (and apart from) the servers' own standby
//! mode.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use boilerhouse_proto::leader::standby_status;

use crate::ServerProcess;

/// A running fake standby; it stops when dropped.
pub struct Standby {
    url: String,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Standby {
    /// A standby beside `server`: on another port of the same host, with
    /// the server's certificate when it is secure (so clients verify it
    /// as they verify the server), naming `leader` (or no leader).
    pub async fn beside(server: &ServerProcess, leader: Option<&str>) -> anyhow::Result<Self> {
        let identity = match server.credentials() {
            Some(c) => Some(Identity::from_pem(
                std::fs::read(c.pki_dir.join("server.pem"))?,
                std::fs::read(c.pki_dir.join("server.key"))?,
            )),
            None => None,
        };
        Self::start(server.addrs.grpc.ip(), identity, leader).await
    }

    /// A standby on `ip`, over TLS with `identity` if given.
    pub async fn start(
        ip: std::net::IpAddr,
        identity: Option<Identity>,
        leader: Option<&str>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicUsize::new(0));
        let refuse = Refuse {
            leader: leader.map(str::to_owned),
            calls: calls.clone(),
        };
        let mut builder = Server::builder();
        let scheme = match identity {
            Some(identity) => {
                boilerhouse_proto::tls::install_crypto_provider();
                builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
                "https"
            }
            None => "http",
        };
        let routes = every_service(&refuse);
        let task = tokio::spawn(async move {
            if let Err(e) = builder
                .add_routes(routes)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                eprintln!("the fake standby stopped: {e}");
            }
        });
        Ok(Self {
            url: format!("{scheme}://{addr}"),
            calls,
            task,
        })
    }

    /// Its URL, for clients.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many calls it refused.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers any call with a standby's refusal.
#[derive(Clone)]
struct Refuse {
    leader: Option<String>,
    calls: Arc<AtomicUsize>,
}

impl Service<http::Request<Body>> for Refuse {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let response = standby_status(self.leader.as_deref()).into_http();
        Box::pin(async move { Ok(response) })
    }
}

/// The routes of every `boilerhouse.v1` service to [`Refuse`]: tonic
/// routes by service name, so each name needs a type of its own.
macro_rules! refuse_services {
    ($($ty:ident => $name:literal),* $(,)?) => {
        $(
            #[derive(Clone)]
            struct $ty(Refuse);

            impl NamedService for $ty {
                const NAME: &'static str = $name;
            }

            impl Service<http::Request<Body>> for $ty {
                type Response = http::Response<Body>;
                type Error = Infallible;
                type Future = BoxFuture<Self::Response, Infallible>;

                fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                    self.0.poll_ready(cx)
                }

                fn call(&mut self, request: http::Request<Body>) -> Self::Future {
                    self.0.call(request)
                }
            }
        )*

        fn every_service(refuse: &Refuse) -> Routes {
            Routes::default()
                $(.add_service($ty(refuse.clone())))*
        }
    };
}

refuse_services! {
    Affinity => "boilerhouse.v1.AffinityService",
    Agent => "boilerhouse.v1.AgentService",
    Boost => "boilerhouse.v1.BoostService",
    Claim => "boilerhouse.v1.ClaimService",
    Container => "boilerhouse.v1.ContainerService",
    Event => "boilerhouse.v1.EventService",
    Node => "boilerhouse.v1.NodeService",
    Pool => "boilerhouse.v1.PoolService",
    Reconcile => "boilerhouse.v1.ReconcileService",
    Sync => "boilerhouse.v1.SyncService",
    System => "boilerhouse.v1.SystemService",
    Workload => "boilerhouse.v1.WorkloadService",
}
