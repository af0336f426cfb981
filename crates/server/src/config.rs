//! Configuration in two stages: flags, environment variables and an
//! optional TOML file are read into loose `Option`s, then merged (flag or
//! environment over file over default) and validated into one [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::DatabaseLocation;
use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `boilerhoused`: the Boilerhouse control-plane server.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "BOILERHOUSE_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "BOILERHOUSE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Prometheus /metrics listen address.
    #[arg(long, env = "BOILERHOUSE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory for the database (and other state).
    #[arg(long, env = "BOILERHOUSE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The database: a SQLite file (default <data-dir>/boilerhouse.db) or
    /// postgres://user:password@host/dbname for PostgreSQL.
    #[arg(long, env = "BOILERHOUSE_DATABASE")]
    pub database: Option<String>,
    /// Directory of workload YAML files.
    #[arg(long, env = "BOILERHOUSE_WORKLOADS_DIR")]
    pub workloads_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "BOILERHOUSE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// fsync every commit (true, the default) or rely on WAL ordering only.
    #[arg(long, env = "BOILERHOUSE_SYNCHRONOUS_FULL")]
    pub synchronous_full: Option<bool>,
    /// Write the bound addresses as JSON to this file once listening; lets
    /// scripts and tests use port 0.
    #[arg(long, env = "BOILERHOUSE_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// The URL clients reach this server at, which a standby names when it
    /// refuses (PostgreSQL replicas). Default: https://<listen> (http://
    /// when --insecure).
    #[arg(long, env = "BOILERHOUSE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Directory holding ca.pem, server.pem and server.key (as made by
    /// `boilerhoused pki init`); defaults to <data-dir>/pki.
    #[arg(long, env = "BOILERHOUSE_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Bearer tokens callers may present (made by `boilerhoused token
    /// create`); defaults to <data-dir>/tokens.toml.
    #[arg(long, env = "BOILERHOUSE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Serve plaintext and let every caller do everything, agents naming
    /// themselves: for labs only.
    #[arg(long, env = "BOILERHOUSE_INSECURE")]
    pub insecure: bool,
    /// Admission policy file (TOML): what workloads may ask of the hosts
    /// beyond the hardened defaults. Without one, the strict defaults apply.
    #[arg(long, env = "BOILERHOUSE_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Replace a missing or damaged database with an empty one and rebuild
    /// it from the agents' reports: the damaged file is moved aside
    /// (`<file>.damaged-<time>`), never deleted. Only a flag, on purpose:
    /// as a standing setting (config file, environment) it would turn the
    /// next damaged database into a silent rebuild. Ignored, with a
    /// warning, when the database is sound.
    #[arg(long)]
    pub rebuild_from_agents: bool,
    /// Subcommands: PKI, tokens, restore. Without one, the server runs.
    #[command(subcommand)]
    pub command: Option<crate::admin_cli::Command>,
}

/// The TOML file: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database: Option<String>,
    workloads_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    synchronous_full: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    workloads_rescan_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    event_retention: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idempotency_retention: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    history_retention: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    trim_interval: Option<Duration>,
    group_commit_max: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    suspect_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    boost_full_pass_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    lost_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    restart_grace: Option<Duration>,
    #[serde(default)]
    partition_threshold: Option<f64>,
    advertise_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    leader_lease: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    full_report_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    command_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    acquire_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reconcile_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reconcile_lost_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reconcile_creation_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pool_surplus_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    sync_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    final_sync_deadline: Option<Duration>,
    tls_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    tokens_file: Option<PathBuf>,
    insecure: Option<bool>,
    reflection: Option<bool>,
    policy_file: Option<PathBuf>,
}

/// Where the listener's TLS identity and the CA of agent certificates are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs agents' client certificates (PEM).
    pub client_ca: PathBuf,
}

