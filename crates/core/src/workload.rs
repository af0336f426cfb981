//! Workload files: the compose-like YAML that describes a container and its
//! pool, parsed into a validated [`WorkloadSpec`].
//!
//! Parsing is two-staged. Serde reads the text into `raw` structs that
//! mirror the file (and reject unknown fields, so a typo such as
//! `min_szie` is an error instead of a silently ignored default). Then
//! [`validate`] turns them into the typed spec, checking cross-field rules.
//! Either stage fails with one [`WorkloadError`] that names the file, the
//! dotted field path and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::WorkloadId;
use crate::time::Timestamp;
use crate::units::{parse_duration, parse_size};

/// A workload file that cannot be used, and exactly why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct WorkloadError {
    /// The file (or `<request>` for YAML that came over the API).
    pub file: String,
    /// Dotted path of the offending field, e.g. `pool.min_size`; empty
    /// when the document itself did not parse.
    pub field: String,
    /// What is wrong, in a sentence.
    pub reason: String,
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: field `{}`: {}", self.file, self.field, self.reason)
        }
    }
}

/// A validated workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Also the id of the workload's pool.
    pub id: WorkloadId,
    /// Human-readable name; defaults to the id.
    pub name: String,
    /// Image reference. It must already be present on the nodes or pullable.
    pub image: String,
    /// Overrides the image's command.
    pub command: Vec<String>,
    /// Host directories bind-mounted into the container.
    pub volumes: Volumes,
    /// Environment variables.
    pub environment: BTreeMap<String, String>,
    /// Container healthcheck; a container is idle only once it passes.
    pub healthcheck: Option<Healthcheck>,
    /// `deploy.resources.limits`.
    pub limits: Limits,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
    /// `user` as Docker reads it (`uid[:gid]` or a name).
    pub user: Option<String>,
    /// Docker network mode (`none`, `bridge`, a network name, ...).
    pub network_mode: Option<String>,
    /// Pool sizing and life-cycle timing.
    pub pool: PoolPolicy,
    /// A node must carry every one of these labels to host the pool.
    pub node_selector: BTreeMap<String, String>,
    /// Hardening.
    pub security: Security,
    /// Tenant state sync, if any.
    pub sync: Option<SyncSpec>,
    /// What happens to claims on a node that cannot be reached. Left out
    /// of the spec hash: it changes no container.
    #[serde(default, skip_serializing_if = "Disconnect::is_default")]
    pub disconnect: Disconnect,
}

/// The well-known volumes and any custom ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volumes {
    /// The tenant's state: synced, and home of `.boilerhouse-state.json`.
    pub state: Option<Mount>,
    /// Secrets, read-only by default.
    pub secrets: Option<Mount>,
    /// A directory for talking to the container (sockets, pipes).
    pub comm: Option<Mount>,
    /// Further named host directories.
    pub custom: Vec<CustomMount>,
}

/// Where a volume appears inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute path inside the container.
    pub target: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// A named custom volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomMount {
    /// Name of the host directory under the container's volume root.
    pub name: String,
    /// Where it appears.
    #[serde(flatten)]
    pub mount: Mount,
}

/// A Docker healthcheck.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// `["CMD", ...]`, `["CMD-SHELL", "..."]` or `["NONE"]`.
    pub test: Vec<String>,
    /// Time between checks.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time a check may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures before unhealthy.
    pub retries: u32,
    /// Grace time after start during which failures do not count.
    #[serde(with = "humantime_serde")]
    pub start_period: Duration,
}

/// Resource limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU cores.
    pub cpus: Option<f64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
}

/// Pool sizing and timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolPolicy {
    /// Idle containers kept ready.
    pub min_size: u32,
    /// Containers in total, in any state, in-flight creates included.
    pub max_size: u32,
    /// Release a claim after this long without activity; `None` never does.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// How long a released container is kept for its tenant.
    #[serde(with = "humantime_serde")]
    pub affinity_timeout: Duration,
    /// Containers created at once while filling.
    pub fill_concurrency: u32,
    /// Whether a released container is kept for its tenant at all. With
    /// `false`, release destroys it at once. A container never passes to a
    /// second tenant either way.
    pub reuse: bool,
}

/// Hardening, on by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    /// `no-new-privileges`.
    pub no_new_privileges: bool,
    /// Capabilities dropped; `ALL` by default.
    pub cap_drop: Vec<String>,
    /// Capabilities added back.
    pub cap_add: Vec<String>,
    /// Maximum processes in the container.
    pub pids_limit: i64,
    /// Refuse to run as root; with no `user`, run as nobody (65534).
    pub non_root: bool,
}

