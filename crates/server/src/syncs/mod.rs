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

pub mod task;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::sync::{SyncErrorEntry, SyncState, SyncStatus, retry_delay};
use boilerhouse_core::workload::{SyncDirection, SyncSpec, WorkloadRecord};
use boilerhouse_core::{ContainerId, TenantId, Timestamp, WorkloadId};
use boilerhouse_proto::pb;

use crate::agents::Registry;
use crate::locks::KeyedLocks;
use crate::store::{PendingReleaseUpload, Store, StoreError};

pub use boilerhouse_core::sync::SyncPhase as Phase;

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

/// A container holding files whose upload is owed outlives its
/// reservation: the pools ask before destroying it.
impl crate::pools::Retention for Syncs {
    fn must_keep(&self, container: &ContainerId) -> bool {
        self.release_upload_owed(container)
    }
}

impl Syncs {
    /// Loads statuses and owed uploads from the database.
    pub async fn load(
        store: Store,
        agents: Registry,
        config: SyncsConfig,
    ) -> Result<Self, StoreError> {
        let statuses = store
            .sync_statuses()
            .await?
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
        let owed = store
            .pending_releases()
            .await?
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

    fn owed_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ContainerId, (PendingReleaseUpload, Instant)>> {
        self.inner.owed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, status: &SyncStatus) {
        // No subscriber is fine.
        let _ = self.inner.changes.send(status.clone());
    }

    /// Syncs `container`'s state directory for `tenant`. Never fails as a
    /// call: what went wrong is in the returned run and in the statuses.
    pub async fn run(
        &self,
        tenant: &TenantId,
        workload: &WorkloadRecord,
        container: &ContainerRecord,
        phase: Phase,
        force: Option<SyncDirection>,
        reason: SyncReason,
    ) -> SyncRun {
        let workload_id = &workload.spec.id;
        let Some(spec) = &workload.spec.sync else {
            return SyncRun {
                statuses: Vec::new(),
                error: Some(format!("workload {workload_id} has no sync section")),
                bytes: 0,
            };
        };
        let mappings: Vec<String> = spec
            .mappings
            .iter()
            .filter(|m| force.is_some() || phase.selects(m.direction))
            .map(|m| m.path.clone())
            .collect();
        let _guard = self
            .inner
            .locks
            .lock(&format!("{tenant}\0{workload_id}"))
            .await;
        let started = crate::clock::now();
        for path in &mappings {
            let mut statuses = self.statuses_lock();
            let status = statuses
                .entry((tenant.clone(), workload_id.clone(), path.clone()))
                .or_insert_with(|| {
                    SyncStatus::new(tenant.clone(), workload_id.clone(), path.clone())
                });
            status.state = SyncState::Running;
            let snapshot = status.clone();
            drop(statuses);
            self.publish(&snapshot);
        }
        let command = pb::Command {
            command_id: format!("sync-{}", boilerhouse_core::ids::Uuid::now_v7()),
            generation: container.claim_generation,
            command: Some(pb::command::Command::RunSync(pb::RunSync {
                container_id: container.id.to_string(),
                tenant_id: tenant.to_string(),
                workload_id: workload_id.to_string(),
                sync_spec_json: serde_json::to_string(spec).unwrap_or_default(),
                direction: phase.as_str().to_owned(),
                force_direction: match force {
                    None => pb::SyncDirection::Unspecified,
                    Some(SyncDirection::Upload) => pb::SyncDirection::Upload,
                    Some(SyncDirection::Download) => pb::SyncDirection::Download,
                    Some(SyncDirection::Bidirectional) => pb::SyncDirection::Bidirectional,
                } as i32,
            })),
        };
        let answer = self
            .inner
            .agents
            .send_once(&container.node_id, command, self.inner.config.sync_timeout)
            .await;
        let now = crate::clock::now();
        let uploads = |path: &str| {
            let direction = force.or_else(|| {
                spec.mappings
                    .iter()
                    .find(|m| m.path == path)
                    .map(|m| m.direction)
            });
            direction != Some(SyncDirection::Download)
        };
        let mut run = SyncRun {
            statuses: Vec::new(),
            error: None,
            bytes: 0,
        };
        let mut new_errors = Vec::new();
        let (reports, whole_error): (Vec<pb::MappingSyncReport>, Option<String>) = match answer {
            Ok(result) => {
                let reports = result.sync.map(|s| s.mappings).unwrap_or_default();
                let error = (!result.ok).then(|| result.error.clone());
                (reports, error)
            }
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        {
            let mut statuses = self.statuses_lock();
            for path in &mappings {
                let Some(status) =
                    statuses.get_mut(&(tenant.clone(), workload_id.clone(), path.clone()))
                else {
                    continue;
                };
                let report = reports.iter().find(|r| &r.path == path);
                match report {
                    Some(r) if r.errors.is_empty() && r.pending == 0 => {
                        status.state = SyncState::Ok;
                        status.last_sync_at = Some(started);
                        if uploads(path) {
                            // Files changed after `started` are in the next
                            // upload; counting from the start keeps lag honest.
                            status.last_upload_at = Some(started);
                        }
                        status.pending_count = 0;
                        status.bytes_transferred += r.bytes;
                        run.bytes += r.bytes;
                    }
                    Some(r) => {
                        status.state = SyncState::Error;
                        status.pending_count = r.pending.max(1);
                        status.bytes_transferred += r.bytes;
                        run.bytes += r.bytes;
                        for message in &r.errors {
                            let entry = SyncErrorEntry {
                                at: now,
                                mapping: path.clone(),
                                message: message.clone(),
                            };
                            status.push_error(entry.clone());
                            new_errors.push((status.clone(), entry));
                        }
                    }
                    None => {
                        status.state = SyncState::Error;
                        status.pending_count = status.pending_count.max(1);
                        let entry = SyncErrorEntry {
                            at: now,
                            mapping: path.clone(),
                            message: whole_error
                                .clone()
                                .unwrap_or_else(|| "the agent did not report this mapping".into()),
                        };
                        status.push_error(entry.clone());
                        new_errors.push((status.clone(), entry));
                    }
                }
                run.statuses.push(status.clone());
            }
        }
        run.error = whole_error.or_else(|| {
            run.statuses
                .iter()
                .any(|s| s.state != SyncState::Ok)
                .then(|| "some files did not move".to_owned())
        });
        for s in &run.statuses {
            self.publish(s);
        }
        let counters = &self.inner.counters;
        counters.bytes.fetch_add(run.bytes, Ordering::Relaxed);
        if run.ok() {
            counters.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        let moved = run.bytes;
        let (kind, message) = match &run.error {
            None => (
                EventKind::SyncCompleted,
                format!(
                    "{} sync ({}) of {tenant}'s {workload_id} files on container {} moved {moved} bytes",
                    phase.as_str(),
                    reason.as_str(),
                    container.id
                ),
            ),
            Some(e) => (
                EventKind::SyncFailed,
                format!(
                    "{} sync ({}) of {tenant}'s {workload_id} files on container {} failed: {e}",
                    phase.as_str(),
                    reason.as_str(),
                    container.id
                ),
            ),
        };
        // Syncs that moved nothing are not worth an event each: periodic
        // syncs of idle tenants would flood the log.
        let events = if run.ok() && moved == 0 && matches!(reason, SyncReason::Periodic) {
            Vec::new()
        } else {
            vec![NewEvent::new(now, kind, message).with_subject(subject(
                tenant,
                workload_id,
                container,
            ))]
        };
        if let Err(e) = self
            .inner
            .store
            .record_sync(run.statuses.clone(), new_errors, events, now)
            .await
        {
            // The sync itself happened; only its record is late. The next
            // run records again.
            tracing::error!(error = %e, tenant = %tenant, workload = %workload_id, "cannot record a sync");
        }
        tracing::info!(
            tenant = %tenant, workload = %workload_id, container = %container.id,
            phase = phase.as_str(), reason = reason.as_str(), bytes = moved,
            error = run.error.as_deref().unwrap_or(""), "sync finished"
        );
        run
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
                .get(&(tenant.clone(), workload.clone(), m.path.clone()))
                .and_then(|s| s.last_upload_at)?;
            oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
        oldest
    }

    /// Counters for /metrics.
    pub fn counters(&self) -> &SyncCounters {
        &self.inner.counters
    }

    /// Whether `container` holds files whose upload on release is owed.
    pub fn release_upload_owed(&self, container: &ContainerId) -> bool {
        self.owed_lock().contains_key(container)
    }

    /// Records that a release's upload failed; the container is held and
    /// the upload retried.
    pub async fn owe_release_upload(
        &self,
        tenant: &TenantId,
        workload: &WorkloadId,
        container: &ContainerRecord,
        error: &str,
    ) -> Result<(), StoreError> {
        let now = crate::clock::now();
        let pending = PendingReleaseUpload {
            container_id: container.id,
            tenant_id: tenant.clone(),
            workload_id: workload.clone(),
            since: now,
            attempts: 1,
            last_error: error.to_owned(),
        };
        self.inner
            .store
            .put_pending_release(
                pending.clone(),
                vec![
                    NewEvent::new(
                        now,
                        EventKind::SyncReleasePending,
                        format!(
                            "upload on release of {tenant}'s {workload} files failed ({error}); container {} is kept and the upload retried",
                            container.id
                        ),
                    )
                    .with_subject(subject(tenant, workload, container)),
                ],
            )
            .await?;
        self.owed_lock()
            .insert(container.id, (pending, Instant::now() + retry_delay(1)));
        Ok(())
    }

    /// Forgets an owed upload, with an event saying why.
    pub async fn settle_release_upload(
        &self,
        container: ContainerId,
        why: &str,
    ) -> Result<(), StoreError> {
        let Some((pending, _)) = self.owed_lock().get(&container).cloned() else {
            return Ok(());
        };
        let now = crate::clock::now();
        self.inner
            .store
            .clear_pending_release(
                container,
                vec![
                    NewEvent::new(
                        now,
                        EventKind::SyncReleaseSettled,
                        format!(
                            "owed upload of {}'s {} files from container {}: {why}",
                            pending.tenant_id, pending.workload_id, container
                        ),
                    )
                    .with_subject(EventSubject {
                        tenant_id: Some(pending.tenant_id.to_string()),
                        workload_id: Some(pending.workload_id.to_string()),
                        container_id: Some(container.to_string()),
                        node_id: None,
                        boost_id: None,
                    }),
                ],
            )
            .await?;
        self.owed_lock().remove(&container);
        Ok(())
    }

    /// Whether any container of `tenant`'s `workload` is owed an upload.
    pub fn owes(&self, tenant: &TenantId, workload: &WorkloadId) -> bool {
        self.owed_lock()
            .values()
            .any(|(p, _)| &p.tenant_id == tenant && &p.workload_id == workload)
    }

    /// Owed uploads whose retry time has come.
    pub fn owed_due(&self) -> Vec<PendingReleaseUpload> {
        let now = Instant::now();
        self.owed_lock()
            .values()
            .filter(|(_, next)| *next <= now)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Every owed upload.
    pub fn owed(&self) -> Vec<PendingReleaseUpload> {
        self.owed_lock().values().map(|(p, _)| p.clone()).collect()
    }

    /// A retry failed: count it and schedule the next with backoff.
    pub async fn retry_failed(&self, container: &ContainerId, error: &str) {
        let updated = {
            let mut owed = self.owed_lock();
            let Some((pending, next)) = owed.get_mut(container) else {
                return;
            };
            pending.attempts = pending.attempts.saturating_add(1);
            pending.last_error = error.to_owned();
            *next = Instant::now() + retry_delay(pending.attempts);
            pending.clone()
        };
        if let Err(e) = self
            .inner
            .store
            .put_pending_release(updated, Vec::new())
            .await
        {
            tracing::warn!(error = %e, "cannot record a failed upload retry");
        }
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

/// What a round of final uploads did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FinalUploads {
    /// Containers whose files all reached the sink.
    pub ok: usize,
    /// Containers whose upload failed.
    pub failed: usize,
    /// Containers still uploading at the deadline.
    pub unfinished: usize,
}

/// Uploads the files of every claimed container (on `node`, if given)
/// whose workload syncs, all at once, giving up at `deadline`. Used by
/// graceful shutdown and node drain.
pub async fn final_uploads(
    syncs: &Syncs,
    pools: &crate::pools::Pools,
    reason: SyncReason,
    node: Option<&boilerhouse_core::NodeId>,
    deadline: Duration,
) -> FinalUploads {
    let mut jobs = Vec::new();
    for granted in pools.active_claims() {
        if node.is_some_and(|n| n != &granted.container.node_id) {
            continue;
        }
        let Ok(workload) = pools.workload_record(&granted.claim.workload_id).await else {
            continue;
        };
        if !workload
            .spec
            .sync
            .as_ref()
            .is_some_and(|s| runs_in(s, Phase::Upload))
        {
            continue;
        }
        let syncs = syncs.clone();
        jobs.push(async move {
            syncs
                .run(
                    &granted.claim.tenant_id,
                    &workload,
                    &granted.container,
                    Phase::Upload,
                    None,
                    reason,
                )
                .await
                .ok()
        });
    }
    let total = jobs.len();
    let done = Arc::new(Mutex::new(Vec::new()));
    let collect = {
        let done = done.clone();
        futures::future::join_all(jobs.into_iter().map(move |job| {
            let done = done.clone();
            async move {
                let ok = job.await;
                done.lock().unwrap_or_else(|e| e.into_inner()).push(ok);
            }
        }))
    };
    let _ = tokio::time::timeout(deadline, collect).await;
    let done = done.lock().unwrap_or_else(|e| e.into_inner());
    let ok = done.iter().filter(|ok| **ok).count();
    FinalUploads {
        ok,
        failed: done.len() - ok,
        unfinished: total - done.len(),
    }
}
