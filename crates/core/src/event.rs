//! The activity log's vocabulary: what happened, how bad it is, and what it
//! concerns. Events are recorded by the server and never edited.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// How much an event matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Normal operation.
    Info,
    /// Something an operator may want to look at.
    Warning,
    /// Something failed.
    Error,
}

impl Severity {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            other => Err(format!("unknown severity {other:?}")),
        }
    }
}

/// The kinds of event the system records. On the wire and in the database a
/// kind is its dotted string, so clients keep working as kinds are added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The server started.
    ServerStarted,
    /// The server began a graceful shutdown.
    ServerStopping,
    /// A workload was loaded for the first time.
    WorkloadLoaded,
    /// A workload's spec changed.
    WorkloadUpdated,
    /// A workload's file disappeared or was deleted.
    WorkloadRemoved,
    /// A workload file failed to load.
    WorkloadInvalid,
    /// A workload was applied through the API.
    WorkloadApplied,
    /// A node's agent connected for the first time.
    NodeJoined,
    /// A node missed heartbeats.
    NodeSuspect,
    /// A node was declared lost.
    NodeLost,
    /// A suspect or lost node came back.
    NodeReturned,
    /// Too much of the fleet went silent at once: the server holds off
    /// declaring any of it lost, since it may be the one cut off.
    NodeLossHeld,
    /// A node was cordoned.
    NodeCordoned,
    /// A node was uncordoned.
    NodeUncordoned,
    /// An agent spoke of a container that is not its node's; what it said
    /// was refused (the NodeRestriction rule).
    NodeRestricted,
    /// An agent's certificate named one node and its Hello another; the
    /// session was refused.
    NodeImpersonation,
    /// A boost was admitted and recorded; the host has yet to confirm it.
    BoostRequested,
    /// A boost is in force.
    BoostActive,
    /// A boost made room for a higher-priority one.
    BoostPreempted,
    /// A boost was released.
    BoostReleased,
    /// A boost's time ran out.
    BoostExpired,
    /// The host could not apply a boost.
    BoostFailed,
    /// A pool's operator overrides changed (scale, drain).
    PoolUpdated,
    /// Creating a pool container failed; the pool backs off.
    PoolCreateFailed,
    /// A tenant claimed a container.
    ClaimCreated,
    /// A tenant's claim was released.
    ClaimReleased,
    /// A claim ended because its container or node is gone.
    ClaimLost,
    /// A tenant got back the container of a claim that was lost.
    ClaimResumed,
    /// A container will be removed.
    ContainerDraining,
    /// A container was removed.
    ContainerDestroyed,
    /// A container is gone from its node.
    ContainerLost,
    /// A reservation was extended.
    AffinityExtended,
    /// A reservation ran out.
    AffinityExpired,
    /// An operator ended a reservation.
    AffinityRevoked,
    /// Reconciliation took in a managed container that had no row.
    ReconcileAdopted,
    /// Reconciliation removed a managed container that had no row.
    ReconcileDestroyed,
    /// Reconciliation rebuilt state from the agents' labels and state files.
    ReconcileRebuilt,
    /// A pool cannot reach its min_size, and why (once per reason).
    PoolShortfall,
    /// A tenant state sync moved every file.
    SyncCompleted,
    /// A tenant state sync did not move every file.
    SyncFailed,
    /// An upload on release failed; the container is kept and it is retried.
    SyncReleasePending,
    /// An owed upload on release was settled (done or given up).
    SyncReleaseSettled,
    /// A sync completed without saving what it was there to save: its
    /// directory is missing, nothing matched while the sink holds files, or
    /// entries that are not regular files (symlinks) were left behind.
    SyncWarning,
    /// A missing or damaged database was moved aside and replaced by an
    /// empty one on purpose (`--rebuild-from-agents`).
    DatabaseReplaced,
    /// A row could not be read at startup; it was left in the database
    /// and skipped.
    DatabaseRowSkipped,
    /// A copy of the database was taken (`bh admin backup`).
    DatabaseBackedUp,
    /// The full integrity check after startup found the database damaged;
    /// the server stopped.
    DatabaseDamaged,
    /// A container ran with limits the database does not account for (a
    /// boost the database forgot); they go back to the workload's.
    ContainerLimitsReverted,
}