/// A loaded workload: the validated spec plus where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadRecord {
    /// The validated spec.
    pub spec: WorkloadSpec,
    /// `spec.spec_hash()`, kept so queries need not recompute it.
    pub spec_hash: String,
    /// The YAML as loaded.
    pub yaml: String,
    /// The file it came from.
    pub source_path: String,
    /// First stored.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

impl WorkloadSpec {
    /// A short, stable hash of the validated spec. Containers carry it as a
    /// label, so a container built from an older spec can be recognised.
    pub fn spec_hash(&self) -> String {
        let container_side = Self {
            disconnect: Disconnect::default(),
            ..self.clone()
        };
        // Serialising our own plain structs to JSON cannot fail.
        let bytes = serde_json::to_vec(&container_side).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        hex::encode(&digest[..8])
    }
}

/// Parses and validates one workload document. `file` only labels errors.
pub fn parse_workload(file: &str, text: &str) -> Result<WorkloadSpec, WorkloadError> {
    let raw = parse_raw(file, text)?;
    validate(file, raw)
}

fn parse_raw(file: &str, text: &str) -> Result<raw::Workload, WorkloadError> {
    // The path tracker only sees serde's view; saphyr's own message carries
    // the line and column, which matter most for syntax errors.
    let mut tracked_path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, raw::Workload>(de).map_err(|e| {
            tracked_path = clean_path(&e.path().to_string());
            e.into_inner()
        })
    });
    result.map_err(|e| WorkloadError {
        file: file.to_owned(),
        field: tracked_path,
        reason: first_line(&e.to_string()),
    })
}

/// serde_path_to_error writes `.` for the root and `?` for segments it
/// cannot name; neither helps a reader.
fn clean_path(path: &str) -> String {
    if path == "." || path == "?" {
        String::new()
    } else {
        path.trim_end_matches(".?").to_owned()
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    if line.is_empty() {
        "the document could not be read".to_owned()
    } else {
        line.to_owned()
    }
}

struct Checker<'a> {
    file: &'a str,
}

