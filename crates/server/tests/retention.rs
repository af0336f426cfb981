//! Retention of what has ended (issue 18), against the real database of
//! the run (SQLite, or PostgreSQL in its pass): old ended claims, boosts,
//! finished sync status and lost empty nodes go, in batches; everything
//! that still means something stays, however old.

use futures::FutureExt as _;

use boilerhouse_core::Timestamp;
use boilerhouse_server::store::retention::BATCH;
use boilerhouse_server::store::{DatabaseLocation, Store, StoreOptions, sql};
use boilerhouse_testkit::database::TestDatabase;

const OLD: i64 = 1_000;
const CUTOFF: i64 = 1_000_000;
const RECENT: i64 = 2_000_000;

async fn open(db: &TestDatabase) -> Store {
    let location = DatabaseLocation::parse(db.value()).expect("a database location");
    Store::open(location, StoreOptions::default())
        .await
        .expect("open store")
}

/// Runs statements in one transaction.
async fn exec(store: &Store, statements: Vec<String>) {
    store
        .writer()
        .write(move |tx| {
            async move {
                for s in &statements {
                    sql::query(s).execute(tx.conn()).await?;
                }
                Ok(())
            }
            .boxed()
        })
        .await
        .expect("setup statements");
}

async fn ids(store: &Store, query: &str) -> Vec<String> {
    let query = query.to_owned();
    let mut ids: Vec<String> = store
        .writer()
        .write(move |tx| {
            async move {
                let rows: Vec<(String,)> = sql::query_as(&query).fetch_all(tx.conn()).await?;
                Ok(rows.into_iter().map(|(s,)| s).collect())
            }
            .boxed()
        })
        .await
        .expect("query");
    ids.sort();
    ids
}

async fn count(store: &Store, table: &str) -> i64 {
    let query = format!("SELECT COUNT(*) FROM {table}");
    store
        .writer()
        .write(move |tx| {
            async move {
                let (n,): (i64,) = sql::query_as(&query).fetch_one(tx.conn()).await?;
                Ok(n)
            }
            .boxed()
        })
        .await
        .expect("count")
}

fn container(id: &str, node: &str) -> String {
    format!(
        "INSERT INTO containers (container_id, pool_id, workload_id, node_id, state, spec_hash, created_at, updated_at) \
         VALUES ('{id}', 'w', 'w', '{node}', 'idle', 'h', {OLD}, {OLD})"
    )
}

fn claim(id: &str, tenant: &str, container: &str, generation: i64, ended: Option<i64>) -> String {
    let (status, released) = match ended {
        Some(at) => ("released", at.to_string()),
        None => ("active", "NULL".to_owned()),
    };
    format!(
        "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, \
         status, claimed_at, last_activity_at, released_at) \
         VALUES ('{id}', '{tenant}', 'w', '{container}', 'n', {generation}, 'pool', '{status}', {OLD}, {OLD}, {released})"
    )
}

fn boost(id: &str, status: &str, ended: Option<i64>) -> String {
    let ended = ended.map_or("NULL".to_owned(), |t| t.to_string());
    format!(
        "INSERT INTO boosts (boost_id, resource, amount, priority, source_node_id, status, requested_at, expires_at, ended_at) \
         VALUES ('{id}', 'cpu', 1.0, 'normal', 'n', '{status}', {OLD}, {OLD}, {ended})"
    )
}

fn sync_status(tenant: &str, state: &str, updated: i64) -> String {
    format!(
        "INSERT INTO sync_status (tenant_id, workload_id, sync_id, state, updated_at) \
         VALUES ('{tenant}', 'w', 'm', '{state}', {updated})"
    )
}

fn node(id: &str, status: &str, heartbeat: i64) -> String {
    format!(
        "INSERT INTO nodes (node_id, status, first_seen_at, last_heartbeat_at, updated_at) \
         VALUES ('{id}', '{status}', {OLD}, {heartbeat}, {heartbeat})"
    )
}

