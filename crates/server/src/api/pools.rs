//! ClaimService, PoolService, AffinityService and ContainerService, over
//! the pool machinery.

use std::time::{Duration, Instant};

use prost::Message as _;
use tonic::{Request, Response, Status};

use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::pool::decide::Refusal;
use boilerhouse_core::pool::{
    ClaimRecord, ClaimSource, ClaimStatus, ContainerRecord, ContainerState, Reservation,
};
use boilerhouse_core::{ContainerId, WorkloadId};
use boilerhouse_proto::convert::{
    self, duration_from_pb, duration_to_pb, limits_to_pb_resources, pool_policy_to_pb,
    timestamp_to_pb,
};
use boilerhouse_proto::pb;

use super::AppState;
use super::idempotency::{replay, request_hash};
use crate::error::ApiError;
use crate::pools::{Granted, PoolError};
use crate::store::{IdempotentRecord, PoolOverride};

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::UnknownWorkload(id) => ApiError::NotFound {
                what: "workload",
                id: id.to_string(),
            },
            PoolError::Refused(Refusal::UnknownContainer(id)) => ApiError::NotFound {
                what: "container",
                id: id.to_string(),
            },
            PoolError::Refused(r @ (Refusal::NoClaim(..) | Refusal::NoReservation(..))) => {
                ApiError::Missing(r.to_string())
            }
            PoolError::Refused(
                r @ (Refusal::StaleGeneration { .. } | Refusal::Precondition(_)),
            ) => ApiError::FailedPrecondition(r.to_string()),
            PoolError::Refused(Refusal::Busy(m)) => ApiError::Unavailable(m),
            PoolError::Exhausted(message) => ApiError::ResourceExhausted {
                message,
                retry_after: Duration::from_secs(1),
            },
            PoolError::Unavailable(m) => ApiError::Unavailable(m),
            PoolError::Store(s) => s.into(),
        }
    }
}

/// The wire source of a claim whose tenant files were restored.
fn with_data(s: ClaimSource) -> pb::ClaimSource {
    match s {
        ClaimSource::Existing => pb::ClaimSource::ExistingWithData,
        ClaimSource::Affinity => pb::ClaimSource::AffinityWithData,
        ClaimSource::Pool => pb::ClaimSource::PoolWithData,
        ClaimSource::Cold => pb::ClaimSource::ColdWithData,
    }
}

fn source_to_pb(s: ClaimSource) -> pb::ClaimSource {
    match s {
        ClaimSource::Existing => pb::ClaimSource::Existing,
        ClaimSource::Affinity => pb::ClaimSource::Affinity,
        ClaimSource::Pool => pb::ClaimSource::Pool,
        ClaimSource::Cold => pb::ClaimSource::Cold,
    }
}

fn status_to_pb(s: ClaimStatus) -> pb::ClaimStatus {
    match s {
        ClaimStatus::Active => pb::ClaimStatus::Active,
        ClaimStatus::Released => pb::ClaimStatus::Released,
        ClaimStatus::Lost => pb::ClaimStatus::Lost,
    }
}

fn state_to_pb(s: ContainerState) -> pb::ContainerState {
    match s {
        ContainerState::Warming => pb::ContainerState::Warming,
        ContainerState::Idle => pb::ContainerState::Idle,
        ContainerState::Claimed => pb::ContainerState::Claimed,
        ContainerState::Reserved => pb::ContainerState::Reserved,
        ContainerState::Draining => pb::ContainerState::Draining,
        ContainerState::Lost => pb::ContainerState::Lost,
    }
}

fn claim_info(
    claim: &ClaimRecord,
    container: Option<&ContainerRecord>,
    source: ClaimSource,
) -> pb::ClaimInfo {
    pb::ClaimInfo {
        tenant_id: claim.tenant_id.to_string(),
        workload_id: claim.workload_id.to_string(),
        container_id: claim.container_id.to_string(),
        node_id: claim.node_id.to_string(),
        docker_id: container
            .and_then(|c| c.docker_id.clone())
            .unwrap_or_default(),
        state_path: container.map(|c| c.state_path.clone()).unwrap_or_default(),
        comm_path: container.map(|c| c.comm_path.clone()).unwrap_or_default(),
        source: source_to_pb(source) as i32,
        generation: claim.generation,
        status: status_to_pb(claim.status) as i32,
        claimed_at: Some(timestamp_to_pb(claim.claimed_at)),
        last_activity_at: Some(timestamp_to_pb(claim.last_activity_at)),
        released_at: claim.released_at.map(timestamp_to_pb),
    }
}

