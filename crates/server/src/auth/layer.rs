//! The tower layer in front of every gRPC service: finds out who is
//! calling, asks [`boilerhouse_core::auth::authorize`] whether they may
//! call this method, and either answers UNAUTHENTICATED/PERMISSION_DENIED
//! itself or runs the handler with the caller in its request extensions
//! and in the task-local that events read.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use boilerhouse_core::NodeId;
use boilerhouse_core::auth::{Access, Denied, Principal, access_for, authorize};

use super::caller::CALLER;
use super::tokens::{TokenFileError, Tokens};

/// How often the token file is checked for changes: tokens can be added
/// and revoked without a restart, and a check costs one stat.
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

struct TokenSource {
    path: PathBuf,
    tokens: RwLock<(Arc<Tokens>, Option<SystemTime>)>,
    checked_at_ms: AtomicU64,
}

/// Decides who a request comes from.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Option<Arc<TokenSource>>,
    insecure: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("insecure", &self.insecure)
            .finish()
    }
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Authenticator {
    /// Callers present tokens from `token_file`; agents present node
    /// certificates.
    pub fn new(token_file: PathBuf) -> Result<Self, TokenFileError> {
        let tokens = Tokens::load(&token_file)?;
        let modified = mtime(&token_file);
        Ok(Self {
            tokens: Some(Arc::new(TokenSource {
                path: token_file,
                tokens: RwLock::new((Arc::new(tokens), modified)),
                checked_at_ms: AtomicU64::new(now_ms()),
            })),
            insecure: false,
        })
    }

    /// Everyone may do everything: `--insecure`, for labs.
    pub fn insecure() -> Self {
        Self {
            tokens: None,
            insecure: true,
        }
    }

    fn tokens(&self) -> Option<Arc<Tokens>> {
        let source = self.tokens.as_ref()?;
        let now = now_ms();
        let last = source.checked_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= TOKEN_RECHECK.as_millis() as u64
            && source
                .checked_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let modified = mtime(&source.path);
            let known = source.tokens.read().expect("token lock").1;
            if modified != known {
                // A file that became unreadable or invalid keeps the last
                // good tokens: a typo must not lock every caller out.
                match Tokens::load(&source.path) {
                    Ok(tokens) => {
                        tracing::info!(path = %source.path.display(), tokens = tokens.len(), "token file reloaded");
                        *source.tokens.write().expect("token lock") = (Arc::new(tokens), modified);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "token file not reloaded; keeping the previous tokens")
                    }
                }
            }
        }
        Some(source.tokens.read().expect("token lock").0.clone())
    }

    /// Who sent `request`, if it carries credentials; an error for
    /// credentials that are present but not valid.
    pub fn identify<B>(&self, request: &http::Request<B>) -> Result<Option<Principal>, Denied> {
        if self.insecure {
            return Ok(Some(Principal::Insecure));
        }
        // Connect goes by the certificate alone; a token presented there
        // is identified so the refusal can say a token is not enough.
        if access_for(request.uri().path()) == Some(Access::Node)
            && let Some(node) = node_from_certificate(request)?
        {
            return Ok(Some(node));
        }
        let Some(header) = request.headers().get(http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let secret = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                Denied::Unauthenticated("the authorization header must be `Bearer <token>`".into())
            })?;
        let tokens = self
            .tokens()
            .ok_or_else(|| Denied::Unauthenticated("this server accepts no tokens".into()))?;
        tokens
            .authenticate(secret)
            .map(Some)
            .ok_or_else(|| Denied::Unauthenticated("the bearer token is not valid".into()))
    }
}

fn node_from_certificate<B>(request: &http::Request<B>) -> Result<Option<Principal>, Denied> {
    let Some(certs) = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
    else {
        return Ok(None);
    };
    // rustls has verified the chain to our CA and the client-auth usage;
    // what remains is reading whose certificate it is.
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    let name = boilerhouse_proto::tls::node_name_from_cert_der(leaf)
        .map_err(|e| Denied::Unauthenticated(format!("client certificate: {e}")))?;
    let node = NodeId::new(name)
        .map_err(|e| Denied::Unauthenticated(format!("client certificate: {e}")))?;
    Ok(Some(Principal::Node(node)))
}

/// Authenticates and authorizes every call; see the module documentation.
#[derive(Debug, Clone)]
pub struct AuthLayer(pub Authenticator);

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: self.0.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Authenticator,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authenticated<S>
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

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let verdict = self
            .auth
            .identify(&request)
            .and_then(|caller| authorize(caller.as_ref(), &method).map(|()| caller));
        match verdict {
            Ok(caller) => {
                if let Some(caller) = &caller {
                    request.extensions_mut().insert(caller.clone());
                }
                let call = self.inner.call(request);
                Box::pin(CALLER.scope(caller, call))
            }
            Err(denied) => {
                let status = match denied {
                    Denied::Unauthenticated(m) => tonic::Status::unauthenticated(m),
                    Denied::PermissionDenied(m) => tonic::Status::permission_denied(m),
                };
                tracing::info!(%method, code = ?status.code(), reason = status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
