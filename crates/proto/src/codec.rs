//! The codec of every `boilerhouse.v1` service: prost's encoding, with
//! tonic's stream buffers sized for streams that live for days.
//!
//! tonic's default encoder gathers the messages a stream has ready into one
//! chunk of up to 32 KiB before handing it to HTTP/2, and both ends keep a
//! stream's buffer at the largest size it ever held: the sender's at the
//! largest chunk it gathered, the receiver's at about twice the largest
//! piece HTTP/2 handed it (tonic reserves a message's length again once
//! its header is read). An agent's full report is a burst of ~5 KiB parts
//! all ready at once, so each agent stream's buffers grew to ~32 KiB or
//! more and kept that for the session: on the server, 1,000 agents held
//! ~35 MB of receive buffers that were empty between reports
//! (docs/BENCHMARKS.md, P5). Here each message of [`YIELD_AT`] or more
//! goes as a chunk of its own, so a stream's buffers follow its largest
//! message (about twice it, rounded up) rather than how many were sent
//! together. Messages smaller than that (heartbeats, events) are still
//! gathered, up to about `YIELD_AT` plus one message, so a burst of small
//! ones is not one frame each.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::BufferSettings;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Where the encoder stops gathering messages into one chunk.
pub const YIELD_AT: usize = 2 * 1024;

/// The buffer a stream begins with (tonic's default); it doubles as needed.
const BUFFER_SIZE: usize = 8 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_AT)
}

/// prost's codec with [`settings`]; the generated clients and servers use
/// it (`crates/proto/build.rs`).
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty};

    use super::*;
    use crate::pb;

    /// gRPC's framing: a flag byte and a four-byte length before each
    /// message.
    const FRAMING: usize = 5;

    /// The other end of a stream: reads the request body chunk by chunk,
    /// as HTTP/2 would carry them, then answers OK.
    #[derive(Clone, Default)]
    struct Receiver {
        chunks: Arc<Mutex<Vec<usize>>>,
    }

    type Answer = http::Response<Empty<Bytes>>;

    impl tower::Service<http::Request<tonic::body::Body>> for Receiver {
        type Response = Answer;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            let chunks = self.chunks.clone();
            Box::pin(async move {
                let mut body = request.into_body();
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data() {
                        chunks.lock().unwrap().push(data.len());
                    }
                }
                Ok(http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Empty::new())
                    .unwrap())
            })
        }
    }

    /// Sends `messages` on an agent stream, every one ready at once (the
    /// case where the encoder gathers most), and returns the size of each
    /// chunk the other end received.
    async fn chunks_of(messages: Vec<pb::ConnectRequest>) -> Vec<usize> {
        let receiver = Receiver::default();
        let mut grpc = tonic::client::Grpc::new(receiver.clone());
        grpc.ready().await.unwrap();
        grpc.streaming(
            tonic::Request::new(futures::stream::iter(messages)),
            http::uri::PathAndQuery::from_static("/boilerhouse.v1.AgentService/Connect"),
            Codec::<pb::ConnectRequest, pb::ConnectResponse>::default(),
        )
        .await
        .unwrap();
        receiver.chunks.lock().unwrap().clone()
    }

    /// A part of a full report as an agent sends it: eight containers with
    /// the labels a managed container carries.
    fn report_part(part: u32) -> pb::ConnectRequest {
        let container = |n: u32| pb::ObservedContainer {
            docker_id: format!("{:064x}", u64::from(part) * 8 + u64::from(n)),
            name: format!("bh-0193a5e2-7c1d-7b3e-9f00-{:012x}", n),
            labels: [
                ("boilerhouse.managed", "true".to_owned()),
                (
                    "boilerhouse.container-id",
                    format!("0193a5e2-7c1d-7b3e-9f00-{n:012x}"),
                ),
                ("boilerhouse.node-id", "node-0001".to_owned()),
                ("boilerhouse.workload-id", "sandbox".to_owned()),
                ("boilerhouse.spec-hash", "9f86d081884c7d65".to_owned()),
                (
                    "boilerhouse.server-id",
                    "0193a5e2-0000-7000-8000-000000000000".to_owned(),
                ),
                ("boilerhouse.created-at", "2026-12-04T20:00:00Z".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            docker_state: "running".to_owned(),
            ..Default::default()
        };
        pb::ConnectRequest {
            message: Some(pb::connect_request::Message::FullReport(pb::FullReport {
                containers: (0..8).map(container).collect(),
                more: true,
                part,
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn a_burst_of_report_parts_arrives_one_part_a_chunk() {
        let parts: Vec<_> = (0..64).map(report_part).collect();
        let largest = parts.iter().map(Message::encoded_len).max().unwrap();
        assert!(
            parts.iter().all(|p| p.encoded_len() >= YIELD_AT),
            "each part is at least YIELD_AT, so none is gathered with another"
        );
        let chunks = chunks_of(parts.clone()).await;
        // Gathered (tonic's default gathers up to 32 KiB), both ends'
        // buffers would grow with the chunks and keep that size.
        assert_eq!(chunks.len(), parts.len(), "chunks: {chunks:?}");
        assert!(
            chunks.iter().all(|c| *c <= largest + FRAMING),
            "largest part {largest} bytes, chunks: {chunks:?}"
        );
    }

    #[tokio::test]
    async fn small_messages_are_still_gathered_up_to_the_threshold() {
        let heartbeat = pb::ConnectRequest {
            message: Some(pb::connect_request::Message::Heartbeat(pb::Heartbeat {
                container_count: 100,
                ..Default::default()
            })),
        };
        let size = heartbeat.encoded_len() + FRAMING;
        let chunks = chunks_of(vec![heartbeat; 1000]).await;
        assert_eq!(chunks.iter().sum::<usize>(), 1000 * size);
        assert!(
            chunks.len() <= 1000 * size / YIELD_AT + 1,
            "{} chunks of {size}-byte messages: {chunks:?}",
            chunks.len()
        );
        assert!(
            chunks.iter().all(|c| *c < YIELD_AT + size),
            "chunks: {chunks:?}"
        );
    }
}
