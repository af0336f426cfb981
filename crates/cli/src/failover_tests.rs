//! The failover channel against servers in this process: a working one,
//! standbys, one that answers UNAVAILABLE for itself and one that hangs up
//! on every request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response};

use boilerhouse_proto::leader::standby_status;
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::affinity_service_client::AffinityServiceClient;
use boilerhouse_proto::pb::affinity_service_server::{AffinityService, AffinityServiceServer};

use super::*;
use crate::client::{CliError, Client, Credentials};

/// How a test server answers.
#[derive(Clone)]
enum Answer {
    /// As a working leader: the tenant of each reservation is this name.
    Serve(&'static str),
    /// As a standby naming this leader.
    Standby(Option<String>),
    /// UNAVAILABLE for a reason of its own (its database restarting).
    Unavailable,
}

#[derive(Clone)]
struct Server {
    answer: Answer,
    calls: Arc<AtomicUsize>,
}

impl Server {
    fn reply<T>(&self, ok: impl FnOnce(&'static str) -> T) -> Result<Response<T>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.answer {
            Answer::Serve(name) => Ok(Response::new(ok(name))),
            Answer::Standby(leader) => Err(standby_status(leader.as_deref())),
            Answer::Unavailable => Err(Status::unavailable("database restarting")),
        }
    }
}

fn reservation(name: &str) -> pb::Reservation {
    pb::Reservation {
        tenant_id: name.to_owned(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AffinityService for Server {
    async fn list_reservations(
        &self,
        _: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<pb::ListReservationsResponse>, Status> {
        self.reply(|name| pb::ListReservationsResponse {
            reservations: vec![reservation(name)],
        })
    }

    async fn extend_reservation(
        &self,
        _: Request<pb::ExtendReservationRequest>,
    ) -> Result<Response<pb::ExtendReservationResponse>, Status> {
        self.reply(|name| pb::ExtendReservationResponse {
            reservation: Some(reservation(name)),
        })
    }

    async fn revoke_reservation(
        &self,
        _: Request<pb::RevokeReservationRequest>,
    ) -> Result<Response<pb::RevokeReservationResponse>, Status> {
        self.reply(|_| pb::RevokeReservationResponse::default())
    }
}

/// A running test server: its URL and how many calls reached it.
struct Running {
    url: String,
    calls: Arc<AtomicUsize>,
}

impl Running {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn serve(answer: Answer) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = Server {
        answer,
        calls: calls.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AffinityServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Running {
        url: format!("http://{addr}"),
        calls,
    }
}

/// A server that takes each connection and hangs up once it has read
/// something: a call sent to it may or may not have been carried out.
async fn hang_up() -> String {
    use tokio::io::AsyncReadExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
        }
    });
    format!("http://{addr}")
}

/// An address nothing listens on.
fn dead() -> String {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", socket.local_addr().unwrap())
}

fn client(addrs: &[&str]) -> Client {
    let addrs: Vec<String> = addrs.iter().map(|a| (*a).to_owned()).collect();
    Client::connect(&addrs, Credentials::default()).unwrap()
}

async fn list(client: &Client) -> Result<String, CliError> {
    let response = AffinityServiceClient::new(client.channel())
        .list_reservations(pb::ListReservationsRequest::default())
        .await
        .map_err(|s| client.fail(s))?;
    Ok(response.into_inner().reservations[0].tenant_id.clone())
}

async fn extend(client: &Client, request_id: &str) -> Result<String, CliError> {
    let message = pb::ExtendReservationRequest {
        request_id: request_id.to_owned(),
        ..Default::default()
    };
    let response = AffinityServiceClient::new(client.channel())
        .extend_reservation(with_request_id(message, request_id))
        .await
        .map_err(|s| client.fail(s))?;
    Ok(response.into_inner().reservation.unwrap().tenant_id)
}

#[tokio::test]
async fn a_standby_sends_reads_and_writes_to_the_leader_and_later_calls_go_there() {
    let leader = serve(Answer::Serve("leader")).await;
    let standby = serve(Answer::Standby(Some(leader.url.clone()))).await;
    let other = serve(Answer::Serve("other")).await;
    // The leader is named before the next listed address is tried.
    let c = client(&[&standby.url, &other.url, &leader.url]);
    assert_eq!(list(&c).await.unwrap(), "leader");
    assert_eq!(standby.calls(), 1);
    assert_eq!(other.calls(), 0);
    // A write without a request_id: the standby did nothing, so it is
    // safe. And it goes straight to the leader now.
    assert_eq!(extend(&c, "").await.unwrap(), "leader");
    assert_eq!(standby.calls(), 1);
    assert_eq!(c.server(), leader.url);
}

#[tokio::test]
async fn an_unlisted_leader_of_the_list_s_scheme_is_followed() {
    let leader = serve(Answer::Serve("leader")).await;
    let standby = serve(Answer::Standby(Some(format!("{}/", leader.url)))).await;
    assert_eq!(
        extend(&client(&[&standby.url]), "").await.unwrap(),
        "leader"
    );
}

#[tokio::test]
async fn an_unreachable_address_is_passed_over() {
    let leader = serve(Answer::Serve("leader")).await;
    let c = client(&[&dead(), &leader.url]);
    assert_eq!(extend(&c, "").await.unwrap(), "leader");
}

#[tokio::test]
async fn when_none_takes_a_call_every_address_is_named_with_its_reason() {
    let standby = serve(Answer::Standby(None)).await;
    let down = dead();
    let e = list(&client(&[&standby.url, &down])).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot reach boilerhoused at any of its addresses: {} (this server is a standby; no leader is known yet); {down} (connection refused)",
            standby.url
        )),
        "{text}"
    );
    // One address reads as it always did.
    let e = list(&client(&[&down])).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot reach boilerhoused at {down}: connection refused. Is it running? Set --server or BOILERHOUSE_ADDR."
        )
    );
}

