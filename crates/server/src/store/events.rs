//! The activity log.

use std::collections::BTreeMap;

use futures::FutureExt as _;

use boilerhouse_core::Timestamp;
use boilerhouse_core::auth::Principal;
use boilerhouse_core::event::{Event, EventFilter, EventSubject, NewEvent};

use super::sql;
use super::statements::{Expect, Statements};
use super::{Store, StoreError, WriteTx};

/// A listing of events.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Which events.
    pub filter: EventFilter,
    /// Only events with a larger id.
    pub after_id: u64,
    /// Only events at or after this time.
    pub since: Option<Timestamp>,
    /// At most this many, oldest first.
    pub limit: u32,
    /// Take the newest `limit` matches instead of the oldest.
    pub latest: bool,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: i64,
    at: i64,
    kind: String,
    severity: String,
    message: String,
    node_id: Option<String>,
    workload_id: Option<String>,
    container_id: Option<String>,
    tenant_id: Option<String>,
    boost_id: Option<String>,
    attributes_json: String,
}

impl TryFrom<EventRow> for Event {
    type Error = StoreError;
    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        let attributes: BTreeMap<String, String> = serde_json::from_str(&row.attributes_json)
            .map_err(|e| StoreError::Corrupt(format!("event {} attributes: {e}", row.id)))?;
        Ok(Event {
            id: row.id as u64,
            event: NewEvent {
                at: Timestamp::from_millis(row.at),
                kind: row.kind,
                severity: row
                    .severity
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", row.id)))?,
                message: row.message,
                subject: EventSubject {
                    node_id: row.node_id,
                    workload_id: row.workload_id,
                    container_id: row.container_id,
                    tenant_id: row.tenant_id,
                    boost_id: row.boost_id,
                },
                attributes,
            },
        })
    }
}

/// How far ahead of the server's clock an event's stamp may be and still
/// count as young for the trim.
const FUTURE_STAMP_SLACK_MS: i64 = 60_000;

/// The attribute naming who caused an event, on every event an RPC caused.
pub const PRINCIPAL_ATTRIBUTE: &str = "principal";

/// Inserts an event inside the caller's transaction. It is published to
/// watchers only once that transaction commits.
pub async fn insert_event(tx: &mut WriteTx, event: NewEvent) -> Result<Event, StoreError> {
    let mut statements = Statements::default();
    let event = push_event(&mut statements, tx.caused_by.as_ref(), event)?;
    let ids = statements.run(tx).await?;
    recorded(tx, ids, vec![event])?;
    Ok(tx.new_events.last().cloned().expect("just recorded"))
}

/// Adds the insert of `event` to a write's statements, naming `caused_by`
/// as its principal; returns the event as it will be stored. Its id comes
/// back from [`Statements::run`] and is given to it by [`recorded`].
pub(super) fn push_event(
    statements: &mut Statements,
    caused_by: Option<&Principal>,
    mut event: NewEvent,
) -> Result<NewEvent, StoreError> {
    if let Some(caller) = caused_by {
        event
            .attributes
            .entry(PRINCIPAL_ATTRIBUTE.to_owned())
            .or_insert_with(|| caller.to_string());
    }
    let attributes = serde_json::to_string(&event.attributes)
        .map_err(|err| StoreError::Internal(err.to_string()))?;
    statements.push(
        "INSERT INTO events (at, kind, severity, message, node_id, workload_id, container_id, \
         tenant_id, boost_id, attributes_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        vec![
            event.at.as_millis().into(),
            (&event.kind).into(),
            event.severity.as_str().into(),
            (&event.message).into(),
            (&event.subject.node_id).into(),
            (&event.subject.workload_id).into(),
            (&event.subject.container_id).into(),
            (&event.subject.tenant_id).into(),
            (&event.subject.boost_id).into(),
            attributes.into(),
        ],
        Expect::Returns,
    );
    Ok(event)
}

/// Gives the events a write inserted the ids their statements returned
/// (in order; the write's only returning statements are its events) and
/// keeps them to be published once the transaction commits.
pub(super) fn recorded(
    tx: &mut WriteTx,
    ids: Vec<i64>,
    events: Vec<NewEvent>,
) -> Result<(), StoreError> {
    if ids.len() != events.len() {
        return Err(StoreError::Internal(format!(
            "{} events inserted, {} ids returned",
            events.len(),
            ids.len()
        )));
    }
    tx.new_events
        .extend(ids.into_iter().zip(events).map(|(id, event)| Event {
            id: id as u64,
            event,
        }));
    Ok(())
}

impl Store {
    /// Records one event on its own.
    pub async fn append_event(&self, event: NewEvent) -> Result<Event, StoreError> {
        self.writer
            .write(move |tx| insert_event(tx, event).boxed())
            .await
    }

