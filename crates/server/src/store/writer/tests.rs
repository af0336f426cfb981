//! Writes of one shape sent to SQLite together must each stand or fall
//! alone, exactly as if they ran one by one: a seeded run of writes,
//! queued at once so that batches and runs form, is checked against a
//! model applied in queue order; and an error that breaks the
//! transaction fails the whole batch.

use std::collections::BTreeMap;

use futures::FutureExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::super::statements::{Expect, Statements};
use super::super::{Store, StoreError, StoreOptions};

/// One write of the run; each kind is one shape.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// Fails on a taken key (a unique violation) or a negative value (a
    /// CHECK constraint): a statement error.
    Insert { k: i64, v: i64 },
    /// Compare and set, then a log row whose id comes back: a failed
    /// check in the first statement, while the second still runs in the
    /// same text and must leave nothing.
    Cas { k: i64, expected: i64, new: i64 },
    /// Bumps one key, then inserts another: the bump must be undone when
    /// the insert fails.
    BumpThenInsert { bump: i64, k: i64 },
    /// Inserts a key if absent, then checks the table holds at most
    /// `bound` rows.
    Capped { k: i64, bound: i64 },
}

/// What a write came to, comparable across the model and the store.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Result_ {
    Ok(Vec<i64>),
    /// A check refused it, with its message.
    Refused(&'static str),
    Unique,
    CheckConstraint,
}

const CAS: &str = "the value was not as expected";
const CAP: &str = "too many rows";

fn statements(write: Write) -> Statements {
    let mut s = Statements::default();
    match write {
        Write::Insert { k, v } => s.push(
            "INSERT INTO kv (k, v) VALUES (?, ?)",
            vec![k.into(), v.into()],
            Expect::Anything,
        ),
        Write::Cas { k, expected, new } => {
            s.push(
                "UPDATE kv SET v = ? WHERE k = ? AND v = ?",
                vec![new.into(), k.into(), expected.into()],
                Expect::Changes(CAS.into()),
            );
            s.push(
                "INSERT INTO log (k) VALUES (?) RETURNING id",
                vec![k.into()],
                Expect::Returns,
            );
        }
        Write::BumpThenInsert { bump, k } => {
            s.push(
                "UPDATE kv SET v = v + 1 WHERE k = ?",
                vec![bump.into()],
                Expect::Anything,
            );
            s.push(
                "INSERT INTO kv (k, v) VALUES (?, 0)",
                vec![k.into()],
                Expect::Anything,
            );
        }
        Write::Capped { k, bound } => {
            s.push(
                "INSERT INTO kv (k, v) VALUES (?, 0) ON CONFLICT (k) DO NOTHING",
                vec![k.into()],
                Expect::Anything,
            );
            s.push(
                "SELECT COUNT(*) FROM kv",
                vec![],
                Expect::AtMost(bound, CAP.into()),
            );
        }
    }
    s
}

/// The database's state as the model keeps it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Model {
    kv: BTreeMap<i64, i64>,
    log: Vec<i64>,
}

impl Model {
    /// Applies one write alone, all or nothing.
    fn apply(&mut self, write: Write) -> Result_ {
        match write {
            Write::Insert { k, v } => {
                // SQLite checks CHECK constraints before unique indexes.
                if v < 0 {
                    return Result_::CheckConstraint;
                }
                if self.kv.contains_key(&k) {
                    return Result_::Unique;
                }
                self.kv.insert(k, v);
                Result_::Ok(vec![])
            }
            Write::Cas { k, expected, new } => {
                if self.kv.get(&k) != Some(&expected) {
                    return Result_::Refused(CAS);
                }
                self.kv.insert(k, new);
                self.log.push(k);
                // INTEGER PRIMARY KEY: max + 1, and nothing is deleted.
                Result_::Ok(vec![self.log.len() as i64])
            }
            Write::BumpThenInsert { bump, k } => {
                if self.kv.contains_key(&k) {
                    return Result_::Unique;
                }
                if let Some(v) = self.kv.get_mut(&bump) {
                    *v += 1;
                }
                self.kv.insert(k, 0);
                Result_::Ok(vec![])
            }
            Write::Capped { k, bound } => {
                let mut next = self.kv.clone();
                next.entry(k).or_insert(0);
                if next.len() as i64 > bound {
                    return Result_::Refused(CAP);
                }
                self.kv = next;
                Result_::Ok(vec![])
            }
        }
    }
}

