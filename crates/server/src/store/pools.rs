//! Containers, claims and affinity reservations.
//!
//! Every pool decision is one [`PoolWrite`]: the rows it changes, its
//! idempotency key and its events, committed in one transaction. A claim is
//! therefore either entirely durable (claim row, container row, consumed
//! reservation, request id, event) or not there at all.
//!
//! Every row change is conditional: an update or delete names the state it
//! expects to replace in its `WHERE`, and touching no row is a conflict
//! that rolls the whole write back. A decision made on a stale view can
//! therefore never overwrite what happened meanwhile.

use futures::FutureExt as _;

use boilerhouse_core::auth::Principal;
use boilerhouse_core::event::NewEvent;
use boilerhouse_core::pool::write::{
    ClaimChange, ContainerChange, Expected, PoolWrite, ReservationChange,
};
use boilerhouse_core::pool::{ClaimRecord, ContainerRecord, Reservation};
use boilerhouse_core::{ContainerId, TenantId, Timestamp, WorkloadId};

use super::events::{insert_event, push_event, recorded};
use super::idempotency::push_idempotent;
use super::lenient;
use super::sql;
use super::statements::{Expect, Param, Statements};
use super::{Store, StoreError};

mod rows;
mod snapshot;
use rows::{ClaimRow, ContainerRow, ReservationRow, corrupt};

/// Operator overrides of a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolOverride {
    /// min_size, if scaled.
    pub min_size: Option<u32>,
    /// max_size, if scaled.
    pub max_size: Option<u32>,
    /// Drained: no refill, idle containers destroyed.
    pub draining: bool,
}

/// Everything needed to rebuild the in-memory pool index.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    /// Every container row.
    pub containers: Vec<ContainerRecord>,
    /// Active claims.
    pub claims: Vec<ClaimRecord>,
    /// Reservations.
    pub reservations: Vec<Reservation>,
    /// Rows that could not be read, and were left out.
    pub unreadable: Vec<lenient::Unreadable>,
}

/// The columns a container row is read with ([`ContainerRow`]).
macro_rules! container_columns {
    () => {
        "container_id, workload_id, node_id, docker_id, state, spec_hash, tenant_id, last_tenant_id, \
         claim_generation, revision, limits_cpus, limits_memory, state_path, comm_path, created_at, updated_at"
    };
}
pub(super) use container_columns;

/// The columns a claim row is read with ([`ClaimRow`]).
macro_rules! claim_columns {
    () => {
        "claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
         claimed_at, last_activity_at, released_at, restored"
    };
}
pub(super) use claim_columns;

/// The columns a reservation row is read with ([`ReservationRow`]).
macro_rules! reservation_columns {
    () => {
        "tenant_id, workload_id, container_id, node_id, reserved_at, expires_at"
    };
}
pub(super) use reservation_columns;

/// A container row as read, or why it cannot be; keyed by its id.
pub(super) fn read_container(
    row: &sqlx::any::AnyRow,
) -> Result<ContainerRecord, lenient::Unreadable> {
    lenient::decode_one::<_, ContainerRow, ContainerRecord>(row, "containers", |r| {
        lenient::text(r, "container_id")
    })
}

/// A claim row as read, or why it cannot be.
pub(super) fn read_claim(row: &sqlx::any::AnyRow) -> Result<ClaimRecord, lenient::Unreadable> {
    lenient::decode_one::<_, ClaimRow, ClaimRecord>(row, "claims", |r| lenient::text(r, "claim_id"))
}

/// A reservation row as read, or why it cannot be.
pub(super) fn read_reservation(
    row: &sqlx::any::AnyRow,
) -> Result<Reservation, lenient::Unreadable> {
    lenient::decode_one::<_, ReservationRow, Reservation>(
        row,
        "affinity_reservations",
        reservation_key,
    )
}

/// How a reservation is named when it cannot be read.
fn reservation_key(row: &sqlx::any::AnyRow) -> String {
    format!(
        "({}, {})",
        lenient::text(row, "tenant_id"),
        lenient::text(row, "workload_id")
    )
}

/// The `WHERE` of a conditional container change: the row is as the
/// decision saw it. Bound from [`expected_params`], in this order.
macro_rules! container_is {
    () => {
        "container_id = ? AND revision = ? AND state = ? AND tenant_id IS NOT DISTINCT FROM ? AND claim_generation = ? \
         AND updated_at = ?"
    };
}

