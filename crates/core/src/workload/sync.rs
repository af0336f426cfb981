//! The `sync` section: its types and their validation.
//!
//! Mapping paths follow the original Boilerhouse format: an absolute path
//! names a directory inside the container and must lie under the state
//! volume's target; a relative path is relative to the state volume. Both
//! are resolved here, once, to a directory inside the state volume, so the
//! agent never sees a container path.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Checker, Mount, WorkloadError, raw};
use crate::sync::{PathFilter, safe_relative};

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
    /// The path as written. Absolute, it is a path inside the container
    /// and lies under the state volume's target (the original Boilerhouse
    /// format: `path: /data` with `volumes.state.target: /data`); relative,
    /// it is a path inside the state volume (`.` is all of it).
    pub path: String,
    /// The directory `path` names, relative to the state volume (`""` for
    /// all of it), resolved when the workload was loaded. Absent in
    /// workloads stored before container paths were understood, whose
    /// `path` was always relative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Only files whose path below the directory matches this glob move
    /// (see [`crate::sync::PathFilter`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Where below the tenant's sink prefix the files go; by default the
    /// directory's path in the state volume, so both spellings of one
    /// directory share their files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_path: Option<String>,
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
    /// Whether an operator may run a sync by hand (`bh sync trigger`).
    #[serde(default)]
    pub manual: bool,
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

impl SyncMapping {
    /// The mapping's name in statuses, events and reports: its path, with
    /// its pattern when it has one, so two patterns over one directory are
    /// told apart.
    pub fn id(&self) -> String {
        match &self.pattern {
            Some(pattern) => format!("{}:{pattern}", self.path),
            None => self.path.clone(),
        }
    }

    /// The directory's components inside the state volume.
    pub fn dir_parts(&self) -> Result<Vec<String>, String> {
        safe_relative(self.dir.as_deref().unwrap_or(&self.path))
    }

    /// Where the mapping's files go below the tenant's sink prefix.
    pub fn key_prefix(&self) -> Result<String, String> {
        Ok(match &self.sink_path {
            Some(sink_path) => safe_relative(sink_path.trim_start_matches('/'))?,
            None => self.dir_parts()?,
        }
        .join("/"))
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

pub(super) fn validate(
    c: &Checker<'_>,
    raw: raw::Sync,
    state: Option<&Mount>,
) -> Result<SyncSpec, WorkloadError> {
    let sink_raw = raw.sink.ok_or_else(|| c.err("sync.sink", "is required"))?;
    let prefix = validate_prefix(c, sink_raw.prefix)?;
    if sink_raw.access_key_id.is_some() || sink_raw.secret_access_key.is_some() {
        return Err(c.err(
            "sync.sink.access_key_id",
            "credentials do not belong in a workload file, which any operator can read back; \
             give each agent its own (--s3-credentials-file, the AWS environment or ~/.aws/credentials)",
        ));
    }
    if sink_raw.rclone_flags.is_some() {
        return Err(c.err(
            "sync.sink.rclone_flags",
            "Boilerhouse does not run rclone; remove the flags (the sink's own fields say everything it needs)",
        ));
    }
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
    let mut mappings: Vec<SyncMapping> = Vec::new();
    for (i, m) in raw_mappings.into_iter().enumerate() {
        let mapping = validate_mapping(c, i, m, state)?;
        let same = |other: &SyncMapping| {
            other.id() == mapping.id()
                || (other.dir == mapping.dir
                    && other.pattern == mapping.pattern
                    && other.key_prefix() == mapping.key_prefix())
        };
        if let Some(j) = mappings.iter().position(same) {
            return Err(c.err(
                format!("sync.mappings[{i}].path"),
                format!("repeats sync.mappings[{j}] ({})", mapping.id()),
            ));
        }
        mappings.push(mapping);
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
            manual: policy_raw.manual.unwrap_or(false),
        },
    })
}

/// One mapping: its path resolved inside the state volume, its pattern and
/// sink path checked.
fn validate_mapping(
    c: &Checker<'_>,
    i: usize,
    m: raw::Mapping,
    state: Option<&Mount>,
) -> Result<SyncMapping, WorkloadError> {
    let field = format!("sync.mappings[{i}].path");
    let written = m.path.unwrap_or_else(|| ".".to_owned());
    let written = written.trim();
    let written = if written.is_empty() { "." } else { written };
    let dir = if written.starts_with('/') {
        let Some(state) = state else {
            return Err(c.err(
                field,
                format!(
                    "{written:?} is a path inside the container, but the workload has no \
                     volumes.state to sync it from"
                ),
            ));
        };
        match inside(&state.target, written) {
            Some(relative) => relative,
            None => {
                return Err(c.err(
                    field,
                    format!(
                        "{written:?} is outside the state volume (volumes.state.target is {:?}); \
                         only files under it are kept between claims",
                        state.target
                    ),
                ));
            }
        }
    } else {
        written.to_owned()
    };
    // The agent checks again, and never follows a symlink on the host.
    let parts = safe_relative(&dir).map_err(|why| c.err(&field, why))?;
    let sink_path = m
        .sink_path
        .map(|p| p.trim().trim_matches('/').to_owned())
        .filter(|p| !p.is_empty());
    if let Some(sink_path) = &sink_path {
        safe_relative(sink_path)
            .map_err(|why| c.err(format!("sync.mappings[{i}].sink_path"), why))?;
    }
    let pattern = m.pattern.map(|p| p.trim().to_owned());
    if let Some(pattern) = &pattern {
        PathFilter::new(pattern)
            .map_err(|why| c.err(format!("sync.mappings[{i}].pattern"), why))?;
    }
    Ok(SyncMapping {
        path: written.to_owned(),
        dir: Some(parts.join("/")),
        pattern,
        sink_path,
        direction: m.direction.unwrap_or(SyncDirection::Bidirectional),
        mode: m.mode.unwrap_or(SyncMode::Copy),
    })
}

/// `path` relative to `target` when it lies at or under it, compared by
/// component so that `/database` is not under `/data`.
fn inside(target: &str, path: &str) -> Option<String> {
    let components = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_owned)
            .collect()
    };
    let target = components(target);
    let path = components(path);
    if path.iter().any(|c| c == "..") || !path.starts_with(&target) {
        return None;
    }
    Some(path[target.len()..].join("/"))
}