fn classify(result: Result<Vec<i64>, StoreError>) -> Result_ {
    match result {
        Ok(ids) => Result_::Ok(ids),
        Err(StoreError::Conflict(m)) if m == CAS => Result_::Refused(CAS),
        Err(StoreError::Conflict(m)) if m == CAP => Result_::Refused(CAP),
        Err(StoreError::Conflict(m)) if m.contains("UNIQUE") => Result_::Unique,
        Err(StoreError::Database(e)) if e.to_string().contains("CHECK") => Result_::CheckConstraint,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Runs of one kind, so that writes of one shape queue back to back.
fn generate(rng: &mut StdRng, n: usize) -> Vec<Write> {
    let mut writes = Vec::with_capacity(n);
    while writes.len() < n {
        let kind = rng.random_range(0..4);
        for _ in 0..rng.random_range(1..=12) {
            let k = rng.random_range(0..24);
            writes.push(match kind {
                0 => Write::Insert {
                    k,
                    v: rng.random_range(-2..10),
                },
                1 => Write::Cas {
                    k,
                    expected: rng.random_range(0..3),
                    new: rng.random_range(0..3),
                },
                2 => Write::BumpThenInsert {
                    bump: rng.random_range(0..24),
                    k,
                },
                _ => Write::Capped {
                    k,
                    bound: rng.random_range(4..20),
                },
            });
        }
    }
    writes.truncate(n);
    writes
}

async fn state(store: &Store) -> Model {
    let kv: Vec<(i64, i64)> = sqlx::query_as("SELECT k, v FROM kv ORDER BY k")
        .fetch_all(&store.reads)
        .await
        .unwrap();
    let log: Vec<(i64,)> = sqlx::query_as("SELECT k FROM log ORDER BY id")
        .fetch_all(&store.reads)
        .await
        .unwrap();
    Model {
        kv: kv.into_iter().collect(),
        log: log.into_iter().map(|(k,)| k).collect(),
    }
}

/// Runs `schema` through the writer.
async fn create(store: &Store, schema: &'static str) {
    store
        .writer
        .write(move |tx| {
            async move {
                sqlx::raw_sql(schema).execute(tx.conn()).await?;
                Ok(())
            }
            .boxed()
        })
        .await
        .unwrap();
}

/// Queues the writes in order, all at once (a write is queued by its first
/// poll), so that the writer takes what waits and runs form; then awaits
/// every answer.
async fn all_at_once<T>(
    mut queued: Vec<futures::future::BoxFuture<'_, Result<T, StoreError>>>,
) -> Vec<Result<T, StoreError>> {
    let mut results = Vec::with_capacity(queued.len());
    for write in &mut queued {
        results.push(match futures::poll!(write.as_mut()) {
            std::task::Poll::Ready(result) => Some(result),
            std::task::Poll::Pending => None,
        });
    }
    for (result, write) in results.iter_mut().zip(queued) {
        if result.is_none() {
            *result = Some(write.await);
        }
    }
    results.into_iter().flatten().collect()
}

#[tokio::test]
async fn writes_sent_together_each_stand_or_fall_as_if_run_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut shared = 0;
    let mut undone = 0;
    for seed in 0..24u64 {
        let path = dir.path().join(format!("{seed}.db"));
        let store = Store::open(&path, StoreOptions::default()).await.unwrap();
        create(
            &store,
            "CREATE TABLE kv (k INTEGER PRIMARY KEY, v INTEGER NOT NULL CHECK (v >= 0));
             CREATE TABLE log (id INTEGER PRIMARY KEY, k INTEGER NOT NULL)",
        )
        .await;
        let before = store.writer_stats();

        let mut rng = StdRng::seed_from_u64(seed);
        let writes = generate(&mut rng, 300);
        let queued: Vec<_> = writes
            .iter()
            .map(|w| {
                store
                    .writer
                    .write_statements_then(statements(*w), |_tx, ids| Ok(ids), || {})
                    .boxed()
            })
            .collect();
        let results = all_at_once(queued).await;

        let mut model = Model::default();
        for (i, (write, result)) in writes.iter().zip(results).enumerate() {
            let expected = model.apply(*write);
            assert_eq!(
                classify(result),
                expected,
                "seed {seed}, write {i}: {write:?}"
            );
        }
        assert_eq!(state(&store).await, model, "seed {seed}: the database");
        let after = store.writer_stats();
        shared += after.shared_trips - before.shared_trips;
        undone += after.undone_runs - before.undone_runs;
        store.close().await;
    }
    assert!(shared > 0, "no write travelled with another");
    assert!(
        undone > 0,
        "no write failed after another in its run: the undoing went untested"
    );
}

/// A full disk (SQLITE_FULL) breaks the transaction wherever it lands in a
/// run sent together: every write of its batch fails UNAVAILABLE, nothing
/// of the batch commits, and the writer goes on with a new connection.
#[tokio::test]
async fn a_full_disk_in_a_run_fails_its_whole_batch_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("full.db"), StoreOptions::default())
        .await
        .unwrap();
    create(
        &store,
        "CREATE TABLE blobs (k INTEGER PRIMARY KEY, b BLOB NOT NULL)",
    )
    .await;
    // Room for a few more pages, on the writer's connection only: the one
    // it opens after a broken batch has no such limit.
    store
        .writer
        .write(|tx| {
            async move {
                let (pages,): (i64,) = sqlx::query_as("PRAGMA page_count")
                    .fetch_one(tx.conn())
                    .await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "PRAGMA max_page_count = {}",
                    pages + 6
                )))
                .execute(tx.conn())
                .await?;
                Ok(())
            }
            .boxed()
        })
        .await
        .unwrap();
    let insert = |k: i64| {
        let mut s = Statements::default();
        // About a page each.
        s.push(
            "INSERT INTO blobs (k, b) VALUES (?, zeroblob(3000))",
            vec![k.into()],
            Expect::Anything,
        );
        store
            .writer
            .write_statements_then(s, |_tx, ids| Ok(ids), || {})
            .boxed()
    };
    let results = all_at_once((0..32).map(insert).collect()).await;
    let stored: Vec<(i64,)> = sqlx::query_as("SELECT k FROM blobs ORDER BY k")
        .fetch_all(&store.reads)
        .await
        .unwrap();
    let stored: Vec<i64> = stored.into_iter().map(|(k,)| k).collect();
    let mut full = 0;
    for (k, result) in results.iter().enumerate() {
        match result {
            Ok(_) => assert!(
                stored.contains(&(k as i64)),
                "write {k} was answered ok but is not in the database"
            ),
            Err(StoreError::Unavailable(m)) if m.contains("full") => {
                full += 1;
                assert!(
                    !stored.contains(&(k as i64)),
                    "write {k} failed but is in the database"
                );
            }
            Err(e) => panic!("write {k}: unexpected error: {e}"),
        }
    }
    assert!(full > 0, "no write met the full disk: {results:?}");
    // A new connection, without the limit.
    let after = insert(1_000).await;
    assert!(after.is_ok(), "the writer did not go on: {after:?}");
    store.close().await;
}
