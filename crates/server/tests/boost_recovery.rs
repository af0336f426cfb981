//! Boosts over time against the real Docker engine: they expire on time,
//! and survive an agent's or the server's absence, with `docker inspect`
//! as the judge of what is really in force.

mod boost_support;

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;

use boost_support::{
    BASE_MEMORY, BASE_NANO_CPUS, claim, first_line, get_boost, limits, start, start_with,
    wait_limits,
};

async fn wait_status(c: &Cluster, id: &str, status: pb::BoostStatus) -> pb::Boost {
    c.eventually(&format!("boost {id} to be {status:?}"), || async {
        let b = get_boost(c, id).await;
        (b.status == status as i32).then_some(b)
    })
    .await
}

#[tokio::test]
async fn a_short_boost_expires_on_time_and_docker_returns_to_base() {
    let Some(c) = start(&["boostexp"], "{min_size: 1, max_size: 2}").await else {
        return;
    };
    let (_container, docker_id) = claim(&c, "t1").await;
    let id = first_line(&c.bh_ok(&[
        "boost",
        "request",
        "tenant/t1/demo",
        "cpu",
        "0.5",
        "--duration",
        "3s",
    ]));
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY)
    );
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "base limits after expiry",
    )
    .await;
    let b = wait_status(&c, &id, pb::BoostStatus::Expired).await;
    let expires = b.expires_at.unwrap();
    let ended = b.ended_at.unwrap();
    let lag_ms = (ended.seconds - expires.seconds) * 1000
        + i64::from(ended.nanos - expires.nanos) / 1_000_000;
    // A figure for docs/BENCHMARKS.md, not an assertion: machines are noisy.
    eprintln!("boost expiry lag: {lag_ms} ms after the deadline");
    assert!(lag_ms >= 0, "ended before its deadline: {lag_ms} ms");
    assert!(b.remaining.is_none());
    assert!(b.reason.contains("expired"), "{}", b.reason);
}

/// One node, with no comparison of every container during the test: what
/// the tests below see put right is put right by the every-second pass
/// over containers with live boosts and those whose last update failed.
async fn start_without_full_pass(node: &str) -> Option<Cluster> {
    start_with(
        &[node],
        "{min_size: 1, max_size: 2}",
        "boost_full_pass_interval = \"1h\"\n",
    )
    .await
}

#[tokio::test]
async fn an_agent_restart_reapplies_live_boosts_and_reverts_ended_ones() {
    let Some(mut c) = start_without_full_pass("boostagent").await else {
        return;
    };
    let (_container, docker_id) = claim(&c, "t1").await;
    let _cpu = first_line(&c.bh_ok(&["boost", "request", "tenant/t1/demo", "cpu", "0.5"]));
    let memory = first_line(&c.bh_ok(&["boost", "request", "tenant/t1/demo", "memory", "32M"]));
    let boosted = (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY + (32 << 20));
    assert_eq!(limits(&c, &docker_id).await, boosted);

    // The agent dies. Meanwhile the CPU boost is lost from the container
    // (as if someone ran docker update), and the memory boost is released
    // while nobody can apply the release.
    c.kill_agent(0);
    c.docker()
        .update_container(
            &docker_id,
            bollard::models::ContainerUpdateBody {
                nano_cpus: Some(BASE_NANO_CPUS),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    c.bh_ok(&["boost", "release", &memory]);
    // A new container boost cannot be applied now: it fails, says so, and
    // holds no capacity.
    let err = c.bh_err(&["boost", "request", "tenant/t1/demo", "cpu", "0.1"]);
    assert!(
        err.contains("unavailable") && err.contains("failed"),
        "{err}"
    );
    let all = c.bh_ok(&["boost", "status", "--all"]);
    assert!(all.lines().any(|l| l.contains("failed")), "{all}");
    assert!(!c.bh_ok(&["boost", "status"]).contains("0.1"));
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS, BASE_MEMORY + (32 << 20)),
        "nothing should reach Docker while the agent is down"
    );

    // It comes back: the live boost is re-applied, the ended one reverted.
    c.restart_agent(0);
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS + 500_000_000, BASE_MEMORY),
        "the cpu boost re-applied and the memory boost reverted",
    )
    .await;
}