/// How callers and agents prove who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// TLS on the listener, node certificates for agents, bearer tokens
    /// for everyone else.
    Secure {
        /// The listener's files.
        tls: TlsFiles,
        /// The token file.
        tokens_file: PathBuf,
    },
    /// `--insecure`: plaintext, no authentication.
    Insecure,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address. Default 127.0.0.1:7600.
    pub listen: SocketAddr,
    /// Prometheus listen address. Default 127.0.0.1:7601.
    pub metrics_listen: SocketAddr,
    /// Directory for state. Default `./data`.
    pub data_dir: PathBuf,
    /// The database: a SQLite file (default `<data_dir>/boilerhouse.db`)
    /// or a PostgreSQL URL.
    pub database: DatabaseLocation,
    /// `--rebuild-from-agents`: replace a missing or damaged SQLite
    /// database with an empty one (moving a damaged file aside) instead of
    /// refusing to start.
    pub rebuild_from_agents: bool,
    /// Workload YAML directory. Default `./workloads`.
    pub workloads_dir: PathBuf,
    /// Log format. Default text.
    pub log_format: LogFormat,
    /// `synchronous=FULL` (default) or NORMAL.
    pub synchronous_full: bool,
    /// How often the workload directory is rescanned even without a file
    /// notification (notifications can be lost, e.g. on network mounts).
    /// Default 30s.
    pub workloads_rescan_interval: Duration,
    /// How long graceful shutdown waits for tasks and streams. Default 10s.
    pub shutdown_timeout: Duration,
    /// How long activity-log entries are kept. Default 7 days.
    pub event_retention: Duration,
    /// How long idempotency keys are honoured. Default 24 hours.
    pub idempotency_retention: Duration,
    /// How long what has ended is kept: released and lost claims (the
    /// newest of a container that still has a row is kept), ended boosts,
    /// finished sync status of tenants holding nothing, and lost nodes
    /// with no containers.
    pub history_retention: Duration,
    /// How often the retention windows above are applied. Default 1 hour.
    pub trim_interval: Duration,
    /// The most writes one commit carries (group commit); 1 commits each
    /// write alone, the floor benchmarks compare group commit with.
    pub group_commit_max: usize,
    /// Where to write the bound addresses once listening.
    pub ready_file: Option<PathBuf>,
    /// How often agents send heartbeats. Default 2s.
    pub heartbeat_interval: Duration,
    /// Silence before a node is Suspect. Default 3 × heartbeat_interval.
    pub suspect_after: Duration,
    /// How often every container's limits are compared with its report,
    /// to undo changes made behind the server's back; containers with
    /// live boosts or a failed update are compared every second. Default
    /// 10s.
    pub boost_full_pass_interval: Duration,
    /// Further silence before a Suspect node is Lost. Default 30s.
    pub lost_grace: Duration,
    /// After a server restart, how long before any node may be declared
    /// Lost, so agents have time to reconnect. Default 60s.
    pub restart_grace: Duration,
    /// The largest fraction of three or more nodes that may go silent
    /// together and still be declared Lost. Default 0.5.
    pub partition_threshold: f64,
    /// PostgreSQL replicas: the URL clients reach this one at; default
    /// `https://<bound address>` (see `leadership::advertised`).
    pub advertise_url: Option<String>,
    /// PostgreSQL replicas: how long the leader's lease lasts without a
    /// renewal (renewed every third of it). A standby takes over at most
    /// this long after the leader dies. Default 6s.
    pub leader_lease: Duration,
    /// How often agents send unrequested full reports. Default 30s.
    pub full_report_interval: Duration,
    /// How long to wait for an agent to answer a command. Default 30s.
    pub command_timeout: Duration,
    /// How long a cold-start claim waits by default. Default 30s.
    pub acquire_timeout: Duration,
    /// How long one tenant state sync may take on the agent. Default 10m.
    pub sync_timeout: Duration,
    /// How long graceful shutdown waits for the final uploads of claimed
    /// containers, all together. Default 30s.
    pub final_sync_deadline: Duration,
    /// How often reconciliation runs. Default 5s.
    pub reconcile_interval: Duration,
    /// How long a container row may be missing from fresh reports before
    /// it is declared lost. Default 30s.
    pub reconcile_lost_grace: Duration,
    /// How old an unknown managed container must be before it is
    /// destroyed. Default 60s.
    pub reconcile_creation_grace: Duration,
    /// How long a pool may hold more idle containers than its min_size
    /// (after a scale down, or adoption) before the surplus is drained.
    /// Default 30s.
    pub pool_surplus_grace: Duration,
    /// TLS and authentication.
    pub security: Security,
    /// Whether gRPC reflection is served (to authenticated callers).
    /// Default true.
    pub reflection: bool,
    /// The admission policy file, if any; read once at startup.
    pub policy_file: Option<PathBuf>,
    /// What workloads may ask for: the policy file's, or the strict
    /// defaults (see `boilerhouse_core::admission`).
    pub admission: boilerhouse_core::admission::AdmissionPolicy,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its location.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// Which setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The admission policy file cannot be used.
    #[error(transparent)]
    Policy(#[from] crate::admission::PolicyFileError),
}

