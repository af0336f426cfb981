//! Resource boosts: admission against the capacity ledger, enforcement on
//! the host, expiry and recovery.
//!
//! The database is the truth. A boost is committed (with the boosts it
//! preempts) before anything touches a host, and every container's limits
//! are then driven towards "workload base + live boosts" from that truth:
//! by the request itself, by release and expiry, and by a periodic pass
//! that compares each agent's report with the wanted limits. That one
//! pass is what re-applies boosts after an agent restart, reverts boosts
//! that ended while a node was unreachable, and finishes reverting boosts
//! that expired while the server was down.
//!
//! This module holds the shared types, startup recovery ([`Boosts::load`])
//! and the event helpers; the work is split by what it does:
//! - `ledger`: the live boosts, shared with placement and metrics;
//! - `admission`: resolving, admitting and applying a request;
//! - `ending`: release and expiry;
//! - `enforcement`: driving container limits to base plus live boosts;
//! - [`expiry`]: waking the boost task at each deadline.

mod admission;
mod ending;
mod enforcement;
pub mod expiry;
mod ledger;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use boilerhouse_core::boost::{AdmitError, Boost, BoostResource, BoostStatus, BoostTarget};
use boilerhouse_core::event::{EventKind, EventSubject, NewEvent};
use boilerhouse_core::pool::{ContainerRecord, ContainerState};
use boilerhouse_core::{BoostId, ContainerId, Timestamp};

use crate::agents::Registry;
use crate::clock::Clock;
use crate::locks::KeyedLocks;
use crate::pools::Pools;
use crate::store::{BoostWrite, Store, StoreError};
use crate::tasks::BackgroundTask;

pub use enforcement::describe_limits;
pub use ledger::BoostLedger;

/// Why a boost operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BoostError {
    /// The target or boost does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A request field does not fit the cluster (a source that is not the
    /// container's node, a node that does not exist).
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The target cannot take this boost in its current state.
    #[error("{0}")]
    Precondition(String),
    /// Not enough capacity, even after preempting lower priorities.
    #[error("{0}")]
    Short(AdmitError),
    /// The host could not apply the boost; it was recorded as failed.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tunables.
#[derive(Debug, Clone, Copy)]
pub struct BoostsConfig {
    /// How long to wait for an agent to apply limits.
    pub command_timeout: Duration,
}

/// An admitted boost and what it preempted.
#[derive(Debug, Clone)]
pub struct Requested {
    /// The boost, as it stands when the call returns.
    pub boost: Boost,
    /// Boosts preempted to admit it.
    pub preempted: Vec<BoostId>,
}

/// What startup did with boosts that outlived the last run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovered {
    /// Active boosts that expired while the server was down.
    pub expired: usize,
    /// Boosts that were pending: their host never confirmed them.
    pub failed: usize,
    /// Boosts still live.
    pub live: usize,
}

struct Inner {
    store: Store,
    agents: Registry,
    pools: Pools,
    ledger: BoostLedger,
    clock: Clock,
    config: BoostsConfig,
    /// Serialises admission decisions, so two requests never both take the
    /// last free core.
    admission: tokio::sync::Mutex<()>,
    /// One limits update at a time per container, each computing the
    /// wanted limits afresh, so updates cannot land out of order.
    container_locks: KeyedLocks,
    /// Containers with an update in flight from the periodic pass.
    enforcing: Mutex<HashSet<ContainerId>>,
    /// Containers whose last update failed (the agent was away, say):
    /// the pass looks at them every tick until one succeeds.
    unsettled: Mutex<HashSet<ContainerId>>,
}

/// The boost machinery. Cheap to clone.
#[derive(Clone)]
pub struct Boosts {
    inner: Arc<Inner>,
}

fn boost_event(kind: EventKind, b: &Boost, message: String, now: Timestamp) -> NewEvent {
    NewEvent::new(now, kind, message)
        .with_subject(EventSubject {
            node_id: Some(b.source_node.to_string()),
            container_id: b.container_id.map(|c| c.to_string()),
            tenant_id: match &b.target {
                BoostTarget::Tenant(t, _) => Some(t.to_string()),
                _ => None,
            },
            workload_id: match &b.target {
                BoostTarget::Tenant(_, w) => Some(w.to_string()),
                _ => None,
            },
            boost_id: Some(b.id.to_string()),
        })
        .with_attribute("resource", b.resource.as_str())
        .with_attribute("amount", b.amount.to_string())
        .with_attribute("priority", b.priority.as_str())
        .with_attribute("target", b.target.to_string())
}

