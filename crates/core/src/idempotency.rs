//! The record of a mutating request's first answer, stored with the change
//! it answers so that a retry with the same `request_id` replays it.
//!
//! It lives in `core` because pool and boost writes carry it as part of one
//! atomic change; the store only persists it.

use crate::time::Timestamp;

/// A response to remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentRecord {
    /// The RPC's full name.
    pub method: String,
    /// The client's key.
    pub request_id: String,
    /// Hash of the encoded request.
    pub request_hash: String,
    /// The encoded response.
    pub response: Vec<u8>,
    /// When.
    pub created_at: Timestamp,
}
