//! Takeover benchmark (PostgreSQL): how long an elected server takes to
//! rebuild the pool index from a large database, from every row (a cold
//! restore, what a restarted server does) against from a standby's warm
//! copy and what changed since it last looked, side by side in one run,
//! with one round trip to the database as the floor.
//!
//! cargo run --release -p boilerhouse-server --example takeover_bench -- \
//!     [--containers N] [--changes K] [--runs R] [--postgres URL]
//!
//! - `--containers` (100000): container rows; half are claimed (an active
//!   claim each) and a tenth of the rest reserved.
//! - `--changes` (1000): rows the old leader changes after the standby's
//!   last read (container updates in transactions of 10, and a deletion
//!   in every tenth), which the catch-up must read.
//! - `--postgres URL`, or `BOILERHOUSE_POSTGRES_URL`: the server; the
//!   benchmark makes a schema of its own there and drops it after.
//!
//! Every case builds the index the server builds (`Index::from_rows`) and
//! checks it equals the cold one, so a fast wrong answer cannot pass.
//!
//! It also times what the feed costs a write: single-row update
//! transactions with the feed's triggers and with them disabled.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::Executor as _;

use boilerhouse_core::pool::index::Index;
use boilerhouse_server::store::{
    DatabaseLocation, PoolSnapshot, Store, StoreOptions, WarmPool, open_inspector,
};
use boilerhouse_testkit::database::TestDatabase;

struct Options {
    containers: u32,
    changes: u32,
    runs: u32,
    postgres: String,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        containers: 100_000,
        changes: 1_000,
        runs: 5,
        postgres: std::env::var("BOILERHOUSE_POSTGRES_URL").unwrap_or_default(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--containers" => options.containers = value()?.parse()?,
            "--changes" => options.changes = value()?.parse()?,
            "--runs" => options.runs = value()?.parse()?,
            "--postgres" => options.postgres = value()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        !options.postgres.is_empty(),
        "give --postgres URL or BOILERHOUSE_POSTGRES_URL (dev/postgres starts a server)"
    );
    anyhow::ensure!(options.containers >= 10, "--containers: at least 10");
    Ok(options)
}