fn container_to_pb(c: &ContainerRecord) -> pb::Container {
    pb::Container {
        container_id: c.id.to_string(),
        pool_id: c.workload_id.to_string(),
        workload_id: c.workload_id.to_string(),
        node_id: c.node_id.to_string(),
        docker_id: c.docker_id.clone().unwrap_or_default(),
        state: state_to_pb(c.state) as i32,
        tenant_id: c
            .tenant_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        last_tenant_id: c
            .last_tenant_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        spec_hash: c.spec_hash.clone(),
        claim_generation: c.claim_generation,
        limits: Some(limits_to_pb_resources(&c.limits)),
        state_path: c.state_path.clone(),
        created_at: Some(timestamp_to_pb(c.created_at)),
        updated_at: Some(timestamp_to_pb(c.updated_at)),
    }
}

fn reservation_to_pb(r: &Reservation) -> pb::Reservation {
    pb::Reservation {
        tenant_id: r.tenant_id.to_string(),
        workload_id: r.workload_id.to_string(),
        container_id: r.container_id.to_string(),
        node_id: r.node_id.to_string(),
        reserved_at: Some(timestamp_to_pb(r.reserved_at)),
        expires_at: Some(timestamp_to_pb(r.expires_at)),
    }
}

/// ClaimService.
pub struct Claims(pub AppState);

const CLAIM: &str = "boilerhouse.v1.ClaimService/Claim";
const RELEASE: &str = "boilerhouse.v1.ClaimService/Release";

