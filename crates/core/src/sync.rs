//! Tenant state sync: the rules, without the I/O.
//!
//! The agent lists the files under a mapping on the host and the sink's
//! manifest of what it holds, asks [`plan`] what to move, and moves it.
//! Here live the decisions that must not go wrong: which paths a mapping
//! may touch, where in the sink a tenant's files go, and which files are
//! unchanged (and therefore skipped), newer on one side, or extra.
//!
//! Files are compared by size and modification time, as rsync does by
//! default. A sink's own timestamps are upload times, so the sink keeps a
//! manifest recording each object's size and the modification time of the
//! file it came from; downloads restore that time on the host file, so a
//! file that went down and comes back unchanged is not uploaded again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::TenantId;
use crate::workload::{SyncDirection, SyncMode};

mod layout;
pub use layout::{MappingLayout, MappingPlan, PathFilter, plan_mapping};

/// The variable a sink prefix may contain.
pub const TENANT_VARIABLE: &str = "${tenantId}";

/// The manifest's key under a tenant's prefix. Never a tenant file: paths
/// starting with `.boilerhouse-` are refused in mappings.
pub const MANIFEST_KEY: &str = ".boilerhouse-manifest.json";

/// A mapping path made safe: relative, normalised, never leaving the state
/// directory. `.` (or empty) is the whole directory and yields no
/// components.
pub fn safe_relative(path: &str) -> Result<Vec<String>, String> {
    if path.starts_with('/') {
        return Err(format!(
            "{path:?} is absolute; mapping paths are relative to the state directory"
        ));
    }
    if path.contains('\0') || path.contains('\\') {
        return Err(format!("{path:?} contains a NUL or backslash"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "{path:?} climbs out with `..`; mapping paths stay inside the state directory"
                ));
            }
            p if p.starts_with(".boilerhouse-") => {
                return Err(format!(
                    "{path:?}: names starting with .boilerhouse- are reserved"
                ));
            }
            p => parts.push(p.to_owned()),
        }
    }
    Ok(parts)
}

/// The sink prefix for `tenant`: `${tenantId}` replaced, and the tenant's
/// id appended when the template does not name it, so two tenants can
/// never share a prefix.
pub fn tenant_prefix(template: &str, tenant: &TenantId) -> String {
    let trimmed = template.trim_matches('/');
    let prefix = if trimmed.contains(TENANT_VARIABLE) {
        trimmed.replace(TENANT_VARIABLE, tenant.as_str())
    } else if trimmed.is_empty() {
        tenant.as_str().to_owned()
    } else {
        format!("{trimmed}/{tenant}")
    };
    prefix.trim_matches('/').to_owned()
}

/// What is known of one file: enough to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Bytes.
    pub size: u64,
    /// Modification time of the host file, in milliseconds since the epoch
    /// (for a sink object: of the file it was uploaded from).
    pub modified_ms: i64,
}

/// The files on one side, by path relative to the mapping.
pub type Listing = BTreeMap<String, FileMeta>;

/// One step of a sync.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transfer {
    /// Host file to sink.
    Upload(String),
    /// Sink object to host.
    Download(String),
    /// Remove from the sink (sync mode, upload side is the source).
    DeleteRemote(String),
    /// Remove from the host (sync mode, download side is the source).
    DeleteLocal(String),
}

/// What a sync of one mapping should do, given the host's files and the
/// sink's manifest. Unchanged files (same size and modification time) are
/// skipped. `Bidirectional` moves each file the way its newer copy points;
/// it never deletes, since a file missing on one side may be new on the
/// other.
pub fn plan(
    direction: SyncDirection,
    mode: SyncMode,
    local: &Listing,
    remote: &Listing,
) -> Vec<Transfer> {
    let mut steps = Vec::new();
    match direction {
        SyncDirection::Upload => {
            for (path, meta) in local {
                if remote.get(path) != Some(meta) {
                    steps.push(Transfer::Upload(path.clone()));
                }
            }
            if mode == SyncMode::Sync {
                for path in remote.keys().filter(|p| !local.contains_key(*p)) {
                    steps.push(Transfer::DeleteRemote(path.clone()));
                }
            }
        }
        SyncDirection::Download => {
            for (path, meta) in remote {
                if local.get(path) != Some(meta) {
                    steps.push(Transfer::Download(path.clone()));
                }
            }
            if mode == SyncMode::Sync {
                for path in local.keys().filter(|p| !remote.contains_key(*p)) {
                    steps.push(Transfer::DeleteLocal(path.clone()));
                }
            }
        }
        SyncDirection::Bidirectional => {
            for (path, l) in local {
                match remote.get(path) {
                    None => steps.push(Transfer::Upload(path.clone())),
                    Some(r) if r == l => {}
                    // Newer wins; on a tie of times with different sizes
                    // the host copy wins, since it is the one in use.
                    Some(r) if r.modified_ms > l.modified_ms => {
                        steps.push(Transfer::Download(path.clone()));
                    }
                    Some(_) => steps.push(Transfer::Upload(path.clone())),
                }
            }
            for path in remote.keys().filter(|p| !local.contains_key(*p)) {
                steps.push(Transfer::Download(path.clone()));
            }
        }
    }
    steps.sort();
    steps
}

