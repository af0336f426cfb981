//! ClaimService, PoolService, AffinityService and ContainerService, over
//! the pool machinery.
//!
//! One file per service; `conversions` holds the pb mapping they share
//! and the mapping of [`crate::pools::PoolError`] to
//! [`crate::error::ApiError`].

mod affinity_service;
mod claim_service;
mod container_service;
mod conversions;
mod pool_service;

pub use affinity_service::Affinity;
pub use claim_service::Claims;
pub use container_service::Containers;
pub use pool_service::PoolsApi;
