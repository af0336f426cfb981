//! The single writer against real databases (SQLite files, or a schema
//! of their own in PostgreSQL when the run is on it): group commit, each
//! operation rolled back alone, callers' writes ahead of the server's own,
//! and a writer stalled inside a transaction under a fence.

use std::time::Duration;

use boilerhouse_core::Timestamp;
use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_testkit::database::TestDatabase;
use futures::FutureExt as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use boilerhouse_server::store::{
    DatabaseLocation, IdempotencyLookup, IdempotentRecord, Store, StoreError, StoreOptions,
};

fn event(n: u64, kind: EventKind) -> NewEvent {
    NewEvent::new(
        Timestamp::from_millis(1_000 + n as i64),
        kind,
        format!("event {n}"),
    )
}

/// Opens the test's database: SQLite, or PostgreSQL when the run is on it.
async fn open(db: &TestDatabase) -> Store {
    let location = DatabaseLocation::parse(db.value()).expect("a database location");
    Store::open(location, StoreOptions::default())
        .await
        .expect("open store")
}

/// Queues a write that holds the writer and returns once it runs (its
/// batch is formed), with the sender that lets it finish and its task.
async fn hold_writer(store: &Store) -> (oneshot::Sender<()>, JoinHandle<Result<(), StoreError>>) {
    let (release, held) = oneshot::channel::<()>();
    let (running, started) = oneshot::channel::<()>();
    let store = store.clone();
    let holder = tokio::spawn(async move {
        store
            .writer()
            .write(move |_tx| {
                async move {
                    let _ = running.send(());
                    let _ = held.await;
                    Ok(())
                }
                .boxed()
            })
            .await
    });
    started.await.expect("the holding write runs");
    (release, holder)
}

#[tokio::test]
async fn concurrent_writes_share_commits() {
    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.append_event(event(n, EventKind::NodeJoined)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = store.writer_stats();
    assert_eq!(stats.operations, 200);
    assert!(
        stats.commits < stats.operations,
        "200 concurrent writes should not need 200 commits: {stats:?}"
    );
}

/// Queues `routine` writes with no caller, then `urgent` ones as an RPC's
/// caller, all behind a write that holds the writer; returns the order
/// they ran in and how many commits they took.
async fn queued_behind_a_held_write(
    store: &Store,
    routine: usize,
    urgent: usize,
) -> (Vec<String>, u64) {
    use std::sync::{Arc, Mutex};

    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let write = |name: String| {
        let store = store.clone();
        let order = order.clone();
        async move {
            store
                .writer()
                .write(move |_tx| {
                    async move {
                        order.lock().unwrap().push(name);
                        Ok(())
                    }
                    .boxed()
                })
                .await
        }
    };
    // The holder's batch is formed (it runs) before the others queue.
    let (queued, holder) = hold_writer(store).await;
    let mut writes = Vec::new();
    for n in 0..routine {
        writes.push(tokio::spawn(write(format!("routine {n}"))));
        // Queued in this order.
        tokio::task::yield_now().await;
    }
    for n in 0..urgent {
        let caller = boilerhouse_core::auth::Principal::Insecure;
        writes.push(tokio::spawn(boilerhouse_server::auth::serving(
            caller,
            write(format!("urgent {n}")),
        )));
        tokio::task::yield_now().await;
    }
    let commits_before = store.writer_stats().commits;
    queued.send(()).unwrap();
    holder.await.unwrap().unwrap();
    for w in writes {
        w.await.unwrap().unwrap();
    }
    let order = order.lock().unwrap().clone();
    (order, store.writer_stats().commits - commits_before)
}

/// A write an RPC's caller waits on goes ahead of the server's own that
/// were queued before it, and a batch carries at most
/// `ROUTINE_PER_BATCH` routine writes: what a claim may find ahead of it.
#[tokio::test]
async fn a_callers_write_goes_ahead_of_routine_ones_and_batches_hold_few_routine_writes() {
    use boilerhouse_server::store::writer::ROUTINE_PER_BATCH;

    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let routine = 2 * ROUTINE_PER_BATCH + 3;
    let (order, commits) = queued_behind_a_held_write(&store, routine, 1).await;
    let mut expected = vec!["urgent 0".to_owned()];
    expected.extend((0..routine).map(|n| format!("routine {n}")));
    assert_eq!(
        order, expected,
        "the caller's write first, the rest in order"
    );
    // The held batch, then one per ROUTINE_PER_BATCH routine writes, the
    // first of them with the urgent write.
    assert_eq!(commits, 1 + routine.div_ceil(ROUTINE_PER_BATCH) as u64);
}

/// With one write per commit, callers' writes and the server's own take
/// turns: neither queue starves the other.
#[tokio::test]
async fn with_one_write_per_commit_callers_and_routine_writes_take_turns() {
    let db = TestDatabase::fresh().await.unwrap();
    let location = DatabaseLocation::parse(db.value()).expect("a database location");
    let options = StoreOptions {
        max_batch: 1,
        ..StoreOptions::default()
    };
    let store = Store::open(location, options).await.expect("open store");
    let (order, commits) = queued_behind_a_held_write(&store, 2, 3).await;
    assert_eq!(
        order,
        ["urgent 0", "routine 0", "urgent 1", "routine 1", "urgent 2"],
    );
    assert_eq!(commits, 1 + 5);
}

/// Within one batch, an operation that wrote and then failed is rolled
/// back alone: what the operation before it wrote (whose savepoint the
/// failing one released when it entered its own) and what the one after
/// it writes both commit.

#[tokio::test]
async fn a_failing_operation_undoes_only_its_own_writes_in_a_batch() {
    use boilerhouse_server::store::sql;

    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let insert = |message: &'static str, fail: bool| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .writer()
                .write(move |tx| {
                    async move {
                        sql::query(
                            "INSERT INTO events (at, kind, severity, message) VALUES (1, 'test', 'info', ?)",
                        )
                        .bind(message)
                        .execute(tx.conn())
                        .await?;
                        if fail {
                            return Err(StoreError::Conflict(format!("{message} refused")));
                        }
                        Ok(())
                    }
                    .boxed()
                })
                .await
        })
    };
    // A write that holds the writer until the three below are queued, so
    // that they share the next batch.
    let (queued, holder) = hold_writer(&store).await;
    let before = insert("before", false);
    let failing = insert("failing", true);
    let after = insert("after", false);
    tokio::task::yield_now().await;
    queued.send(()).unwrap();
    holder.await.unwrap().unwrap();
    before.await.unwrap().expect("the write before commits");
    assert!(matches!(
        failing.await.unwrap(),
        Err(StoreError::Conflict(_))
    ));
    after.await.unwrap().expect("the write after commits");
    let mut inspector =
        boilerhouse_server::store::open_inspector(&DatabaseLocation::parse(db.value()).unwrap())
            .await
            .unwrap();
    let rows: Vec<(String,)> =
        sql::query_as("SELECT message FROM events WHERE kind = 'test' ORDER BY message")
            .fetch_all(&mut inspector)
            .await
            .unwrap();
    let messages: Vec<&str> = rows.iter().map(|(m,)| m.as_str()).collect();
    assert_eq!(messages, ["after", "before"]);
}