fn index(s: PoolSnapshot) -> Index {
    Index::from_rows(s.containers, s.claims, s.reservations)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let db = TestDatabase::postgres_schema_in(&o.postgres).await?;
    let location = DatabaseLocation::parse(db.value()).map_err(|e| anyhow::anyhow!(e))?;
    let store = Store::open(location.clone(), StoreOptions::default()).await?;
    let mut writer = open_inspector(&location).await?;
    let n = o.containers;
    let filled = Instant::now();
    writer
        .execute(sqlx::AssertSqlSafe(format!(
            "BEGIN; \
             INSERT INTO containers (container_id, pool_id, workload_id, node_id, docker_id, state, spec_hash, \
             tenant_id, last_tenant_id, claim_generation, created_at, updated_at) \
             SELECT '00000000-0000-7000-8000-' || lpad(i::text, 12, '0'), 'w' || (i % 20), 'w' || (i % 20), \
             'node-' || (i % 1000), 'd' || i, \
             CASE WHEN i % 2 = 0 THEN 'claimed' WHEN i % 20 = 1 THEN 'reserved' ELSE 'idle' END, 'h1', \
             CASE WHEN i % 2 = 0 THEN 't' || i END, CASE WHEN i % 20 = 1 THEN 't' || i END, \
             CASE WHEN i % 2 = 0 OR i % 20 = 1 THEN 1 ELSE 0 END, \
             1700000000000 + i, 1700000000000 + i FROM generate_series(0, {last}) AS i; \
             INSERT INTO claims (claim_id, tenant_id, workload_id, container_id, node_id, generation, source, \
             status, claimed_at, last_activity_at) \
             SELECT 'claim-' || i, 't' || i, 'w' || (i % 20), '00000000-0000-7000-8000-' || lpad(i::text, 12, '0'), \
             'node-' || (i % 1000), 1, 'pool', 'active', 1700000001000, 1700000001000 \
             FROM generate_series(0, {last}, 2) AS i; \
             INSERT INTO affinity_reservations (tenant_id, workload_id, container_id, node_id, reserved_at, expires_at) \
             SELECT 't' || i, 'w' || (i % 20), '00000000-0000-7000-8000-' || lpad(i::text, 12, '0'), \
             'node-' || (i % 1000), 1700000002000, 1800000000000 FROM generate_series(1, {last}, 20) AS i; \
             COMMIT; ANALYZE",
            last = n - 1
        )))
        .await?;
    let filled = filled.elapsed();

    // The floor: one round trip to the database.
    let mut trips = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        writer.execute("SELECT 1").await?;
        trips.push(t.elapsed());
    }
    let floor = median(trips);

    let mut cold = Vec::new();
    let mut cold_index = None;
    for _ in 0..o.runs {
        let t = Instant::now();
        let built = index(store.load_pool_snapshot().await?);
        cold.push(t.elapsed());
        cold_index = Some(built);
    }

    // A standby's first read (off the takeover's path), then the old
    // leader's last changes, then the elected server's catch-up.
    let mut standby = open_inspector(&location).await?;
    let mut first_reads = Vec::new();
    let mut catch_ups = Vec::new();
    let mut rows_read = 0;
    let mut next_change = 0u32;
    for _ in 0..o.runs {
        let mut warm = WarmPool::default();
        let t = Instant::now();
        warm.refresh(&mut standby).await?;
        first_reads.push(t.elapsed());
        for batch in 0..o.changes.div_ceil(10) {
            let mut statements = String::from("BEGIN;");
            for _ in 0..10 {
                // Idle containers (odd, not reserved) are updated; every
                // tenth batch removes one.
                let i = 3 + 2 * (next_change % (n / 2 - 2));
                next_change += 1;
                let id = format!("00000000-0000-7000-8000-{i:012}");
                statements.push_str(&format!(
                    "UPDATE containers SET revision = revision + 1 WHERE container_id = '{id}';"
                ));
            }
            if batch % 10 == 9 {
                let i = 3 + 2 * (next_change % (n / 2 - 2));
                next_change += 1;
                statements.push_str(&format!(
                    "DELETE FROM containers WHERE container_id = '00000000-0000-7000-8000-{i:012}' AND state = 'idle';"
                ));
            }
            statements.push_str("COMMIT");
            writer.execute(sqlx::AssertSqlSafe(statements)).await?;
        }
        let expected = index(store.load_pool_snapshot().await?);
        let t = Instant::now();
        let caught_up = store.catch_up(&mut warm).await?;
        let (built, _unreadable) = warm.into_parts();
        catch_ups.push(t.elapsed());
        rows_read = caught_up.rows;
        anyhow::ensure!(
            built == expected,
            "the index built from the warm copy differs from a cold load"
        );
    }
    anyhow::ensure!(cold_index.is_some());

    // What the feed costs a write: single-row update transactions, one
    // after another (each COMMIT flushed), with the feed's triggers and
    // with them disabled, interleaved in rounds so drift hits both.
    let writes = 500;
    let mut with_feed = Vec::new();
    let mut without_feed = Vec::new();
    for round in 0..o.runs {
        for feed in [true, false] {
            if !feed {
                writer
                    .execute("ALTER TABLE containers DISABLE TRIGGER USER")
                    .await?;
            }
            let t = Instant::now();
            for k in 0..writes {
                let i = 3 + 2 * ((round * writes + k) % (n / 2 - 2));
                writer
                    .execute(sqlx::AssertSqlSafe(format!(
                        "UPDATE containers SET revision = revision + 1 \
                         WHERE container_id = '00000000-0000-7000-8000-{i:012}'"
                    )))
                    .await?;
            }
            let per = t.elapsed() / writes;
            if feed {
                with_feed.push(per);
            } else {
                without_feed.push(per);
                writer
                    .execute("ALTER TABLE containers ENABLE TRIGGER USER")
                    .await?;
            }
        }
    }

    let claims = n.div_ceil(2);
    let reservations = (n - 1).div_ceil(20);
    println!(
        "PostgreSQL, {n} containers, {claims} active claims, {reservations} reservations \
         (filled in {}); medians of {} runs",
        ms(filled),
        o.runs
    );
    println!();
    println!("| what | time |");
    println!("|---|---:|");
    println!("| floor: one round trip (`SELECT 1`) | {} |", ms(floor));
    println!(
        "| cold restore: read every row, build the index | {} |",
        ms(median(cold))
    );
    println!(
        "| warm: catch up {rows_read} changed rows after {} changes, into the index kept warm | {} |",
        o.changes,
        ms(median(catch_ups))
    );
    println!(
        "| (standby's first read of every row, before any election) | {} |",
        ms(median(first_reads))
    );
    println!();
    println!("| one write transaction (a container row, COMMIT flushed) | time |");
    println!("|---|---:|");
    println!(
        "| without the feed's triggers | {:.3} ms |",
        median(without_feed).as_secs_f64() * 1e3
    );
    println!(
        "| with them (the clock row, the token, the stamp) | {:.3} ms |",
        median(with_feed).as_secs_f64() * 1e3
    );
    Ok(())
}
