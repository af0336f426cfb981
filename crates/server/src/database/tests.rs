use std::io::{Seek as _, SeekFrom, Write as _};

use boilerhouse_core::Timestamp;
use boilerhouse_core::event::{EventKind, NewEvent};

use super::*;

async fn open_at(db: &Path, rebuild: bool) -> anyhow::Result<(Store, Guard)> {
    open_with(db, rebuild, StoreOptions::default()).await
}

async fn open_with(
    db: &Path,
    rebuild: bool,
    options: StoreOptions,
) -> anyhow::Result<(Store, Guard)> {
    match open(&DatabaseLocation::Sqlite(db.to_owned()), rebuild, options).await? {
        (store, Opened::Sqlite(guard)) => Ok((store, guard)),
        (_, Opened::Postgres) => unreachable!("a path opens SQLite"),
    }
}

/// A database with enough rows to span many pages, closed cleanly (its
/// WAL checkpointed away).
async fn filled(db: &Path) {
    let fast = StoreOptions {
        synchronous_full: false,
        ..StoreOptions::default()
    };
    let (store, guard) = open_with(db, false, fast).await.unwrap();
    for n in 0..2000 {
        let event = NewEvent::new(
            Timestamp::from_millis(n),
            EventKind::NodeJoined,
            format!("event {n} with a message long enough to fill pages quickly"),
        );
        store.append_event(event).await.unwrap();
    }
    store.checkpoint().await.unwrap();
    store.close().await;
    drop(store);
    drop(guard);
}

fn refused(result: anyhow::Result<(Store, Guard)>) -> Refused {
    match result {
        Ok(_) => panic!("the database was accepted"),
        Err(e) => e
            .downcast::<Refused>()
            .unwrap_or_else(|e| panic!("not a refusal: {e:#}")),
    }
}

#[tokio::test]
async fn a_fresh_install_creates_the_database_and_a_second_start_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    // What `pki init` and `token create` leave before the first start.
    std::fs::create_dir(dir.path().join("pki")).unwrap();
    std::fs::write(dir.path().join("tokens.toml"), "").unwrap();
    let db = dir.path().join("boilerhouse.db");
    let (store, guard) = open_at(&db, false).await.unwrap();
    assert_eq!(guard.origin, Origin::Created);
    assert!(files::marker(&db).exists());
    store.close().await;
    drop((store, guard));
    let (_store, guard) = open_at(&db, false).await.unwrap();
    assert_eq!(guard.origin, Origin::Existing);
}

#[tokio::test]
async fn a_missing_database_is_refused_once_the_installation_ran() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("boilerhouse.db");
    filled(&db).await;
    std::fs::remove_file(&db).unwrap();
    let r = refused(open_at(&db, false).await);
    assert!(r.sentence.contains(&db.display().to_string()), "{r:?}");
    assert!(r.sentence.contains("is missing"), "{r:?}");
    assert!(r.sentence.contains("boilerhoused restore --from"), "{r:?}");
    assert!(r.sentence.contains("--rebuild-from-agents"), "{r:?}");
    assert!(!db.exists(), "nothing was created");
    // On purpose, it starts empty.
    let (_store, guard) = open_at(&db, true).await.unwrap();
    assert!(
        matches!(&guard.origin, Origin::Rebuilt { was, .. } if was == "missing"),
        "{:?}",
        guard.origin
    );
}

