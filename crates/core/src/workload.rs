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

/// Tenant state sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSpec {
    /// Where tenants' files are kept.
    pub sink: SyncSink,
    /// What is copied, and which way.
    pub mappings: Vec<SyncMapping>,
    /// When syncs run.
    pub policy: SyncPolicy,
}

/// A sync sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SyncSink {
    /// A directory on the agent's host.
    Local {
        /// The directory.
        path: String,
        /// Key prefix; may contain `${tenantId}`.
        prefix: String,
    },
    /// An S3-compatible bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Region; optional for S3-compatible servers.
        region: Option<String>,
        /// Endpoint URL for S3-compatible servers.
        endpoint: Option<String>,
        /// Key prefix; may contain `${tenantId}`.
        prefix: String,
    },
}

/// One copied path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMapping {
    /// Path relative to the state directory; `.` is all of it.
    pub path: String,
    /// Which way files move.
    pub direction: SyncDirection,
    /// Whether files missing at the source are deleted at the destination.
    pub mode: SyncMode,
}

/// Which way a mapping copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncDirection {
    /// Container to sink.
    Upload,
    /// Sink to container.
    Download,
    /// Both; the newer file wins.
    Bidirectional,
}

/// How a mapping treats files that exist only at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Copy new and changed files; never delete.
    Copy,
    /// Make the destination match the source, deleting extras.
    Sync,
}

/// When syncs run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPolicy {
    /// Download before Claim returns.
    pub on_claim: bool,
    /// Upload before the affinity reservation begins.
    pub on_release: bool,
    /// Periodic upload while claimed.
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Whether a failed download on claim fails the claim.
    pub on_claim_error: OnClaimError,
}

/// What a failed download on claim does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnClaimError {
    /// The claim fails with UNAVAILABLE; no tenant starts without its data.
    Fail,
    /// The claim succeeds without the data.
    Continue,
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
        // Serialising our own plain structs to JSON cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
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
    let sync = raw.sync.map(|s| validate_sync(&c, s)).transpose()?;

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

fn validate_prefix(c: &Checker<'_>, prefix: Option<String>) -> Result<String, WorkloadError> {
    let prefix = prefix.unwrap_or_else(|| "${tenantId}/".to_owned());
    let without_var = prefix.replace("${tenantId}", "");
    if without_var.contains("${") {
        return Err(c.err(
            "sync.sink.prefix",
            "the only variable a prefix may contain is ${tenantId}",
        ));
    }
    if prefix.split('/').any(|part| part == "..") {
        return Err(c.err("sync.sink.prefix", "must not contain '..'"));
    }
    if !prefix.contains("${tenantId}") {
        return Err(c.err(
            "sync.sink.prefix",
            "must contain ${tenantId}, or every tenant would share one set of files",
        ));
    }
    Ok(prefix)
}

fn validate_sync(c: &Checker<'_>, raw: raw::Sync) -> Result<SyncSpec, WorkloadError> {
    let sink_raw = raw.sink.ok_or_else(|| c.err("sync.sink", "is required"))?;
    let prefix = validate_prefix(c, sink_raw.prefix)?;
    let sink = match sink_raw.kind.as_deref() {
        Some("local") | None => {
            let path = sink_raw.path.unwrap_or_default();
            if path.trim().is_empty() {
                return Err(c.err("sync.sink.path", "is required for a local sink"));
            }
            SyncSink::Local { path, prefix }
        }
        Some("s3") => {
            let bucket = sink_raw.bucket.unwrap_or_default();
            if bucket.trim().is_empty() {
                return Err(c.err("sync.sink.bucket", "is required for an s3 sink"));
            }
            if let Some(endpoint) = &sink_raw.endpoint
                && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            {
                return Err(c.err("sync.sink.endpoint", "must be an http:// or https:// URL"));
            }
            SyncSink::S3 {
                bucket,
                region: sink_raw.region,
                endpoint: sink_raw.endpoint,
                prefix,
            }
        }
        Some(other) => {
            return Err(c.err(
                "sync.sink.type",
                format!("{other:?} is not a sink type; use local or s3"),
            ));
        }
    };
    let raw_mappings = raw.mappings.unwrap_or_default();
    if raw_mappings.is_empty() {
        return Err(c.err("sync.mappings", "must list at least one mapping"));
    }
    let mut mappings = Vec::new();
    for (i, m) in raw_mappings.into_iter().enumerate() {
        let field = format!("sync.mappings[{i}].path");
        let path = m.path.unwrap_or_else(|| ".".to_owned());
        let trimmed = path.trim_start_matches('/');
        // The agent checks again, and also refuses symlinks on the host.
        if let Err(why) = crate::sync::safe_relative(trimmed) {
            return Err(c.err(field, why));
        }
        let path = if trimmed.is_empty() {
            ".".to_owned()
        } else {
            trimmed.to_owned()
        };
        mappings.push(SyncMapping {
            path,
            direction: m.direction.unwrap_or(SyncDirection::Bidirectional),
            mode: m.mode.unwrap_or(SyncMode::Copy),
        });
    }
    let policy_raw = raw.policy.unwrap_or_default();
    let interval = policy_raw
        .interval
        .map(|t| c.duration("sync.policy.interval", &t))
        .transpose()?
        .filter(|d| !d.is_zero());
    if interval.is_some_and(|d| d < Duration::from_secs(1)) {
        return Err(c.err("sync.policy.interval", "must be at least 1s"));
    }
    Ok(SyncSpec {
        sink,
        mappings,
        policy: SyncPolicy {
            on_claim: policy_raw.on_claim.unwrap_or(true),
            on_release: policy_raw.on_release.unwrap_or(true),
            interval,
            on_claim_error: policy_raw.on_claim_error.unwrap_or(OnClaimError::Fail),
        },
    })
}

