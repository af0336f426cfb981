//! The statements a pool write becomes: conditional on the rows being as
//! the decision saw them, so a write decided on a stale view conflicts
//! instead of overwriting.

use boilerhouse_core::auth::Principal;
use boilerhouse_core::event::NewEvent;
use boilerhouse_core::pool::ContainerRecord;
use boilerhouse_core::pool::write::{
    ClaimChange, ContainerChange, Expected, PoolWrite, ReservationChange,
};
use boilerhouse_core::{ContainerId, TenantId};

use super::super::StoreError;
use super::super::events::push_event;
use super::super::idempotency::push_idempotent;
use super::super::sql::Backend;
use super::super::statements::{Expect, Param, Statements};

/// The `WHERE` of a conditional container change: the row is as the
/// decision saw it. Bound from [`expected_params`], in this order.
macro_rules! container_is {
    () => {
        "container_id = ? AND revision = ? AND state = ? AND tenant_id IS NOT DISTINCT FROM ? AND claim_generation = ? \
         AND updated_at = ? AND docker_id IS NOT DISTINCT FROM ?"
    };
}

/// The columns an update sets after `docker_id`, which it sets only when
/// it changes: in a claim or a release it does not, and writing it anyway
/// rewrote an entry of its unique index, a page at random for each claim.
macro_rules! container_sets {
    () => {
        "state = ?, tenant_id = ?, last_tenant_id = ?, claim_generation = ?, revision = ?, \
         limits_cpus = ?, limits_memory = ?, state_path = ?, comm_path = ?, updated_at = ?"
    };
}

/// A container row's insert, without its values.
macro_rules! insert_container {
    () => {
        "INSERT INTO containers (container_id, pool_id, workload_id, node_id, spec_hash, created_at, \
         docker_id, state, tenant_id, last_tenant_id, claim_generation, revision, limits_cpus, \
         limits_memory, state_path, comm_path, updated_at)"
    };
}

macro_rules! values_17 {
    () => {
        "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
    };
}

/// A claim row's insert, without its values.
macro_rules! insert_claim {
    () => {
        "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, \
         status, claimed_at, last_activity_at, released_at, restored)"
    };
}

macro_rules! values_12 {
    () => {
        "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
    };
}

/// How many claims a container row about to be inserted would contradict:
/// ones newer than its claim generation. Bound: container, generation.
macro_rules! container_conflicts {
    () => {
        "(SELECT COUNT(*) FROM claims WHERE container_id = ? AND generation > ?)"
    };
}

/// How many rows a new claim would conflict with: an active or later
/// claim of its container at its generation or above, a reservation of
/// its tenant and workload. Bound: container, generation, tenant,
/// workload.
macro_rules! claim_conflicts {
    () => {
        "(SELECT COUNT(*) FROM claims WHERE container_id = ? AND generation >= ?) \
         + (SELECT COUNT(*) FROM affinity_reservations WHERE tenant_id = ? AND workload_id = ?)"
    };
}

