//! A standby's warm copy of the pool's rows and the change feed it reads
//! (PostgreSQL only), against a real PostgreSQL server: the copy always
//! equals what a cold load reads, reads only what changed, falls back to
//! reading everything when a delta could be incomplete (trimmed tombstones,
//! a rewound history), and versions are
//! handed out in commit order. The seeded simulation checks the same
//! equality after random pool operations (`tests/simulation`, PostgreSQL
//! pass), and `tests/replicas.rs` and `tests/failover.rs` that a real
//! elected server restores from its warm copy.
//!
//! Needs `BOILERHOUSE_POSTGRES_URL` (dev/test starts one with
//! dev/postgres). Skipped without it unless `BOILERHOUSE_REQUIRE_POSTGRES=1`.

use boilerhouse_core::pool::index::Index;
use boilerhouse_server::store::{
    DatabaseLocation, Store, StoreOptions, Unreadable, WarmPool, open_inspector,
};
use boilerhouse_testkit::database::{TestDatabase, postgres_available};
use sqlx::{AnyConnection, Executor as _};

/// A migrated schema, the store on it and a second connection (a
/// standby's, or a writer's).
async fn setup() -> (TestDatabase, Store, AnyConnection) {
    let db = TestDatabase::postgres_schema().await.unwrap();
    let location = DatabaseLocation::parse(db.value()).unwrap();
    let store = Store::open(location.clone(), StoreOptions::default())
        .await
        .unwrap();
    let conn = open_inspector(&location).await.unwrap();
    (db, store, conn)
}

/// `n` idle containers of `workload` on node-a, ids numbered from `from`.
async fn add_containers(conn: &mut AnyConnection, workload: &str, from: u32, n: u32) {
    conn.execute(sqlx::AssertSqlSafe(format!(
        "INSERT INTO containers (container_id, pool_id, workload_id, node_id, state, spec_hash, created_at, updated_at) \
         SELECT '00000000-0000-7000-8000-' || lpad(i::text, 12, '0'), '{workload}', '{workload}', 'node-a', 'idle', 'h1', \
         1700000000000 + i, 1700000000000 + i FROM generate_series({from}, {}) AS i",
        from + n - 1
    )))
    .await
    .unwrap();
}

fn container_id(i: u32) -> String {
    format!("00000000-0000-7000-8000-{i:012}")
}

/// Tenant `tenant` claims container `i`.
async fn claim(conn: &mut AnyConnection, tenant: &str, i: u32) {
    let id = container_id(i);
    conn.execute(sqlx::AssertSqlSafe(format!(
        "BEGIN; \
         UPDATE containers SET state = 'claimed', tenant_id = '{tenant}', claim_generation = 1, revision = revision + 1 \
         WHERE container_id = '{id}'; \
         INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, status, \
         claimed_at, last_activity_at) \
         VALUES ('claim-{tenant}-{i}', '{tenant}', 'w', '{id}', 'node-a', 1, 'pool', 'active', 1700000001000, 1700000001000); \
         COMMIT"
    )))
    .await
    .unwrap();
}

/// Tenant `tenant` releases container `i`, which is reserved for it.
async fn release(conn: &mut AnyConnection, tenant: &str, i: u32) {
    let id = container_id(i);
    conn.execute(sqlx::AssertSqlSafe(format!(
        "BEGIN; \
         UPDATE claims SET status = 'released', released_at = 1700000002000 WHERE claim_id = 'claim-{tenant}-{i}'; \
         UPDATE containers SET state = 'reserved', revision = revision + 1 WHERE container_id = '{id}'; \
         INSERT INTO affinity_reservations (tenant_id, workload_id, container_id, node_id, reserved_at, expires_at) \
         VALUES ('{tenant}', 'w', '{id}', 'node-a', 1700000002000, 1700000062000); \
         COMMIT"
    )))
    .await
    .unwrap();
}

/// The unreadable rows, comparable.
fn named(unreadable: &[Unreadable]) -> Vec<String> {
    let mut named: Vec<String> = unreadable.iter().map(|u| u.to_string()).collect();
    named.sort();
    named
}

async fn assert_same(warm: &WarmPool, store: &Store, when: &str) {
    let cold = store.load_pool_snapshot().await.unwrap();
    let unreadable = named(&cold.unreadable);
    let index = Index::from_rows(cold.containers, cold.claims, cold.reservations);
    assert!(
        warm.index() == &index,
        "{when}: the warm copy differs from a cold load\nwarm: {:#?}\ncold: {index:#?}",
        warm.index()
    );
    assert_eq!(named(&warm.unreadable()), unreadable, "{when}");
}

