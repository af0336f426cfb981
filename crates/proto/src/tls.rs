//! Credentials every program shares: how a node's identity is read from its
//! certificate, how clients present a bearer token, and the client side of
//! TLS against the installation's CA.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Request, Status};

/// Selects rustls's ring provider for this process, once. Two providers
/// are compiled in (ring for ours, aws-lc for an S3 client's), so rustls
/// cannot pick one itself; every TLS configuration calls this first.
pub fn install_crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Err means another provider is installed already: fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A node certificate's common name is this prefix and the node's name
/// (the Kubernetes `system:node:<name>` convention).
pub const NODE_CN_PREFIX: &str = "boilerhouse:node:";

/// The node a DER certificate names in its subject's common name.
pub fn node_name_from_cert_der(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let mut names = cert.subject().iter_common_name();
    let cn = names
        .next()
        .ok_or("the certificate has no common name")?
        .as_str()
        .map_err(|e| format!("unreadable common name: {e}"))?;
    if names.next().is_some() {
        return Err("the certificate has more than one common name".into());
    }
    cn.strip_prefix(NODE_CN_PREFIX)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("common name {cn:?} is not {NODE_CN_PREFIX}<node>"))
}

/// The node the first certificate of a PEM file names.
pub fn node_name_from_cert_pem(pem: &[u8]) -> Result<String, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("unreadable PEM: {e}"))?;
    node_name_from_cert_der(&pem.contents)
}

/// Adds `authorization: Bearer <token>` to every request, when there is a
/// token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str(if self.0.is_some() {
            "BearerToken(…)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl BearerToken {
    /// A token to present; `None` presents nothing.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| "the token has characters a header cannot carry".to_owned())
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that presents a bearer token on every call.
pub type AuthedChannel = InterceptedService<Channel, BearerToken>;

/// Client TLS that trusts only `ca_pem`, presents `identity` (a node's
/// certificate and key) when given, and expects the server to be named
/// `domain` (default: the host of the URL).
pub fn client_tls(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
    domain: Option<&str>,
) -> ClientTlsConfig {
    install_crypto_provider();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = domain {
        tls = tls.domain_name(domain);
    }
    tls
}