#[tokio::test]
async fn damage_in_the_middle_and_truncation_are_refused_and_a_rebuild_moves_the_file_aside() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("boilerhouse.db");
    filled(&db).await;
    let len = std::fs::metadata(&db).unwrap().len();
    assert!(len > 64 * 1024, "{len} bytes");
    let original = std::fs::read(&db).unwrap();

    // 8 KiB of garbage in the middle: the history (the events fill the
    // file). The start serves; the whole check that follows refuses it.
    let mut file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.seek(SeekFrom::Start(len / 2)).unwrap();
    file.write_all(&[0xA5; 8192]).unwrap();
    drop(file);
    let (store, guard) = open_at(&db, false).await.unwrap();
    let opened = Opened::Sqlite(guard);
    let r = tokio::time::timeout(std::time::Duration::from_secs(30), opened.full_check())
        .await
        .expect("the whole check never found the damage");
    assert!(r.sentence.contains("is damaged"), "{r:?}");
    assert!(r.detail.is_some(), "{r:?}");
    store.close().await;
    drop(store);
    drop(opened);
    // Marked: the next start checks the whole file first.
    let r = refused(open_at(&db, false).await);
    assert!(r.sentence.contains("is damaged"), "{r:?}");

    // Garbage in what serving rests on (the container rows): refused
    // before serving, unmarked.
    std::fs::write(&db, &original).unwrap();
    std::fs::remove_file(files::check_whole_marker(&db)).unwrap();
    crate::store::damage::overwrite_root_page(&db, "containers").await;
    let r = refused(open_at(&db, false).await);
    assert!(r.sentence.contains("is damaged"), "{r:?}");
    assert!(r.detail.is_some(), "{r:?}");
    assert!(!files::check_whole_marker(&db).exists());

    // Cut in half.
    std::fs::write(&db, &original[..original.len() / 2]).unwrap();
    let r = refused(open_at(&db, false).await);
    assert!(r.sentence.contains("truncated"), "{r:?}");

    // Rebuilt on purpose: the damaged file is kept, byte for byte.
    let (_store, guard) = open_at(&db, true).await.unwrap();
    let Origin::Rebuilt { moved_aside, .. } = &guard.origin else {
        panic!("{:?}", guard.origin);
    };
    assert_eq!(
        std::fs::read(&moved_aside[0]).unwrap(),
        &original[..original.len() / 2]
    );
}

#[tokio::test]
async fn a_file_that_is_not_a_database_or_not_ours_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("boilerhouse.db");
    std::fs::write(&db, "a text file where the database should be\n").unwrap();
    let r = refused(open_at(&db, false).await);
    assert!(r.sentence.contains("not a SQLite database"), "{r:?}");
    assert!(
        !r.sentence.contains("code"),
        "no SQLite codes in the sentence: {r:?}"
    );
}

#[tokio::test]
async fn a_second_server_on_one_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("boilerhouse.db");
    let (_store, _guard) = open_at(&db, false).await.unwrap();
    let r = refused(open_at(&db, false).await);
    assert!(
        r.sentence.contains("in use by another boilerhoused"),
        "{r:?}"
    );
    assert!(
        r.sentence.contains(&std::process::id().to_string()),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_rebuild_of_a_sound_database_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("boilerhouse.db");
    filled(&db).await;
    let (store, guard) = open_at(&db, true).await.unwrap();
    assert_eq!(guard.origin, Origin::Existing);
    let query = crate::store::EventQuery {
        limit: 1000,
        ..Default::default()
    };
    assert!(store.list_events(&query).await.unwrap().len() > 100);
}

#[test]
fn damage_that_shows_only_at_open_or_migration_is_refused_too() {
    let db = Path::new("/var/lib/boilerhouse/boilerhouse.db");
    let migration = StoreError::Unavailable(
        "migration failed: error returned from database: (code: 11) database disk image is malformed"
            .into(),
    );
    let e = refuse_open_error(db, migration);
    let r = e.downcast_ref::<Refused>().expect("a refusal");
    assert!(
        r.sentence
            .contains("is damaged (SQLite finds it malformed)"),
        "{r:?}"
    );
    assert!(r.detail.as_deref().unwrap().contains("code: 11"), "{r:?}");
    // Anything else stays what it was.
    let busy = refuse_open_error(db, StoreError::Unavailable("database is locked".into()));
    assert!(busy.downcast_ref::<Refused>().is_none());
}

#[test]
fn the_backend_is_told_from_the_location_and_postgres_gets_its_own_recipe() {
    let file = "/var/lib/boilerhouse/boilerhouse.db";
    assert_eq!(
        DatabaseLocation::parse(file).unwrap(),
        DatabaseLocation::Sqlite(file.into())
    );
    for url in ["postgres://bh@db/bh", "postgresql://db/bh"] {
        assert_eq!(
            DatabaseLocation::parse(url).unwrap().backend(),
            crate::store::Backend::Postgres
        );
    }
    assert!(PG_DUMP_RECIPE.contains("pg_dump") && PG_DUMP_RECIPE.contains("pg_restore"));
}

