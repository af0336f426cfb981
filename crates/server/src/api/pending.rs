//! Services whose capabilities are not built yet. Each RPC answers
//! UNIMPLEMENTED with a message naming the capability, never a fake
//! success, so clients can tell "not yet" from "nothing there".

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::affinity_service_server::AffinityService;
use boilerhouse_proto::pb::boost_service_server::BoostService;
use boilerhouse_proto::pb::claim_service_server::ClaimService;
use boilerhouse_proto::pb::container_service_server::ContainerService;
use boilerhouse_proto::pb::pool_service_server::PoolService;
use boilerhouse_proto::pb::reconcile_service_server::ReconcileService;
use boilerhouse_proto::pb::sync_service_server::SyncService;

use crate::error::ApiError;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn not_yet<T>(capability: &'static str) -> Result<T, Status> {
    Err(ApiError::Unimplemented(capability).into())
}

const POOLS: &str = "warm pools";
const CLAIMS: &str = "tenant claims";
const AFFINITY: &str = "affinity reservations";
const CONTAINERS: &str = "managed containers";
const BOOSTS: &str = "resource boosts";
const SYNC: &str = "tenant state sync";
const RECONCILE: &str = "reconciliation";

/// Placeholder for every service not built yet.
pub struct Pending;

#[tonic::async_trait]
impl PoolService for Pending {
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        not_yet(POOLS)
    }
    async fn get_pool(
        &self,
        _: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::GetPoolResponse>, Status> {
        not_yet(POOLS)
    }
    async fn scale_pool(
        &self,
        _: Request<pb::ScalePoolRequest>,
    ) -> Result<Response<pb::ScalePoolResponse>, Status> {
        not_yet(POOLS)
    }
    async fn drain_pool(
        &self,
        _: Request<pb::DrainPoolRequest>,
    ) -> Result<Response<pb::DrainPoolResponse>, Status> {
        not_yet(POOLS)
    }
}

#[tonic::async_trait]
impl ClaimService for Pending {
    async fn claim(
        &self,
        _: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        not_yet(CLAIMS)
    }
    async fn release(
        &self,
        _: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        not_yet(CLAIMS)
    }
    async fn touch(
        &self,
        _: Request<pb::TouchRequest>,
    ) -> Result<Response<pb::TouchResponse>, Status> {
        not_yet(CLAIMS)
    }
    async fn get_claim(
        &self,
        _: Request<pb::GetClaimRequest>,
    ) -> Result<Response<pb::GetClaimResponse>, Status> {
        not_yet(CLAIMS)
    }
    async fn list_claims(
        &self,
        _: Request<pb::ListClaimsRequest>,
    ) -> Result<Response<pb::ListClaimsResponse>, Status> {
        not_yet(CLAIMS)
    }
}

#[tonic::async_trait]
impl AffinityService for Pending {
    async fn list_reservations(
        &self,
        _: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<pb::ListReservationsResponse>, Status> {
        not_yet(AFFINITY)
    }
    async fn extend_reservation(
        &self,
        _: Request<pb::ExtendReservationRequest>,
    ) -> Result<Response<pb::ExtendReservationResponse>, Status> {
        not_yet(AFFINITY)
    }
    async fn revoke_reservation(
        &self,
        _: Request<pb::RevokeReservationRequest>,
    ) -> Result<Response<pb::RevokeReservationResponse>, Status> {
        not_yet(AFFINITY)
    }
}

#[tonic::async_trait]
impl ContainerService for Pending {
    async fn list_containers(
        &self,
        _: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        not_yet(CONTAINERS)
    }
    async fn get_container(
        &self,
        _: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::GetContainerResponse>, Status> {
        not_yet(CONTAINERS)
    }
    async fn destroy_container(
        &self,
        _: Request<pb::DestroyContainerRequest>,
    ) -> Result<Response<pb::DestroyContainerResponse>, Status> {
        not_yet(CONTAINERS)
    }
}

#[tonic::async_trait]
impl BoostService for Pending {
    async fn request_boost(
        &self,
        _: Request<pb::RequestBoostRequest>,
    ) -> Result<Response<pb::RequestBoostResponse>, Status> {
        not_yet(BOOSTS)
    }
    async fn get_boost(
        &self,
        _: Request<pb::GetBoostRequest>,
    ) -> Result<Response<pb::GetBoostResponse>, Status> {
        not_yet(BOOSTS)
    }
    async fn list_boosts(
        &self,
        _: Request<pb::ListBoostsRequest>,
    ) -> Result<Response<pb::ListBoostsResponse>, Status> {
        not_yet(BOOSTS)
    }
    async fn release_boost(
        &self,
        _: Request<pb::ReleaseBoostRequest>,
    ) -> Result<Response<pb::ReleaseBoostResponse>, Status> {
        not_yet(BOOSTS)
    }
}

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

#[tonic::async_trait]
impl ReconcileService for Pending {
    async fn plan_reconcile(
        &self,
        _: Request<pb::PlanReconcileRequest>,
    ) -> Result<Response<pb::PlanReconcileResponse>, Status> {
        not_yet(RECONCILE)
    }
    async fn apply_reconcile(
        &self,
        _: Request<pb::ApplyReconcileRequest>,
    ) -> Result<Response<pb::ApplyReconcileResponse>, Status> {
        not_yet(RECONCILE)
    }
}