/// A release that could not reach the agent is retried every tick until
/// it lands, not only at the next comparison of every container (here
/// off): the container has no live boost left to draw the pass to it.
#[tokio::test]
async fn a_release_the_agent_missed_is_retried_until_the_limits_are_back() {
    let Some(mut c) = start_without_full_pass("boostretry").await else {
        return;
    };
    let (_container, docker_id) = claim(&c, "t1").await;
    let memory = first_line(&c.bh_ok(&["boost", "request", "tenant/t1/demo", "memory", "32M"]));
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS, BASE_MEMORY + (32 << 20))
    );
    c.kill_agent(0);
    c.bh_ok(&["boost", "release", &memory]);
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS, BASE_MEMORY + (32 << 20)),
        "nothing reaches Docker while the agent is down"
    );
    c.restart_agent(0);
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "the released memory boost reverted once the agent is back",
    )
    .await;
}

#[tokio::test]
async fn boosts_that_expire_while_the_server_is_down_are_reverted_at_startup() {
    let Some(mut c) = start(&["boostdown"], "{min_size: 1, max_size: 2}").await else {
        return;
    };
    let (_container, docker_id) = claim(&c, "t1").await;
    let id = first_line(&c.bh_ok(&[
        "boost",
        "request",
        "tenant/t1/demo",
        "memory",
        "32M",
        "--duration",
        "2s",
    ]));
    let expires_at = get_boost(&c, &id).await.expires_at.unwrap();
    c.kill_server();
    // Poll the clock, not a fixed sleep: wait until the deadline has passed.
    c.eventually("the boost's deadline to pass", || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        (now.as_secs() as i64 > expires_at.seconds + 1).then_some(())
    })
    .await;
    assert_eq!(
        limits(&c, &docker_id).await,
        (BASE_NANO_CPUS, BASE_MEMORY + (32 << 20))
    );
    c.restart_server().await;
    let b = get_boost(&c, &id).await;
    assert_eq!(b.status, pb::BoostStatus::Expired as i32, "{b:?}");
    assert!(
        b.reason.contains("while the server was down"),
        "{}",
        b.reason
    );
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "base limits after the restart",
    )
    .await;
}

/// Limits someone changed behind the server's back (`docker update`) on a
/// container with no boost are put back by the comparison of every
/// container (every second here), which runs on the server's niced
/// background thread and spawns the correction from there.
#[tokio::test]
async fn limits_changed_behind_the_servers_back_are_put_back_by_the_full_pass() {
    let Some(c) = Cluster::builder()
        .workload("demo", |image| {
            boost_support::workload(image, "{min_size: 1, max_size: 2}")
        })
        .config("boost_full_pass_interval = \"1s\"\n")
        .node("boostdrift")
        // The agent sees a changed limit in its next full report.
        .agent_args(&["--full-report-interval", "1s"])
        .start()
        .await
    else {
        return;
    };
    let (_container, docker_id) = claim(&c, "t1").await;
    assert_eq!(limits(&c, &docker_id).await, (BASE_NANO_CPUS, BASE_MEMORY));
    c.docker()
        .update_container(
            &docker_id,
            bollard::models::ContainerUpdateBody {
                nano_cpus: Some(BASE_NANO_CPUS + 300_000_000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_limits(
        &c,
        &docker_id,
        (BASE_NANO_CPUS, BASE_MEMORY),
        "the base limits back after a docker update",
    )
    .await;
    // The boost task lived through it (a failing pass would end it): it
    // still runs, and its last pass was a full one without error.
    let status = c.bh_ok(&["status"]);
    let boost = status
        .lines()
        .find(|l| l.starts_with("boost_expiry"))
        .unwrap_or_else(|| panic!("no boost_expiry task in:\n{status}"));
    assert!(!boost.contains("error"), "{boost}");
}