#[tokio::test]
async fn one_failing_write_does_not_fail_its_batch() {
    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let record = |hash: &str| IdempotentRecord {
        method: "m".into(),
        request_id: "r1".into(),
        request_hash: hash.into(),
        response: b"first".to_vec(),
        created_at: Timestamp::from_millis(1),
    };
    store.record_idempotent(record("h")).await.unwrap();
    // Queue a duplicate key (fails) together with good writes.
    let dup = {
        let store = store.clone();
        tokio::spawn(async move { store.record_idempotent(record("h")).await })
    };
    let goods: Vec<_> = (0..20)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.append_event(event(n, EventKind::NodeJoined)).await })
        })
        .collect();
    assert!(matches!(dup.await.unwrap(), Err(StoreError::Conflict(_))));
    for g in goods {
        g.await.unwrap().expect("good writes commit");
    }
    assert_eq!(
        store.lookup_idempotent("m", "r1", "h").await.unwrap(),
        IdempotencyLookup::Hit(b"first".to_vec())
    );
    assert_eq!(
        store.lookup_idempotent("m", "r1", "other").await.unwrap(),
        IdempotencyLookup::Mismatch
    );
    assert_eq!(
        store.lookup_idempotent("m", "r2", "h").await.unwrap(),
        IdempotencyLookup::Miss
    );
}

