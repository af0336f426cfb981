//! BoostService.

use prost::Message as _;
use tonic::{Request, Response, Status};

use boilerhouse_core::BoostId;
use boilerhouse_core::boost::{AdmitError, BoostStatus};
use boilerhouse_proto::convert;
use boilerhouse_proto::pb;

use super::AppState;
use super::idempotency::{once, replay, request_hash};
use crate::boosts::{BoostError, Boosts};
use crate::error::ApiError;
use crate::store::IdempotentRecord;

const REQUEST: &str = "boilerhouse.v1.BoostService/RequestBoost";
const RELEASE: &str = "boilerhouse.v1.BoostService/ReleaseBoost";

/// Most boosts one List returns.
const LIST_LIMIT: u32 = 1000;

/// BoostService.
pub struct BoostsApi {
    /// Shared state.
    pub state: AppState,
    /// The boost machinery.
    pub boosts: Boosts,
}

impl From<BoostError> for ApiError {
    fn from(e: BoostError) -> Self {
        match e {
            BoostError::NotFound(m) => ApiError::Missing(m),
            BoostError::Invalid { field, reason } => ApiError::invalid(field, reason),
            BoostError::Precondition(m) => ApiError::FailedPrecondition(m),
            BoostError::Short(short) => {
                let (subject, description) = match &short {
                    AdmitError::Short {
                        node,
                        resource,
                        needed,
                        free,
                        preemptible,
                    } => (
                        format!("node/{node}:{resource}"),
                        format!("needed {needed}, free {free}, preemptible {preemptible}"),
                    ),
                    AdmitError::NoSource(node, resource) => (
                        format!("node/{node}:{resource}"),
                        "no other live node to draw from".to_owned(),
                    ),
                    other => ("boost".to_owned(), other.to_string()),
                };
                ApiError::CapacityShort {
                    message: format!("not enough capacity for the boost: {short}"),
                    subject,
                    description,
                }
            }
            BoostError::Unavailable(m) => ApiError::Unavailable(m),
            BoostError::Store(e) => e.into(),
        }
    }
}

fn boost_id(field: &'static str, s: &str) -> Result<BoostId, ApiError> {
    if s.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    s.parse()
        .map_err(|e: boilerhouse_core::IdError| ApiError::invalid(field, e.to_string()))
}

impl BoostsApi {
    /// The boost as it is now, for a replayed request.
    async fn current(
        &self,
        stored: pb::RequestBoostResponse,
    ) -> Result<pb::RequestBoostResponse, ApiError> {
        let id = boost_id(
            "boost_id",
            stored.boost.as_ref().map_or("", |b| b.boost_id.as_str()),
        )?;
        let boost = self
            .state
            .store
            .get_boost(&id)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("replayed boost {id} is not stored")))?;
        // The first answer for a boost the host refused was an error; a
        // retry gets the same error, not a success carrying FAILED.
        if boost.status == BoostStatus::Failed {
            return Err(ApiError::Unavailable(format!(
                "boost {} failed: {}; it holds no capacity and the container keeps its limits",
                boost.id, boost.reason
            )));
        }
        Ok(pb::RequestBoostResponse {
            boost: Some(convert::boost_to_pb(&boost, self.boosts.now())),
            preempted_boost_ids: stored.preempted_boost_ids,
        })
    }
}

#[tonic::async_trait]
impl pb::boost_service_server::BoostService for BoostsApi {
    async fn request_boost(
        &self,
        request: Request<pb::RequestBoostRequest>,
    ) -> Result<Response<pb::RequestBoostResponse>, Status> {
        let req = request.into_inner();
        let boost_request = convert::boost_request_from_pb(&req).map_err(ApiError::from)?;
        let request_id = convert::request_id(&req.request_id)
            .map_err(ApiError::from)?
            .map(str::to_owned);
        let hash = request_hash(&req);
        let _guard = match &request_id {
            Some(id) => Some(
                self.state
                    .idempotency
                    .lock(&format!("{REQUEST}\0{id}"))
                    .await,
            ),
            None => None,
        };
        // A retry answers with the boost as it stands now: the id is what
        // the request bought, and its status may have moved on.
        if let Some(stored) = replay::<pb::RequestBoostResponse>(
            &self.state.store,
            REQUEST,
            request_id.as_deref(),
            &hash,
        )
        .await?
        {
            return Ok(Response::new(self.current(stored).await?));
        }
        let now = self.boosts.now();
        let record = |b: &boilerhouse_core::boost::Boost, preempted: &[BoostId]| {
            request_id.as_ref().map(|id| IdempotentRecord {
                method: REQUEST.to_owned(),
                request_id: id.clone(),
                request_hash: hash.clone(),
                response: pb::RequestBoostResponse {
                    boost: Some(convert::boost_to_pb(b, now)),
                    preempted_boost_ids: preempted.iter().map(ToString::to_string).collect(),
                }
                .encode_to_vec(),
                created_at: now,
            })
        };
        let requested = self
            .boosts
            .request(boost_request, record)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RequestBoostResponse {
            boost: Some(convert::boost_to_pb(&requested.boost, self.boosts.now())),
            preempted_boost_ids: requested
                .preempted
                .iter()
                .map(ToString::to_string)
                .collect(),
        }))
    }

    async fn get_boost(
        &self,
        request: Request<pb::GetBoostRequest>,
    ) -> Result<Response<pb::GetBoostResponse>, Status> {
        let id = boost_id("boost_id", &request.get_ref().boost_id)?;
        let boost = self
            .state
            .store
            .get_boost(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::Missing(format!("boost {id} not found")))?;
        Ok(Response::new(pb::GetBoostResponse {
            boost: Some(convert::boost_to_pb(&boost, self.boosts.now())),
        }))
    }

    async fn list_boosts(
        &self,
        request: Request<pb::ListBoostsRequest>,
    ) -> Result<Response<pb::ListBoostsResponse>, Status> {
        let req = request.into_inner();
        let node = if req.node_id.is_empty() {
            None
        } else {
            Some(convert::node_id("node_id", &req.node_id).map_err(ApiError::from)?)
        };
        let boosts = self
            .state
            .store
            .list_boosts(node.as_ref(), req.include_ended, LIST_LIMIT)
            .await
            .map_err(ApiError::from)?;
        let now = self.boosts.now();
        Ok(Response::new(pb::ListBoostsResponse {
            boosts: boosts
                .iter()
                .map(|b| convert::boost_to_pb(b, now))
                .collect(),
        }))
    }

    async fn release_boost(
        &self,
        request: Request<pb::ReleaseBoostRequest>,
    ) -> Result<Response<pb::ReleaseBoostResponse>, Status> {
        let req = request.into_inner();
        let id = boost_id("boost_id", &req.boost_id)?;
        let boosts = self.boosts.clone();
        let response = once(
            &self.state.store,
            &self.state.idempotency,
            RELEASE,
            &req.request_id,
            &req,
            || async move {
                let boost = boosts.release(&id).await?;
                Ok(pb::ReleaseBoostResponse {
                    boost: Some(convert::boost_to_pb(&boost, boosts.now())),
                })
            },
        )
        .await?;
        Ok(Response::new(response))
    }
}