impl Checker<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> WorkloadError {
        WorkloadError {
            file: self.file.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn duration(&self, field: &str, value: &raw::Text) -> Result<Duration, WorkloadError> {
        parse_duration(&value.0).map_err(|reason| self.err(field, reason))
    }

    fn absolute_target(&self, field: &str, target: &str) -> Result<(), WorkloadError> {
        if !target.starts_with('/') {
            return Err(self.err(field, format!("{target:?} must be an absolute path")));
        }
        if target.split('/').any(|part| part == "..") {
            return Err(self.err(field, format!("{target:?} must not contain '..'")));
        }
        Ok(())
    }
}

const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_FILL_CONCURRENCY: u32 = 2;
const DEFAULT_PIDS_LIMIT: i64 = 512;
const MAX_POOL_SIZE: u32 = 10_000;
const MAX_CPUS: f64 = 1024.0;

fn validate(file: &str, raw: raw::Workload) -> Result<WorkloadSpec, WorkloadError> {
    let c = Checker { file };

    let id_text = raw.id.ok_or_else(|| c.err("id", "is required"))?;
    let id = WorkloadId::new(id_text).map_err(|e| c.err("id", e.reason))?;
    let name = raw.name.unwrap_or_else(|| id.to_string());
    let image = raw.image.unwrap_or_default();
    if image.trim().is_empty() {
        return Err(c.err("image", "is required"));
    }
    if image.chars().any(char::is_whitespace) {
        return Err(c.err("image", format!("{image:?} must not contain spaces")));
    }
    let command = match raw.command {
        None => Vec::new(),
        Some(raw::StringOrList::List(list)) => list,
        Some(raw::StringOrList::One(one)) => vec!["/bin/sh".into(), "-c".into(), one],
    };

    let volumes = validate_volumes(&c, raw.volumes.unwrap_or_default())?;
    let environment = validate_environment(&c, raw.environment)?;
    let healthcheck = raw
        .healthcheck
        .map(|h| validate_healthcheck(&c, h))
        .transpose()?
        .flatten();
    let limits = validate_limits(&c, raw.deploy)?;
    let pool = validate_pool(&c, raw.pool.unwrap_or_default())?;
    let security = validate_security(&c, raw.security.unwrap_or_default());

    let user = raw.user.filter(|u| !u.trim().is_empty());
    if let Some(user) = user.as_ref().filter(|_| security.non_root)
        && crate::admission::is_root_user(user)
    {
        return Err(c.err(
            "user",
            "runs as root while security.non_root is true; set security.non_root: false to allow it",
        ));
    }
    let user = match (user, security.non_root) {
        (Some(user), _) => Some(user),
        (None, true) => Some("65534:65534".to_owned()),
        (None, false) => None,
    };

    let node_selector = raw.node_selector.unwrap_or_default();
    for key in node_selector.keys() {
        if key.trim().is_empty() {
            return Err(c.err("node_selector", "label names must not be empty"));
        }
    }
    let network_mode = raw.network_mode.filter(|m| !m.trim().is_empty());
    let sync = raw
        .sync
        .map(|s| sync::validate(&c, s, volumes.state.as_ref()))
        .transpose()?;
    let disconnect = raw
        .disconnect
        .map(|d| disconnect::validate(&c, d))
        .transpose()?
        .unwrap_or_default();

    Ok(WorkloadSpec {
        id,
        name,
        image,
        command,
        volumes,
        environment,
        healthcheck,
        limits,
        read_only: raw.read_only.unwrap_or(false),
        user,
        network_mode,
        pool,
        node_selector,
        security,
        sync,
        disconnect,
    })
}

fn validate_volumes(c: &Checker<'_>, raw: raw::Volumes) -> Result<Volumes, WorkloadError> {
    let mut seen_targets: BTreeMap<String, String> = BTreeMap::new();
    let mut check = |field: String, target: &str| -> Result<(), WorkloadError> {
        c.absolute_target(&field, target)?;
        let normalised = target.trim_end_matches('/').to_owned();
        if let Some(other) = seen_targets.insert(normalised, field.clone()) {
            return Err(c.err(field, format!("target {target:?} is also used by {other}")));
        }
        Ok(())
    };
    let mut well_known = |name: &str, mount: Option<raw::Mount>, read_only_default: bool| {
        mount
            .map(|m| {
                check(format!("volumes.{name}.target"), &m.target)?;
                Ok(Mount {
                    target: m.target,
                    read_only: m.read_only.unwrap_or(read_only_default),
                })
            })
            .transpose()
    };
    let state = well_known("state", raw.state, false)?;
    let secrets = well_known("secrets", raw.secrets, true)?;
    let comm = well_known("comm", raw.comm, false)?;
    let mut custom = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, m) in raw.custom.unwrap_or_default().into_iter().enumerate() {
        let name = m.name.unwrap_or_default();
        let valid_name = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_name {
            return Err(c.err(
                format!("volumes.custom[{i}].name"),
                "must be 1-63 letters, digits, '-' or '_'",
            ));
        }
        if matches!(name.as_str(), "state" | "secrets" | "comm") || !names.insert(name.clone()) {
            return Err(c.err(
                format!("volumes.custom[{i}].name"),
                format!("{name:?} is already used by another volume"),
            ));
        }
        check(format!("volumes.custom[{i}].target"), &m.target)?;
        custom.push(CustomMount {
            name,
            mount: Mount {
                target: m.target,
                read_only: m.read_only.unwrap_or(false),
            },
        });
    }
    Ok(Volumes {
        state,
        secrets,
        comm,
        custom,
    })
}

fn validate_environment(
    c: &Checker<'_>,
    raw: Option<raw::Environment>,
) -> Result<BTreeMap<String, String>, WorkloadError> {
    let pairs: Vec<(String, String)> = match raw {
        None => Vec::new(),
        Some(raw::Environment::Map(map)) => map.into_iter().map(|(k, v)| (k, v.0)).collect(),
        Some(raw::Environment::List(list)) => list
            .into_iter()
            .map(|entry| match entry.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (entry, String::new()),
            })
            .collect(),
    };
    let mut env = BTreeMap::new();
    for (key, value) in pairs {
        if key.is_empty() || key.contains('=') || key.chars().any(char::is_whitespace) {
            return Err(c.err(
                format!("environment.{key}"),
                "variable names must be non-empty, without '=' or spaces",
            ));
        }
        if key.contains('\0') || value.contains('\0') {
            return Err(c.err(format!("environment.{key}"), "must not contain NUL"));
        }
        env.insert(key, value);
    }
    Ok(env)
}

