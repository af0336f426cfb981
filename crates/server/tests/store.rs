//! Store tests against real databases: SQLite files in temp directories,
//! or, when the run is on PostgreSQL (`BOILERHOUSE_TEST_DATABASE=postgres`),
//! a schema of their own in a real PostgreSQL server. Tests of SQLite's
//! own file (WAL, checkpoints) use a SQLite file in either run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use boilerhouse_core::Timestamp;
use boilerhouse_core::event::{EventFilter, EventKind, EventSubject, NewEvent, Severity};
use boilerhouse_core::workload::parse_workload;
use boilerhouse_testkit::database::TestDatabase;

use boilerhouse_server::store::{
    DatabaseLocation, EventQuery, Store, StoreOptions, WorkloadChange,
};

fn event(n: u64, kind: EventKind, workload: Option<&str>) -> NewEvent {
    NewEvent::new(
        Timestamp::from_millis(1_000 + n as i64),
        kind,
        format!("event {n}"),
    )
    .with_subject(EventSubject {
        workload_id: workload.map(str::to_owned),
        ..Default::default()
    })
}

/// Opens the test's database: SQLite, or PostgreSQL when the run is on it
/// (see `boilerhouse_testkit::database`).
async fn open(db: &TestDatabase) -> Store {
    let location = DatabaseLocation::parse(db.value()).expect("a database location");
    Store::open(location, StoreOptions::default())
        .await
        .expect("open store")
}