#[tonic::async_trait]
impl pb::claim_service_server::ClaimService for Claims {
    async fn claim(
        &self,
        request: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let tenant = convert::tenant_id("tenant_id", &req.tenant_id).map_err(ApiError::from)?;
        let workload =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let acquire_timeout = req
            .acquire_timeout
            .as_ref()
            .map(|d| duration_from_pb("acquire_timeout", d))
            .transpose()
            .map_err(ApiError::from)?
            .filter(|d| !d.is_zero());
        if acquire_timeout.is_some_and(|d| d > Duration::from_secs(600)) {
            return Err(ApiError::invalid("acquire_timeout", "must be at most 10m").into());
        }
        let request_id = convert::request_id(&req.request_id)
            .map_err(ApiError::from)?
            .map(str::to_owned);
        let hash = request_hash(&req);
        if let Some(previous) =
            replay::<pb::ClaimResponse>(&self.0.store, CLAIM, request_id.as_deref(), &hash).await?
        {
            return Ok(Response::new(previous));
        }
        let _guard = match &request_id {
            Some(id) => Some(self.0.idempotency.lock(&format!("{CLAIM}\0{id}")).await),
            None => None,
        };
        // A concurrent twin may have finished while we waited for the lock.
        if let Some(previous) =
            replay::<pb::ClaimResponse>(&self.0.store, CLAIM, request_id.as_deref(), &hash).await?
        {
            return Ok(Response::new(previous));
        }
        let respond = |g: &Granted, source: ClaimSource, restored: bool| {
            let mut info = claim_info(&g.claim, Some(&g.container), source);
            if restored {
                info.source = with_data(source) as i32;
            }
            pb::ClaimResponse {
                claim: Some(info),
                server_latency: Some(duration_to_pb(started.elapsed())),
            }
        };
        // With a request id, the response is fixed when the decision is
        // made and stored with it; the first caller gets that very answer,
        // so a retry's answer is identical to the byte.
        let stored: std::sync::Mutex<Option<pb::ClaimResponse>> = std::sync::Mutex::new(None);
        let record = |g: &Granted, source: ClaimSource, restored: bool| {
            request_id.as_ref().map(|id| {
                let response = respond(g, source, restored);
                let bytes = response.encode_to_vec();
                *stored.lock().unwrap_or_else(|e| e.into_inner()) = Some(response);
                IdempotentRecord {
                    method: CLAIM.to_owned(),
                    request_id: id.clone(),
                    request_hash: hash.clone(),
                    response: bytes,
                    created_at: crate::clock::now(),
                }
            })
        };
        let (granted, source, restored) = self
            .0
            .tenancy
            .claim(&tenant, &workload, acquire_timeout, &record)
            .await
            .map_err(ApiError::from)?;
        let response = stored
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(|| respond(&granted, source, restored));
        self.0.metrics.observe_claim(source, started.elapsed());
        Ok(Response::new(response))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = request.into_inner();
        let tenant = convert::tenant_id("tenant_id", &req.tenant_id).map_err(ApiError::from)?;
        let workload =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        if req.generation == 0 {
            return Err(ApiError::invalid(
                "generation",
                "is required: pass the generation your claim returned",
            )
            .into());
        }
        let request_id = convert::request_id(&req.request_id)
            .map_err(ApiError::from)?
            .map(str::to_owned);
        let hash = request_hash(&req);
        if let Some(previous) =
            replay::<pb::ReleaseResponse>(&self.0.store, RELEASE, request_id.as_deref(), &hash)
                .await?
        {
            return Ok(Response::new(previous));
        }
        let container = self
            .0
            .pools
            .active_claim(&tenant, &workload)
            .map(|g| g.container);
        // The response is known before the write, so it commits with it.
        let pending = self.0.pools.active_claim(&tenant, &workload);
        let predicted = pending.as_ref().map(|g| {
            let mut claim = g.claim.clone();
            claim.status = ClaimStatus::Released;
            claim
        });
        let record = match (&request_id, &predicted) {
            (Some(id), Some(claim)) => Some(IdempotentRecord {
                method: RELEASE.to_owned(),
                request_id: id.clone(),
                request_hash: hash.clone(),
                response: pb::ReleaseResponse {
                    claim: Some(claim_info(claim, container.as_ref(), claim.source)),
                    affinity_expires_at: None,
                }
                .encode_to_vec(),
                created_at: crate::clock::now(),
            }),
            _ => None,
        };
        let (claim, reservation) = self
            .0
            .tenancy
            .release(
                &tenant,
                &workload,
                Some(req.generation),
                "released by the tenant",
                record,
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ReleaseResponse {
            claim: Some(claim_info(&claim, container.as_ref(), claim.source)),
            affinity_expires_at: reservation.map(|r| timestamp_to_pb(r.expires_at)),
        }))
    }

    async fn touch(
        &self,
        request: Request<pb::TouchRequest>,
    ) -> Result<Response<pb::TouchResponse>, Status> {
        let req = request.into_inner();
        let tenant = convert::tenant_id("tenant_id", &req.tenant_id).map_err(ApiError::from)?;
        let workload =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let generation = (req.generation != 0).then_some(req.generation);
        let at = self
            .0
            .pools
            .touch(&tenant, &workload, generation)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::TouchResponse {
            last_activity_at: Some(timestamp_to_pb(at)),
        }))
    }

    async fn get_claim(
        &self,
        request: Request<pb::GetClaimRequest>,
    ) -> Result<Response<pb::GetClaimResponse>, Status> {
        let req = request.into_inner();
        let tenant = convert::tenant_id("tenant_id", &req.tenant_id).map_err(ApiError::from)?;
        let workload =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let granted = self
            .0
            .pools
            .active_claim(&tenant, &workload)
            .ok_or_else(|| ApiError::from(PoolError::from(Refusal::NoClaim(tenant, workload))))?;
        Ok(Response::new(pb::GetClaimResponse {
            claim: Some(claim_info(
                &granted.claim,
                Some(&granted.container),
                granted.claim.source,
            )),
        }))
    }

    async fn list_claims(
        &self,
        request: Request<pb::ListClaimsRequest>,
    ) -> Result<Response<pb::ListClaimsResponse>, Status> {
        let req = request.into_inner();
        let matches = |c: &ClaimRecord| {
            (req.workload_id.is_empty() || c.workload_id.as_str() == req.workload_id)
                && (req.node_id.is_empty() || c.node_id.as_str() == req.node_id)
                && (req.tenant_id.is_empty() || c.tenant_id.as_str() == req.tenant_id)
        };
        let mut claims: Vec<pb::ClaimInfo> = if req.include_ended {
            let containers = self.0.pools.containers();
            self.0
                .store
                .list_claims(true, 10_000)
                .await
                .map_err(ApiError::from)?
                .iter()
                .filter(|c| matches(c))
                .map(|c| {
                    claim_info(
                        c,
                        containers.iter().find(|x| x.id == c.container_id),
                        c.source,
                    )
                })
                .collect()
        } else {
            self.0
                .pools
                .active_claims()
                .iter()
                .filter(|g| matches(&g.claim))
                .map(|g| claim_info(&g.claim, Some(&g.container), g.claim.source))
                .collect()
        };
        claims.sort_by(|a, b| (&a.workload_id, &a.tenant_id).cmp(&(&b.workload_id, &b.tenant_id)));
        Ok(Response::new(pb::ListClaimsResponse { claims }))
    }
}

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
            }),
            min_size: o.min_size.unwrap_or(workload.spec.pool.min_size),
            max_size: o.max_size.unwrap_or(workload.spec.pool.max_size),
            draining: o.draining,
            policy: Some(pool_policy_to_pb(&workload.spec.pool)),
        })
    }

    async fn set_override(
        &self,
        id: &WorkloadId,
        value: PoolOverride,
        message: String,
    ) -> Result<pb::Pool, ApiError> {
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
        let pool = super::idempotency::once(
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
        let pool = super::idempotency::once(&state.store, &state.idempotency, "boilerhouse.v1.PoolService/DrainPool", &req.request_id, &req, || async {
            let value = PoolOverride { min_size: Some(current.min_size), max_size: Some(current.max_size), draining: true };
            let pool = self.set_override(&id, value, format!("pool {id} draining: idle containers go, claimed ones stay until released")).await?;
            Ok(pb::DrainPoolResponse { pool: Some(pool) })
        })
        .await?;
        Ok(Response::new(pool))
    }
}