/// The file as written. Every field is optional here; [`validate`] decides
/// what is required, so that the error can say so in plain words.
mod raw {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{self, Deserializer, Visitor};

    use super::{OnClaimError, SyncDirection, SyncMode};

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Workload {
        pub id: Option<String>,
        pub name: Option<String>,
        pub image: Option<String>,
        pub command: Option<StringOrList>,
        pub volumes: Option<Volumes>,
        pub environment: Option<Environment>,
        pub healthcheck: Option<Healthcheck>,
        pub deploy: Option<Deploy>,
        pub read_only: Option<bool>,
        pub user: Option<String>,
        pub network_mode: Option<String>,
        pub pool: Option<Pool>,
        pub node_selector: Option<BTreeMap<String, String>>,
        pub security: Option<Security>,
        pub sync: Option<Sync>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Volumes {
        pub state: Option<Mount>,
        pub secrets: Option<Mount>,
        pub comm: Option<Mount>,
        pub custom: Option<Vec<CustomMount>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Mount {
        pub target: String,
        pub read_only: Option<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct CustomMount {
        pub name: Option<String>,
        pub target: String,
        pub read_only: Option<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Healthcheck {
        pub test: Option<StringOrList>,
        pub interval: Option<Text>,
        pub timeout: Option<Text>,
        pub retries: Option<u32>,
        pub start_period: Option<Text>,
        pub disable: Option<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Deploy {
        pub resources: Option<Resources>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Resources {
        pub limits: Option<Limits>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Limits {
        pub cpus: Option<Text>,
        pub memory: Option<Text>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Pool {
        pub min_size: Option<u32>,
        pub max_size: Option<u32>,
        pub idle_timeout: Option<Text>,
        pub affinity_timeout: Option<Text>,
        pub fill_concurrency: Option<u32>,
        pub reuse: Option<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Security {
        pub no_new_privileges: Option<bool>,
        pub cap_drop: Option<Vec<String>>,
        pub cap_add: Option<Vec<String>>,
        pub pids_limit: Option<i64>,
        pub non_root: Option<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Sync {
        pub sink: Option<Sink>,
        pub mappings: Option<Vec<Mapping>>,
        pub policy: Option<Policy>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Sink {
        #[serde(rename = "type")]
        pub kind: Option<String>,
        pub path: Option<String>,
        pub bucket: Option<String>,
        pub region: Option<String>,
        pub endpoint: Option<String>,
        pub prefix: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Mapping {
        pub path: Option<String>,
        pub direction: Option<SyncDirection>,
        pub mode: Option<SyncMode>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Policy {
        pub on_claim: Option<bool>,
        pub on_release: Option<bool>,
        pub interval: Option<Text>,
        pub on_claim_error: Option<OnClaimError>,
    }

    /// A scalar read as text, so `cpus: 0.5` and `cpus: "0.5"` both work,
    /// as they do in compose files.
    pub(super) struct Text(pub String);

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Text;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string or a number")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                    Ok(Text(v.to_owned()))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                    Ok(Text(String::new()))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// `command: "sh -c ..."` or `command: [sh, -c, ...]`.
    pub(super) enum StringOrList {
        One(String),
        List(Vec<String>),
    }

    impl<'de> Deserialize<'de> for StringOrList {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = StringOrList;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string or a list of strings")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrList, E> {
                    Ok(StringOrList::One(v.to_owned()))
                }
                fn visit_seq<A: de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<StringOrList, A::Error> {
                    let mut items = Vec::new();
                    while let Some(Text(item)) = seq.next_element()? {
                        items.push(item);
                    }
                    Ok(StringOrList::List(items))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// `environment:` as a map, or as a list of `KEY=value`, like compose.
    pub(super) enum Environment {
        Map(BTreeMap<String, Text>),
        List(Vec<String>),
    }

    impl<'de> Deserialize<'de> for Environment {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Environment;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a map of variables or a list of KEY=value")
                }
                fn visit_map<A: de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Environment, A::Error> {
                    let mut out = BTreeMap::new();
                    while let Some((k, v)) = map.next_entry::<String, Text>()? {
                        out.insert(k, v);
                    }
                    Ok(Environment::Map(out))
                }
                fn visit_seq<A: de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Environment, A::Error> {
                    let mut out = Vec::new();
                    while let Some(Text(item)) = seq.next_element()? {
                        out.push(item);
                    }
                    Ok(Environment::List(out))
                }
            }
            d.deserialize_any(V)
        }
    }
}

#[cfg(test)]
mod tests;
