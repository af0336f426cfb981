//! Every RPC runs to completion once it has started, whatever the client
//! does.
//!
//! A handler's future is owned by the connection: a client that hangs up,
//! or whose `grpc-timeout` passes, drops it wherever it stands. A mutating
//! handler dropped between its commit and what follows (the answer's
//! record, an in-memory bookkeeping step, a slot given back) would leave
//! the server half-way. So each call is spawned as its own task and the
//! connection only waits for it: dropping the wait cancels nothing, and a
//! retry with the same `request_id` finds the result recorded.
//!
//! Streams are unaffected: a streaming handler returns its response at
//! once, and the stream itself stops when the client goes, as it should.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

/// Spawns each call: see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunToCompletionLayer;

impl<S> Layer<S> for RunToCompletionLayer {
    type Service = RunToCompletion<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RunToCompletion { inner }
    }
}

/// The service [`RunToCompletionLayer`] makes.
#[derive(Debug, Clone)]
pub struct RunToCompletion<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RunToCompletion<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = tokio::spawn(self.inner.call(request));
        Box::pin(async move {
            match call.await {
                Ok(answer) => answer,
                // A panicking handler: answer INTERNAL rather than reset
                // the stream; the panic itself is logged by the runtime.
                Err(e) => {
                    Ok(tonic::Status::internal(format!("the handler failed: {e}")).into_http())
                }
            }
        })
    }
}
