//! PoolService: each pool's counts and sizes, and the operator's scale
//! and drain overrides.

use tonic::{Request, Response, Status};

use boilerhouse_core::WorkloadId;
use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_proto::convert::{self, pool_policy_to_pb};
use boilerhouse_proto::pb;

use crate::api::{AppState, idempotency};
use crate::error::ApiError;
use crate::store::PoolOverride;

/// PoolService.
pub struct PoolsApi(pub AppState);

impl PoolsApi {
    async fn pool(&self, id: &WorkloadId) -> Result<pb::Pool, ApiError> {
        let workload = self
            .0
            .store
            .get_workload(id)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                what: "pool",
                id: id.to_string(),
            })?;
        let o = self.0.pools.overrides(id).await?;
        let c = self.0.pools.counts(id);
        Ok(pb::Pool {
            pool_id: id.to_string(),
            workload_id: id.to_string(),
            counts: Some(pb::PoolCounts {
                warming: c.warming,
                idle: c.idle,
                claimed: c.claimed,
                reserved: c.reserved,
                draining: c.draining,
                lost: c.lost,
                total: c.total(),
                stale: self.0.pools.stale(id, &workload.spec_hash),
            }),
            min_size: o.min_size.unwrap_or(workload.spec.pool.min_size),
            max_size: o.max_size.unwrap_or(workload.spec.pool.max_size),
            draining: o.draining,
            policy: Some(pool_policy_to_pb(&workload.spec.pool)),
            shortfall: self.0.pools.shortfall(id).unwrap_or_default(),
        })
    }

    async fn set_override(
        &self,
        id: &WorkloadId,
        value: PoolOverride,
        message: String,
    ) -> Result<pb::Pool, ApiError> {
        // Asking again for what is already so changes nothing and says
        // nothing: twenty identical scale calls are not twenty events.
        if self.0.pools.overrides(id).await.map_err(ApiError::from)? == value {
            return self.pool(id).await;
        }
        let now = crate::clock::now();
        let event =
            NewEvent::new(now, EventKind::PoolUpdated, message).with_subject(EventSubject {
                workload_id: Some(id.to_string()),
                ..Default::default()
            });
        self.0
            .store
            .set_pool_override(id.clone(), value, event, now)
            .await?;
        self.0.pools.refill_notify().notify_one();
        self.pool(id).await
    }
}

#[tonic::async_trait]
impl pb::pool_service_server::PoolService for PoolsApi {
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let mut pools = Vec::new();
        for w in self
            .0
            .store
            .list_workloads()
            .await
            .map_err(ApiError::from)?
        {
            pools.push(self.pool(&w.spec.id).await?);
        }
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::GetPoolResponse>, Status> {
        let id =
            convert::workload_id("pool_id", &request.get_ref().pool_id).map_err(ApiError::from)?;
        Ok(Response::new(pb::GetPoolResponse {
            pool: Some(self.pool(&id).await?),
        }))
    }

    async fn scale_pool(
        &self,
        request: Request<pb::ScalePoolRequest>,
    ) -> Result<Response<pb::ScalePoolResponse>, Status> {
        let req = request.into_inner();
        let id = convert::workload_id("pool_id", &req.pool_id).map_err(ApiError::from)?;
        let current = self.pool(&id).await?;
        let min = req.min_size.unwrap_or(current.min_size);
        let max = req.max_size.unwrap_or(current.max_size);
        if max == 0 || max > 10_000 {
            return Err(ApiError::invalid("max_size", "must be between 1 and 10000").into());
        }
        if min > max {
            return Err(ApiError::invalid(
                "min_size",
                format!("{min} is larger than max_size {max}"),
            )
            .into());
        }
        let state = &self.0;
        let pool = idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.PoolService/ScalePool",
            &req.request_id,
            &req,
            || async {
                // Scaling a drained pool puts it back in service.
                let value = PoolOverride {
                    min_size: Some(min),
                    max_size: Some(max),
                    draining: false,
                };
                let pool = self
                    .set_override(
                        &id,
                        value,
                        format!("pool {id} scaled to min {min}, max {max}"),
                    )
                    .await?;
                Ok(pb::ScalePoolResponse { pool: Some(pool) })
            },
        )
        .await?;
        Ok(Response::new(pool))
    }

    async fn drain_pool(
        &self,
        request: Request<pb::DrainPoolRequest>,
    ) -> Result<Response<pb::DrainPoolResponse>, Status> {
        let req = request.into_inner();
        let id = convert::workload_id("pool_id", &req.pool_id).map_err(ApiError::from)?;
        let current = self.pool(&id).await?;
        let state = &self.0;
        let pool = idempotency::once(&state.store, &state.idempotency, "boilerhouse.v1.PoolService/DrainPool", &req.request_id, &req, || async {
            let value = PoolOverride { min_size: Some(current.min_size), max_size: Some(current.max_size), draining: true };
            let pool = self.set_override(&id, value, format!("pool {id} draining: idle containers go, claimed ones stay until released")).await?;
            Ok(pb::DrainPoolResponse { pool: Some(pool) })
        })
        .await?;
        Ok(Response::new(pool))
    }
}
