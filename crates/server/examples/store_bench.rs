//! Store benchmark: acknowledged durable writes per second with group
//! commit against one transaction per write, side by side in one run, at
//! 1, 16 and 256 concurrent writers. Every write is an activity-log insert
//! acknowledged only after its COMMIT (synchronous=FULL, so after fsync).
//!
//! cargo run --release -p boilerhouse-server --example store_bench -- [seconds-per-case]

use std::time::{Duration, Instant};

use boilerhouse_core::Timestamp;
use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_server::store::{Store, StoreOptions};

async fn run_case(
    writers: usize,
    max_batch: usize,
    duration: Duration,
) -> anyhow::Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(
        &dir.path().join("bench.db"),
        StoreOptions {
            max_batch,
            ..StoreOptions::default()
        },
    )
    .await?;
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = 0u64;
            while Instant::now() < deadline {
                let e = NewEvent::new(
                    Timestamp::from_millis(1),
                    EventKind::NodeJoined,
                    format!("writer {w}"),
                );
                store.append_event(e).await?;
                acknowledged += 1;
            }
            anyhow::Ok(acknowledged)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, store.writer_stats().commits))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);
    let duration = Duration::from_secs_f64(seconds);
    println!(
        "| writers | one txn per write (writes/s) | group commit (writes/s) | writes per commit | speed-up |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for writers in [1usize, 16, 256] {
        let (single, _) = run_case(writers, 1, duration).await?;
        let (group, commits) = run_case(writers, 512, duration).await?;
        let single_rate = single as f64 / seconds;
        let group_rate = group as f64 / seconds;
        println!(
            "| {writers} | {single_rate:.0} | {group_rate:.0} | {:.1} | {:.1}x |",
            group as f64 / commits.max(1) as f64,
            group_rate / single_rate.max(1.0)
        );
    }
    Ok(())
}
