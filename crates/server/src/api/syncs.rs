//! SyncService: run a tenant's sync now, and see where every sync stands.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use boilerhouse_core::auth::Principal;
use boilerhouse_core::sync::{SyncState, SyncStatus};
use boilerhouse_core::workload::SyncDirection;
use boilerhouse_core::{TenantId, Timestamp, WorkloadId};
use boilerhouse_proto::convert::{self, duration_to_pb, timestamp_to_pb};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::sync_service_server::SyncService;

use super::AppState;
use crate::error::ApiError;
use crate::syncs::{Phase, SyncReason};

/// SyncService over the sync machinery.
pub struct SyncApi(pub AppState);

fn state_to_pb(s: SyncState) -> pb::SyncState {
    match s {
        SyncState::Idle => pb::SyncState::Idle,
        SyncState::Pending => pb::SyncState::Pending,
        SyncState::Running => pb::SyncState::Running,
        SyncState::Ok => pb::SyncState::Ok,
        SyncState::Warning => pb::SyncState::Warning,
        SyncState::Error => pb::SyncState::Error,
    }
}

impl SyncApi {
    /// The wire status. Lag is how long the sink's copy may be behind: the
    /// time since the last complete upload (or the claim, if none since),
    /// while the tenant holds a claim or is owed an upload; zero otherwise.
    fn to_pb(&self, s: &SyncStatus, now: Timestamp) -> pb::SyncStatus {
        let claim = self.0.pools.active_claim(&s.tenant_id, &s.workload_id);
        let owed = self.0.syncs.owes(&s.tenant_id, &s.workload_id);
        let lag = match (&claim, s.last_upload_at) {
            (Some(g), last) => {
                let base = last.map_or(g.claim.claimed_at, |l| l.max(g.claim.claimed_at));
                now.saturating_since(base)
            }
            (None, Some(last)) if owed => now.saturating_since(last),
            _ => std::time::Duration::ZERO,
        };
        pb::SyncStatus {
            tenant_id: s.tenant_id.to_string(),
            workload_id: s.workload_id.to_string(),
            sync_id: s.sync_id.clone(),
            state: state_to_pb(if owed && s.state == SyncState::Error {
                // Failed, and being retried.
                SyncState::Pending
            } else {
                s.state
            }) as i32,
            last_sync_at: s.last_sync_at.map(timestamp_to_pb),
            pending_count: s.pending_count,
            lag: Some(duration_to_pb(lag)),
            bytes_transferred: s.bytes_transferred,
            recent_errors: s
                .recent_errors
                .iter()
                .map(|e| pb::SyncError {
                    at: Some(timestamp_to_pb(e.at)),
                    mapping: e.mapping.clone(),
                    message: e.message.clone(),
                })
                .collect(),
            warning: s.warning.clone().unwrap_or_default(),
        }
    }
}

/// Optional tenant and workload filters.
/// The filters of a status read; a tenant token reads only its tenant's.
fn filters(
    caller: &Principal,
    tenant: &str,
    workload: &str,
) -> Result<(Option<TenantId>, Option<WorkloadId>), ApiError> {
    let tenant = super::tenant_filter(caller, "tenant_id", tenant)?;
    let workload = (!workload.is_empty())
        .then(|| convert::workload_id("workload_id", workload))
        .transpose()?;
    Ok((tenant, workload))
}

