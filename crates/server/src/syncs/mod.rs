//! Tenant state sync, the server's side: when syncs run, what they did,
//! and the uploads still owed.
//!
//! The agent moves the files (`boilerhouse_agent::sync`); the server
//! decides when, waits for the answer and keeps the record:
//! - on claim, a download before Claim answers (in `crate::tenancy`);
//! - on release, an upload before the reservation begins (in
//!   `crate::tenancy`); a
//!   failed one leaves the container held and is retried here with
//!   backoff, across restarts, until it succeeds or an operator acts;
//! - every `interval` while claimed, counted from the last complete
//!   upload, which is stored, so a sync that fell due while the server
//!   was down runs as soon as it is back (catch-up);
//! - a final upload of every claim on graceful shutdown and on drain.
//!
//! Syncs of one (tenant, workload) never overlap: they share a lock, so a
//! periodic upload and a release's upload cannot race on the manifest.
//!
//! This module holds the shared types, the loaded statuses and their
//! queries; the work is split by what it does:
//! - `running`: one sync through the agent, and its record;
//! - `owed`: uploads owed on release, and their retries;
//! - `finals`: the final uploads of shutdown and drain;
//! - [`task`]: the scheduler of periodic syncs and owed-upload retries.

mod finals;
mod owed;
mod running;
pub mod task;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use boilerhouse_core::event::EventSubject;
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::sync::SyncStatus;
use boilerhouse_core::workload::SyncSpec;
use boilerhouse_core::{ContainerId, TenantId, Timestamp, WorkloadId};

use crate::agents::Registry;
use crate::locks::KeyedLocks;
use crate::store::{PendingReleaseUpload, Store, StoreError};

pub use boilerhouse_core::sync::SyncPhase as Phase;
pub use finals::{FinalUploads, final_uploads};

/// Why a sync runs; recorded in events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReason {
    /// Restoring a tenant's files before Claim answers.
    Claim,
    /// Saving them before the reservation begins.
    Release,
    /// The workload's interval passed.
    Periodic,
    /// The interval passed while the server was down.
    CatchUp,
    /// Graceful shutdown.
    Shutdown,
    /// The node is being drained.
    Drain,
    /// An operator asked.
    Trigger,
    /// Retrying a failed upload on release.
    Retry,
}

impl SyncReason {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncReason::Claim => "claim",
            SyncReason::Release => "release",
            SyncReason::Periodic => "periodic",
            SyncReason::CatchUp => "catch-up",
            SyncReason::Shutdown => "shutdown",
            SyncReason::Drain => "drain",
            SyncReason::Trigger => "trigger",
            SyncReason::Retry => "retry",
        }
    }

    /// Whether the container is paused around the sync: uploads that save
    /// the tenant's files for good (release, its retries, drain,
    /// shutdown) are taken of a still container, as the original
    /// Boilerhouse did (pause, extract, unpause). Periodic and manual
    /// syncs run live, and downloads happen before the tenant has it.
    pub fn snapshots(self) -> bool {
        matches!(
            self,
            SyncReason::Release | SyncReason::Retry | SyncReason::Shutdown | SyncReason::Drain
        )
    }
}

/// What one sync did.
#[derive(Debug, Clone)]
pub struct SyncRun {
    /// The statuses of the mappings it ran, as they now stand.
    pub statuses: Vec<SyncStatus>,
    /// Why it did not complete; `None` when every file moved.
    pub error: Option<String>,
    /// Bytes moved.
    pub bytes: u64,
    /// Files fetched from the sink.
    pub downloaded: u32,
    /// What the mappings that completed could not do, one line each.
    pub warnings: Vec<String>,
}

