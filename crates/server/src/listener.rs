//! The gRPC listener's side of trust: TLS with optional client
//! certificates (agents present one, other callers a token) and the
//! authenticator that goes with it.

use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::Server;

use crate::config::{Config, Security};

/// HTTP/2 pings on every connection: an agent behind a link that went
/// silent (a partition drops packets, it does not close connections) is
/// noticed and its session ended within 15 s, instead of lingering until
/// the agent reconnects, with its last report taken for the present.
fn with_keepalive(builder: Server) -> Server {
    builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
}

/// A server builder with TLS (client certificates optional: agents present
/// one, other callers a token) and the matching authenticator; plaintext
/// and no authentication with `--insecure`.
pub fn secure_builder(config: &Config) -> anyhow::Result<(Server, crate::auth::Authenticator)> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    match &config.security {
        Security::Insecure => {
            tracing::warn!(
                listen = %config.listen,
                "--insecure: serving plaintext, and every caller may do everything"
            );
            Ok((
                with_keepalive(Server::builder()),
                crate::auth::Authenticator::insecure(),
            ))
        }
        Security::Secure { tls, tokens_file } => {
            boilerhouse_proto::tls::install_crypto_provider();
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
            let tls_config = ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(Certificate::from_pem(read(&tls.client_ca)?))
                .client_auth_optional(true)
                // A client that opens a connection and never finishes the
                // handshake holds nothing for long.
                .timeout(Duration::from_secs(10));
            let builder = with_keepalive(Server::builder())
                .tls_config(tls_config)
                .context("the TLS certificate or key")?;
            let authenticator = crate::auth::Authenticator::new(tokens_file.clone())?;
            tracing::info!(
                cert = %tls.cert.display(),
                tokens = %tokens_file.display(),
                "TLS on; agents need node certificates, callers bearer tokens"
            );
            Ok((builder, authenticator))
        }
    }
}

/// Accepted connections with TCP_NODELAY. Serving from our own listener
/// means tonic does not set it, and Nagle's algorithm meeting the client's
/// delayed ACKs adds ~40 ms to small responses: claims would pay it.
pub(crate) fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}