/// A database whose container index (one row per Docker id, partial, so
/// `quick_check` cannot count it) disagrees with its table.
/// [`filled`], and a container row with a Docker id (an entry in the
/// partial index `containers_docker_id`).
async fn filled_with_a_container(db: &Path) {
    filled(db).await;
    let mut conn = crate::store::open_raw(db).await.unwrap();
    sqlx::query(
        "INSERT INTO containers (container_id, pool_id, workload_id, node_id, docker_id, state, spec_hash, created_at, updated_at) VALUES ('k1', 'w', 'w', 'n', 'd1', 'idle', 'h', 0, 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
}

async fn with_a_damaged_container_index(db: &Path) {
    filled_with_a_container(db).await;
    crate::store::damage::empty_index(db, "containers_docker_id").await;
}

/// Polls `flag` until it is set; fails after 10 s.
async fn set_within_10s(flag: &AtomicBool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !flag.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "never set");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A sound existing file opens before its whole check, which runs after:
/// until it passes, `whole_checked` is false (the history trim waits on
/// it); then true. The whole check comes back while the server runs:
/// damage that arises after the first one passed (here an index emptied
/// under the open store) is found by the next, and ends in the refusal
/// and the mark.
#[tokio::test]
async fn the_whole_check_follows_the_open_and_comes_back_for_damage_that_arises_later() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("boilerhouse.db");
    filled_with_a_container(&db).await;
    let (store, opened) = open(
        &DatabaseLocation::Sqlite(db.clone()),
        false,
        StoreOptions::default(),
    )
    .await
    .unwrap();
    let whole_checked = opened.whole_checked();
    assert!(!whole_checked.load(Ordering::Acquire));
    let mut check = opened.full_check_every(std::time::Duration::from_millis(50));
    tokio::select! {
        refused = &mut check => panic!("a sound file refused: {refused:?}"),
        () = set_within_10s(&whole_checked) => {}
    }
    assert!(!files::check_whole_marker(&db).exists());

    crate::store::damage::empty_index(&db, "containers_docker_id").await;
    let refused = tokio::time::timeout(std::time::Duration::from_secs(30), check)
        .await
        .expect("the damage was never found");
    assert!(
        refused
            .sentence
            .contains(&format!("the database {} is damaged", db.display())),
        "{}",
        refused.sentence
    );
    assert!(
        refused
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("containers_docker_id")),
        "{refused:?}"
    );
    assert!(files::check_whole_marker(&db).exists());
    store.close().await;
}

/// A start that failed on a damaged file ends in the refusal, and marks
/// it: the next start checks the whole file before serving and refuses
/// it there. The marked file repaired (here: the damage undone by a
/// restore of the pristine copy), a start passes and the mark goes.
#[tokio::test]
async fn a_failed_start_on_a_damaged_file_ends_in_the_refusal_and_the_next_is_checked_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("boilerhouse.db");
    with_a_damaged_container_index(&db).await;
    let location = DatabaseLocation::Sqlite(db.clone());

    // The checks before serving pass it: the damage is where only the
    // whole check looks.
    let (store, guard) = open_at(&db, false).await.unwrap();
    assert!(!guard.whole_checked.load(Ordering::Acquire));
    store.close().await;
    drop(store);
    drop(guard);

    let behind = damage_behind_failure(&location)
        .await
        .expect("the damage behind a failed start");
    assert!(behind.sentence.contains("is damaged"), "{behind:?}");
    assert!(files::check_whole_marker(&db).exists());

    let r = refused(open_at(&db, false).await);
    assert!(r.sentence.contains("is damaged"), "{r:?}");
    assert!(
        r.detail
            .as_deref()
            .unwrap_or("")
            .contains("containers_docker_id"),
        "{r:?}"
    );

    let sound = dir.path().join("sound.db");
    filled(&sound).await;
    assert!(
        damage_behind_failure(&DatabaseLocation::Sqlite(sound.clone()))
            .await
            .is_none()
    );
    std::fs::write(files::check_whole_marker(&sound), "test\n").unwrap();
    let (store, guard) = open_at(&sound, false).await.unwrap();
    assert!(guard.whole_checked.load(Ordering::Acquire));
    assert!(!files::check_whole_marker(&sound).exists());
    store.close().await;
}