/// A leader's writer that stalls inside a write transaction (SIGSTOP, a
/// stall, a cut to the database) holds the fence's share lock on the lease
/// row. PostgreSQL ends that session once it has sat idle for the lease,
/// so a standby takes the lease once it has run out instead of waiting on
/// the lock for as long as the stall lasts; and the woken writer commits
/// nothing: its transaction is gone, and its next one is fenced.
#[tokio::test]
async fn a_writer_stalled_inside_a_transaction_does_not_keep_the_lease_from_a_standby() {
    if std::env::var("BOILERHOUSE_POSTGRES_URL").is_err() {
        assert!(
            std::env::var("BOILERHOUSE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "BOILERHOUSE_REQUIRE_POSTGRES=1 but BOILERHOUSE_POSTGRES_URL is not set"
        );
        eprintln!("skipped: no PostgreSQL (set BOILERHOUSE_POSTGRES_URL; dev/postgres starts one)");
        return;
    }
    use boilerhouse_server::store::{Fence, sql};

    let db = TestDatabase::postgres_schema().await.unwrap();
    let location = DatabaseLocation::parse(db.value()).unwrap();
    let lease = Duration::from_millis(500);
    let lost = tokio_util::sync::CancellationToken::new();
    let store = Store::open(
        location.clone(),
        StoreOptions {
            fence: Some(Fence {
                epoch: 1,
                lease,
                lost: lost.clone(),
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // This store leads at epoch 1, for one lease.
    let mut standby = boilerhouse_server::store::open_inspector(&location)
        .await
        .unwrap();
    sql::query(
        "UPDATE leadership SET epoch = 1, holder = 'old', \
         expires_at = now() + CAST(? AS DOUBLE PRECISION) * INTERVAL '1 millisecond' WHERE id = 1",
    )
    .bind(lease.as_millis() as f64)
    .execute(&mut standby)
    .await
    .unwrap();

    // A write that passed the fence, then stalls until told to go on.
    let (go_on, write) = hold_writer(&store).await;

    // A standby takes the lease once it has run out, while the writer
    // still stalls.
    let take = "UPDATE leadership SET epoch = epoch + 1, holder = 'new' \
         WHERE id = 1 AND expires_at < now() RETURNING epoch";
    // Polled until the lease has run out; any one attempt that waits
    // on the lock for long means the stalled writer still holds it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let epoch = loop {
        let attempt = sql::query_as::<(i64,)>(take).fetch_optional(&mut standby);
        let taken = tokio::time::timeout(Duration::from_secs(30), attempt)
            .await
            .expect("the standby waited on the stalled writer's lock")
            .unwrap();
        if let Some(epoch) = taken {
            break epoch;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(epoch, (2,));

    // Woken, the writer commits nothing.
    go_on.send(()).unwrap();
    let stalled_write = write.await.unwrap();
    assert!(
        matches!(stalled_write, Err(StoreError::Unavailable(_))),
        "{stalled_write:?}"
    );
    let next = store.append_event(event(1, EventKind::ServerStarted)).await;
    assert!(matches!(next, Err(StoreError::NotLeader(_))), "{next:?}");
    assert!(lost.is_cancelled());
    let (events,): (i64,) = sql::query_as("SELECT COUNT(*) FROM events")
        .fetch_one(&mut standby)
        .await
        .unwrap();
    assert_eq!(events, 0);
}

/// A container row as the fill writes it.
fn container(n: u128) -> boilerhouse_core::pool::ContainerRecord {
    use boilerhouse_core::pool::{ContainerRecord, ContainerState};
    ContainerRecord {
        id: boilerhouse_core::ContainerId::from_uuid(uuid::Uuid::from_u128(n)),
        workload_id: "batch".parse().unwrap(),
        node_id: boilerhouse_core::NodeId::new("node-a").unwrap(),
        docker_id: Some(format!("docker-{n}")),
        state: ContainerState::Idle,
        spec_hash: "h".into(),
        tenant_id: None,
        last_tenant_id: None,
        claim_generation: 0,
        revision: 1,
        limits: Default::default(),
        state_path: String::new(),
        comm_path: String::new(),
        created_at: Timestamp::from_millis(1),
        updated_at: Timestamp::from_millis(1),
    }
}

/// Pool writes send their statements together (on SQLite, savepoint
/// included, in one round trip) and check what came back afterwards: a
/// write whose first statement changed a row and whose second found
/// nothing to change is undone whole, and the writes around it in the
/// same batch commit with the events they recorded, under the ids the
/// database gave them.
#[tokio::test]
async fn a_pool_write_refused_after_its_first_statement_is_undone_whole_in_its_batch() {
    use boilerhouse_core::pool::ContainerState;
    use boilerhouse_core::pool::write::{ClaimChange, ContainerChange, Expected, PoolWrite};
    use boilerhouse_server::store::sql;

    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let insert = |n: u128| PoolWrite {
        containers: vec![ContainerChange::Insert(container(n))],
        events: vec![event(n as u64, EventKind::ContainerDraining)],
        ..PoolWrite::default()
    };
    store
        .commit_pool_write(insert(1), |_| {})
        .await
        .expect("the first container is written");
    let mut events = store.subscribe_events();

    let commit = |write: PoolWrite| {
        let store = store.clone();
        tokio::spawn(async move { store.commit_pool_write(write, |_| {}).await })
    };
    let (queued, holder) = hold_writer(&store).await;
    let before = commit(insert(2));
    // Changes container 1 (its expected state is right), then ends a claim
    // that does not exist: nothing of it may stay.
    let old = container(1);
    let mut drained = old.clone();
    drained.state = ContainerState::Draining;
    drained.revision = 2;
    let refused = commit(PoolWrite {
        containers: vec![ContainerChange::Update {
            expected: Expected::of(&old),
            record: drained,
        }],
        claims: vec![ClaimChange::End(boilerhouse_core::pool::ClaimRecord {
            claim_id: "no-such-claim".into(),
            tenant_id: "t".parse().unwrap(),
            workload_id: "batch".parse().unwrap(),
            container_id: old.id,
            node_id: old.node_id.clone(),
            generation: 1,
            source: boilerhouse_core::pool::ClaimSource::Pool,
            status: boilerhouse_core::pool::ClaimStatus::Released,
            claimed_at: Timestamp::from_millis(1),
            last_activity_at: Timestamp::from_millis(1),
            released_at: Some(Timestamp::from_millis(2)),
            restored: false,
        })],
        events: vec![event(99, EventKind::ContainerDraining)],
        ..PoolWrite::default()
    });
    let after = commit(insert(3));
    tokio::task::yield_now().await;
    queued.send(()).unwrap();
    holder.await.unwrap().unwrap();
    before.await.unwrap().expect("the write before commits");
    let refusal = refused.await.unwrap();
    assert!(
        matches!(&refusal, Err(StoreError::Conflict(m)) if m.contains("no-such-claim")),
        "{refusal:?}"
    );
    after.await.unwrap().expect("the write after commits");

    let mut inspector =
        boilerhouse_server::store::open_inspector(&DatabaseLocation::parse(db.value()).unwrap())
            .await
            .unwrap();
    let rows: Vec<(String, String, i64)> =
        sql::query_as("SELECT docker_id, state, revision FROM containers ORDER BY docker_id")
            .fetch_all(&mut inspector)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("docker-1".to_owned(), "idle".to_owned(), 1),
            ("docker-2".to_owned(), "idle".to_owned(), 1),
            ("docker-3".to_owned(), "idle".to_owned(), 1),
        ]
    );
    let stored: Vec<(i64, String)> =
        sql::query_as("SELECT id, message FROM events WHERE message <> 'event 1' ORDER BY id")
            .fetch_all(&mut inspector)
            .await
            .unwrap();
    let published: Vec<(i64, String)> =
        [events.recv().await.unwrap(), events.recv().await.unwrap()]
            .into_iter()
            .map(|e| (e.id as i64, e.event.message))
            .collect();
    assert_eq!(published, stored, "published events carry their rows' ids");
    assert_eq!(
        stored.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>(),
        ["event 2", "event 3"]
    );
    assert!(
        events.try_recv().is_err(),
        "the refused write's event is not published"
    );
}

/// Another process holding SQLite's write lock (an operator's sqlite3
/// shell in a transaction) delays a pool write, whose first statements
/// begin the transaction, and loses nothing: the write commits once the
/// lock is let go, well inside the connection's busy timeout.
#[tokio::test]
async fn a_pool_write_waits_out_another_processs_write_lock() {
    use boilerhouse_core::pool::write::{ContainerChange, PoolWrite};
    use boilerhouse_server::store::sql;
    use sqlx::Connection as _;

    let db = TestDatabase::fresh().await.unwrap();
    let location = DatabaseLocation::parse(db.value()).unwrap();
    let Some(path) = location.sqlite_path().map(|p| p.to_owned()) else {
        return; // PostgreSQL has no file lock to hold.
    };
    let store = open(&db).await;
    let mut shell = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut shell)
        .await
        .unwrap();
    let mut write = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .commit_pool_write(
                    PoolWrite {
                        containers: vec![ContainerChange::Insert(container(7))],
                        ..PoolWrite::default()
                    },
                    |_| {},
                )
                .await
        })
    };
    // While the lock is held the write neither commits nor fails: it is
    // still pending when this bound runs out.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut write)
            .await
            .is_err(),
        "the write waits for the lock"
    );
    sqlx::raw_sql("ROLLBACK").execute(&mut shell).await.unwrap();
    write
        .await
        .unwrap()
        .expect("the write commits once the lock is free");
    let mut inspector = boilerhouse_server::store::open_inspector(&location)
        .await
        .unwrap();
    let (rows,): (i64,) = sql::query_as("SELECT COUNT(*) FROM containers")
        .fetch_one(&mut inspector)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}
