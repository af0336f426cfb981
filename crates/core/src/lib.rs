//! Boilerhouse domain types and pure logic.
//!
//! Nothing in this crate performs I/O: no files, no sockets, no clocks. The
//! server, the agent and the CLI feed it values and act on what it returns,
//! which keeps every rule here testable in microseconds.

pub mod admission;
pub mod auth;
pub mod boost;
pub mod container;
pub mod event;
pub mod idempotency;
pub mod ids;
pub mod liveness;
pub mod node;
pub mod pool;
pub mod reconcile;
pub mod sync;
pub mod time;
pub mod units;
pub mod workload;

pub use ids::{BoostId, ContainerId, IdError, NodeId, PoolId, TenantId, WorkloadId};
pub use time::Timestamp;