impl EventKind {
    /// Every kind, for listings and validation.
    pub const ALL: &'static [EventKind] = &[
        EventKind::ServerStarted,
        EventKind::ServerStopping,
        EventKind::WorkloadLoaded,
        EventKind::WorkloadUpdated,
        EventKind::WorkloadRemoved,
        EventKind::WorkloadInvalid,
        EventKind::WorkloadApplied,
        EventKind::NodeJoined,
        EventKind::NodeSuspect,
        EventKind::NodeLost,
        EventKind::NodeReturned,
        EventKind::NodeLossHeld,
        EventKind::NodeCordoned,
        EventKind::NodeUncordoned,
        EventKind::NodeRestricted,
        EventKind::NodeImpersonation,
        EventKind::BoostRequested,
        EventKind::BoostActive,
        EventKind::BoostPreempted,
        EventKind::BoostReleased,
        EventKind::BoostExpired,
        EventKind::BoostFailed,
        EventKind::PoolUpdated,
        EventKind::PoolCreateFailed,
        EventKind::ClaimCreated,
        EventKind::ClaimReleased,
        EventKind::ClaimLost,
        EventKind::ClaimResumed,
        EventKind::ContainerDraining,
        EventKind::ContainerDestroyed,
        EventKind::ContainerLost,
        EventKind::AffinityExtended,
        EventKind::AffinityExpired,
        EventKind::AffinityRevoked,
        EventKind::ReconcileAdopted,
        EventKind::ReconcileDestroyed,
        EventKind::ReconcileRebuilt,
        EventKind::PoolShortfall,
        EventKind::SyncCompleted,
        EventKind::SyncFailed,
        EventKind::SyncReleasePending,
        EventKind::SyncReleaseSettled,
        EventKind::SyncWarning,
        EventKind::DatabaseReplaced,
        EventKind::DatabaseRowSkipped,
        EventKind::DatabaseBackedUp,
        EventKind::DatabaseDamaged,
        EventKind::ContainerLimitsReverted,
    ];

    /// The dotted name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ServerStarted => "server.started",
            EventKind::ServerStopping => "server.stopping",
            EventKind::WorkloadLoaded => "workload.loaded",
            EventKind::WorkloadUpdated => "workload.updated",
            EventKind::WorkloadRemoved => "workload.removed",
            EventKind::WorkloadInvalid => "workload.invalid",
            EventKind::WorkloadApplied => "workload.applied",
            EventKind::NodeJoined => "node.joined",
            EventKind::NodeSuspect => "node.suspect",
            EventKind::NodeLost => "node.lost",
            EventKind::NodeReturned => "node.returned",
            EventKind::NodeLossHeld => "node.loss_held",
            EventKind::NodeCordoned => "node.cordoned",
            EventKind::NodeUncordoned => "node.uncordoned",
            EventKind::NodeRestricted => "node.restricted",
            EventKind::NodeImpersonation => "node.impersonation",
            EventKind::BoostRequested => "boost.requested",
            EventKind::BoostActive => "boost.active",
            EventKind::BoostPreempted => "boost.preempted",
            EventKind::BoostReleased => "boost.released",
            EventKind::BoostExpired => "boost.expired",
            EventKind::BoostFailed => "boost.failed",
            EventKind::PoolUpdated => "pool.updated",
            EventKind::PoolCreateFailed => "pool.create_failed",
            EventKind::ClaimCreated => "claim.created",
            EventKind::ClaimReleased => "claim.released",
            EventKind::ClaimLost => "claim.lost",
            EventKind::ClaimResumed => "claim.resumed",
            EventKind::ContainerDraining => "container.draining",
            EventKind::ContainerDestroyed => "container.destroyed",
            EventKind::ContainerLost => "container.lost",
            EventKind::AffinityExtended => "affinity.extended",
            EventKind::AffinityExpired => "affinity.expired",
            EventKind::AffinityRevoked => "affinity.revoked",
            EventKind::ReconcileAdopted => "reconcile.adopted",
            EventKind::ReconcileDestroyed => "reconcile.destroyed",
            EventKind::ReconcileRebuilt => "reconcile.rebuilt",
            EventKind::PoolShortfall => "pool.shortfall",
            EventKind::SyncCompleted => "sync.completed",
            EventKind::SyncFailed => "sync.failed",
            EventKind::SyncReleasePending => "sync.release_pending",
            EventKind::SyncReleaseSettled => "sync.release_settled",
            EventKind::SyncWarning => "sync.warning",
            EventKind::DatabaseReplaced => "database.replaced",
            EventKind::DatabaseRowSkipped => "database.row_skipped",
            EventKind::DatabaseBackedUp => "database.backed_up",
            EventKind::DatabaseDamaged => "database.damaged",
            EventKind::ContainerLimitsReverted => "container.limits_reverted",
        }
    }

    /// The severity this kind is recorded with.
    pub fn severity(self) -> Severity {
        match self {
            EventKind::WorkloadInvalid
            | EventKind::NodeSuspect
            | EventKind::BoostPreempted
            | EventKind::BoostFailed
            | EventKind::PoolCreateFailed
            | EventKind::ClaimLost
            | EventKind::ContainerLost
            | EventKind::ReconcileDestroyed
            | EventKind::ReconcileRebuilt
            | EventKind::SyncFailed
            | EventKind::SyncWarning
            | EventKind::PoolShortfall
            | EventKind::NodeLossHeld
            | EventKind::SyncReleasePending
            | EventKind::DatabaseReplaced
            | EventKind::ContainerLimitsReverted => Severity::Warning,
            EventKind::NodeLost
            | EventKind::NodeRestricted
            | EventKind::NodeImpersonation
            | EventKind::DatabaseRowSkipped => Severity::Error,
            _ => Severity::Info,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event about to be recorded; the store assigns its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// When it happened.
    pub at: Timestamp,
    /// Dotted kind.
    pub kind: String,
    /// How much it matters.
    pub severity: Severity,
    /// One sentence for people.
    pub message: String,
    /// What it concerns.
    pub subject: EventSubject,
    /// Further structured detail.
    pub attributes: BTreeMap<String, String>,
}

impl NewEvent {
    /// An event of a known kind, with its default severity.
    pub fn new(at: Timestamp, kind: EventKind, message: impl Into<String>) -> Self {
        Self {
            at,
            kind: kind.as_str().to_owned(),
            severity: kind.severity(),
            message: message.into(),
            subject: EventSubject::default(),
            attributes: BTreeMap::new(),
        }
    }

    /// Adds an attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: EventSubject) -> Self {
        self.subject = subject;
        self
    }
}