#[tokio::test]
async fn what_ended_long_ago_goes_and_what_still_means_something_stays() {
    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    exec(
        &store,
        vec![
            // k1 has a row: its older claim goes, its newest (the fencing
            // token the next claim must exceed) stays.
            container("k1", "n-lost-busy"),
            claim("c-k1-g1", "t1", "k1", 1, Some(OLD)),
            claim("c-k1-g2", "t2", "k1", 2, Some(OLD)),
            // k2 has no row: its claim goes once old, k3's is recent.
            claim("c-k2", "t1", "k2", 1, Some(OLD)),
            claim("c-k3", "t1", "k3", 1, Some(RECENT)),
            // An active claim stays, however old.
            container("k4", "n-ready"),
            claim("c-k4", "t-active", "k4", 1, None),
            boost("b-old", "expired", Some(OLD)),
            boost("b-recent", "released", Some(RECENT)),
            boost("b-active", "active", None),
            sync_status("t-gone", "ok", OLD),
            "INSERT INTO sync_errors (tenant_id, workload_id, sync_id, at, message) \
             VALUES ('t-gone', 'w', 'm', 1000, 'old failure')"
                .to_owned(),
            sync_status("t-error", "error", OLD),
            sync_status("t-active", "ok", OLD),
            sync_status("t-reserved", "ok", OLD),
            container("k5", "n-ready"),
            "INSERT INTO affinity_reservations (tenant_id, workload_id, container_id, node_id, reserved_at, expires_at) \
             VALUES ('t-reserved', 'w', 'k5', 'n-ready', 1000, 9000000)"
                .to_owned(),
            sync_status("t-owed", "ok", OLD),
            "INSERT INTO sync_release_pending (container_id, tenant_id, workload_id, since) \
             VALUES ('k9', 't-owed', 'w', 1000)"
                .to_owned(),
            sync_status("t-recent", "ok", RECENT),
            node("n-lost", "lost", OLD),
            node("n-lost-busy", "lost", OLD),
            node("n-ready", "ready", OLD),
        ],
    )
    .await;
    // More old claims than one batch, on containers long gone: every one
    // goes, over several transactions.
    let many = (BATCH as usize) + 500;
    for chunk in (0..many).collect::<Vec<_>>().chunks(1000) {
        exec(
            &store,
            chunk
                .iter()
                .map(|i| {
                    claim(
                        &format!("bulk-{i}"),
                        "t-bulk",
                        &format!("gone-{i}"),
                        1,
                        Some(OLD),
                    )
                })
                .collect(),
        )
        .await;
    }

    let trimmed = store
        .trim_history(Timestamp::from_millis(CUTOFF))
        .await
        .expect("trim");
    assert_eq!(trimmed.claims, many as u64 + 2, "{trimmed:?}");
    assert_eq!(
        ids(&store, "SELECT claim_id FROM claims").await,
        ["c-k1-g2", "c-k3", "c-k4"]
    );
    assert_eq!(trimmed.boosts, 1, "{trimmed:?}");
    assert_eq!(
        ids(&store, "SELECT boost_id FROM boosts").await,
        ["b-active", "b-recent"]
    );
    assert_eq!(
        ids(&store, "SELECT tenant_id FROM sync_status").await,
        ["t-active", "t-error", "t-owed", "t-recent", "t-reserved"]
    );
    assert_eq!(count(&store, "sync_errors").await, 0);
    assert_eq!(
        ids(&store, "SELECT node_id FROM nodes").await,
        ["n-lost-busy", "n-ready"]
    );
    // A second trim finds nothing more.
    let again = store
        .trim_history(Timestamp::from_millis(CUTOFF))
        .await
        .expect("trim again");
    assert_eq!(
        (again.claims, again.boosts, again.sync_status, again.nodes),
        (0, 0, 0, 0)
    );
}

