//! A small PKI for one Boilerhouse installation, made with rcgen: a CA, the
//! server's certificate, and one client certificate per agent node.
//!
//! Layout of the directory (`<data_dir>/pki` by default):
//!
//! ```text
//! ca.pem  ca.key                 the CA; ca.key never leaves this machine
//! server.pem  server.key         the gRPC listener's identity
//! nodes/<name>.pem  <name>.key   an agent's identity: CN boilerhouse:node:<name>
//! ```
//!
//! Every step is idempotent: what exists is kept, so `pki init` can run at
//! every start (as `./dev/run` does) without rotating anything.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use boilerhouse_core::NodeId;
use boilerhouse_proto::tls::NODE_CN_PREFIX;

use super::files::{write_private, write_public};

const CA_VALIDITY: Duration = Duration::days(3650);
const LEAF_VALIDITY: Duration = Duration::days(825);

/// The files of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir(pub PathBuf);

impl PkiDir {
    /// The CA certificate: clients and the server trust it.
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    /// The server's certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.0.join("server.pem")
    }
    /// The server's key.
    pub fn server_key(&self) -> PathBuf {
        self.0.join("server.key")
    }
    /// A node's certificate.
    pub fn node_cert(&self, node: &NodeId) -> PathBuf {
        self.0.join("nodes").join(format!("{node}.pem"))
    }
    /// A node's key.
    pub fn node_key(&self, node: &NodeId) -> PathBuf {
        self.0.join("nodes").join(format!("{node}.key"))
    }
}

/// What `init` or `issue_node` did.
#[derive(Debug, Default)]
pub struct Issued {
    /// Files written now.
    pub created: Vec<PathBuf>,
    /// Files that existed and were kept.
    pub kept: Vec<PathBuf>,
}

fn pki_err(what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{what}: {e}")
}

fn validity(params: &mut CertificateParams, for_how_long: Duration) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks a little behind ours.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + for_how_long;
}

/// Creates what is missing of the CA, the server certificate (for
/// `localhost`, 127.0.0.1, ::1 and every `extra_sans`, each a DNS name or
/// an IP address) and a certificate for each of `nodes`.
pub fn init(dir: &PkiDir, extra_sans: &[String], nodes: &[NodeId]) -> anyhow::Result<Issued> {
    let mut issued = Issued::default();
    std::fs::create_dir_all(&dir.0)?;
    if dir.ca_cert().exists() != dir.ca_key().exists() {
        anyhow::bail!(
            "{} holds only one of ca.pem and ca.key; restore the other or remove both",
            dir.0.display()
        );
    }
    if dir.ca_cert().exists() {
        issued.kept.push(dir.ca_cert());
    } else {
        let key = KeyPair::generate().map_err(|e| pki_err("generating the CA key", e))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Boilerhouse CA");
        name.push(DnType::OrganizationName, "boilerhouse");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY);
        let cert = params
            .self_signed(&key)
            .map_err(|e| pki_err("signing the CA", e))?;
        write_private(&dir.ca_key(), key.serialize_pem().as_bytes())?;
        write_public(&dir.ca_cert(), cert.pem().as_bytes())?;
        issued.created.extend([dir.ca_cert(), dir.ca_key()]);
    }
    if dir.server_cert().exists() && dir.server_key().exists() {
        issued.kept.push(dir.server_cert());
    } else {
        issue_server(dir, extra_sans)?;
        issued.created.extend([dir.server_cert(), dir.server_key()]);
    }
    for node in nodes {
        let more = issue_node(dir, node)?;
        issued.created.extend(more.created);
        issued.kept.extend(more.kept);
    }
    Ok(issued)
}

fn load_issuer(dir: &PkiDir) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
    };
    let key = KeyPair::from_pem(&read(dir.ca_key())?).map_err(|e| pki_err("the CA key", e))?;
    Issuer::from_ca_cert_pem(&read(dir.ca_cert())?, key).map_err(|e| pki_err("the CA", e))
}

fn issue_server(dir: &PkiDir, extra_sans: &[String]) -> anyhow::Result<()> {
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "boilerhoused");
    let mut sans = vec![
        SanType::DnsName("localhost".try_into().map_err(|e| pki_err("a SAN", e))?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress("::1".parse().expect("an IPv6 literal")),
    ];
    for san in extra_sans {
        sans.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                san.clone()
                    .try_into()
                    .map_err(|e| pki_err(&format!("--san {san:?}"), e))?,
            ),
        });
    }
    params.subject_alt_names = sans;
    // Server only: this certificate cannot stand in for a client.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, LEAF_VALIDITY);
    let key = KeyPair::generate().map_err(|e| pki_err("generating the server key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| pki_err("signing the server certificate", e))?;
    write_private(&dir.server_key(), key.serialize_pem().as_bytes())?;
    write_public(&dir.server_cert(), cert.pem().as_bytes())?;
    Ok(())
}

/// Issues `node`'s client certificate unless it exists.
pub fn issue_node(dir: &PkiDir, node: &NodeId) -> anyhow::Result<Issued> {
    let (cert_path, key_path) = (dir.node_cert(node), dir.node_key(node));
    if cert_path.exists() && key_path.exists() {
        return Ok(Issued {
            created: vec![],
            kept: vec![cert_path],
        });
    }
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    // The Kubernetes convention (system:node:<name>): the identity is the
    // whole CN, which no server or CA certificate can carry by accident.
    name.push(DnType::CommonName, format!("{NODE_CN_PREFIX}{node}"));
    name.push(DnType::OrganizationName, "boilerhouse:nodes");
    params.distinguished_name = name;
    // Client only: a node's certificate cannot serve as the server.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, LEAF_VALIDITY);
    let key = KeyPair::generate().map_err(|e| pki_err("generating a node key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| pki_err("signing a node certificate", e))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(Issued {
        created: vec![cert_path, key_path],
        kept: vec![],
    })
}

/// Whether `path` looks like a PKI directory made by [`init`].
pub fn is_initialised(path: &Path) -> bool {
    let dir = PkiDir(path.to_owned());
    dir.ca_cert().exists() && dir.server_cert().exists() && dir.server_key().exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_idempotent_and_node_certificates_carry_the_node() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PkiDir(tmp.path().join("pki"));
        let node = NodeId::new("node-a").unwrap();
        let first = init(
            &dir,
            &["10.0.0.7".into(), "bh.example".into()],
            std::slice::from_ref(&node),
        )
        .unwrap();
        assert_eq!(first.created.len(), 6, "{first:?}");
        let ca = std::fs::read(dir.ca_cert()).unwrap();
        let again = init(&dir, &[], std::slice::from_ref(&node)).unwrap();
        assert!(again.created.is_empty(), "{again:?}");
        assert_eq!(std::fs::read(dir.ca_cert()).unwrap(), ca, "the CA is kept");
        let pem = std::fs::read(dir.node_cert(&node)).unwrap();
        assert_eq!(
            boilerhouse_proto::tls::node_name_from_cert_pem(&pem).unwrap(),
            "node-a"
        );
        let server = std::fs::read(dir.server_cert()).unwrap();
        assert!(
            boilerhouse_proto::tls::node_name_from_cert_pem(&server).is_err(),
            "the server's certificate names no node"
        );
        use std::os::unix::fs::PermissionsExt as _;
        for key in [dir.ca_key(), dir.server_key(), dir.node_key(&node)] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is private: {mode:o}", key.display());
        }
        assert!(is_initialised(&dir.0));
    }
}