#[tokio::test]
async fn the_warm_copy_reads_only_what_changed_and_equals_a_cold_load() {
    if !postgres_available() {
        return;
    }
    let (_db, store, mut standby) = setup().await;
    let mut writer = open_inspector(store.location()).await.unwrap();
    add_containers(&mut writer, "w", 0, 500).await;
    claim(&mut writer, "t1", 3).await;
    claim(&mut writer, "t2", 4).await;

    let mut warm = WarmPool::default();
    let first = warm.refresh(&mut standby).await.unwrap();
    assert!(first.full, "{first:?}");
    assert_eq!(first.rows, 502, "500 containers and 2 claims: {first:?}");
    assert_same(&warm, &store, "after the first read").await;

    // Nothing changed: nothing read, same version.
    let idle = warm.refresh(&mut standby).await.unwrap();
    assert_eq!(
        (idle.full, idle.rows, idle.version),
        (false, 0, first.version)
    );

    // A release (claim ended, container reserved, reservation added), a
    // removed container, a new one, and a rolled-back change.
    release(&mut writer, "t1", 3).await;
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "DELETE FROM containers WHERE container_id = '{}'",
            container_id(10)
        )))
        .await
        .unwrap();
    add_containers(&mut writer, "w", 900, 1).await;
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "BEGIN; UPDATE containers SET state = 'draining' WHERE container_id = '{}'; ROLLBACK",
            container_id(11)
        )))
        .await
        .unwrap();
    let delta = warm.refresh(&mut standby).await.unwrap();
    assert!(!delta.full, "{delta:?}");
    // The ended claim, the reserved container and its reservation, the
    // tombstone, the new container: three committed transactions.
    assert_eq!(delta.rows, 5, "{delta:?}");
    assert_eq!(
        delta.version,
        first.version + 3,
        "one version per committed transaction"
    );
    assert_same(&warm, &store, "after a delta").await;

    // The reservation ends and its container goes.
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "BEGIN; DELETE FROM affinity_reservations WHERE tenant_id = 't1'; \
             DELETE FROM containers WHERE container_id = '{}'; COMMIT",
            container_id(3)
        )))
        .await
        .unwrap();
    let delta = warm.refresh(&mut standby).await.unwrap();
    assert_eq!((delta.full, delta.rows), (false, 2), "{delta:?}");
    assert_same(&warm, &store, "after two deletions").await;

    // A container removed and made again under its id (an adoption)
    // between two reads, and a tenant that reserves again: both are there.
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "DELETE FROM containers WHERE container_id = '{}'",
            container_id(12)
        )))
        .await
        .unwrap();
    add_containers(&mut writer, "w", 12, 1).await;
    claim(&mut writer, "t1", 13).await;
    release(&mut writer, "t1", 13).await;
    let delta = warm.refresh(&mut standby).await.unwrap();
    assert!(!delta.full, "{delta:?}");
    assert_same(&warm, &store, "after a row deleted and made again").await;
    assert!(
        warm.index()
            .containers()
            .any(|c| c.id.to_string() == container_id(12)),
        "the container made again is in the copy"
    );

    // What an elected server does: catch up on the store's own reads.
    claim(&mut writer, "t3", 20).await;
    let caught_up = store.catch_up(&mut warm).await.unwrap();
    assert_eq!(
        (caught_up.full, caught_up.rows),
        (false, 2),
        "{caught_up:?}"
    );
    assert_same(&warm, &store, "after catching up").await;
}

#[tokio::test]
async fn an_unreadable_row_is_named_in_the_copy_as_in_a_cold_load_until_it_is_mended() {
    if !postgres_available() {
        return;
    }
    let (_db, store, mut standby) = setup().await;
    let mut writer = open_inspector(store.location()).await.unwrap();
    add_containers(&mut writer, "w", 0, 5).await;
    let mut warm = WarmPool::default();
    warm.refresh(&mut standby).await.unwrap();
    let id = container_id(2);
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "UPDATE containers SET tenant_id = 'not a tenant' WHERE container_id = '{id}'"
        )))
        .await
        .unwrap();
    warm.refresh(&mut standby).await.unwrap();
    assert_eq!(warm.index().containers().count(), 4);
    let unreadable = warm.unreadable();
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    assert_eq!(unreadable[0].key, id);
    assert_same(&warm, &store, "with an unreadable row").await;
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "UPDATE containers SET tenant_id = NULL WHERE container_id = '{id}'"
        )))
        .await
        .unwrap();
    warm.refresh(&mut standby).await.unwrap();
    assert_eq!(warm.index().containers().count(), 5);
    assert!(warm.unreadable().is_empty());
}