/// Which of a workload's mappings one sync runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPhase {
    /// Mappings that upload or are bidirectional: release, periodic and
    /// final syncs.
    Upload,
    /// Mappings that download or are bidirectional: claims.
    Download,
    /// Every mapping.
    All,
}

impl SyncPhase {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncPhase::Upload => "upload",
            SyncPhase::Download => "download",
            SyncPhase::All => "all",
        }
    }

    /// From the wire name; empty is `All`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "upload" => Ok(Self::Upload),
            "download" => Ok(Self::Download),
            "all" | "" => Ok(Self::All),
            other => Err(format!(
                "unknown sync direction {other:?}; expected upload, download or all"
            )),
        }
    }

    /// Whether a mapping moving `direction` runs in this phase.
    pub fn selects(self, direction: SyncDirection) -> bool {
        match self {
            SyncPhase::All => true,
            SyncPhase::Upload => direction != SyncDirection::Download,
            SyncPhase::Download => direction != SyncDirection::Upload,
        }
    }
}

/// Where a (tenant, workload, mapping) sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    /// Never ran.
    Idle,
    /// Due, or waiting to be retried.
    Pending,
    /// Running now.
    Running,
    /// The last run moved everything it had to.
    Ok,
    /// The last run completed but did not save what it was there to save
    /// (a missing directory, nothing matched while the sink holds files);
    /// [`SyncStatus::warning`] says why.
    Warning,
    /// The last run failed or left files behind.
    Error,
}

impl SyncState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Idle => "idle",
            SyncState::Pending => "pending",
            SyncState::Running => "running",
            SyncState::Ok => "ok",
            SyncState::Warning => "warning",
            SyncState::Error => "error",
        }
    }
}

impl std::str::FromStr for SyncState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "idle" => SyncState::Idle,
            "pending" => SyncState::Pending,
            "running" => SyncState::Running,
            "ok" => SyncState::Ok,
            "warning" => SyncState::Warning,
            "error" => SyncState::Error,
            other => return Err(format!("unknown sync state {other:?}")),
        })
    }
}

/// One recorded sync error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncErrorEntry {
    /// When.
    pub at: crate::Timestamp,
    /// The mapping's path.
    pub mapping: String,
    /// What went wrong.
    pub message: String,
}

/// Errors kept per (tenant, workload, mapping).
pub const ERROR_HISTORY: usize = 20;

/// The status of one (tenant, workload, mapping): the `sync_id` is the
/// mapping's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    /// Whose.
    pub tenant_id: TenantId,
    /// Which workload.
    pub workload_id: crate::WorkloadId,
    /// The mapping's path.
    pub sync_id: String,
    /// Where it stands.
    pub state: SyncState,
    /// The last run that completed without errors, either way.
    pub last_sync_at: Option<crate::Timestamp>,
    /// The last complete upload: what periodic syncs and catch-up count from.
    pub last_upload_at: Option<crate::Timestamp>,
    /// Files the last run should have moved and did not.
    pub pending_count: u32,
    /// Bytes moved, over all runs.
    pub bytes_transferred: u64,
    /// Newest last; at most [`ERROR_HISTORY`].
    pub recent_errors: Vec<SyncErrorEntry>,
    /// Why the last run is a [`SyncState::Warning`]; `None` otherwise.
    pub warning: Option<String>,
}

