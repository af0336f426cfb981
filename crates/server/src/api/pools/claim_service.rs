//! ClaimService: claim, release, touch and the claim queries.
//!
//! Claim and Release are idempotent by request id: the response is fixed
//! when the decision is made and committed with it, so a retry gets the
//! same answer to the byte.

use std::time::{Duration, Instant};

use prost::Message as _;
use tonic::{Request, Response, Status};

use boilerhouse_core::pool::decide::Refusal;
use boilerhouse_core::pool::{ClaimRecord, ClaimSource, ClaimStatus};
use boilerhouse_proto::convert::{self, duration_from_pb, duration_to_pb, timestamp_to_pb};
use boilerhouse_proto::pb;

use super::conversions::{claim_info, with_data};
use crate::api::idempotency::{replay, request_hash};
use crate::api::{self, AppState};
use crate::error::ApiError;
use crate::pools::{Granted, PoolError};
use crate::store::IdempotentRecord;
use crate::tenancy::Restore;

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
        let caller = api::caller(&request)?;
        let req = request.into_inner();
        let tenant = api::tenant_arg(&caller, "tenant_id", &req.tenant_id)?;
        let workload =
            convert::workload_id("workload_id", &req.workload_id).map_err(ApiError::from)?;
        let acquire_timeout = req
            .acquire_timeout
            .as_ref()
            .map(|d| duration_from_pb("acquire_timeout", d))
            .transpose()
            .map_err(ApiError::from)?;
        if acquire_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ApiError::invalid(
                "acquire_timeout",
                "must be positive; leave it out for the server's default",
            )
            .into());
        }
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
        let respond = |g: &Granted, source: ClaimSource, restore: &Restore| {
            let mut info = claim_info(&g.claim, Some(&g.container), source);
            if restore.restored {
                info.source = with_data(source) as i32;
            }
            pb::ClaimResponse {
                claim: Some(info),
                server_latency: Some(duration_to_pb(started.elapsed())),
                restore_warning: restore.warning.clone().unwrap_or_default(),
                node_warning: self
                    .0
                    .tenancy
                    .pools
                    .unreachable(&g.container.node_id)
                    .unwrap_or_default(),
            }
        };
        // With a request id, the response is fixed when the decision is
        // made and stored with it; the first caller gets that very answer,
        // so a retry's answer is identical to the byte.
        let stored: std::sync::Mutex<Option<pb::ClaimResponse>> = std::sync::Mutex::new(None);
        let record = |g: &Granted, source: ClaimSource, restore: &Restore| {
            request_id.as_ref().map(|id| {
                let response = respond(g, source, restore);
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
        let (granted, source, restore) = self
            .0
            .tenancy
            .claim(&tenant, &workload, acquire_timeout, &record)
            .await
            .map_err(ApiError::from)?;
        let response = stored
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(|| respond(&granted, source, &restore));
        self.0.metrics.observe_claim(source, started.elapsed());
        Ok(Response::new(response))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let caller = api::caller(&request)?;
        let req = request.into_inner();
        let tenant = api::tenant_arg(&caller, "tenant_id", &req.tenant_id)?;
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
        // A retry that arrives while the first call still runs (its client
        // gave up during a slow upload) waits for it, then replays it.
        let _guard = match &request_id {
            Some(id) => Some(self.0.idempotency.lock(&format!("{RELEASE}\0{id}")).await),
            None => None,
        };
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
        let caller = api::caller(&request)?;
        let req = request.into_inner();
        let tenant = api::tenant_arg(&caller, "tenant_id", &req.tenant_id)?;
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
        let caller = api::caller(&request)?;
        let req = request.into_inner();
        let tenant = api::tenant_arg(&caller, "tenant_id", &req.tenant_id)?;
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
        let caller = api::caller(&request)?;
        let req = request.into_inner();
        let tenant = api::tenant_filter(&caller, "tenant_id", &req.tenant_id)?;
        let matches = |c: &ClaimRecord| {
            (req.workload_id.is_empty() || c.workload_id.as_str() == req.workload_id)
                && (req.node_id.is_empty() || c.node_id.as_str() == req.node_id)
                && tenant.as_ref().is_none_or(|t| &c.tenant_id == t)
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
