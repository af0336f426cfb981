//! Services whose capabilities are not built yet. Each RPC answers
//! UNIMPLEMENTED with a message naming the capability, never a fake
//! success, so clients can tell "not yet" from "nothing there".

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::sync_service_server::SyncService;

use crate::error::ApiError;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn not_yet<T>(capability: &'static str) -> Result<T, Status> {
    Err(ApiError::Unimplemented(capability).into())
}

const SYNC: &str = "tenant state sync";

/// Placeholder for every service not built yet.
pub struct Pending;

#[tonic::async_trait]
impl SyncService for Pending {
    async fn trigger_sync(
        &self,
        _: Request<pb::TriggerSyncRequest>,
    ) -> Result<Response<pb::TriggerSyncResponse>, Status> {
        not_yet(SYNC)
    }
    async fn get_sync_status(
        &self,
        _: Request<pb::GetSyncStatusRequest>,
    ) -> Result<Response<pb::GetSyncStatusResponse>, Status> {
        not_yet(SYNC)
    }
    type WatchSyncStatusStream = Stream_<pb::WatchSyncStatusResponse>;
    async fn watch_sync_status(
        &self,
        _: Request<pb::WatchSyncStatusRequest>,
    ) -> Result<Response<Self::WatchSyncStatusStream>, Status> {
        not_yet(SYNC)
    }
}