/// The values [`container_is!`] compares, in its order.
fn expected_params(id: &ContainerId, e: &Expected) -> [Param; 6] {
    [
        id.to_string().into(),
        (e.revision as i64).into(),
        e.state.as_str().into(),
        e.tenant_id.as_ref().map(TenantId::as_str).into(),
        (e.claim_generation as i64).into(),
        e.updated_at.as_millis().into(),
    ]
}

fn push_reservation(statements: &mut Statements, change: &ReservationChange) {
    let (sql, params): (&'static str, Vec<Param>) = match change {
        ReservationChange::Insert(r) => (
            "INSERT INTO affinity_reservations (tenant_id, workload_id, container_id, node_id, reserved_at, \
             expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            vec![
                r.tenant_id.as_str().into(),
                r.workload_id.as_str().into(),
                r.container_id.to_string().into(),
                r.node_id.as_str().into(),
                r.reserved_at.as_millis().into(),
                r.expires_at.as_millis().into(),
            ],
        ),
        ReservationChange::Update { expected, new } => (
            "UPDATE affinity_reservations SET node_id = ?, reserved_at = ?, expires_at = ? \
             WHERE tenant_id = ? AND workload_id = ? AND container_id = ? AND expires_at = ?",
            vec![
                new.node_id.as_str().into(),
                new.reserved_at.as_millis().into(),
                new.expires_at.as_millis().into(),
                expected.tenant_id.as_str().into(),
                expected.workload_id.as_str().into(),
                expected.container_id.to_string().into(),
                expected.expires_at.as_millis().into(),
            ],
        ),
        ReservationChange::Remove { expected } => (
            "DELETE FROM affinity_reservations \
             WHERE tenant_id = ? AND workload_id = ? AND container_id = ? AND expires_at = ?",
            vec![
                expected.tenant_id.as_str().into(),
                expected.workload_id.as_str().into(),
                expected.container_id.to_string().into(),
                expected.expires_at.as_millis().into(),
            ],
        ),
    };
    statements.push(
        sql,
        params,
        Expect::Changes(format!(
            "the reservation changed since it was read ({change:?})"
        )),
    );
}

/// The columns a change may set, in the order the statements list them:
/// docker_id through updated_at.
fn changing_params(c: &ContainerRecord) -> [Param; 11] {
    [
        (&c.docker_id).into(),
        c.state.as_str().into(),
        c.tenant_id.as_ref().map(TenantId::as_str).into(),
        c.last_tenant_id.as_ref().map(TenantId::as_str).into(),
        (c.claim_generation as i64).into(),
        (c.revision as i64).into(),
        c.limits.cpus.into(),
        c.limits.memory_bytes.map(|m| m as i64).into(),
        (&c.state_path).into(),
        (&c.comm_path).into(),
        c.updated_at.as_millis().into(),
    ]
}

fn push_container(statements: &mut Statements, change: &ContainerChange) {
    let changed = || format!("container {} changed since it was read", change.id());
    match change {
        ContainerChange::Insert(c) => {
            // A row comes back only with the history its claims wrote: a
            // stale adoption never revives a used container as unused.
            // The check is part of the statement.
            let mut params: Vec<Param> = vec![
                c.id.to_string().into(),
                c.workload_id.as_str().into(),
                c.workload_id.as_str().into(),
                c.node_id.as_str().into(),
                (&c.spec_hash).into(),
                c.created_at.as_millis().into(),
            ];
            params.extend(changing_params(c));
            params.push(c.id.to_string().into());
            params.push((c.claim_generation as i64).into());
            statements.push(
                "INSERT INTO containers (container_id, pool_id, workload_id, node_id, spec_hash, created_at, \
                 docker_id, state, tenant_id, last_tenant_id, claim_generation, revision, limits_cpus, \
                 limits_memory, state_path, comm_path, updated_at) \
                 SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? \
                 WHERE NOT EXISTS (SELECT 1 FROM claims WHERE container_id = ? AND generation > ?)",
                params,
                Expect::Changes(format!("container {} had newer claims", c.id)),
            );
        }
        ContainerChange::Update {
            expected,
            record: c,
        } => {
            let mut params: Vec<Param> = Vec::with_capacity(17);
            params.extend(changing_params(c));
            params.extend(expected_params(&c.id, expected));
            statements.push(
                concat!(
                    "UPDATE containers SET docker_id = ?, state = ?, tenant_id = ?, last_tenant_id = ?, ",
                    "claim_generation = ?, revision = ?, limits_cpus = ?, limits_memory = ?, state_path = ?, ",
                    "comm_path = ?, updated_at = ? WHERE ",
                    container_is!()
                ),
                params,
                Expect::Changes(changed()),
            );
        }
        ContainerChange::Remove { id, expected } => {
            statements.push(
                concat!("DELETE FROM containers WHERE ", container_is!()),
                expected_params(id, expected).into(),
                Expect::Changes(changed()),
            );
        }
    }
}