    /// Events matching `query`, oldest first.
    pub async fn list_events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        /// A value bound in the order its `?` appears.
        enum Bind {
            Int(i64),
            Text(String),
        }
        let mut sql = String::from(
            "SELECT id, at, kind, severity, message, node_id, workload_id, container_id, \
             tenant_id, boost_id, attributes_json FROM events WHERE id > ?",
        );
        let mut binds = vec![Bind::Int(query.after_id as i64)];
        if let Some(since) = query.since {
            sql.push_str(" AND at >= ?");
            binds.push(Bind::Int(since.as_millis()));
        }
        let f = &query.filter;
        if !f.kinds.is_empty() {
            let mut alternatives = Vec::with_capacity(f.kinds.len());
            for kind in &f.kinds {
                if kind.ends_with('.') {
                    // substr() rather than LIKE: kinds may contain '_' or
                    // '%'. The cast: PostgreSQL's substr takes an integer.
                    alternatives.push("substr(kind, 1, CAST(? AS INTEGER)) = ?");
                    binds.push(Bind::Int(kind.len() as i64));
                } else {
                    alternatives.push("kind = ?");
                }
                binds.push(Bind::Text(kind.clone()));
            }
            sql.push_str(&format!(" AND ({})", alternatives.join(" OR ")));
        }
        let subject = [
            ("node_id", &f.subject.node_id),
            ("workload_id", &f.subject.workload_id),
            ("container_id", &f.subject.container_id),
            ("tenant_id", &f.subject.tenant_id),
            ("boost_id", &f.subject.boost_id),
        ];
        for (column, value) in subject {
            if let Some(value) = value {
                sql.push_str(&format!(" AND {column} = ?"));
                binds.push(Bind::Text(value.clone()));
            }
        }
        if let Some(min) = f.min_severity {
            let allowed: &[&str] = match min {
                boilerhouse_core::event::Severity::Info => &["info", "warning", "error"],
                boilerhouse_core::event::Severity::Warning => &["warning", "error"],
                boilerhouse_core::event::Severity::Error => &["error"],
            };
            sql.push_str(&format!(
                " AND severity IN ({})",
                vec!["?"; allowed.len()].join(", ")
            ));
            binds.extend(allowed.iter().map(|s| Bind::Text((*s).to_owned())));
        }
        sql.push_str(if query.latest {
            " ORDER BY id DESC LIMIT ?"
        } else {
            " ORDER BY id ASC LIMIT ?"
        });
        binds.push(Bind::Int(i64::from(query.limit.max(1))));
        let mut statement = sql::query_as::<EventRow>(&sql);
        for bind in binds {
            statement = match bind {
                Bind::Int(v) => statement.bind(v),
                Bind::Text(v) => statement.bind(v),
            };
        }
        let mut rows: Vec<EventRow> = statement.fetch_all(&self.reads).await?;
        if query.latest {
            rows.reverse();
        }
        rows.into_iter().map(Event::try_from).collect()
    }

    /// The newest event's id, or 0.
    pub async fn last_event_id(&self) -> Result<u64, StoreError> {
        let (id,): (Option<i64>,) = sql::query_as("SELECT max(id) FROM events")
            .fetch_one(&self.reads)
            .await?;
        Ok(id.unwrap_or(0) as u64)
    }

    /// Deletes events older than `before`, keeping at least `keep_newest`.
    /// Returns how many went.
    pub async fn trim_events(
        &self,
        before: Timestamp,
        keep_newest: u64,
    ) -> Result<u64, StoreError> {
        // The log has no index on time (one more page for every claim's
        // commit to write): it is in id order, which is time order up to
        // the clock, so the old events are those before the first young
        // one, found by reading from the oldest: only what is about to go.
        // An event stamped earlier than one before it waits for that one.
        // A stamp in the future (the server's clock was ahead, then set
        // right) is not young: it would hold back every event after it
        // for as long as the clock was ahead. With none young, the old
        // are those up to the newest now, not every one: events
        // committed while the trim runs are young.
        let latest_believable = crate::clock::now().as_millis() + FUTURE_STAMP_SLACK_MS;
        let (first_young,): (i64,) = sql::query_as(
            "SELECT coalesce((SELECT id FROM events WHERE at >= ? AND at <= ? ORDER BY id LIMIT 1), \
             (SELECT coalesce(max(id), 0) FROM events) + 1)",
        )
        .bind(before.as_millis())
        .bind(latest_believable)
        .fetch_one(&self.reads)
        .await?;
        // In batches (see `retention`): an hour of a busy day's events is
        // millions of rows, too many for one transaction in the writer.
        let statement = format!(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id < ? \
             AND id <= (SELECT coalesce(max(id), 0) FROM events) - {keep_newest} \
             ORDER BY id LIMIT ?)"
        );
        self.delete_in_batches(&statement, first_young).await
    }
}