/// What an event is about. Kept as plain strings: an event may name
/// something that no longer exists or was never valid (a bad file's id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSubject {
    /// Node name.
    pub node_id: Option<String>,
    /// Workload id.
    pub workload_id: Option<String>,
    /// Container id.
    pub container_id: Option<String>,
    /// Tenant id.
    pub tenant_id: Option<String>,
    /// Boost id.
    pub boost_id: Option<String>,
}

/// A recorded event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Strictly increasing; doubles as the resume token.
    pub id: u64,
    /// The event itself.
    #[serde(flatten)]
    pub event: NewEvent,
}

/// Which events a listing or a watch wants. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Exact kinds, or prefixes ending in `.`.
    pub kinds: Vec<String>,
    /// What the event must concern.
    pub subject: EventSubject,
    /// The least severity wanted.
    pub min_severity: Option<Severity>,
}

impl EventFilter {
    /// Whether `event` passes the filter. The store applies the same rules
    /// in SQL; this is the one used for live streams.
    pub fn matches(&self, event: &NewEvent) -> bool {
        let kind_ok = self.kinds.is_empty()
            || self.kinds.iter().any(|k| {
                if k.ends_with('.') {
                    event.kind.starts_with(k.as_str())
                } else {
                    event.kind == *k
                }
            });
        let field_ok = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_deref() == Some(w.as_str()),
        };
        let s = &self.subject;
        let e = &event.subject;
        kind_ok
            && field_ok(&s.node_id, &e.node_id)
            && field_ok(&s.workload_id, &e.workload_id)
            && field_ok(&s.container_id, &e.container_id)
            && field_ok(&s.tenant_id, &e.tenant_id)
            && field_ok(&s.boost_id, &e.boost_id)
            && self.min_severity.is_none_or(|min| event.severity >= min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, node: Option<&str>) -> NewEvent {
        NewEvent::new(Timestamp::from_millis(1), kind, "m").with_subject(EventSubject {
            node_id: node.map(str::to_owned),
            ..Default::default()
        })
    }

    #[test]
    fn kinds_are_unique_dotted_names() {
        let mut names: Vec<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), EventKind::ALL.len());
        assert!(names.iter().all(|n| n.contains('.')));
    }

    #[test]
    fn filters_match_kinds_prefixes_subjects_and_severity() {
        let lost = event(EventKind::NodeLost, Some("a"));
        let loaded = event(EventKind::WorkloadLoaded, None);
        let all = EventFilter::default();
        assert!(all.matches(&lost) && all.matches(&loaded));

        let nodes = EventFilter {
            kinds: vec!["node.".into()],
            ..Default::default()
        };
        assert!(nodes.matches(&lost));
        assert!(!nodes.matches(&loaded));

        let exact = EventFilter {
            kinds: vec!["node".into()],
            ..Default::default()
        };
        assert!(!exact.matches(&lost), "a kind without a dot is exact");

        let node_b = EventFilter {
            subject: EventSubject {
                node_id: Some("b".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!node_b.matches(&lost));

        let warnings = EventFilter {
            min_severity: Some(Severity::Warning),
            ..Default::default()
        };
        assert!(warnings.matches(&lost));
        assert!(!warnings.matches(&loaded));
    }
}