fn push_claim(statements: &mut Statements, change: &ClaimChange) {
    match change {
        ClaimChange::Insert(c) => {
            // Two checks, in the statement itself: a fencing token is
            // never handed out twice, and a tenant never holds a claim and
            // a reservation of one workload (reservation changes are
            // applied before claim changes, so this sees what the write
            // leaves; the unique index claims_one_per_tenant rules out two
            // claims).
            statements.push(
                "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, \
                 status, claimed_at, last_activity_at, released_at, restored) \
                 SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? \
                 WHERE NOT EXISTS (SELECT 1 FROM claims WHERE container_id = ? AND generation >= ?) \
                 AND NOT EXISTS (SELECT 1 FROM affinity_reservations WHERE tenant_id = ? AND workload_id = ?)",
                vec![
                    (&c.claim_id).into(),
                    c.tenant_id.as_str().into(),
                    c.workload_id.as_str().into(),
                    c.container_id.to_string().into(),
                    c.node_id.as_str().into(),
                    (c.generation as i64).into(),
                    c.source.as_str().into(),
                    c.status.as_str().into(),
                    c.claimed_at.as_millis().into(),
                    c.last_activity_at.as_millis().into(),
                    c.released_at.map(|t| t.as_millis()).into(),
                    c.restored.into(),
                    c.container_id.to_string().into(),
                    (c.generation as i64).into(),
                    c.tenant_id.as_str().into(),
                    c.workload_id.as_str().into(),
                ],
                Expect::Changes(format!(
                    "generation {} on container {} was used, or {}/{} holds a reservation",
                    c.generation, c.container_id, c.tenant_id, c.workload_id
                )),
            );
        }
        ClaimChange::End(c) => statements.push(
            "UPDATE claims SET status = ?, released_at = ? \
             WHERE claim_id = ? AND status = 'active' AND generation = ?",
            vec![
                c.status.as_str().into(),
                c.released_at.map(|t| t.as_millis()).into(),
                (&c.claim_id).into(),
                (c.generation as i64).into(),
            ],
            Expect::Changes(format!(
                "claim {} of {} is no longer active at generation {}",
                c.claim_id, c.tenant_id, c.generation
            )),
        ),
        ClaimChange::Touch { claim_id, at } => statements.push(
            // Only ever forward; no scalar max() on PostgreSQL.
            "UPDATE claims SET last_activity_at = ? WHERE claim_id = ? AND last_activity_at < ?",
            vec![
                at.as_millis().into(),
                claim_id.into(),
                at.as_millis().into(),
            ],
            Expect::Anything,
        ),
        ClaimChange::Restored { claim_id } => statements.push(
            "UPDATE claims SET restored = TRUE WHERE claim_id = ?",
            vec![claim_id.into()],
            Expect::Anything,
        ),
    }
}

/// The statements of `write`, and the events they insert, made on the
/// caller's task: the writer, which runs everything in series, only sends
/// them.
fn statements_of(
    write: &PoolWrite,
    caused_by: Option<&Principal>,
) -> Result<(Statements, Vec<NewEvent>), StoreError> {
    let mut statements = Statements::default();
    for change in &write.reservations {
        push_reservation(&mut statements, change);
    }
    for change in &write.containers {
        push_container(&mut statements, change);
    }
    for change in &write.claims {
        push_claim(&mut statements, change);
    }
    // Checked on what the write leaves: a release (which reserves) that
    // lands after a claim decided before it is refused. Claim inserts
    // check the same in their own statement.
    for (tenant, workload) in write.reservations.iter().filter_map(|r| match r {
        ReservationChange::Insert(r) => Some((&r.tenant_id, &r.workload_id)),
        _ => None,
    }) {
        statements.push(
            "SELECT (SELECT COUNT(*) FROM claims WHERE tenant_id = ? AND workload_id = ? AND status = 'active') \
             + (SELECT COUNT(*) FROM affinity_reservations WHERE tenant_id = ? AND workload_id = ?)",
            vec![
                tenant.as_str().into(),
                workload.as_str().into(),
                tenant.as_str().into(),
                workload.as_str().into(),
            ],
            Expect::AtMost(
                1,
                format!("{tenant}/{workload} would hold a claim and a reservation"),
            ),
        );
    }
    if let Some(record) = &write.idempotency {
        push_idempotent(&mut statements, record);
    }
    let mut events = Vec::with_capacity(write.events.len());
    for event in &write.events {
        events.push(push_event(&mut statements, caused_by, event.clone())?);
    }
    Ok((statements, events))
}