impl SyncRun {
    /// Whether every file moved.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Tunables.
#[derive(Debug, Clone, Copy)]
pub struct SyncsConfig {
    /// How long one sync may take on the agent.
    pub sync_timeout: Duration,
}

type Key = (TenantId, WorkloadId, String);

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct SyncCounters {
    /// Syncs that moved everything.
    pub ok: AtomicU64,
    /// Syncs that did not.
    pub failed: AtomicU64,
    /// Bytes moved.
    pub bytes: AtomicU64,
    /// The largest lag of a claimed container's periodic upload (time since
    /// the last complete upload, or the claim), in ms, as of the last pass.
    pub max_lag_ms: std::sync::atomic::AtomicI64,
}

struct Inner {
    store: Store,
    agents: Registry,
    config: SyncsConfig,
    statuses: Mutex<BTreeMap<Key, SyncStatus>>,
    /// Owed uploads on release, with when to try each next.
    owed: Mutex<HashMap<ContainerId, (PendingReleaseUpload, Instant)>>,
    locks: KeyedLocks,
    changes: broadcast::Sender<SyncStatus>,
    stopping: AtomicBool,
    counters: SyncCounters,
}

/// The sync machinery. Cheap to clone.
#[derive(Clone)]
pub struct Syncs {
    inner: Arc<Inner>,
}

/// Whether `spec` has mappings a `phase` sync would run.
pub fn runs_in(spec: &SyncSpec, phase: Phase) -> bool {
    spec.mappings.iter().any(|m| phase.selects(m.direction))
}

fn subject(tenant: &TenantId, workload: &WorkloadId, container: &ContainerRecord) -> EventSubject {
    EventSubject {
        tenant_id: Some(tenant.to_string()),
        workload_id: Some(workload.to_string()),
        container_id: Some(container.id.to_string()),
        node_id: Some(container.node_id.to_string()),
        boost_id: None,
    }
}

impl Syncs {
    /// Loads statuses and owed uploads from the database.
    pub async fn load(
        store: Store,
        agents: Registry,
        config: SyncsConfig,
    ) -> Result<Self, StoreError> {
        let (statuses, unreadable) = store.sync_statuses().await?;
        let (owed, more) = store.pending_releases().await?;
        store
            .report_unreadable(&[unreadable, more].concat(), crate::clock::now())
            .await?;
        let statuses = statuses
            .into_iter()
            .map(|s| {
                (
                    (
                        s.tenant_id.clone(),
                        s.workload_id.clone(),
                        s.sync_id.clone(),
                    ),
                    s,
                )
            })
            .collect();
        let now = Instant::now();
        // Owed uploads are retried at once after a restart: the retry
        // schedule did not survive, and the data has waited long enough.
        let owed = owed
            .into_iter()
            .map(|p| (p.container_id, (p, now)))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                agents,
                config,
                statuses: Mutex::new(statuses),
                owed: Mutex::new(owed),
                locks: KeyedLocks::default(),
                changes: broadcast::channel(1024).0,
                stopping: AtomicBool::new(false),
                counters: SyncCounters::default(),
            }),
        })
    }

    fn statuses_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, SyncStatus>> {
        self.inner
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, status: &SyncStatus) {
        // No subscriber is fine.
        let _ = self.inner.changes.send(status.clone());
    }

    /// Statuses, optionally of one tenant and/or workload.
    pub fn statuses(
        &self,
        tenant: Option<&TenantId>,
        workload: Option<&WorkloadId>,
    ) -> Vec<SyncStatus> {
        self.statuses_lock()
            .values()
            .filter(|s| tenant.is_none_or(|t| &s.tenant_id == t))
            .filter(|s| workload.is_none_or(|w| &s.workload_id == w))
            .cloned()
            .collect()
    }

    /// Every status change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SyncStatus> {
        self.inner.changes.subscribe()
    }

    /// The last time every uploading mapping of `spec` completed an upload
    /// for the tenant: the oldest of them, `None` if one never did.
    pub fn last_upload(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        spec: &SyncSpec,
    ) -> Option<Timestamp> {
        let statuses = self.statuses_lock();
        let mut oldest: Option<Timestamp> = None;
        for m in spec
            .mappings
            .iter()
            .filter(|m| Phase::Upload.selects(m.direction))
        {
            let at = statuses
                .get(&(tenant.clone(), workload.clone(), m.id()))
                .and_then(|s| s.last_upload_at)?;
            oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
        oldest
    }

    /// Counters for /metrics.
    pub fn counters(&self) -> &SyncCounters {
        &self.inner.counters
    }

    /// Stops periodic syncs from starting: shutdown has begun.
    pub fn begin_shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }
}