#[tokio::test]
async fn the_leader_s_own_unavailable_sends_on_only_what_is_safe_to_repeat() {
    let sick = serve(Answer::Unavailable).await;
    let leader = serve(Answer::Serve("leader")).await;
    let c = client(&[&sick.url, &leader.url]);
    // A write without request_id may have happened: the answer stands.
    match extend(&c, "").await.unwrap_err() {
        CliError::Server(text) => assert!(text.contains("database restarting"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(leader.calls(), 0);
    // A read, or a write with a request_id, goes on.
    let c = client(&[&sick.url, &leader.url]);
    assert_eq!(list(&c).await.unwrap(), "leader");
    let c = client(&[&sick.url, &leader.url]);
    assert_eq!(extend(&c, "r-1").await.unwrap(), "leader");
}

#[tokio::test]
async fn a_connection_that_breaks_after_sending_is_reported_unless_safe() {
    let broken = hang_up().await;
    let leader = serve(Answer::Serve("leader")).await;
    let c = client(&[&broken, &leader.url]);
    match extend(&c, "").await.unwrap_err() {
        CliError::Dropped { addr, .. } => assert_eq!(addr, broken),
        other => panic!("{other:?}"),
    }
    assert_eq!(leader.calls(), 0);
    assert_eq!(extend(&c, "r-2").await.unwrap(), "leader");
    let c = client(&[&broken, &leader.url]);
    assert_eq!(list(&c).await.unwrap(), "leader");
}

#[test]
fn addresses_are_checked_before_any_call() {
    let err = |addrs: &[&str], ca: Option<&str>| {
        let addrs: Vec<String> = addrs.iter().map(|a| (*a).to_owned()).collect();
        let credentials = Credentials {
            ca: ca.map(std::path::Path::new),
            ..Default::default()
        };
        match Client::connect(&addrs, credentials) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    assert!(
        err(&["https://a:1,http://b:1"], None).starts_with("--server mixes"),
        "mixed schemes"
    );
    // host:port takes its scheme from --ca, as before.
    assert_eq!(err(&["a:1,b:1"], None), "");
    assert!(err(&["a:1,b:1"], Some("/nonexistent")).starts_with("--ca /nonexistent"));
    assert!(err(&["https://a:1"], None).contains("set --ca"));
    assert!(err(&[","], None).contains("--server names no server address"));
}

#[test]
fn the_reads_are_rpcs_of_the_api_and_every_list_get_watch_and_plan_is_one() {
    let set =
        prost_types::FileDescriptorSet::decode(boilerhouse_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut rpcs = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                rpcs.push((
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    method.name().to_owned(),
                ));
            }
        }
    }
    for read in READS.iter().filter(|r| !r.starts_with("/grpc.")) {
        assert!(
            rpcs.iter().any(|(path, _)| path == read),
            "{read} is no RPC"
        );
    }
    for (path, name) in &rpcs {
        let looks_read = ["List", "Get", "Watch", "Plan"]
            .iter()
            .any(|p| name.starts_with(p));
        assert_eq!(READS.contains(&path.as_str()), looks_read, "{path}");
    }
}