/// Ends `b` with `status` and `reason` as of `now`, adding it and its
/// event to `write`.
fn end_into(
    write: &mut BoostWrite,
    mut b: Boost,
    status: BoostStatus,
    reason: String,
    now: Timestamp,
) {
    let kind = match status {
        BoostStatus::Expired => EventKind::BoostExpired,
        BoostStatus::Preempted => EventKind::BoostPreempted,
        BoostStatus::Failed => EventKind::BoostFailed,
        _ => EventKind::BoostReleased,
    };
    b.end(status, reason, now);
    write.events.push(boost_event(
        kind,
        &b,
        format!("{}: {}", describe(&b), b.reason),
        now,
    ));
    write.boosts.push(b);
}

/// "1.5 cpu", "512M memory", "1 gpu".
pub fn describe_amount(resource: BoostResource, amount: f64) -> String {
    match resource {
        BoostResource::Memory => format!(
            "{} memory",
            boilerhouse_core::units::format_size(amount.max(0.0).round() as u64)
        ),
        other => format!("{amount} {other}"),
    }
}

fn describe(b: &Boost) -> String {
    format!(
        "{} boost {} of {} for {}",
        b.priority,
        b.id,
        describe_amount(b.resource, b.amount),
        b.target
    )
}

fn runs(c: &ContainerRecord) -> bool {
    c.docker_id.is_some()
        && matches!(
            c.state,
            ContainerState::Idle | ContainerState::Claimed | ContainerState::Reserved
        )
}

impl Boosts {
    /// Rebuilds the ledger from the database, ending what cannot be live
    /// any more: boosts that expired while the server was down, and
    /// pending boosts whose host never confirmed them. Their containers'
    /// limits are reverted by the periodic pass once the agents report.
    pub async fn load(
        store: Store,
        agents: Registry,
        pools: Pools,
        ledger: BoostLedger,
        clock: Clock,
        config: BoostsConfig,
    ) -> Result<(Self, Recovered), StoreError> {
        let now = clock.now();
        let mut recovered = Recovered::default();
        let mut write = BoostWrite::default();
        let (live, unreadable) = store.live_boosts().await?;
        store.report_unreadable(&unreadable, now).await?;
        for b in live {
            if b.status == BoostStatus::Pending {
                recovered.failed += 1;
                let reason = "the server stopped before the host confirmed the boost".into();
                end_into(&mut write, b, BoostStatus::Failed, reason, now);
            } else if b.expires_at <= now {
                recovered.expired += 1;
                let reason = format!("expired at {} while the server was down", b.expires_at);
                end_into(&mut write, b, BoostStatus::Expired, reason, now);
            } else {
                recovered.live += 1;
                ledger.put(b);
            }
        }
        if !write.boosts.is_empty() {
            store.apply_boost_write(write).await?;
        }
        let boosts = Self {
            inner: Arc::new(Inner {
                store,
                agents,
                pools,
                ledger,
                clock,
                config,
                admission: tokio::sync::Mutex::new(()),
                container_locks: KeyedLocks::default(),
                enforcing: Mutex::default(),
                unsettled: Mutex::default(),
            }),
        };
        Ok((boosts, recovered))
    }

    /// The ledger.
    pub fn ledger(&self) -> &BoostLedger {
        &self.inner.ledger
    }

    /// The clock boosts are timed by.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }
}

/// How often, by default, the periodic pass compares every container with
/// its report, to undo changes made behind the server's back
/// (`boost_full_pass_interval`). Every tick it compares
/// the containers that matter sooner: those with live boosts and those
/// whose last update failed. Comparing all 100,000 every second was a
/// quarter of the server's CPU.
pub const FULL_PASS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Expires boosts and keeps container limits at base plus live boosts.
pub struct BoostTask {
    boosts: Boosts,
    full_pass_every: std::time::Duration,
    last_full_pass: Option<std::time::Instant>,
}

impl BoostTask {
    /// The task for `boosts`, comparing every container every
    /// `full_pass_every`.
    pub fn new(boosts: Boosts, full_pass_every: std::time::Duration) -> Self {
        Self {
            boosts,
            full_pass_every,
            last_full_pass: None,
        }
    }
}

impl BackgroundTask for BoostTask {
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            let ended = self.boosts.expire().await?;
            let full = self
                .last_full_pass
                .is_none_or(|at| at.elapsed() >= self.full_pass_every);
            if full {
                self.last_full_pass = Some(std::time::Instant::now());
            }
            // A full pass is synchronous and takes 20-90 ms over 60,000
            // containers: behind the claim path (see `background`). The
            // pass of every second looks at a few containers only, and
            // stays here so that nothing delays it.
            let corrections = if full {
                let boosts = self.boosts.clone();
                crate::background::run(move || boosts.enforce_all(true)).await
            } else {
                self.boosts.enforce_all(false)
            };
            Ok(serde_json::json!({
                "ended": ended,
                "limit_corrections": corrections,
                "full_pass": full,
                "live": self.boosts.ledger().live().len(),
            }))
        })
    }
}
