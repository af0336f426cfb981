//! The caller of the RPC being served, for handlers (from the request) and
//! for everything below them (a task-local, so an event written deep in
//! the pools records who caused it without every function passing it on).

use boilerhouse_core::auth::Principal;

tokio::task_local! {
    /// Set by [`super::AuthLayer`] around each handler.
    pub(super) static CALLER: Option<Principal>;
}

/// The caller of the RPC this task serves, if any: `None` in background
/// tasks, which act on their own account.
pub fn current() -> Option<Principal> {
    CALLER.try_with(Clone::clone).ok().flatten()
}

/// Runs `f` as the handler of an RPC from `caller` would run: what it
/// writes is recorded as caused by `caller`, and goes ahead of the
/// server's own writes (see [`crate::store::writer`]).
pub async fn serving<F: std::future::Future>(caller: Principal, f: F) -> F::Output {
    CALLER.scope(Some(caller), f).await
}
