//! One atomic, conditional change to pool state.
//!
//! Every pool decision is a [`PoolWrite`]: the rows it changes, each with
//! what it expects to replace, plus the request id it answers and its
//! events. The store commits it in one transaction and refuses it whole
//! (a conflict) if any row is not as expected, so a writer that decided on
//! a stale view can never overwrite what happened meanwhile; the in-memory
//! index then applies exactly the same value. One type, two readers: what
//! was committed is what memory becomes.

use crate::event::NewEvent;
use crate::idempotency::IdempotentRecord;
use crate::ids::{ContainerId, TenantId};
use crate::pool::{ClaimRecord, ContainerRecord, ContainerState, Reservation};
use crate::time::Timestamp;

/// What a change expects of the container row it replaces: the facts a
/// decision rests on. The revision alone would not do: a row removed and
/// adopted again starts over, and a stale writer could match it; with the
/// state, the tenant and the claim generation, a match means the decision
/// was made on an equal state, and with the time of the row's last change
/// (a new row's is the time it was inserted) on this very incarnation of
/// the row (the simulation found a claim decided on a row that was then
/// removed and adopted again, identical but for that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Row version.
    pub revision: u64,
    /// Life-cycle state.
    pub state: ContainerState,
    /// The tenant holding it.
    pub tenant_id: Option<TenantId>,
    /// Fencing generation.
    pub claim_generation: u64,
    /// When the row last changed.
    pub updated_at: Timestamp,
    /// The Docker container it names: an update that keeps it need not
    /// write it (nor the index on it).
    pub docker_id: Option<String>,
}

impl Expected {
    /// What a decision made on `c` expects.
    pub fn of(c: &ContainerRecord) -> Self {
        Self {
            revision: c.revision,
            state: c.state,
            tenant_id: c.tenant_id.clone(),
            claim_generation: c.claim_generation,
            updated_at: c.updated_at,
            docker_id: c.docker_id.clone(),
        }
    }

    /// Whether `c` is as expected.
    pub fn matches(&self, c: &ContainerRecord) -> bool {
        *self == Self::of(c)
    }
}

/// A change to one container row.
#[derive(Debug, Clone, PartialEq)]
pub enum ContainerChange {
    /// A new row; refused if the id exists.
    Insert(ContainerRecord),
    /// The row as it becomes; refused unless the stored row is as
    /// `expected`.
    Update {
        /// As the decision saw it.
        expected: Expected,
        /// As it becomes (its revision one past `expected`'s).
        record: ContainerRecord,
    },
    /// Deletes the row; refused unless it is as `expected`.
    Remove {
        /// The row.
        id: ContainerId,
        /// As the decision saw it.
        expected: Expected,
    },
}

impl ContainerChange {
    /// The container this change is about.
    pub fn id(&self) -> ContainerId {
        match self {
            ContainerChange::Insert(c) | ContainerChange::Update { record: c, .. } => c.id,
            ContainerChange::Remove { id, .. } => *id,
        }
    }

    /// `old` becomes `new` (which should come from `old.successor(now)`).
    pub fn update(old: &ContainerRecord, new: ContainerRecord) -> Self {
        ContainerChange::Update {
            expected: Expected::of(old),
            record: new,
        }
    }

    /// The removal of `old` as it was seen.
    pub fn remove(old: &ContainerRecord) -> Self {
        ContainerChange::Remove {
            id: old.id,
            expected: Expected::of(old),
        }
    }
}

/// A change to one claim row.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimChange {
    /// A new active claim; refused if the tenant already holds one of the
    /// workload or the container is already claimed.
    Insert(ClaimRecord),
    /// Ends an active claim with the record's status and `released_at`;
    /// refused unless the stored claim is still active at the same
    /// generation.
    End(ClaimRecord),
    /// Records activity. Monotonic (the later time wins), so it commutes
    /// with everything and is never refused.
    Touch {
        /// The claim.
        claim_id: String,
        /// When the tenant was last seen.
        at: Timestamp,
    },
    /// Records that the tenant's files were restored into the claim's
    /// container. A flag that only ever goes up, so, like a touch, it is
    /// never refused (on a claim that ended meanwhile it marks the ended
    /// row).
    Restored {
        /// The claim.
        claim_id: String,
    },
}

/// A change to one affinity reservation.
#[derive(Debug, Clone, PartialEq)]
pub enum ReservationChange {
    /// A new reservation; refused if (tenant, workload) has one or the
    /// container is reserved already.
    Insert(Reservation),
    /// Replaces `expected` with `new`; refused unless the stored
    /// reservation still is `expected` (same container, same expiry).
    Update {
        /// As the decision saw it.
        expected: Reservation,
        /// As it becomes.
        new: Reservation,
    },
    /// Deletes a reservation; refused unless it is still as the decision
    /// saw it (same container, same expiry: an extension made meanwhile
    /// is not overwritten by an expiry decided before it).
    Remove {
        /// As the decision saw it.
        expected: Reservation,
    },
}

impl ReservationChange {
    /// The removal of `r` as it was seen.
    pub fn remove(r: &Reservation) -> Self {
        ReservationChange::Remove {
            expected: r.clone(),
        }
    }
}

/// One atomic change to pool state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolWrite {
    /// Reservations ended or changed. Applied first: an affinity claim
    /// consumes the reservation before its container changes state.
    pub reservations: Vec<ReservationChange>,
    /// Container rows.
    pub containers: Vec<ContainerChange>,
    /// Claim rows.
    pub claims: Vec<ClaimChange>,
    /// The request id this write answers.
    pub idempotency: Option<IdempotentRecord>,
    /// Events to record with it.
    pub events: Vec<NewEvent>,
}

impl PoolWrite {
    /// Whether the write changes no pool row (it may still record a
    /// request id or events).
    pub fn changes_nothing(&self) -> bool {
        self.reservations.is_empty() && self.containers.is_empty() && self.claims.is_empty()
    }

    /// Appends `other`'s changes (used to commit several decisions at once).
    pub fn extend(&mut self, other: PoolWrite) {
        self.reservations.extend(other.reservations);
        self.containers.extend(other.containers);
        self.claims.extend(other.claims);
        self.events.extend(other.events);
        if other.idempotency.is_some() {
            self.idempotency = other.idempotency;
        }
    }
}