#[tonic::async_trait]
impl SyncService for SyncApi {
    async fn trigger_sync(
        &self,
        request: Request<pb::TriggerSyncRequest>,
    ) -> Result<Response<pb::TriggerSyncResponse>, Status> {
        let req = request.into_inner();
        let tenant = convert::tenant_id("tenant_id", &req.tenant_id).map_err(ApiError::from)?;
        let workload_id =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let force = match pb::SyncDirection::try_from(req.direction) {
            Ok(pb::SyncDirection::Unspecified) => None,
            Ok(pb::SyncDirection::Upload) => Some(SyncDirection::Upload),
            Ok(pb::SyncDirection::Download) => Some(SyncDirection::Download),
            Ok(pb::SyncDirection::Bidirectional) => Some(SyncDirection::Bidirectional),
            Err(_) => {
                return Err(ApiError::invalid(
                    "direction",
                    format!("{} is not a SyncDirection", req.direction),
                )
                .into());
            }
        };
        let state = &self.0;
        let workload = state
            .pools
            .workload_record(&workload_id)
            .await
            .map_err(ApiError::from)?;
        let Some(spec) = &workload.spec.sync else {
            return Err(ApiError::FailedPrecondition(format!(
                "workload {workload_id} has no sync section"
            ))
            .into());
        };
        if !spec.policy.manual {
            return Err(ApiError::FailedPrecondition(format!(
                "workload {workload_id} does not allow manual syncs: its sync.policy.manual is not true"
            ))
            .into());
        }
        // The tenant's container: its claim's, else its reservation's.
        let container = match state.pools.active_claim(&tenant, &workload_id) {
            Some(g) => g.container,
            None => state
                .pools
                .reservations()
                .into_iter()
                .find(|r| r.tenant_id == tenant && r.workload_id == workload_id)
                .and_then(|r| state.pools.container(&r.container_id))
                .ok_or_else(|| {
                    ApiError::FailedPrecondition(format!(
                        "tenant {tenant} has no container of {workload_id} to sync: claim it first"
                    ))
                })?,
        };
        let owed = state
            .syncs
            .owed()
            .into_iter()
            .find(|o| o.container_id == container.id);
        let run = state
            .syncs
            .run(
                &tenant,
                &workload,
                &container,
                Phase::All,
                force,
                SyncReason::Trigger,
            )
            .await;
        if let Some(e) = &run.error {
            return Err(Status::unavailable(format!(
                "sync of {tenant}'s {workload_id} files on container {} failed: {e}",
                container.id
            )));
        }
        // An operator's sync that uploads settles an owed upload.
        if let Some(owed) = owed
            && force != Some(SyncDirection::Download)
        {
            crate::syncs::task::upload_done(&state.syncs, &state.pools, &owed, &workload)
                .await
                .map_err(|e| ApiError::Unavailable(format!("{e:#}")))?;
        }
        let now = crate::clock::now();
        Ok(Response::new(pb::TriggerSyncResponse {
            statuses: run.statuses.iter().map(|s| self.to_pb(s, now)).collect(),
        }))
    }

    async fn get_sync_status(
        &self,
        request: Request<pb::GetSyncStatusRequest>,
    ) -> Result<Response<pb::GetSyncStatusResponse>, Status> {
        let caller = super::caller(&request)?;
        let req = request.into_inner();
        let (tenant, workload) = filters(&caller, &req.tenant_id, &req.workload_id)?;
        let now = crate::clock::now();
        Ok(Response::new(pb::GetSyncStatusResponse {
            statuses: self
                .0
                .syncs
                .statuses(tenant.as_ref(), workload.as_ref())
                .iter()
                .map(|s| self.to_pb(s, now))
                .collect(),
        }))
    }

    type WatchSyncStatusStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchSyncStatusResponse, Status>> + Send>>;

    async fn watch_sync_status(
        &self,
        request: Request<pb::WatchSyncStatusRequest>,
    ) -> Result<Response<Self::WatchSyncStatusStream>, Status> {
        let caller = super::caller(&request)?;
        let req = request.into_inner();
        let (tenant, workload) = filters(&caller, &req.tenant_id, &req.workload_id)?;
        // Subscribe before the snapshot, so no change falls between them.
        let mut feed = self.0.syncs.subscribe();
        let (tx, rx) = mpsc::channel(256);
        let api = SyncApi(self.0.clone());
        let shutdown = self.0.shutdown.clone();
        tokio::spawn(async move {
            let matches = |s: &SyncStatus| {
                tenant.as_ref().is_none_or(|t| &s.tenant_id == t)
                    && workload.as_ref().is_none_or(|w| &s.workload_id == w)
            };
            let send = |s: &SyncStatus| {
                Ok(pb::WatchSyncStatusResponse {
                    status: Some(api.to_pb(s, crate::clock::now())),
                })
            };
            for s in api.0.syncs.statuses(tenant.as_ref(), workload.as_ref()) {
                if tx.send(send(&s)).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    // Cancel-safe: observing the token loses nothing.
                    () = shutdown.cancelled() => return,
                    // Cancel-safe: closed() only watches the receiver.
                    () = tx.closed() => return,
                    // Cancel-safe: broadcast::Receiver::recv loses no
                    // message when dropped before completion.
                    received = feed.recv() => match received {
                        Ok(s) if matches(&s) => {
                            if tx.send(send(&s)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Fell behind: the current statuses say where
                        // everything stands now.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            for s in api.0.syncs.statuses(tenant.as_ref(), workload.as_ref()) {
                                if tx.send(send(&s)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
