//! Three real `boilerhoused` replicas on one real PostgreSQL database, over
//! TLS with tokens: one leads, the standbys refuse naming it, a kill -9 of
//! the leader hands the lease to a standby that serves what the old one
//! acknowledged, and a leader paused past its lease (SIGSTOP) wakes up
//! deposed and commits nothing.
//!
//! Needs a PostgreSQL server: `BOILERHOUSE_POSTGRES_URL` (dev/test starts
//! one with dev/postgres). Skipped without it unless
//! `BOILERHOUSE_REQUIRE_POSTGRES=1`.

use std::path::Path;
use std::time::{Duration, Instant};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;
use boilerhouse_testkit::database::{TestDatabase, postgres_available};
use boilerhouse_testkit::{ServerOptions, ServerProcess, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;

const LEASE: &str = "2s";

async fn replica(root: &Path, name: &str, database: &str) -> ServerProcess {
    ServerProcess::start_in(
        root,
        ServerOptions {
            args: vec!["--database".into(), database.into()],
            config_toml: Some(format!("leader_lease = \"{LEASE}\"\n")),
            replica: Some(name.into()),
            ..Default::default()
        },
    )
    .await
    .expect("start a replica")
}

/// A client for `server`; a refused connection (a replica swapping its
/// listener between leading and standing by) is an UNAVAILABLE like any
/// other refusal.
async fn pools(
    server: &ServerProcess,
) -> Result<PoolServiceClient<boilerhouse_proto::tls::AuthedChannel>, tonic::Status> {
    let channel = server
        .channel()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:#}")))?;
    Ok(PoolServiceClient::new(channel))
}

/// The replica that leads, once exactly one does.
async fn the_leader(replicas: &[ServerProcess], within: Duration) -> usize {
    eventually(within, "exactly one leader", || async {
        let leaders: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].pid().is_some() && replicas[i].role() == "leader")
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
    .unwrap()
}

async fn scale(server: &ServerProcess, min: u32) -> Result<pb::Pool, tonic::Status> {
    pools(server)
        .await?
        .scale_pool(pb::ScalePoolRequest {
            pool_id: "demo".into(),
            min_size: Some(min),
            max_size: Some(10),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().pool.expect("a pool"))
}

async fn min_size(server: &ServerProcess) -> Result<u32, tonic::Status> {
    pools(server)
        .await?
        .get_pool(pb::GetPoolRequest {
            pool_id: "demo".into(),
        })
        .await
        .map(|r| r.into_inner().pool.expect("a pool").min_size)
}

#[tokio::test]
async fn one_leads_standbys_name_it_and_a_killed_or_paused_leader_is_replaced_and_fenced() {
    if !postgres_available() {
        return;
    }
    let database = TestDatabase::postgres_schema().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("workloads")).unwrap();
    // No agent: the pool stays empty, but its overrides are real writes.
    std::fs::write(
        root.join("workloads/demo.yaml"),
        "id: demo\nimage: busybox\npool: {min_size: 0, max_size: 4}\n",
    )
    .unwrap();
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(replica(root, name, database.value()).await);
    }

    // One leads; the standbys refuse a write and a read, naming it.
    let first = the_leader(&replicas, Duration::from_secs(30)).await;
    let leader_url = replicas[first].url();
    eventually(
        Duration::from_secs(30),
        "the leader to take writes",
        || async { scale(&replicas[first], 1).await.ok() },
    )
    .await
    .unwrap();
    for (i, standby) in replicas.iter().enumerate().filter(|(i, _)| *i != first) {
        let refused = scale(standby, 2)
            .await
            .expect_err("a standby refuses writes");
        assert_eq!(
            refused.code(),
            Code::Unavailable,
            "replica {i}: {refused:?}"
        );
        assert_eq!(
            refused
                .metadata()
                .get("boilerhouse-leader")
                .and_then(|v| v.to_str().ok()),
            Some(leader_url.as_str()),
            "replica {i} names the leader: {refused:?}"
        );
        assert!(refused.message().contains(&leader_url), "{refused:?}");
        let read = min_size(standby)
            .await
            .expect_err("a standby redirects reads");
        assert_eq!(read.code(), Code::Unavailable);
    }
    // Acknowledged by the leader before it dies.
    let acked = scale(&replicas[first], 3).await.unwrap();
    assert_eq!(acked.min_size, 3);

    // kill -9 the leader: a standby leads within a bounded time and has
    // what the old one acknowledged.
    let killed_at = Instant::now();
    replicas[first]
        .signal_and_wait(Signal::SIGKILL, Duration::from_secs(10))
        .await
        .unwrap();
    let second = the_leader(&replicas, Duration::from_secs(30)).await;
    assert_ne!(second, first);
    let served = eventually(
        Duration::from_secs(30),
        "the new leader to serve",
        || async { min_size(&replicas[second]).await.ok() },
    )
    .await
    .unwrap();
    let takeover = killed_at.elapsed();
    println!("takeover after kill -9: {takeover:?} (lease {LEASE})");
    assert_eq!(
        served, 3,
        "the new leader serves what the old one acknowledged"
    );
    // It stood by with a warm copy of the pool's rows, and restored from
    // that copy and what changed since, not from every row.
    let log = replicas[second].log();
    assert!(
        log.contains("standby: read the pool's rows for a warm copy")
            && log.contains("pool index restored from the standby's warm copy"),
        "the new leader restored from its warm copy:\n{log}"
    );

    // SIGSTOP the leader past its lease: the last standby takes over; the
    // old leader wakes up deposed and commits nothing.
    let paused = replicas[second].pid().unwrap();
    kill(Pid::from_raw(paused as i32), Signal::SIGSTOP).unwrap();
    let third = eventually(
        Duration::from_secs(30),
        "a leader besides the paused one",
        || async {
            let others: Vec<usize> = (0..replicas.len())
                .filter(|&i| {
                    i != second && replicas[i].pid().is_some() && replicas[i].role() == "leader"
                })
                .collect();
            (others.len() == 1).then(|| others[0])
        },
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "the third leader to take writes",
        || async { scale(&replicas[third], 5).await.ok() },
    )
    .await
    .unwrap();
    kill(Pid::from_raw(paused as i32), Signal::SIGCONT).unwrap();
    // Whatever the woken server had in flight, and whatever it is asked
    // now, it writes nothing: its writes fail the fence or it refuses as
    // a standby.
    // (UNAVAILABLE from the fence or the standby; a connection cut while
    // it swaps its listener is a refusal too.)
    let late = scale(&replicas[second], 7).await;
    assert!(late.is_err(), "the deposed leader refuses: {late:?}");
    eventually(
        Duration::from_secs(30),
        "the deposed leader to stand by",
        || async { (replicas[second].role() == "standby").then_some(()) },
    )
    .await
    .unwrap();
    let log = replicas[second].log();
    assert!(
        log.contains("the lease was taken by another server") || log.contains("fenced"),
        "the deposed leader noticed:\n{log}"
    );
    assert_eq!(
        min_size(&replicas[third]).await.unwrap(),
        5,
        "nothing the deposed leader was asked took effect"
    );
    let leaders = (0..replicas.len())
        .filter(|&i| replicas[i].pid().is_some() && replicas[i].role() == "leader")
        .count();
    assert_eq!(leaders, 1, "one leader at the end");
}
