//! Agent configuration: flags and `BOILERHOUSE_*` environment variables,
//! validated into one [`AgentConfig`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use boilerhouse_core::NodeId;

/// `boilerhouse-agent`: runs on a Docker host and reports what really runs.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Address of boilerhoused: a URL, or several (comma-separated or
    /// repeated) for replicas, of which the agent follows the leader.
    #[arg(
        long,
        env = "BOILERHOUSE_ADDR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7600"
    )]
    pub server: Vec<String>,
    /// This node's name: a DNS label, stable across restarts. Defaults to
    /// the host name.
    #[arg(long, env = "BOILERHOUSE_NODE_NAME")]
    pub node_name: Option<String>,
    /// A node label for node_selector, `key=value`; repeatable.
    #[arg(long = "label", env = "BOILERHOUSE_NODE_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Directory for containers' host volumes and state files.
    #[arg(
        long,
        env = "BOILERHOUSE_STATE_ROOT",
        default_value = "/var/lib/boilerhouse-agent"
    )]
    pub state_root: PathBuf,
    /// Docker endpoint: unix:///var/run/docker.sock or tcp://host:2375.
    /// Defaults to DOCKER_HOST or the local socket.
    #[arg(long, env = "BOILERHOUSE_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// An extra label for every container this agent creates,
    /// `key=value`; repeatable.
    #[arg(
        long = "container-label",
        env = "BOILERHOUSE_CONTAINER_LABELS",
        value_delimiter = ','
    )]
    pub container_labels: Vec<String>,
    /// How often a full report is sent even without a request; a
    /// session's first one at a random point between half this and one
    /// and a half, so agents that connected together do not report in step.
    #[arg(long, env = "BOILERHOUSE_FULL_REPORT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub full_report_interval: Duration,
    /// Longest wait between reconnection attempts.
    #[arg(long, env = "BOILERHOUSE_MAX_BACKOFF", default_value = "10s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
    /// An AWS shared credentials file for S3 sync sinks, read before the
    /// environment (profile AWS_PROFILE or default).
    #[arg(long, env = "BOILERHOUSE_S3_CREDENTIALS_FILE")]
    pub s3_credentials_file: Option<PathBuf>,
    /// Log as JSON.
    #[arg(long, env = "BOILERHOUSE_LOG_JSON")]
    pub log_json: bool,
    /// The CA that signed the server's certificate (PEM); needed for an
    /// https:// server.
    #[arg(long, env = "BOILERHOUSE_CA")]
    pub ca: Option<PathBuf>,
    /// This node's client certificate (PEM), from `boilerhoused pki node`;
    /// its common name is the node's identity.
    #[arg(long, env = "BOILERHOUSE_CERT")]
    pub cert: Option<PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, env = "BOILERHOUSE_KEY")]
    pub key: Option<PathBuf>,
    /// The name every server's certificate must carry, when it differs
    /// from the host in --server.
    #[arg(long, env = "BOILERHOUSE_SERVER_NAME")]
    pub server_name: Option<String>,
    /// What this agent will create and where it will write.
    #[command(flatten)]
    pub policy: crate::policy::PolicyArgs,
}

/// Where the agent's TLS material is. Read again at every connection, so a
/// renewed certificate is used at the next reconnect.
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// The CA to verify the server against.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The server's expected name, if not the URL's host.
    pub server_name: Option<String>,
}

impl AgentTls {
    /// The client TLS configuration, read from the files now.
    pub fn client_config(&self) -> std::io::Result<tonic::transport::ClientTlsConfig> {
        let ca = std::fs::read(&self.ca)?;
        let cert = std::fs::read(&self.cert)?;
        let key = std::fs::read(&self.key)?;
        Ok(boilerhouse_proto::tls::client_tls(
            &ca,
            Some((&cert, &key)),
            self.server_name.as_deref(),
        ))
    }
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server URLs, all of one scheme, in the order to try them.
    pub servers: Vec<String>,
    /// This node.
    pub node_id: NodeId,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Root of container directories.
    pub state_root: PathBuf,
    /// Docker endpoint, or the local default.
    pub docker_host: Option<String>,
    /// Labels added to every created container.
    pub container_labels: BTreeMap<String, String>,
    /// Periodic full report.
    pub full_report_interval: Duration,
    /// Reconnection backoff cap.
    pub max_backoff: Duration,
    /// Credentials for S3 sinks.
    pub s3_credentials_file: Option<PathBuf>,
    /// TLS and this node's identity, for an https:// server.
    pub tls: Option<AgentTls>,
    /// The local policy, checked on every create and local sync.
    pub policy: crate::policy::LocalPolicy,
}

fn parse_pairs(field: &str, items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("{field} {item:?} must be key=value"))?;
        if k.is_empty() {
            return Err(format!("{field} {item:?} has an empty key"));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_ascii_lowercase())
}

