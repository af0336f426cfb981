//! gRPC service implementations. Each handler converts its request through
//! `boilerhouse_proto::convert`, calls into the server, and maps errors
//! through [`crate::error::ApiError`].

pub mod admin;
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

use boilerhouse_core::TenantId;
use boilerhouse_core::auth::Principal;

use crate::error::{ApiError, ApiResult};
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

/// The authenticated caller of `request`: every method but health checks
/// has one once [`crate::auth::AuthLayer`] let it through.
pub fn caller<T>(request: &tonic::Request<T>) -> ApiResult<Principal> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthenticated("no credentials".into()))
}

/// Parses the tenant a tenant-scoped request names, refusing one its
/// caller may not act for. Every handler of a tenant method (see
/// [`boilerhouse_core::auth::access_for`]) reads its tenant through this
/// or [`tenant_filter`].
pub fn tenant_arg(caller: &Principal, field: &'static str, value: &str) -> ApiResult<TenantId> {
    let tenant = boilerhouse_proto::convert::tenant_id(field, value)?;
    caller.may_act_for(&tenant)?;
    Ok(tenant)
}

/// The tenant filter of a tenant-scoped list (empty: no filter): a tenant
/// token sees only its own tenant, and naming another is refused; other
/// callers see what they ask for.
pub fn tenant_filter(
    caller: &Principal,
    field: &'static str,
    value: &str,
) -> ApiResult<Option<TenantId>> {
    if value.is_empty() {
        return Ok(caller.own_tenant().cloned());
    }
    tenant_arg(caller, field, value).map(Some)
}