/// AffinityService.
pub struct Affinity(pub AppState);

#[tonic::async_trait]
impl pb::affinity_service_server::AffinityService for Affinity {
    async fn list_reservations(
        &self,
        request: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<pb::ListReservationsResponse>, Status> {
        let req = request.into_inner();
        let mut reservations: Vec<pb::Reservation> = self
            .0
            .pools
            .reservations()
            .iter()
            .filter(|r| req.workload_id.is_empty() || r.workload_id.as_str() == req.workload_id)
            .filter(|r| req.tenant_id.is_empty() || r.tenant_id.as_str() == req.tenant_id)
            .map(reservation_to_pb)
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
        let response = super::idempotency::once(
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
        let response = super::idempotency::once(
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

/// ContainerService.
pub struct Containers(pub AppState);

#[tonic::async_trait]
impl pb::container_service_server::ContainerService for Containers {
    async fn list_containers(
        &self,
        request: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let req = request.into_inner();
        let mut containers: Vec<ContainerRecord> = self
            .0
            .pools
            .containers()
            .into_iter()
            .filter(|c| req.workload_id.is_empty() || c.workload_id.as_str() == req.workload_id)
            .filter(|c| req.node_id.is_empty() || c.node_id.as_str() == req.node_id)
            .filter(|c| {
                req.tenant_id.is_empty()
                    || c.tenant_id
                        .as_ref()
                        .is_some_and(|t| t.as_str() == req.tenant_id)
            })
            .filter(|c| req.state == 0 || state_to_pb(c.state) as i32 == req.state)
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(Response::new(pb::ListContainersResponse {
            containers: containers.iter().map(container_to_pb).collect(),
        }))
    }

    async fn get_container(
        &self,
        request: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::GetContainerResponse>, Status> {
        let id: ContainerId =
            request
                .get_ref()
                .container_id
                .parse()
                .map_err(|e: boilerhouse_core::IdError| {
                    ApiError::invalid("container_id", e.to_string())
                })?;
        let c = self
            .0
            .pools
            .container(&id)
            .ok_or_else(|| ApiError::from(PoolError::from(Refusal::UnknownContainer(id))))?;
        Ok(Response::new(pb::GetContainerResponse {
            container: Some(container_to_pb(&c)),
        }))
    }

    async fn destroy_container(
        &self,
        request: Request<pb::DestroyContainerRequest>,
    ) -> Result<Response<pb::DestroyContainerResponse>, Status> {
        let req = request.into_inner();
        let id: ContainerId =
            req.container_id
                .parse()
                .map_err(|e: boilerhouse_core::IdError| {
                    ApiError::invalid("container_id", e.to_string())
                })?;
        let state = &self.0;
        let response = super::idempotency::once(
            &state.store,
            &state.idempotency,
            "boilerhouse.v1.ContainerService/DestroyContainer",
            &req.request_id,
            &req,
            || async {
                let c = state
                    .tenancy
                    .destroy(&id, req.force, "destroyed by an operator")
                    .await?;
                Ok(pb::DestroyContainerResponse {
                    container: Some(container_to_pb(&c)),
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }
}