#[tokio::test]
async fn events_are_listed_filtered_and_resumed_in_order() {
    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        let kind = if n % 2 == 0 {
            EventKind::WorkloadLoaded
        } else {
            EventKind::NodeLost
        };
        let workload = (n % 2 == 0).then_some("demo");
        ids.push(
            store
                .append_event(event(n, kind, workload))
                .await
                .unwrap()
                .id,
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    let all = store
        .list_events(&EventQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 10);
    assert_eq!(all[3].event.message, "event 3");

    let after = store
        .list_events(&EventQuery {
            after_id: ids[6],
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(after.iter().map(|e| e.id).collect::<Vec<_>>(), ids[7..]);

    let nodes = store
        .list_events(&EventQuery {
            filter: EventFilter {
                kinds: vec!["node.".into()],
                ..Default::default()
            },
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(nodes.len(), 5);
    assert!(nodes.iter().all(|e| e.event.kind == "node.lost"));

    let errors = store
        .list_events(&EventQuery {
            filter: EventFilter {
                min_severity: Some(Severity::Error),
                ..Default::default()
            },
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        errors.len(),
        5,
        "node.lost is an error, workload.loaded is not"
    );

    let demo = store
        .list_events(&EventQuery {
            filter: EventFilter {
                subject: EventSubject {
                    workload_id: Some("demo".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(demo.len(), 2, "limit is honoured");
    assert_eq!(store.last_event_id().await.unwrap(), ids[9]);
}

#[tokio::test]
async fn committed_events_reach_subscribers_after_commit() {
    let db = TestDatabase::fresh().await.unwrap();
    let store = open(&db).await;
    let mut feed = store.subscribe_events();
    let recorded = store
        .append_event(event(1, EventKind::ServerStarted, None))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), feed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, recorded);
}

#[tokio::test]
async fn workloads_survive_reopening_and_report_what_changed() {
    let db = TestDatabase::fresh().await.unwrap();
    let yaml = "id: demo\nimage: busybox\npool: {min_size: 2}\n";
    let spec = parse_workload("demo.yaml", yaml).unwrap();
    {
        let store = open(&db).await;
        let now = Timestamp::from_millis(10);
        let (_, change) = store
            .put_workload(spec.clone(), yaml.into(), "demo.yaml".into(), now, false)
            .await
            .unwrap();
        assert_eq!(change, WorkloadChange::Created);
        let (_, change) = store
            .put_workload(spec.clone(), yaml.into(), "demo.yaml".into(), now, false)
            .await
            .unwrap();
        assert_eq!(change, WorkloadChange::Unchanged);
        store.close().await;
    }
    let store = open(&db).await;
    let loaded = store.list_workloads().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].spec, spec);
    assert_eq!(loaded[0].spec_hash, spec.spec_hash());

    let yaml2 = "id: demo\nimage: busybox\npool: {min_size: 3}\n";
    let spec2 = parse_workload("demo.yaml", yaml2).unwrap();
    let (record, change) = store
        .put_workload(
            spec2,
            yaml2.into(),
            "demo.yaml".into(),
            Timestamp::from_millis(20),
            false,
        )
        .await
        .unwrap();
    assert_eq!(change, WorkloadChange::Updated);
    assert_eq!(record.created_at, Timestamp::from_millis(10));
    assert_eq!(record.spec.pool.min_size, 3);

    let removed = store
        .remove_workload(
            spec.id.clone(),
            "file deleted".into(),
            Timestamp::from_millis(30),
        )
        .await
        .unwrap();
    assert!(removed.is_some());
    assert!(store.get_workload(&spec.id).await.unwrap().is_none());
    let kinds: Vec<String> = store
        .list_events(&EventQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event.kind)
        .collect();
    assert_eq!(
        kinds,
        ["workload.loaded", "workload.updated", "workload.removed"]
    );
}

/// A SQLite store in `dir` with one event written, and a connection of
/// its own to the file.
async fn sqlite_in(dir: &std::path::Path) -> (Store, sqlx::SqliteConnection) {
    let store = open(&TestDatabase::sqlite(&dir.join("bh.db"))).await;
    store
        .append_event(event(1, EventKind::ServerStarted, None))
        .await
        .unwrap();
    let raw = boilerhouse_server::store::open_raw(store.path())
        .await
        .unwrap();
    (store, raw)
}

#[tokio::test]
async fn the_database_is_in_wal_mode_with_full_sync() {
    // SQLite's own file format, whatever the run's backend.
    let dir = tempfile::tempdir().unwrap();
    let (store, mut raw) = sqlite_in(dir.path()).await;
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
}

#[tokio::test]
async fn kill9_in_the_middle_of_writes_loses_no_acknowledged_write() {
    let db = TestDatabase::fresh().await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_boilerhouse-store-load"))
        .arg(db.value())
        .arg("32")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut killer = Some(child);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            if parts.next() != Some("ack") {
                continue;
            }
            let id: u64 = parts.next().unwrap().parse().unwrap();
            let marker = parts.next().unwrap().to_owned();
            acked.push((id, marker));
            if acked.len() == 2_000 {
                // SIGKILL: no destructor, no flush, no checkpoint.
                let mut c = killer.take().unwrap();
                c.kill().unwrap();
                killer = Some(c);
            }
        }
        let mut child = killer.unwrap();
        let status = child.wait().unwrap();
        (acked, status)
    });
    let (acked, status) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(
        !status.success(),
        "the writer was killed, not finished: {status:?}"
    );
    assert!(
        acked.len() >= 2_000,
        "the child acknowledged writes before the kill"
    );

    let store = open(&db).await;
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    let stored = store
        .list_events(&EventQuery {
            limit: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap();
    let by_id: std::collections::HashMap<u64, String> = stored
        .into_iter()
        .map(|e| (e.id, e.event.message))
        .collect();
    for (id, marker) in &acked {
        assert_eq!(
            by_id.get(id),
            Some(marker),
            "acknowledged write {id} ({marker}) is present"
        );
    }
}

#[tokio::test]
async fn the_wal_is_checkpointed_outside_the_write_path() {
    // SQLite's own file format, whatever the run's backend.
    let dir = tempfile::tempdir().unwrap();
    let store = open(&TestDatabase::sqlite(&dir.path().join("bh.db"))).await;
    for n in 0..200 {
        store
            .append_event(event(n, EventKind::NodeJoined, None))
            .await
            .unwrap();
    }
    let wal = store.path().with_extension("db-wal");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "commits went to the WAL"
    );
    // Nothing checkpointed inside the commits; the checkpointer copies
    // every committed page when asked.
    assert_eq!(store.checkpoint().await.unwrap(), 0);
    assert_eq!(
        store
            .list_events(&EventQuery {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
        200
    );
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
}

/// Under writes that never pause, the WAL still starts over: copying it
/// in the background alone never finds every frame copied (a commit lands
/// meanwhile), and it grew by gigabytes in a day of churn.
#[tokio::test]
async fn the_wal_starts_over_under_writes_that_never_pause() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::sqlite(&dir.path().join("bh.db"));
    let options = StoreOptions {
        synchronous_full: false,
        restart_log_after_frames: 64,
        ..StoreOptions::default()
    };
    let location = DatabaseLocation::parse(db.value()).expect("a database location");
    let store = Store::open(location, options).await.expect("open store");
    let wal = store.path().with_extension("db-wal");
    // Eight writers keep the writer's queue from ever running dry.
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..2_500 {
                    store
                        .append_event(event(w * 10_000 + n, EventKind::NodeJoined, None))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    // The checkpointer's cadence (every 200 ms in the server), faster.
    let mut checkpointer = tokio::time::interval(Duration::from_millis(5));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut longest = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writes did not finish in 120 s"
        );
        checkpointer.tick().await;
        store.checkpoint().await.unwrap();
        longest = longest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    // 20,000 events (rows and index entries, in group commits) went
    // through it; without starting over it holds the frames of every
    // commit (38,000 frames, 150 MiB, when the writer ignored the
    // checkpointer). Started over from 64 frames, it holds what the
    // commits add until the next start over succeeds (a reader on an
    // old snapshot defers it): here 500 to 2,200 frames.
    let frame = 4096 + 24;
    assert!(
        longest < 8_000 * frame,
        "the WAL reached {longest} bytes ({} frames)",
        longest / frame
    );
}

/// The checks on the rows every claim writes are comparisons: SQLite
/// builds a temporary index for each `IN` list of more than two values,
/// for every row written, and the schema's were a seventh of a claim's
/// time in the writer (migration 0008 rewrites them in place). They
/// still refuse what they refused.
#[tokio::test]
async fn a_claims_rows_are_checked_without_temporary_indexes() {
    // SQLite's own schema, whatever the run's backend.
    let dir = tempfile::tempdir().unwrap();
    let (store, mut raw) = sqlite_in(dir.path()).await;
    for (table, insert, allowed) in [
        (
            "containers",
            "INSERT INTO containers (container_id, pool_id, workload_id, node_id, spec_hash, created_at, \
             state, claim_generation, revision, updated_at) VALUES ('c', 'p', 'w', 'n', 'h', 1, ?, 0, 1, 1)",
            &["warming", "idle", "claimed", "reserved", "draining", "lost"][..],
        ),
        (
            "claims",
            "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, \
             source, status, claimed_at, last_activity_at) VALUES ('k', 't', 'w', 'c', 'n', 1, 'pool', ?, 1, 1)",
            &["active", "released", "lost"][..],
        ),
        (
            "events",
            "INSERT INTO events (at, kind, severity, message) VALUES (1, 'k', ?, 'm')",
            &["info", "warning", "error"][..],
        ),
    ] {
        let (schema,): (String,) =
            sqlx::query_as("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?")
                .bind(table)
                .fetch_one(&mut raw)
                .await
                .unwrap();
        assert!(!schema.contains(" IN ("), "{table}: {schema}");
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN {insert}")))
            .bind("x")
            .fetch_all(&mut raw)
            .await
            .unwrap()
            .iter()
            .map(|step| sqlx::Row::get::<String, _>(step, "opcode"))
            .collect();
        assert!(plan.iter().any(|op| op == "Insert"), "{table}: {plan:?}");
        assert!(
            !plan.iter().any(|op| op == "OpenEphemeral"),
            "{table}: {plan:?}"
        );
        let refused = sqlx::query(insert)
            .bind("bogus")
            .execute(&mut raw)
            .await
            .expect_err("a value outside the set is refused");
        assert!(
            refused.to_string().contains("CHECK constraint failed"),
            "{table}: {refused}"
        );
        // Every value of the set is still taken (each undone after).
        for value in allowed {
            sqlx::query("BEGIN").execute(&mut raw).await.unwrap();
            sqlx::query(insert)
                .bind(*value)
                .execute(&mut raw)
                .await
                .unwrap_or_else(|e| panic!("{table}: {value} refused: {e}"));
            sqlx::query("ROLLBACK").execute(&mut raw).await.unwrap();
        }
    }
    let (foreign_key_problems,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pragma_foreign_key_check")
            .fetch_one(&mut raw)
            .await
            .unwrap();
    assert_eq!(foreign_key_problems, 0);
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
}