impl AgentConfig {
    /// Validates the arguments.
    pub fn from_args(args: Args) -> Result<Self, String> {
        let servers = boilerhouse_proto::servers::split_addresses(&args.server);
        let https = boilerhouse_proto::servers::check_schemes("--server", &servers)?;
        let tls = tls_from_args(&args, https)?;
        // The certificate is the identity: the name in it wins, and a
        // --node-name that disagrees is a mistake to catch here rather
        // than as a refused connection.
        let certified = match &tls {
            Some(tls) => {
                let pem = std::fs::read(&tls.cert)
                    .map_err(|e| format!("--cert {}: {e}", tls.cert.display()))?;
                Some(
                    boilerhouse_proto::tls::node_name_from_cert_pem(&pem)
                        .map_err(|e| format!("--cert {}: {e}", tls.cert.display()))?,
                )
            }
            None => None,
        };
        let name = match (args.node_name, certified) {
            (Some(given), Some(certified)) if given != certified => {
                return Err(format!(
                    "--node-name {given:?} differs from the node in --cert ({certified:?})"
                ));
            }
            (_, Some(certified)) => certified,
            (Some(given), None) => given,
            (None, None) => {
                host_name().ok_or("no --node-name given and the host name cannot be read")?
            }
        };
        let node_id = NodeId::new(name).map_err(|e| format!("--node-name: {e}"))?;
        let labels = parse_pairs("--label", &args.labels)?;
        let container_labels = parse_pairs("--container-label", &args.container_labels)?;
        if let Some(reserved) = container_labels
            .keys()
            .find(|k| k.starts_with("boilerhouse.") && !k.starts_with("boilerhouse.test"))
        {
            return Err(format!(
                "--container-label {reserved:?} is reserved for Boilerhouse's own labels"
            ));
        }
        if args.full_report_interval < Duration::from_secs(1) {
            return Err("--full-report-interval must be at least 1s".into());
        }
        // Docker reads a relative bind-mount source as a volume name, so
        // the state root must be absolute.
        let state_root = std::path::absolute(&args.state_root)
            .map_err(|e| format!("--state-root {}: {e}", args.state_root.display()))?;
        let policy = crate::policy::LocalPolicy::from_args(&args.policy, &state_root)?;
        Ok(Self {
            servers,
            node_id,
            labels,
            state_root,
            docker_host: args.docker_host,
            container_labels,
            full_report_interval: args.full_report_interval,
            max_backoff: args.max_backoff.max(Duration::from_millis(100)),
            s3_credentials_file: args.s3_credentials_file,
            tls,
            policy,
        })
    }
}

/// The TLS settings, which apply to every address of --server (checked
/// to be all https or all http).
fn tls_from_args(args: &Args, https: bool) -> Result<Option<AgentTls>, String> {
    match (&args.ca, &args.cert, &args.key) {
        (None, None, None) if !https => Ok(None),
        (Some(ca), Some(cert), Some(key)) if https => {
            for (flag, path) in [("--ca", ca), ("--cert", cert), ("--key", key)] {
                std::fs::metadata(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
            }
            Ok(Some(AgentTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: args.server_name.clone(),
            }))
        }
        _ if https => Err(
            "an https:// server needs --ca, --cert and --key (make them with `boilerhoused pki init --node <name>`)".into(),
        ),
        _ => Err(format!(
            "--ca, --cert and --key need an https:// server, not {}",
            args.server.join(",")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<AgentConfig, String> {
        let mut all = vec!["boilerhouse-agent"];
        all.extend_from_slice(argv);
        AgentConfig::from_args(Args::parse_from(all))
    }

    #[test]
    fn labels_and_names_are_validated() {
        let c = parse(&[
            "--node-name",
            "node-a",
            "--label",
            "zone=a",
            "--label",
            "gpu=yes",
        ])
        .unwrap();
        assert_eq!(c.node_id.as_str(), "node-a");
        assert_eq!(c.labels["zone"], "a");
        assert!(
            parse(&["--node-name", "Node_A"])
                .unwrap_err()
                .contains("--node-name")
        );
        assert!(
            parse(&["--node-name", "a", "--label", "novalue"])
                .unwrap_err()
                .contains("key=value")
        );
        assert!(
            parse(&[
                "--node-name",
                "a",
                "--container-label",
                "boilerhouse.managed=x"
            ])
            .is_err()
        );
        let relative = parse(&["--node-name", "a", "--state-root", "./data/agent"]).unwrap();
        assert!(
            relative.state_root.is_absolute(),
            "bind mounts need absolute host paths"
        );
    }

    #[test]
    fn one_server_reads_as_before_and_several_as_a_list() {
        let one = parse(&["--node-name", "a", "--server", "http://10.0.0.1:7600"]).unwrap();
        assert_eq!(one.servers, ["http://10.0.0.1:7600"]);
        assert!(one.tls.is_none());
        let default = parse(&["--node-name", "a"]).unwrap();
        assert_eq!(default.servers, ["http://127.0.0.1:7600"]);
        // Comma-separated (as BOILERHOUSE_ADDR carries them), repeated, or
        // both; blanks and repeats dropped.
        let several = parse(&[
            "--node-name",
            "a",
            "--server",
            "http://a:7600, http://b:7600,",
            "--server",
            "http://c:7600",
            "--server",
            "http://a:7600/",
        ])
        .unwrap();
        assert_eq!(
            several.servers,
            ["http://a:7600", "http://b:7600", "http://c:7600"]
        );
    }

    #[test]
    fn every_server_is_a_url_of_one_scheme() {
        let mixed = parse(&[
            "--node-name",
            "a",
            "--server",
            "https://a:7600,http://b:7600",
        ])
        .unwrap_err();
        assert!(
            mixed.starts_with("--server mixes https:// and http://"),
            "{mixed}"
        );
        let bare = parse(&["--node-name", "a", "--server", "a:7600"]).unwrap_err();
        assert!(bare.contains("--server \"a:7600\""), "{bare}");
        let none = parse(&["--node-name", "a", "--server", ","]).unwrap_err();
        assert!(none.contains("--server names no server address"), "{none}");
        // The TLS settings go with the list's one scheme.
        let https = parse(&[
            "--node-name",
            "a",
            "--server",
            "https://a:7600,https://b:7600",
        ])
        .unwrap_err();
        assert!(https.contains("needs --ca, --cert and --key"), "{https}");
        let ca = parse(&[
            "--node-name",
            "a",
            "--server",
            "http://a:7600,http://b:7600",
            "--ca",
            "/nonexistent",
        ])
        .unwrap_err();
        assert!(ca.contains("need an https:// server"), "{ca}");
    }
}