#[tokio::test]
async fn a_copy_behind_trimmed_tombstones_or_a_restored_database_reads_everything_again() {
    if !postgres_available() {
        return;
    }
    let (_db, store, mut standby) = setup().await;
    let mut writer = open_inspector(store.location()).await.unwrap();
    add_containers(&mut writer, "w", 0, 20).await;
    let mut warm = WarmPool::default();
    warm.refresh(&mut standby).await.unwrap();

    // A deletion whose tombstone is trimmed before the standby reads it:
    // a delta would miss it, so the copy reads everything.
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "DELETE FROM containers WHERE container_id = '{}'",
            container_id(5)
        )))
        .await
        .unwrap();
    writer
        .execute("UPDATE deleted_rows SET deleted_at = now() - INTERVAL '2 hours'")
        .await
        .unwrap();
    assert_eq!(store.trim_tombstones().await.unwrap(), 1);
    let after_trim = warm.refresh(&mut standby).await.unwrap();
    assert!(after_trim.full, "{after_trim:?}");
    assert_same(&warm, &store, "after the trim").await;

    // The clock behind the copy (an older backup restored under a
    // running standby): everything, and deltas from there on.
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "BEGIN; DELETE FROM containers WHERE container_id = '{}'; \
             UPDATE change_clock SET version = 1, trimmed_through = 0; COMMIT",
            container_id(6)
        )))
        .await
        .unwrap();
    let restored = warm.refresh(&mut standby).await.unwrap();
    assert_eq!((restored.full, restored.version), (true, 1), "{restored:?}");
    assert_same(&warm, &store, "after the clock went back").await;
    add_containers(&mut writer, "w", 100, 1).await;
    let next = warm.refresh(&mut standby).await.unwrap();
    assert!(!next.full, "{next:?}");
    assert_same(&warm, &store, "after the clock went on").await;

    // A history rewound under the standby and gone past its version
    // before it looked again (commits lost, then others numbered the
    // same): its version's token is not its own any more.
    let at = next.version;
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "UPDATE change_clock SET version = {}",
            at - 1
        )))
        .await
        .unwrap();
    for i in 0..3 {
        add_containers(&mut writer, "w", 200 + i, 1).await;
    }
    let rewound = warm.refresh(&mut standby).await.unwrap();
    assert_eq!(
        (rewound.full, rewound.version),
        (true, at + 2),
        "{rewound:?}"
    );
    assert_same(&warm, &store, "after a rewound history").await;
}

#[tokio::test]
async fn versions_are_taken_in_commit_order() {
    if !postgres_available() {
        return;
    }
    let (_db, store, mut first) = setup().await;
    let mut second = open_inspector(store.location()).await.unwrap();
    add_containers(&mut first, "w", 0, 2).await;
    // While one transaction has changed a pool row and not committed, a
    // second cannot take a version: it waits for the first to end, so a
    // reader never sees a later version without every earlier one.
    first
        .execute(sqlx::AssertSqlSafe(format!(
            "BEGIN; UPDATE containers SET revision = revision + 1 WHERE container_id = '{}'",
            container_id(0)
        )))
        .await
        .unwrap();
    let waited = second
        .execute(sqlx::AssertSqlSafe(format!(
            "SET lock_timeout = '300ms'; \
             UPDATE containers SET revision = revision + 1 WHERE container_id = '{}'",
            container_id(1)
        )))
        .await
        .expect_err("the second writer waits for the first");
    assert!(waited.to_string().contains("lock timeout"), "{waited}");
    first.execute("COMMIT").await.unwrap();
    second
        .execute(sqlx::AssertSqlSafe(format!(
            "UPDATE containers SET revision = revision + 1 WHERE container_id = '{}'",
            container_id(1)
        )))
        .await
        .unwrap();
    let versions: Vec<(String, i64)> =
        sqlx::query_as("SELECT container_id, change_version FROM containers ORDER BY container_id")
            .fetch_all(&mut first)
            .await
            .unwrap();
    assert!(
        versions[0].1 < versions[1].1,
        "committed first, lower version: {versions:?}"
    );
}