impl Config {
    /// Merges flags, environment and file into a validated config.
    pub fn load(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./data"));
        let database = match args.database.or(file.database) {
            Some(value) => {
                DatabaseLocation::parse(&value).map_err(|reason| ConfigError::Invalid {
                    field: "database",
                    reason,
                })?
            }
            None => DatabaseLocation::Sqlite(data_dir.join("boilerhouse.db")),
        };
        let heartbeat_interval = file.heartbeat_interval.unwrap_or(Duration::from_secs(2));
        let security = if args.insecure || file.insecure == Some(true) {
            Security::Insecure
        } else {
            let tls_dir = args
                .tls_dir
                .or(file.tls_dir)
                .unwrap_or_else(|| data_dir.join("pki"));
            Security::Secure {
                tls: TlsFiles {
                    cert: file.tls_cert.unwrap_or_else(|| tls_dir.join("server.pem")),
                    key: file.tls_key.unwrap_or_else(|| tls_dir.join("server.key")),
                    client_ca: file.tls_client_ca.unwrap_or_else(|| tls_dir.join("ca.pem")),
                },
                tokens_file: args
                    .tokens_file
                    .or(file.tokens_file)
                    .unwrap_or_else(|| data_dir.join("tokens.toml")),
            }
        };
        let policy_file = args.policy_file.or(file.policy_file);
        let admission = crate::admission::load_policy(policy_file.as_deref())?;
        let config = Config {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7600))),
            metrics_listen: args
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7601))),
            data_dir,
            database,
            rebuild_from_agents: args.rebuild_from_agents,
            workloads_dir: args
                .workloads_dir
                .or(file.workloads_dir)
                .unwrap_or_else(|| PathBuf::from("./workloads")),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            synchronous_full: args
                .synchronous_full
                .or(file.synchronous_full)
                .unwrap_or(true),
            workloads_rescan_interval: file
                .workloads_rescan_interval
                .unwrap_or(Duration::from_secs(30)),
            shutdown_timeout: file.shutdown_timeout.unwrap_or(Duration::from_secs(10)),
            event_retention: file
                .event_retention
                .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
            idempotency_retention: file
                .idempotency_retention
                .unwrap_or(Duration::from_secs(24 * 3600)),
            group_commit_max: file.group_commit_max.unwrap_or(512),
            history_retention: file
                .history_retention
                .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
            trim_interval: file.trim_interval.unwrap_or(Duration::from_secs(3600)),
            ready_file: args.ready_file,
            heartbeat_interval,
            suspect_after: file.suspect_after.unwrap_or(heartbeat_interval * 3),
            boost_full_pass_interval: file
                .boost_full_pass_interval
                .unwrap_or(crate::boosts::FULL_PASS_EVERY),
            lost_grace: file.lost_grace.unwrap_or(Duration::from_secs(30)),
            restart_grace: file.restart_grace.unwrap_or(Duration::from_secs(60)),
            partition_threshold: file.partition_threshold.unwrap_or(0.5),
            advertise_url: args.advertise_url.or(file.advertise_url),
            leader_lease: file.leader_lease.unwrap_or(Duration::from_secs(6)),
            full_report_interval: file.full_report_interval.unwrap_or(Duration::from_secs(30)),
            command_timeout: file.command_timeout.unwrap_or(Duration::from_secs(30)),
            acquire_timeout: file.acquire_timeout.unwrap_or(Duration::from_secs(30)),
            reconcile_interval: file.reconcile_interval.unwrap_or(Duration::from_secs(5)),
            reconcile_lost_grace: file.reconcile_lost_grace.unwrap_or(Duration::from_secs(30)),
            reconcile_creation_grace: file
                .reconcile_creation_grace
                .unwrap_or(Duration::from_secs(60)),
            pool_surplus_grace: file.pool_surplus_grace.unwrap_or(Duration::from_secs(30)),
            sync_timeout: file.sync_timeout.unwrap_or(Duration::from_secs(600)),
            final_sync_deadline: file.final_sync_deadline.unwrap_or(Duration::from_secs(30)),
            security,
            reflection: file.reflection.unwrap_or(true),
            policy_file,
            admission,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |field: &'static str, value: Duration, min: Duration| {
            if value < min {
                Err(ConfigError::Invalid {
                    field,
                    reason: format!("must be at least {}", humantime::format_duration(min)),
                })
            } else {
                Ok(())
            }
        };
        if !(1..=10_000).contains(&self.group_commit_max) {
            return Err(ConfigError::Invalid {
                field: "group_commit_max",
                reason: "must be from 1 to 10000".into(),
            });
        }
        at_least(
            "workloads_rescan_interval",
            self.workloads_rescan_interval,
            Duration::from_millis(100),
        )?;
        at_least("sync_timeout", self.sync_timeout, Duration::from_secs(1))?;
        at_least(
            "shutdown_timeout",
            self.shutdown_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "event_retention",
            self.event_retention,
            Duration::from_secs(60),
        )?;
        at_least(
            "history_retention",
            self.history_retention,
            Duration::from_secs(60),
        )?;
        at_least(
            "idempotency_retention",
            self.idempotency_retention,
            Duration::from_secs(60),
        )?;
        at_least("trim_interval", self.trim_interval, Duration::from_secs(1))?;
        at_least(
            "heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(100),
        )?;
        at_least(
            "full_report_interval",
            self.full_report_interval,
            Duration::from_secs(1),
        )?;
        if !(0.0..=1.0).contains(&self.partition_threshold) {
            return Err(ConfigError::Invalid {
                field: "partition_threshold",
                reason: "must be between 0 and 1 (1 turns the guard off)".into(),
            });
        }
        if self.suspect_after <= self.heartbeat_interval {
            return Err(ConfigError::Invalid {
                field: "suspect_after",
                reason: "must be longer than heartbeat_interval, or every late heartbeat makes a node Suspect".into(),
            });
        }
        if let Security::Secure { tls, tokens_file } = &self.security {
            for (field, path) in [
                ("tls_cert", &tls.cert),
                ("tls_key", &tls.key),
                ("tls_client_ca", &tls.client_ca),
            ] {
                if !path.exists() {
                    let refusing = if self.listen.ip().is_loopback() {
                        String::new()
                    } else {
                        format!("refusing to serve {} without TLS: ", self.listen)
                    };
                    return Err(ConfigError::Invalid {
                        field,
                        reason: format!(
                            "{refusing}{} does not exist; make the PKI with `boilerhoused pki init` (or pass --insecure to serve plaintext to anyone, for labs only)",
                            path.display()
                        ),
                    });
                }
            }
            if !tokens_file.exists() {
                return Err(ConfigError::Invalid {
                    field: "tokens_file",
                    reason: format!(
                        "{} does not exist; make a token with `boilerhoused token create --name <who> --scope admin` (or pass --insecure, for labs only)",
                        tokens_file.display()
                    ),
                });
            }
        }
        if self.listen == self.metrics_listen && self.listen.port() != 0 {
            return Err(ConfigError::Invalid {
                field: "metrics_listen",
                reason: "must differ from listen".into(),
            });
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
