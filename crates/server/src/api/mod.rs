//! gRPC service implementations. Each handler converts its request through
//! `boilerhouse_proto::convert`, calls into the server, and maps errors
//! through [`crate::error::ApiError`].

pub mod boosts;
pub mod completion;
pub mod events;
pub mod idempotency;
pub mod nodes;
pub mod pools;
pub mod reconcile;
pub mod syncs;
pub mod system;
pub mod workloads;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::tasks::{Activator, Driver};
use crate::workloads::WorkloadDir;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// The workload directory.
    pub workloads: WorkloadDir,
    /// Wakes the workload loader.
    pub reload_workloads: Activator,
    /// Background tasks, for status.
    pub driver: Driver,
    /// Fires when shutdown starts; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// Serialises requests that share a request_id.
    pub idempotency: Arc<crate::locks::KeyedLocks>,
    /// When the server started.
    pub started_at: boilerhouse_core::Timestamp,
    /// Live agent sessions.
    pub agents: crate::agents::Registry,
    /// Warm pools and claims.
    pub pools: crate::pools::Pools,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Reconciliation.
    pub reconciler: crate::reconcile::Reconciler,
    /// Tenant state sync.
    pub syncs: crate::syncs::Syncs,
    /// Claims and releases with the tenant's files.
    pub tenancy: crate::tenancy::Tenancy,
}