impl Store {
    /// Commits one pool decision atomically, or refuses it whole with
    /// [`StoreError::Conflict`] when a row is not as the decision saw it.
    /// `on_commit` gets the write once it committed, on the writer task and
    /// in commit order (see [`super::writer`]): the pool index applies it
    /// there, so memory follows every commit even if the caller is gone.
    pub async fn commit_pool_write(
        &self,
        write: PoolWrite,
        on_commit: impl FnOnce(&PoolWrite) + Send + 'static,
    ) -> Result<(), StoreError> {
        let (statements, events) = statements_of(&write, crate::auth::current().as_ref())?;
        self.writer
            .write_statements_then(
                statements,
                move |tx, ids| recorded(tx, ids, events),
                move || on_commit(&write),
            )
            .await
    }

    /// The tenant of the claims the database has on a container, and the
    /// highest generation among them: evidence that outlives the
    /// container's row (adoption reads it).
    pub async fn claim_history(
        &self,
        container: &ContainerId,
    ) -> Result<Option<(TenantId, u64)>, StoreError> {
        let row: Option<(String, i64)> = sql::query_as(
            "SELECT tenant_id, generation FROM claims WHERE container_id = ? ORDER BY generation DESC LIMIT 1",
        )
        .bind(container.to_string())
        .fetch_optional(&self.reads)
        .await?;
        row.map(|(t, g)| {
            Ok((
                TenantId::new(t).map_err(|e| corrupt("tenant id", e))?,
                g.max(0) as u64,
            ))
        })
        .transpose()
    }

    /// One claim by id, active or ended.
    pub async fn get_claim(&self, claim_id: &str) -> Result<Option<ClaimRecord>, StoreError> {
        let row: Option<ClaimRow> = sql::query_as(
            "SELECT claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
             claimed_at, last_activity_at, released_at, restored FROM claims WHERE claim_id = ?",
        )
        .bind(claim_id)
        .fetch_optional(&self.reads)
        .await?;
        row.map(ClaimRecord::try_from).transpose()
    }

    /// Claims, newest first; ended ones only when asked.
    pub async fn list_claims(
        &self,
        include_ended: bool,
        limit: u32,
    ) -> Result<Vec<ClaimRecord>, StoreError> {
        let rows: Vec<ClaimRow> = sql::query_as(
            "SELECT claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
             claimed_at, last_activity_at, released_at, restored FROM claims WHERE (? OR status = 'active') \
             ORDER BY claimed_at DESC LIMIT ?",
        )
        .bind(include_ended)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter().map(ClaimRecord::try_from).collect()
    }

    /// Every pool's operator overrides.
    pub async fn pool_overrides(&self) -> Result<Vec<(WorkloadId, PoolOverride)>, StoreError> {
        let rows: Vec<(String, Option<i64>, Option<i64>, sql::Flag)> = sql::query_as(
            "SELECT pool_id, min_size_override, max_size_override, draining FROM pools",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter()
            .map(|(id, min, max, draining)| {
                Ok((
                    WorkloadId::new(id).map_err(|e| corrupt("pool id", e))?,
                    PoolOverride {
                        min_size: min.map(|m| m.clamp(0, i64::from(u32::MAX)) as u32),
                        max_size: max.map(|m| m.clamp(0, i64::from(u32::MAX)) as u32),
                        draining: draining.0,
                    },
                ))
            })
            .collect()
    }

    /// Sets a pool's overrides, recording `event`.
    pub async fn set_pool_override(
        &self,
        pool: WorkloadId,
        value: PoolOverride,
        event: NewEvent,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.writer
            .write(move |tx| {
                async move {
                    sql::query(
                        "INSERT INTO pools (pool_id, min_size_override, max_size_override, draining, created_at, \
                         updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (pool_id) DO UPDATE SET \
                         min_size_override = excluded.min_size_override, max_size_override = excluded.max_size_override, \
                         draining = excluded.draining, updated_at = excluded.updated_at",
                    )
                    .bind(pool.as_str())
                    .bind(value.min_size.map(i64::from))
                    .bind(value.max_size.map(i64::from))
                    .bind(value.draining)
                    .bind(now.as_millis())
                    .bind(now.as_millis())
                    .execute(tx.conn())
                    .await?;
                    insert_event(tx, event).await?;
                    Ok(())
                }
                .boxed()
            })
            .await
    }
}
