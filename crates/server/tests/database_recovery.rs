//! A database that is missing, damaged or partly unreadable, with real
//! servers, agents and Docker: the server refuses to start in one
//! sentence naming the file and the way out, rebuilds from the agents
//! only when told to (and then every container's limits agree with the
//! rebuilt database), and skips and reports a row it cannot read.

#[allow(dead_code)]
mod boost_support;

use std::path::{Path, PathBuf};

use boilerhouse_proto::pb;
use boilerhouse_server::store::{DatabaseLocation, sql};
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::database::{TestBackend, backend};
use boilerhouse_testkit::{stderr, stdout};

use boost_support::{BASE_MEMORY, BASE_NANO_CPUS, claim, first_line, limits, start, wait_limits};

/// These tests damage or remove a SQLite file; on PostgreSQL (whose own
/// server guards its pages) there is no file to damage.
fn sqlite_only(test: &str) -> bool {
    if backend() == TestBackend::Postgres {
        eprintln!("skipped on PostgreSQL: {test} damages a SQLite file");
        return false;
    }
    true
}

/// The database and SQLite's files beside it.
fn remove_database(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

/// The events of `kind`, as `bh events -o json` prints them.
fn events(c: &Cluster, kind: &str) -> Vec<serde_json::Value> {
    let out = c.bh_ok(&["events", "--kind", kind, "-n", "500", "-o", "json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the agent has written `tenant` into the state file of the
/// container whose state volume is `state_path`: what a rebuild reads.
async fn wait_state_file(c: &Cluster, state_path: &str, tenant: &str) {
    let file = Path::new(state_path)
        .parent()
        .unwrap()
        .join("boilerhouse-state.json");
    c.eventually(&format!("{tenant} in its state file"), || async {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok()?;
        (json["tenant_id"] == tenant).then_some(())
    })
    .await;
}

/// A start that must be refused: exit status 3, and the sentence first.
fn refused(c: &Cluster, args: &[&str]) -> String {
    let out = c.run_server_to_exit(args);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{text}\n{}", stdout(&out));
    let first = text
        .lines()
        .find(|l| l.starts_with("boilerhoused: "))
        .unwrap_or_else(|| panic!("no refusal sentence in:\n{text}"))
        .to_owned();
    // The sentence speaks to people; SQLite's codes stay on the detail line.
    assert!(!first.contains("(code:"), "{text}");
    first
}

#[tokio::test]
async fn a_removed_database_is_refused_and_rebuilt_from_the_agents_only_on_purpose() {
    let Some(mut c) = start(&["rebuild"], "{min_size: 1, max_size: 6}").await else {
        return;
    };
    let t1 = c.claim("t1", "demo").await;
    let t2 = c.claim("t2", "demo").await;
    let t1_docker = t1.docker_id.clone();
    wait_state_file(&c, &t1.state_path, "t1").await;
    wait_state_file(&c, &t2.state_path, "t2").await;
    let boost = first_line(&c.bh_ok(&["boost", "request", "tenant/t1/demo", "cpu", "0.5"]));
    c.bh_ok(&["boost", "request", "tenant/t1/demo", "memory", "32M"]);
    let boosted = (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY + (32 << 20));
    assert_eq!(limits(&c, &t1_docker).await, boosted);

    // The database is lost while the containers run: the file removed,
    // or the PostgreSQL schema emptied (a URL now naming an empty one).
    c.stop_server().await;
    let postgres = backend() == TestBackend::Postgres;
    if postgres {
        c.lose_database().await;
        let sentence = refused(&c, &[]);
        assert!(
            sentence.contains("is empty, though this server used it before"),
            "{sentence}"
        );
        assert!(sentence.contains("pg_restore"), "{sentence}");
        assert!(sentence.contains("--rebuild-from-agents"), "{sentence}");
    } else {
        let db = c.server().database();
        remove_database(&db);
        let sentence = refused(&c, &[]);
        assert!(
            sentence.contains(&format!("the database {} is missing", db.display())),
            "{sentence}"
        );
        assert!(sentence.contains("--rebuild-from-agents"), "{sentence}");
        assert!(
            sentence.contains("boilerhoused restore --from"),
            "{sentence}"
        );
        assert!(!db.exists(), "a refused start creates nothing");
    }

    // On purpose: the agents' reports rebuild it.
    c.extend_config("reconcile_interval = \"500ms\"");
    c.start_server_with(&["--rebuild-from-agents"]).await;
    let mut claims = c.claims().await;
    for old in [&t1, &t2] {
        let back = c
            .eventually(&format!("{}'s claim to be rebuilt", old.tenant_id), || {
                let mut claims = claims.clone();
                let tenant = old.tenant_id.clone();
                async move {
                    let request = pb::GetClaimRequest {
                        tenant_id: tenant,
                        workload_id: "demo".into(),
                    };
                    claims.get_claim(request).await.ok()?.into_inner().claim
                }
            })
            .await;
        assert_eq!(back.container_id, old.container_id, "the same container");
        assert_eq!(back.generation, old.generation, "the same fencing token");
    }
    let again = claims
        .claim(pb::ClaimRequest {
            tenant_id: "t2".into(),
            workload_id: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(again.container_id, t2.container_id);
    let pool = c.pool("demo").await;
    assert_eq!(pool.counts.unwrap().claimed, 2, "{pool:?}");

    // The boosts are not in the rebuilt database, so neither are their
    // limits: the container goes back to its workload's, and says why.
    wait_limits(
        &c,
        &t1_docker,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "t1's container back at its workload's limits",
    )
    .await;
    let reverted = events(&c, "container.limits_reverted");
    assert!(
        reverted
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains(&t1.container_id)),
        "{reverted:?}"
    );
    assert!(
        !c.bh_ok(&["boost", "status"]).contains(&boost),
        "no boost survives in the rebuilt database"
    );
    let replaced = events(&c, "database.replaced");
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert!(
        replaced[0]["message"]
            .as_str()
            .unwrap()
            .contains(if postgres { "was empty" } else { "was missing" }),
        "{replaced:?}"
    );

    // From now on it is the database: a plain restart finds it sound.
    c.stop_server().await;
    c.start_server().await;
    let back = c.claim("t1", "demo").await;
    assert_eq!(back.container_id, t1.container_id);
}

/// Files beside `db` whose name starts with `<db>.damaged-`.
fn moved_aside(db: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}.damaged-", db.file_name().unwrap().to_string_lossy());
    let mut found: Vec<PathBuf> = std::fs::read_dir(db.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && !name.ends_with("-wal") && !name.ends_with("-shm")
        })
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn a_damaged_or_truncated_database_is_refused_in_one_sentence() {
    if !sqlite_only("a_damaged_or_truncated_database_is_refused") {
        return;
    }
    let Some(mut c) = Cluster::builder()
        .node("damage")
        .workload("demo", |image| {
            format!(
                "id: demo\nimage: {image}\ncommand: [sleep, infinity]\npool: {{min_size: 2, max_size: 4}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 2).await;
    c.stop_server().await;
    let db = c.server().database();
    // Checkpointed and without its WAL, the file is the whole database:
    // the damage cannot hide behind newer copies of its pages.
    let mut conn = boilerhouse_server::store::open_raw(&db).await.unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let pristine = std::fs::read(&db).unwrap();
    let len = pristine.len();
    assert!(len >= 64 * 1024, "a database of {len} bytes");

    // Garbage where serving starts from: the container rows' first page.
    boilerhouse_server::store::damage::overwrite_root_page(&db, "containers").await;
    let sentence = refused(&c, &[]);
    assert!(
        sentence.contains(&format!("the database {} is damaged", db.display())),
        "{sentence}"
    );
    assert!(
        sentence.contains("boilerhoused restore --from"),
        "{sentence}"
    );
    assert!(sentence.contains("--rebuild-from-agents"), "{sentence}");

    std::fs::write(&db, &pristine[..len / 2]).unwrap();
    let sentence = refused(&c, &[]);
    assert!(sentence.contains("(it was truncated)"), "{sentence}");

    std::fs::write(&db, b"#!/bin/sh\necho this is no database\n").unwrap();
    let sentence = refused(&c, &[]);
    assert!(
        sentence.contains("(it is not a SQLite database)"),
        "{sentence}"
    );

    // The damage back as it was; a rebuild keeps the damaged file.
    std::fs::write(&db, &pristine).unwrap();
    boilerhouse_server::store::damage::overwrite_root_page(&db, "containers").await;
    let damaged = std::fs::read(&db).unwrap();
    c.start_server_with(&["--rebuild-from-agents"]).await;
    let aside = moved_aside(&db);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).unwrap(),
        damaged,
        "moved, not changed"
    );
    // The agent's containers are adopted into the new database.
    c.wait_idle("demo", 2).await;
}

/// A start that exits with status 3: its log (stdout), the refusal
/// sentence (stderr's first `boilerhoused:` line), and both for messages.
fn refused_run(c: &Cluster) -> (String, String, String) {
    let out = c.run_server_to_exit(&[]);
    let log = stdout(&out);
    let text = format!("{log}{}", stderr(&out));
    assert_eq!(out.status.code(), Some(3), "{text}");
    let sentence = stderr(&out)
        .lines()
        .find(|l| l.starts_with("boilerhoused: "))
        .unwrap_or_else(|| panic!("no refusal sentence in:\n{text}"))
        .to_owned();
    (log, sentence, text)
}

/// Before it serves, startup checks what serving rests on (the claims'
/// guards entry for entry, the container rows' pages); the whole file
/// just after. An emptied claims index (one active claim per tenant) is
/// refused before serving. An emptied container index is found once the server
/// serves: it stops with the same refusal, records it, and the next start
/// checks the whole file before serving, so a supervisor that restarts it
/// does not serve the damage again.
#[tokio::test]
async fn an_index_that_disagrees_with_its_table_is_never_served_twice() {
    if !sqlite_only("an_index_that_disagrees_with_its_table_is_never_served_twice") {
        return;
    }
    let Some(mut c) = Cluster::builder()
        .node("verify")
        .workload("demo", |image| {
            format!(
                "id: demo\nimage: {image}\ncommand: [sleep, infinity]\npool: {{min_size: 2, max_size: 4}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 2).await;
    c.claim("t1", "demo").await;
    c.stop_server().await;
    let db = c.server().database();
    let mut conn = boilerhouse_server::store::open_raw(&db).await.unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let pristine = std::fs::read(&db).unwrap();
    let damaged_by = |sentence: &str, summary: &str| {
        sentence.contains(&format!(
            "the database {} is damaged ({summary})",
            db.display()
        )) && sentence.contains("--rebuild-from-agents")
    };
    let damaged = |sentence: &str| damaged_by(sentence, "it fails SQLite's integrity check");

    boilerhouse_server::store::damage::empty_index(&db, "claims_one_per_tenant").await;
    let (log, sentence, text) = refused_run(&c);
    assert!(
        damaged_by(&sentence, "an index disagrees with its table"),
        "{sentence}"
    );
    assert!(!log.contains("boilerhoused serving"), "served:\n{text}");
    assert!(text.contains("claims_one_per_tenant"), "{text}");

    // The file alone, whole: no WAL of the run before to replay over it.
    remove_database(&db);
    std::fs::write(&db, &pristine).unwrap();
    boilerhouse_server::store::damage::empty_index(&db, "containers_docker_id").await;
    let (log, sentence, text) = refused_run(&c);
    assert!(damaged(&sentence), "{sentence}");
    assert!(text.contains("containers_docker_id"), "{text}");
    // In the log, in the order written: it served, then it found the
    // damage and stopped as it stops on SIGTERM.
    let serving = log
        .find("boilerhoused serving")
        .unwrap_or_else(|| panic!("it never served:\n{text}"));
    let stops = log
        .find("the server stops")
        .unwrap_or_else(|| panic!("no word of stopping in the log:\n{text}"));
    assert!(stops > serving, "stopped before serving:\n{text}");
    assert!(log.contains("shutting down"), "{text}");
    // Recorded where the damaged database still takes it, for whoever
    // reads the history after a restore or rebuild.
    let mut conn = boilerhouse_server::store::open_raw(&db).await.unwrap();
    let (recorded,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE kind = 'database.damaged'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    assert_eq!(recorded, 1, "{text}");

    // Restarted as a supervisor would: refused before serving now.
    let (log, sentence, text) = refused_run(&c);
    assert!(damaged(&sentence), "{sentence}");
    assert!(
        !log.contains("boilerhoused serving"),
        "served again:\n{text}"
    );

    // Repaired (here: the pristine file back), it serves, and the mark
    // that asked for the whole check is gone.
    remove_database(&db);
    std::fs::write(&db, &pristine).unwrap();
    c.start_server_with(&[]).await;
    c.wait_idle("demo", 2).await;
    let marker = format!("{}.check-whole", db.display());
    assert!(!Path::new(&marker).exists(), "{marker} is still there");
}

#[tokio::test]
async fn a_row_that_cannot_be_read_is_skipped_and_reported() {
    let Some(mut c) = start(&["rows"], "{min_size: 1, max_size: 4}").await else {
        return;
    };
    let (container, docker_id) = claim(&c, "t1").await;
    let boost = first_line(&c.bh_ok(&["boost", "request", "tenant/t1/demo", "cpu", "0.5"]));
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY)
    );
    let node = c.node(0).to_owned();
    c.wait_idle("demo", 1).await;
    c.stop_server().await;

    // Four rows that no longer read: valid SQL values, invalid data.
    // Through the store's own driver, so that it is the same on both
    // backends.
    let location = DatabaseLocation::parse(&c.server().database_value()).unwrap();
    let mut conn = boilerhouse_server::store::open_inspector(&location)
        .await
        .unwrap();
    let (idle, idle_docker): (String, String) = sql::query_as(
        "SELECT container_id, docker_id FROM containers WHERE state = 'idle' LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    for (sql, key) in [
        (
            "UPDATE containers SET tenant_id = 'not a tenant!' WHERE container_id = ?",
            idle.as_str(),
        ),
        (
            "UPDATE nodes SET labels_json = '{oops' WHERE node_id = ?",
            node.as_str(),
        ),
        (
            "UPDATE workloads SET spec_json = '{\"id\": 7}' WHERE workload_id = ?",
            "demo",
        ),
        (
            "UPDATE boosts SET target_tenant_id = 'not a tenant!' WHERE boost_id = ?",
            boost.as_str(),
        ),
    ] {
        let done = sql::query(sql).bind(key).execute(&mut conn).await.unwrap();
        assert_eq!(done.rows_affected(), 1, "{sql}");
    }
    drop(conn);
    // The workload changed meanwhile, so that the idle container without a
    // readable row is stale: reconciliation would destroy such a stray
    // once its creation grace (1 s here) has passed, were it not left alone.
    let file = c.server().workloads_dir().join("demo.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap() + "environment: {CHANGED: \"1\"}\n";
    std::fs::write(&file, yaml).unwrap();
    c.extend_config("reconcile_interval = \"300ms\"\nreconcile_creation_grace = \"1s\"");

    c.start_server().await;
    let skipped = events(&c, "database.row_skipped");
    for wanted in [
        format!("nodes row {node}"),
        "workloads row demo".to_owned(),
        format!("boosts row {boost}"),
        format!("containers row {idle}"),
    ] {
        assert!(
            skipped
                .iter()
                .any(|e| e["message"].as_str().unwrap().starts_with(&wanted)),
            "no event for {wanted}: {skipped:#?}"
        );
    }
    assert!(
        c.server()
            .log()
            .contains("a row of the database cannot be read")
    );

    // The node's Hello and the workload's file put their rows right; the
    // boost's row stays as it is, and is no longer in force.
    c.wait_node(&node, pb::NodeStatus::Ready, Some(true)).await;
    let again = c.claim("t1", "demo").await;
    assert_eq!(again.container_id, container);
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "the unreadable boost no longer in force",
    )
    .await;
    c.bh_ok(&["boost", "status", "--all"]);
    c.eventually("the workload row healed from its file", || async {
        c.bh_ok(&["workload", "get", "demo"])
            .contains("CHANGED")
            .then_some(())
    })
    .await;

    // Reconciliation runs again and again, and leaves the container whose
    // row it could not read where it is.
    let passes = || {
        let status: serde_json::Value =
            serde_json::from_str(&c.bh_ok(&["status", "-o", "json"])).unwrap();
        status["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "reconcile")
            .and_then(|t| t["activations"].as_u64())
            .unwrap_or(0)
    };
    let first = passes();
    c.eventually("five more reconcile passes", || async {
        (passes() >= first + 5).then_some(())
    })
    .await;
    assert!(c.exists(&idle_docker).await, "{}", c.server().log());
    assert!(!c.bh_ok(&["reconcile", "plan"]).contains(&idle));
}