fn validate_healthcheck(
    c: &Checker<'_>,
    raw: raw::Healthcheck,
) -> Result<Option<Healthcheck>, WorkloadError> {
    if raw.disable == Some(true) {
        return Ok(None);
    }
    let test = match raw.test {
        None => return Err(c.err("healthcheck.test", "is required")),
        Some(raw::StringOrList::One(cmd)) => vec!["CMD-SHELL".to_owned(), cmd],
        Some(raw::StringOrList::List(list)) => list,
    };
    match test.first().map(String::as_str) {
        Some("NONE") => return Ok(None),
        Some("CMD") | Some("CMD-SHELL") if test.len() >= 2 => {}
        _ => {
            return Err(c.err(
                "healthcheck.test",
                "must be a command string, or a list starting with CMD or CMD-SHELL followed by the command",
            ));
        }
    }
    let duration_or = |field: &str, v: Option<raw::Text>, default: Duration| {
        v.map(|t| c.duration(field, &t))
            .transpose()
            .map(|d| d.unwrap_or(default))
    };
    let interval = duration_or("healthcheck.interval", raw.interval, Duration::from_secs(5))?;
    let timeout = duration_or("healthcheck.timeout", raw.timeout, Duration::from_secs(3))?;
    let start_period = duration_or("healthcheck.start_period", raw.start_period, Duration::ZERO)?;
    // Docker rejects intervals under 1ms and treats 0 as its default.
    if interval < Duration::from_millis(1) {
        return Err(c.err("healthcheck.interval", "must be at least 1ms"));
    }
    if timeout < Duration::from_millis(1) {
        return Err(c.err("healthcheck.timeout", "must be at least 1ms"));
    }
    Ok(Some(Healthcheck {
        test,
        interval,
        timeout,
        retries: raw.retries.unwrap_or(3),
        start_period,
    }))
}

fn validate_limits(c: &Checker<'_>, raw: Option<raw::Deploy>) -> Result<Limits, WorkloadError> {
    let Some(limits) = raw.and_then(|d| d.resources).and_then(|r| r.limits) else {
        return Ok(Limits::default());
    };
    let cpus = limits
        .cpus
        .map(|text| {
            let field = "deploy.resources.limits.cpus";
            let cpus: f64 = text
                .0
                .trim()
                .parse()
                .map_err(|_| c.err(field, format!("{:?} is not a number of cores", text.0)))?;
            if !cpus.is_finite() || cpus <= 0.0 || cpus > MAX_CPUS {
                return Err(c.err(field, format!("must be more than 0 and at most {MAX_CPUS}")));
            }
            Ok(cpus)
        })
        .transpose()?;
    let memory_bytes = limits
        .memory
        .map(|text| {
            let field = "deploy.resources.limits.memory";
            let bytes = parse_size(&text.0).map_err(|reason| c.err(field, reason))?;
            // Docker refuses limits under 6 MiB.
            if bytes < 6 << 20 {
                return Err(c.err(field, "must be at least 6M, Docker's minimum"));
            }
            Ok(bytes)
        })
        .transpose()?;
    Ok(Limits { cpus, memory_bytes })
}

fn validate_pool(c: &Checker<'_>, raw: raw::Pool) -> Result<PoolPolicy, WorkloadError> {
    let min_size = raw.min_size.unwrap_or(1);
    let max_size = raw.max_size.unwrap_or(min_size.max(1) * 4);
    if max_size == 0 {
        return Err(c.err("pool.max_size", "must be at least 1"));
    }
    if max_size > MAX_POOL_SIZE {
        return Err(c.err("pool.max_size", format!("must be at most {MAX_POOL_SIZE}")));
    }
    if min_size > max_size {
        return Err(c.err(
            "pool.min_size",
            format!("{min_size} is larger than pool.max_size ({max_size})"),
        ));
    }
    let idle_timeout = raw
        .idle_timeout
        .map(|t| c.duration("pool.idle_timeout", &t))
        .transpose()?
        .filter(|d| !d.is_zero());
    let affinity_timeout = raw
        .affinity_timeout
        .map(|t| c.duration("pool.affinity_timeout", &t))
        .transpose()?
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
    let fill_concurrency = raw.fill_concurrency.unwrap_or(DEFAULT_FILL_CONCURRENCY);
    if fill_concurrency == 0 {
        return Err(c.err("pool.fill_concurrency", "must be at least 1"));
    }
    Ok(PoolPolicy {
        min_size,
        max_size,
        idle_timeout,
        affinity_timeout,
        fill_concurrency,
        reuse: raw.reuse.unwrap_or(true),
    })
}

fn validate_security(_c: &Checker<'_>, raw: raw::Security) -> Security {
    Security {
        no_new_privileges: raw.no_new_privileges.unwrap_or(true),
        cap_drop: raw.cap_drop.unwrap_or_else(|| vec!["ALL".to_owned()]),
        cap_add: raw.cap_add.unwrap_or_default(),
        pids_limit: raw.pids_limit.unwrap_or(DEFAULT_PIDS_LIMIT),
        non_root: raw.non_root.unwrap_or(true),
    }
}

mod disconnect;
pub use disconnect::Disconnect;
mod raw;
mod sync;
pub use sync::{
    OnClaimError, SyncDirection, SyncMapping, SyncMode, SyncPolicy, SyncSink, SyncSpec,
};
#[cfg(test)]
mod tests;