/// The values [`container_is!`] compares, in its order.
fn expected_params(id: &ContainerId, e: &Expected) -> [Param; 7] {
    [
        id.to_string().into(),
        (e.revision as i64).into(),
        e.state.as_str().into(),
        e.tenant_id.as_ref().map(TenantId::as_str).into(),
        (e.claim_generation as i64).into(),
        e.updated_at.as_millis().into(),
        (&e.docker_id).into(),
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

/// An insert refused, as a conflict, when `conflicts` counts any row.
struct CheckedInsert {
    /// `SELECT` of an integer expression counting the rows the insert
    /// conflicts with.
    conflicts: &'static str,
    /// The values `conflicts` is bound with.
    check: Vec<Param>,
    /// The insert, `VALUES` bound with `params`.
    insert: &'static str,
    /// The insert as one statement: `SELECT <params> WHERE <the count> =
    /// 0`, bound with `params` then `check`.
    insert_unless: &'static str,
    params: Vec<Param>,
    refused: String,
}

fn push_checked_insert(statements: &mut Statements, backend: Backend, i: CheckedInsert) {
    match backend {
        // The check first, then a plain insert: SQLite gives an `INSERT
        // ... SELECT` a statement journal, a copy of every page the insert
        // touches (a claim's: its table and four indexes), made and dropped
        // for each one; without it P2's claims/s rose by a tenth.
        Backend::Sqlite => {
            statements.push(i.conflicts, i.check, Expect::AtMost(0, i.refused));
            statements.push(i.insert, i.params, Expect::Anything);
        }
        // In the statement itself: one round trip.
        Backend::Postgres => {
            let mut params = i.params;
            params.extend(i.check);
            statements.push(i.insert_unless, params, Expect::Changes(i.refused));
        }
    }
}

fn push_container(statements: &mut Statements, backend: Backend, change: &ContainerChange) {
    let changed = || format!("container {} changed since it was read", change.id());
    match change {
        ContainerChange::Insert(c) => {
            // A row comes back only with the history its claims wrote: a
            // stale adoption never revives a used container as unused.
            let mut params: Vec<Param> = vec![
                c.id.to_string().into(),
                c.workload_id.as_str().into(),
                c.workload_id.as_str().into(),
                c.node_id.as_str().into(),
                (&c.spec_hash).into(),
                c.created_at.as_millis().into(),
            ];
            params.extend(changing_params(c));
            push_checked_insert(
                statements,
                backend,
                CheckedInsert {
                    conflicts: concat!("SELECT ", container_conflicts!()),
                    check: vec![c.id.to_string().into(), (c.claim_generation as i64).into()],
                    insert: concat!(insert_container!(), " VALUES (", values_17!(), ")"),
                    insert_unless: concat!(
                        insert_container!(),
                        " SELECT ",
                        values_17!(),
                        " WHERE ",
                        container_conflicts!(),
                        " = 0"
                    ),
                    params,
                    refused: format!("container {} had newer claims", c.id),
                },
            );
        }
        ContainerChange::Update {
            expected,
            record: c,
        } => {
            let sets_docker_id = c.docker_id != expected.docker_id;
            let mut params: Vec<Param> = Vec::with_capacity(18);
            params.extend(
                changing_params(c)
                    .into_iter()
                    .skip(usize::from(!sets_docker_id)),
            );
            params.extend(expected_params(&c.id, expected));
            let sql = if sets_docker_id {
                concat!(
                    "UPDATE containers SET docker_id = ?, ",
                    container_sets!(),
                    " WHERE ",
                    container_is!()
                )
            } else {
                concat!(
                    "UPDATE containers SET ",
                    container_sets!(),
                    " WHERE ",
                    container_is!()
                )
            };
            statements.push(sql, params, Expect::Changes(changed()));
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

fn push_claim(statements: &mut Statements, backend: Backend, change: &ClaimChange) {
    match change {
        ClaimChange::Insert(c) => {
            // Two checks: a fencing token is never handed out twice, and a
            // tenant never holds a claim and a reservation of one workload
            // (reservation changes are applied before claim changes, so
            // this sees what the write leaves; the unique index
            // claims_one_per_tenant rules out two claims).
            let params: Vec<Param> = vec![
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
            ];
            push_checked_insert(
                statements,
                backend,
                CheckedInsert {
                    conflicts: concat!("SELECT ", claim_conflicts!()),
                    check: vec![
                        c.container_id.to_string().into(),
                        (c.generation as i64).into(),
                        c.tenant_id.as_str().into(),
                        c.workload_id.as_str().into(),
                    ],
                    insert: concat!(insert_claim!(), " VALUES (", values_12!(), ")"),
                    insert_unless: concat!(
                        insert_claim!(),
                        " SELECT ",
                        values_12!(),
                        " WHERE ",
                        claim_conflicts!(),
                        " = 0"
                    ),
                    params,
                    refused: format!(
                        "generation {} on container {} was used, or {}/{} holds a reservation",
                        c.generation, c.container_id, c.tenant_id, c.workload_id
                    ),
                },
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
pub(super) fn statements_of(
    write: &PoolWrite,
    backend: Backend,
    caused_by: Option<&Principal>,
) -> Result<(Statements, Vec<NewEvent>), StoreError> {
    let mut statements = Statements::default();
    for change in &write.reservations {
        push_reservation(&mut statements, change);
    }
    for change in &write.containers {
        push_container(&mut statements, backend, change);
    }
    for change in &write.claims {
        push_claim(&mut statements, backend, change);
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
