//! Tests of the startup and whole checks against damage made on purpose.

use std::str::FromStr as _;

use super::*;

async fn made(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("t.db");
    let store = crate::store::Store::open(&path, crate::store::StoreOptions::default())
        .await
        .unwrap();
    store.close().await;
    drop(store);
    path
}

#[tokio::test]
async fn a_new_store_is_sound_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = made(dir.path()).await;
    assert_eq!(
        check_file(&path, Depth::Full).await.unwrap(),
        Verdict::Sound
    );

    std::fs::write(&path, b"").unwrap();
    assert_eq!(
        check_file(&path, Depth::Full).await.unwrap(),
        Verdict::Empty
    );

    std::fs::write(&path, b"hello, not a database at all").unwrap();
    let Verdict::Damaged { summary, detail } = check_file(&path, Depth::Full).await.unwrap() else {
        panic!("text taken for a database");
    };
    assert_eq!(summary, "it is not a SQLite database");
    assert!(detail.contains("header"), "{detail}");
}

#[tokio::test]
async fn a_database_of_another_program_is_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let mut conn = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .unwrap()
        .create_if_missing(true)
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE notes (body TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_eq!(
        check_file(&path, Depth::Full).await.unwrap(),
        Verdict::Foreign
    );
}

async fn execute(path: &Path, statement: &'static str) {
    let mut conn = crate::store::open_raw(path).await.unwrap();
    sqlx::query(statement).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

/// Partial indexes that lost their entries while every page stays well
/// formed (`quick_check` counts the entries of a whole index, not of a
/// partial one). The claims' (the one that keeps one active claim per
/// tenant) fails the startup check; the containers' (one row per
/// Docker id) passes it and fails the whole check, of the file and of
/// the open database.
#[tokio::test]
async fn an_index_that_disagrees_with_its_table_is_found_by_the_check_that_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let claims = made(dir.path()).await;
    execute(
        &claims,
        "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, claimed_at, last_activity_at) VALUES ('c1', 't1', 'w', 'k1', 'n', 1, 'pool', 'active', 0, 0)",
    )
    .await;
    crate::store::damage::empty_index(&claims, "claims_one_per_tenant").await;
    let Verdict::Damaged { summary, detail } = check_file(&claims, Depth::Startup).await.unwrap()
    else {
        panic!("the startup check passed a claims index that lost its entries");
    };
    assert_eq!(summary, "an index disagrees with its table");
    assert!(
        detail.contains(
            "claims_one_per_tenant holds 0 entries for 1 active claims, 1 of them missing"
        ),
        "{detail}"
    );

    let dir = tempfile::tempdir().unwrap();
    let containers = made(dir.path()).await;
    execute(
        &containers,
        "INSERT INTO containers (container_id, pool_id, workload_id, node_id, docker_id, state, spec_hash, created_at, updated_at) VALUES ('k1', 'w', 'w', 'n', 'd1', 'idle', 'h', 0, 0)",
    )
    .await;
    crate::store::damage::empty_index(&containers, "containers_docker_id").await;
    assert_eq!(
        check_file(&containers, Depth::Startup).await.unwrap(),
        Verdict::Sound
    );
    let Verdict::Damaged { detail, .. } = check_file(&containers, Depth::Full).await.unwrap()
    else {
        panic!("the full check passed an index that lost its entries");
    };
    assert!(detail.contains("containers_docker_id"), "{detail}");
    assert!(
        matches!(
            full_check_open(&containers).await.unwrap(),
            Some(Verdict::Damaged { .. })
        ),
        "the check of the open database passed it"
    );
}

/// What waits for the whole check: an index of the history, and the
/// claims' index by end (the trim's, which waits for the whole check
/// too): emptied, they pass the startup check and fail the whole one.
/// The whole indexes of the claims and of the request ids, which
/// serving writes through, are counted before serving.
#[tokio::test]
async fn only_what_serving_does_not_write_through_waits_for_the_whole_check() {
    let claim = "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, claimed_at, last_activity_at, released_at) VALUES ('c1', 't1', 'w', 'k1', 'n', 1, 'pool', 'released', 0, 0, 1)";
    let request = "INSERT INTO idempotency_keys (method, request_id, request_hash, response, created_at) VALUES ('Claim', 'r1', 'h', x'00', 0)";
    let event = "INSERT INTO events (at, kind, severity, message) VALUES (0, 'node.joined', 'info', 'n joined')";
    for (row, index, before_serving) in [
        (claim, "claims_ended", false),
        (event, "events_by_kind", false),
        (claim, "claims_by_container", true),
        (request, "idempotency_by_age", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = made(dir.path()).await;
        execute(&path, row).await;
        crate::store::damage::empty_index(&path, index).await;
        match check_file(&path, Depth::Startup).await.unwrap() {
            Verdict::Sound => assert!(!before_serving, "{index} passed the startup check"),
            Verdict::Damaged { summary, detail } => {
                assert!(before_serving, "{index}: {detail}");
                assert_eq!(summary, "an index disagrees with its table");
                assert!(
                    detail.contains(&format!("the index {index} holds 0 entries for the 1 rows")),
                    "{detail}"
                );
            }
            other => panic!("{index}: {other:?}"),
        }
        let Verdict::Damaged { detail, .. } = check_file(&path, Depth::Full).await.unwrap() else {
            panic!("the full check passed {index} with its entries lost");
        };
        assert!(detail.contains(index), "{detail}");
    }
}

/// A guard entry with no active claim behind it (the claim ended, its
/// entry stayed) is refused before serving: it would refuse a claim
/// the container is free for, and hides that the index and its table
/// part.
#[tokio::test]
async fn a_guard_entry_without_its_active_claim_is_refused_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = made(dir.path()).await;
    execute(
        &path,
        "INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, claimed_at, last_activity_at) VALUES ('c1', 't1', 'w', 'k1', 'n', 1, 'pool', 'active', 0, 0)",
    )
    .await;
    // The claim ends while its index, by its schema text for that one
    // write, still takes ended claims: the entry stays.
    let widen = "UPDATE sqlite_schema SET sql = replace(sql, 'WHERE status = ''active''', 'WHERE status = ''active'' OR status = ''released''') WHERE name = 'claims_one_per_container'";
    let narrow = "UPDATE sqlite_schema SET sql = replace(sql, ' OR status = ''released''', '') WHERE name = 'claims_one_per_container'";
    for statements in [
        &["PRAGMA writable_schema = ON", widen][..],
        &["UPDATE claims SET status = 'released', released_at = 1"][..],
        &[
            "PRAGMA writable_schema = ON",
            narrow,
            "PRAGMA wal_checkpoint(TRUNCATE)",
        ][..],
    ] {
        // A connection each: each reads the schema text as last left.
        let mut conn = crate::store::open_raw(&path).await.unwrap();
        for statement in statements {
            sqlx::query(*statement).execute(&mut conn).await.unwrap();
        }
        sqlx::Connection::close(conn).await.unwrap();
    }
    let Verdict::Damaged { summary, detail } = check_file(&path, Depth::Startup).await.unwrap()
    else {
        panic!("the startup check passed a guard entry with no active claim behind it");
    };
    assert_eq!(summary, "an index disagrees with its table");
    assert!(
        detail.contains("claims_one_per_container holds 1 entries for 0 active claims"),
        "{detail}"
    );
}

#[test]
fn damage_codes_are_told_apart_from_other_errors() {
    assert!(is_damage_message(
        "migration failed: error returned from database: (code: 26) file is not a database"
    ));
    assert!(!is_damage_message("database is locked"));
    assert!(!is_damage(&sqlx::Error::PoolTimedOut));
}
