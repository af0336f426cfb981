//! Running one sync: asking the container's agent to move the files,
//! then recording what happened to each mapping (statuses, errors,
//! counters, an event).
//!
//! A sync never fails as a call; its outcome is in the returned
//! [`SyncRun`] and in the statuses.

use std::sync::atomic::Ordering;

use boilerhouse_core::TenantId;
use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::sync::{SyncErrorEntry, SyncState, SyncStatus};
use boilerhouse_core::workload::{SyncDirection, WorkloadRecord};
use boilerhouse_proto::pb;

use super::{Phase, SyncReason, SyncRun, Syncs, subject};

impl Syncs {
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
                downloaded: 0,
                warnings: Vec::new(),
            };
        };
        let mappings: Vec<String> = spec
            .mappings
            .iter()
            .filter(|m| force.is_some() || phase.selects(m.direction))
            .map(|m| m.id())
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
                pause: reason.snapshots(),
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
                    .find(|m| m.id() == path)
                    .map(|m| m.direction)
            });
            direction != Some(SyncDirection::Download)
        };
        let mut new_errors = Vec::new();
        // Warnings are evented when they appear or change, not at every
        // periodic run that repeats them.
        let mut new_warnings: Vec<(String, String)> = Vec::new();
        let (reports, whole_error): (Vec<pb::MappingSyncReport>, Option<String>) = match answer {
            Ok(result) => {
                let reports = result.sync.map(|s| s.mappings).unwrap_or_default();
                let error = (!result.ok).then(|| result.error.clone());
                (reports, error)
            }
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let mut run = SyncRun {
            statuses: Vec::new(),
            error: None,
            bytes: 0,
            downloaded: reports.iter().map(|r| r.downloaded).sum(),
            warnings: reports
                .iter()
                .filter(|r| !r.warning.is_empty())
                .map(|r| format!("{}: {}", r.path, r.warning))
                .collect(),
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
                        let warning = Some(r.warning.clone()).filter(|w| !w.is_empty());
                        if warning.is_some() && warning != status.warning {
                            new_warnings.push((path.clone(), r.warning.clone()));
                        }
                        status.state = if warning.is_some() {
                            SyncState::Warning
                        } else {
                            SyncState::Ok
                        };
                        status.warning = warning;
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
                        status.warning = Some(r.warning.clone()).filter(|w| !w.is_empty());
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
                // A warning completed: what it could not save is not
                // there to save (a missing directory, nothing matched).
                .any(|s| s.state == SyncState::Error)
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
        let mut events = if run.ok() && moved == 0 && matches!(reason, SyncReason::Periodic) {
            Vec::new()
        } else {
            vec![NewEvent::new(now, kind, message).with_subject(subject(
                tenant,
                workload_id,
                container,
            ))]
        };
        for (mapping, warning) in new_warnings {
            events.push(
                NewEvent::new(
                    now,
                    EventKind::SyncWarning,
                    format!(
                        "{} sync ({}) of {tenant}'s {workload_id} mapping {mapping} on container {}: {warning}",
                        phase.as_str(),
                        reason.as_str(),
                        container.id
                    ),
                )
                .with_subject(subject(tenant, workload_id, container))
                .with_attribute("mapping", mapping),
            );
        }
        if let Some(r) = reports.iter().find(|r| !r.pause_error.is_empty()) {
            tracing::warn!(container = %container.id, error = %r.pause_error, "synced without pausing the container");
        }
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
}