impl SyncStatus {
    /// A status that has never run.
    pub fn new(tenant_id: TenantId, workload_id: crate::WorkloadId, sync_id: String) -> Self {
        Self {
            tenant_id,
            workload_id,
            sync_id,
            state: SyncState::Idle,
            last_sync_at: None,
            last_upload_at: None,
            pending_count: 0,
            bytes_transferred: 0,
            recent_errors: Vec::new(),
            warning: None,
        }
    }

    /// Records an error, forgetting the oldest beyond the bound.
    pub fn push_error(&mut self, entry: SyncErrorEntry) {
        self.recent_errors.push(entry);
        let excess = self.recent_errors.len().saturating_sub(ERROR_HISTORY);
        self.recent_errors.drain(..excess);
    }
}

/// When a claimed container's next periodic upload is due: one interval
/// after its last complete upload, or after the claim if none happened
/// since. A due time in the past is a catch-up: it runs at once.
pub fn periodic_due(
    interval: std::time::Duration,
    claimed_at: crate::Timestamp,
    last_upload_at: Option<crate::Timestamp>,
) -> crate::Timestamp {
    let base = last_upload_at.map_or(claimed_at, |u| u.max(claimed_at));
    base.saturating_add(interval)
}

/// How long an upload that failed `attempts` times in a row waits before
/// the next try: doubling from 1 s, capped at 5 minutes.
pub fn retry_delay(attempts: u32) -> std::time::Duration {
    let secs = 1u64 << attempts.saturating_sub(1).min(9);
    std::time::Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(size: u64, modified_ms: i64) -> FileMeta {
        FileMeta { size, modified_ms }
    }

    #[test]
    fn mapping_paths_cannot_escape() {
        assert_eq!(safe_relative(".").unwrap(), Vec::<String>::new());
        assert_eq!(safe_relative("").unwrap(), Vec::<String>::new());
        assert_eq!(safe_relative("a/./b/").unwrap(), vec!["a", "b"]);
        assert!(safe_relative("../etc").is_err());
        assert!(safe_relative("a/../../b").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a\\..\\b").is_err());
        assert!(safe_relative(".boilerhouse-manifest.json").is_err());
    }

    #[test]
    fn tenants_never_share_a_prefix() {
        let t = TenantId::new("t1").unwrap();
        assert_eq!(
            tenant_prefix("tenants/${tenantId}/files", &t),
            "tenants/t1/files"
        );
        assert_eq!(tenant_prefix("/shared/", &t), "shared/t1");
        assert_eq!(tenant_prefix("", &t), "t1");
    }

    #[test]
    fn unchanged_files_are_skipped_and_changed_ones_move() {
        let local = Listing::from([
            ("same".into(), meta(3, 10)),
            ("changed".into(), meta(4, 20)),
            ("new".into(), meta(1, 30)),
        ]);
        let remote = Listing::from([
            ("same".into(), meta(3, 10)),
            ("changed".into(), meta(3, 10)),
            ("gone".into(), meta(9, 5)),
        ]);
        assert_eq!(
            plan(SyncDirection::Upload, SyncMode::Copy, &local, &remote),
            vec![
                Transfer::Upload("changed".into()),
                Transfer::Upload("new".into())
            ]
        );
        assert_eq!(
            plan(SyncDirection::Upload, SyncMode::Sync, &local, &remote),
            vec![
                Transfer::Upload("changed".into()),
                Transfer::Upload("new".into()),
                Transfer::DeleteRemote("gone".into())
            ]
        );
        assert_eq!(
            plan(SyncDirection::Download, SyncMode::Sync, &local, &remote),
            vec![
                Transfer::Download("changed".into()),
                Transfer::Download("gone".into()),
                Transfer::DeleteLocal("new".into())
            ]
        );
    }

    #[test]
    fn bidirectional_takes_the_newer_copy_and_deletes_nothing() {
        let local = Listing::from([
            ("host-newer".into(), meta(1, 20)),
            ("sink-newer".into(), meta(1, 10)),
            ("host-only".into(), meta(1, 10)),
        ]);
        let remote = Listing::from([
            ("host-newer".into(), meta(2, 10)),
            ("sink-newer".into(), meta(2, 20)),
            ("sink-only".into(), meta(1, 10)),
        ]);
        assert_eq!(
            plan(
                SyncDirection::Bidirectional,
                SyncMode::Sync,
                &local,
                &remote
            ),
            vec![
                Transfer::Upload("host-newer".into()),
                Transfer::Upload("host-only".into()),
                Transfer::Download("sink-newer".into()),
                Transfer::Download("sink-only".into()),
            ]
        );
    }

    fn listing() -> impl Strategy<Value = Listing> {
        proptest::collection::btree_map(
            "[a-d]{1,2}",
            (0u64..4, 0i64..4).prop_map(|(s, m)| meta(s, m)),
            0..8,
        )
    }

    /// Applies a plan the way the agent does.
    fn apply(steps: &[Transfer], local: &mut Listing, remote: &mut Listing) {
        let (l, r) = (local.clone(), remote.clone());
        for step in steps {
            match step {
                Transfer::Upload(p) => {
                    remote.insert(p.clone(), l[p]);
                }
                Transfer::Download(p) => {
                    local.insert(p.clone(), r[p]);
                }
                Transfer::DeleteRemote(p) => {
                    remote.remove(p);
                }
                Transfer::DeleteLocal(p) => {
                    local.remove(p);
                }
            }
        }
    }

    proptest! {
        /// After a sync the destination holds the source's files (all of
        /// them in sync mode, and nothing else); a second sync moves
        /// nothing.
        #[test]
        fn a_sync_converges_and_the_next_one_is_empty(
            local in listing(),
            remote in listing(),
            sync_mode in any::<bool>(),
            which in 0u8..3,
        ) {
            let direction = [SyncDirection::Upload, SyncDirection::Download, SyncDirection::Bidirectional][which as usize];
            let mode = if sync_mode { SyncMode::Sync } else { SyncMode::Copy };
            let (mut l, mut r) = (local.clone(), remote.clone());
            let steps = plan(direction, mode, &l, &r);
            apply(&steps, &mut l, &mut r);
            match direction {
                SyncDirection::Upload => {
                    for (p, m) in &local { prop_assert_eq!(r.get(p), Some(m)); }
                    if sync_mode { prop_assert_eq!(&r, &local); }
                    prop_assert_eq!(&l, &local);
                }
                SyncDirection::Download => {
                    for (p, m) in &remote { prop_assert_eq!(l.get(p), Some(m)); }
                    if sync_mode { prop_assert_eq!(&l, &remote); }
                    prop_assert_eq!(&r, &remote);
                }
                SyncDirection::Bidirectional => {
                    prop_assert_eq!(&l, &r);
                    // Nothing is lost: every path of either side survives.
                    for p in local.keys().chain(remote.keys()) { prop_assert!(l.contains_key(p)); }
                }
            }
            prop_assert!(plan(direction, mode, &l, &r).is_empty());
        }
    }

    #[test]
    fn periodic_uploads_count_from_the_last_upload_or_the_claim() {
        let interval = std::time::Duration::from_secs(60);
        let claimed = crate::Timestamp::from_millis(1_000);
        assert_eq!(
            periodic_due(interval, claimed, None),
            crate::Timestamp::from_millis(61_000)
        );
        assert_eq!(
            periodic_due(
                interval,
                claimed,
                Some(crate::Timestamp::from_millis(30_000))
            ),
            crate::Timestamp::from_millis(90_000)
        );
        // An upload from an earlier claim does not count for this one.
        assert_eq!(
            periodic_due(interval, claimed, Some(crate::Timestamp::from_millis(5))),
            crate::Timestamp::from_millis(61_000)
        );
    }

    #[test]
    fn retries_back_off_and_cap() {
        assert_eq!(retry_delay(1), std::time::Duration::from_secs(1));
        assert_eq!(retry_delay(2), std::time::Duration::from_secs(2));
        assert_eq!(retry_delay(5), std::time::Duration::from_secs(16));
        assert_eq!(retry_delay(40), std::time::Duration::from_secs(300));
    }

    #[test]
    fn the_error_history_is_bounded_and_keeps_the_newest() {
        let mut s = SyncStatus::new(
            TenantId::new("t").unwrap(),
            crate::WorkloadId::new("w").unwrap(),
            ".".into(),
        );
        for i in 0..(ERROR_HISTORY + 5) {
            s.push_error(SyncErrorEntry {
                at: crate::Timestamp::from_millis(i as i64),
                mapping: ".".into(),
                message: format!("e{i}"),
            });
        }
        assert_eq!(s.recent_errors.len(), ERROR_HISTORY);
        assert_eq!(
            s.recent_errors.last().unwrap().message,
            format!("e{}", ERROR_HISTORY + 4)
        );
        assert_eq!(s.recent_errors[0].message, "e5");
    }
}
