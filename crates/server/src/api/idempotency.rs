//! `request_id` handling shared by every mutating RPC.
//!
//! The first answer to a request id is stored with a hash of the request.
//! A retry with the same id and the same request gets that answer again;
//! the same id with a different request gets ALREADY_EXISTS. Requests that
//! share an id are serialised in-process, so two concurrent retries cannot
//! both do the work.

use std::future::Future;

use prost::Message;
use sha2::{Digest, Sha256};

use boilerhouse_proto::convert;

use crate::error::{ApiError, ApiResult};
use crate::locks::KeyedLocks;
use crate::store::{IdempotencyLookup, IdempotentRecord, Store, StoreError};

/// The hash a request id is bound to.
pub fn request_hash(message: &impl prost::Message) -> String {
    hex::encode(Sha256::digest(message.encode_to_vec()))
}

/// Checks a request id before doing any work: a replay returns the stored
/// answer, a reuse for another request is refused.
pub async fn replay<T: prost::Message + Default>(
    store: &Store,
    method: &str,
    request_id: Option<&str>,
    hash: &str,
) -> Result<Option<T>, ApiError> {
    let Some(id) = request_id else {
        return Ok(None);
    };
    match store.lookup_idempotent(method, id, hash).await? {
        IdempotencyLookup::Miss => Ok(None),
        IdempotencyLookup::Hit(bytes) => T::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| ApiError::Internal(format!("stored response for {method}: {e}"))),
        IdempotencyLookup::Mismatch => Err(ApiError::AlreadyExists(format!(
            "request_id {id:?} was already used for a different {method} request"
        ))),
    }
}

/// Runs `work` at most once per `(method, request_id)`.
pub async fn once<Req, Resp, F, Fut>(
    store: &Store,
    locks: &KeyedLocks,
    method: &'static str,
    request_id: &str,
    request: &Req,
    work: F,
) -> ApiResult<Resp>
where
    Req: Message,
    Resp: Message + Default,
    F: FnOnce() -> Fut,
    Fut: Future<Output = ApiResult<Resp>>,
{
    let Some(request_id) = convert::request_id(request_id)? else {
        return work().await;
    };
    let request_hash = hex::encode(Sha256::digest(request.encode_to_vec()));
    let _guard = locks.lock(&format!("{method}\0{request_id}")).await;
    match store
        .lookup_idempotent(method, request_id, &request_hash)
        .await?
    {
        IdempotencyLookup::Hit(bytes) => {
            return Resp::decode(bytes.as_slice())
                .map_err(|e| ApiError::Internal(format!("stored response for {method}: {e}")));
        }
        IdempotencyLookup::Mismatch => {
            return Err(ApiError::AlreadyExists(format!(
                "request_id {request_id:?} was already used for a different {method} request"
            )));
        }
        IdempotencyLookup::Miss => {}
    }
    let response = work().await?;
    let record = IdempotentRecord {
        method: method.to_owned(),
        request_id: request_id.to_owned(),
        request_hash,
        response: response.encode_to_vec(),
        created_at: crate::clock::now(),
    };
    match store.record_idempotent(record).await {
        Ok(()) | Err(StoreError::Conflict(_)) => Ok(response),
        Err(e) => Err(e.into()),
    }
}
