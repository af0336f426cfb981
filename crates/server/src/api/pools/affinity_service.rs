//! AffinityService: the reservations that keep a released container for
//! its tenant, listed, extended and revoked.

use tonic::{Request, Response, Status};

use boilerhouse_proto::convert::{self, duration_from_pb};
use boilerhouse_proto::pb;

use super::conversions::reservation_to_pb;
use crate::api::{self, AppState, idempotency};
use crate::error::ApiError;

/// AffinityService.
pub struct Affinity(pub AppState);

#[tonic::async_trait]
impl pb::affinity_service_server::AffinityService for Affinity {
    async fn list_reservations(
        &self,
        request: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<pb::ListReservationsResponse>, Status> {
        let caller = api::caller(&request)?;
        let req = request.into_inner();
        let tenant = api::tenant_filter(&caller, "tenant_id", &req.tenant_id)?;
        let mut reservations: Vec<pb::Reservation> = self
            .0
            .pools
            .reservations()
            .iter()
            .filter(|r| req.workload_id.is_empty() || r.workload_id.as_str() == req.workload_id)
            .filter(|r| tenant.as_ref().is_none_or(|t| &r.tenant_id == t))
            .map(|r| {
                let mut pb = reservation_to_pb(r);
                if self.0.syncs.release_upload_owed(&r.container_id) {
                    pb.held = "until its upload, owed since the release, succeeds".into();
                }
                pb
            })
            .collect();
        reservations
            .sort_by(|a, b| (&a.workload_id, &a.tenant_id).cmp(&(&b.workload_id, &b.tenant_id)));
        Ok(Response::new(pb::ListReservationsResponse { reservations }))
    }

    async fn extend_reservation(
        &self,
        request: Request<pb::ExtendReservationRequest>,
    ) -> Result<Response<pb::ExtendReservationResponse>, Status> {
        let req = request.into_inner();
        let tenant = convert::tenant_id("tenant_id", &req.tenant_id).map_err(ApiError::from)?;
        let workload =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let by = req
            .extend_by
            .as_ref()
            .map(|d| duration_from_pb("extend_by", d))
            .transpose()
            .map_err(ApiError::from)?
            .filter(|d| !d.is_zero())
            .ok_or_else(|| ApiError::invalid("extend_by", "is required and must be positive"))?;
        let state = &self.0;
        let response = idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.AffinityService/ExtendReservation",
            &req.request_id,
            &req,
            || async {
                let r = state.pools.extend(&tenant, &workload, by).await?;
                Ok(pb::ExtendReservationResponse {
                    reservation: Some(reservation_to_pb(&r)),
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn revoke_reservation(
        &self,
        request: Request<pb::RevokeReservationRequest>,
    ) -> Result<Response<pb::RevokeReservationResponse>, Status> {
        let req = request.into_inner();
        let tenant = convert::tenant_id("tenant_id", &req.tenant_id).map_err(ApiError::from)?;
        let workload =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let state = &self.0;
        let response = idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.AffinityService/RevokeReservation",
            &req.request_id,
            &req,
            || async {
                let r = state.tenancy.revoke(&tenant, &workload).await?;
                Ok(pb::RevokeReservationResponse {
                    reservation: Some(reservation_to_pb(&r)),
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }
}