/// The node list is read once and reused (placement reads it for every
/// container it creates), but never across a write: each change is in the
/// very next read, however soon.
#[tokio::test]
async fn the_node_list_shows_every_write_at_once() {
    use boilerhouse_core::NodeId;
    use boilerhouse_core::node::{NodeStatus, Resources};
    use boilerhouse_server::store::NodeHello;

    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let now = Timestamp::from_millis(RECENT);
    let hello = |id: &str| NodeHello {
        id: NodeId::new(id).unwrap(),
        boot_id: "b".into(),
        agent_version: "v".into(),
        engine_version: "e".into(),
        capacity: Resources {
            cpus: 4.0,
            memory_bytes: 1 << 30,
            gpus: 0,
        },
        labels: Default::default(),
        state_root: "/r".into(),
    };
    store.register_node(hello("a"), now).await.unwrap();
    let names = |nodes: Vec<boilerhouse_core::node::Node>| {
        nodes
            .into_iter()
            .map(|n| n.id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(store.list_nodes().await.unwrap()), ["a"]);
    // Read again at once: the copy. Then a write, and the next read has it.
    assert_eq!(names(store.list_nodes().await.unwrap()), ["a"]);
    store.register_node(hello("b"), now).await.unwrap();
    assert_eq!(names(store.list_nodes().await.unwrap()), ["a", "b"]);
    store
        .set_cordoned(NodeId::new("a").unwrap(), true, now)
        .await
        .unwrap();
    let a = store.list_nodes().await.unwrap().remove(0);
    assert!(a.cordoned, "{a:?}");
    store
        .set_node_status(
            NodeId::new("b").unwrap(),
            NodeStatus::Suspect,
            "test".into(),
            now,
        )
        .await
        .unwrap();
    let b = store.list_nodes().await.unwrap().remove(1);
    assert_eq!(b.status, NodeStatus::Suspect);
    // Writes this store did not make show within the copy's lifetime.
    exec(
        &store,
        vec!["UPDATE nodes SET cordoned = FALSE WHERE node_id = 'a'".to_owned()],
    )
    .await;
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if !store.list_nodes().await.unwrap()[0].cordoned {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "an outside write never showed");
}

fn event(at: i64) -> String {
    format!(
        "INSERT INTO events (at, kind, severity, message) VALUES ({at}, 'test.trim', 'info', 'm')"
    )
}

/// The activity log has no index on time: the trim takes the events
/// before the first young one, reading from the oldest, over several
/// transactions; an old stamp after a young one waits for it, and the
/// newest `keep_newest` stay whatever their age.
#[tokio::test]
async fn old_events_go_in_log_order_and_the_newest_stay() {
    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let old = (BATCH as usize) + 300;
    for chunk in (0..old).collect::<Vec<_>>().chunks(1000) {
        exec(&store, chunk.iter().map(|_| event(OLD)).collect()).await;
    }
    // A young event, then one stamped old after it (the clock stepped
    // back), then more young ones.
    let mut tail = vec![event(RECENT), event(OLD)];
    tail.extend((0..5).map(|_| event(RECENT)));
    exec(&store, tail).await;
    let first_young = store.last_event_id().await.unwrap() - 6;

    let trimmed = store
        .trim_events(Timestamp::from_millis(CUTOFF), 3)
        .await
        .expect("trim");
    assert_eq!(trimmed, old as u64);
    let left = ids(&store, "SELECT CAST(id AS TEXT) FROM events").await;
    let mut expected: Vec<String> = (first_young..first_young + 7)
        .map(|i| i.to_string())
        .collect();
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(
        store
            .trim_events(Timestamp::from_millis(CUTOFF), 3)
            .await
            .expect("trim again"),
        0,
        "the old stamp after a young event waits for it"
    );

    // Everything old now: all but the newest three go.
    let trimmed = store
        .trim_events(Timestamp::from_millis(RECENT + 1), 3)
        .await
        .expect("trim all");
    assert_eq!(trimmed, 4);
    let left = ids(&store, "SELECT CAST(id AS TEXT) FROM events").await;
    let mut expected: Vec<String> = (first_young + 4..first_young + 7)
        .map(|i| i.to_string())
        .collect();
    expected.sort();
    assert_eq!(left, expected);
    store.close().await;
}

/// A stamp far in the future (the server's clock was ahead, then set
/// right) does not hold back the trim of every event after it.
#[tokio::test]
async fn an_event_stamped_in_the_future_does_not_stall_the_trim() {
    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let next_century = 4_102_444_800_000; // 2100-01-01
    let mut rows: Vec<String> = (0..5).map(|_| event(OLD)).collect();
    rows.push(event(next_century));
    rows.extend((0..3).map(|_| event(OLD)));
    rows.extend((0..2).map(|_| event(RECENT)));
    exec(&store, rows).await;
    let trimmed = store
        .trim_events(Timestamp::from_millis(CUTOFF), 1)
        .await
        .expect("trim");
    assert_eq!(trimmed, 9, "the old ones and the one from the future");
    assert_eq!(count(&store, "events").await, 2);
}
