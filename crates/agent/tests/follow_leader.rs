//! Agents and `bh` given several server addresses find the leader: the
//! real boilerhoused, and beside it a fake standby
//! ([`boilerhouse_testkit::standby`]) that refuses every call as a standby
//! replica does, naming the real server as the leader (or no leader).

use std::process::{Output, Stdio};

use boilerhouse_testkit::cluster::{Cluster, ClusterBuilder};
use boilerhouse_testkit::standby::Standby;
use boilerhouse_testkit::{stderr, stdout};

fn demo() -> ClusterBuilder {
    Cluster::builder().workload("demo", |image| {
        format!("id: demo\nimage: {image}\npool: {{min_size: 1}}\n")
    })
}

/// Whether agent `i` logged a session with `server`.
fn connected_to(c: &Cluster, i: usize, server: &str) -> bool {
    c.agent(i).log().lines().any(|line| {
        line.contains("connected to the server") && line.contains(&format!("server={server} "))
    })
}

#[tokio::test]
async fn agents_find_the_leader_past_standbys_and_follow_a_hint() {
    let Some(mut c) = demo().start().await else {
        return;
    };
    let leader = c.url();
    let naming = Standby::beside(c.server(), Some(&leader)).await.unwrap();
    let unknowing = Standby::beside(c.server(), None).await.unwrap();

    // A standby first in the list: refused, the agent goes to the leader
    // it names and its node is Ready there.
    let listed = c
        .add_node_via("listed", &format!("{},{leader}", naming.url()))
        .await;
    assert!(naming.calls() >= 1, "the agent tried the standby first");
    let log = c.agent(listed).log();
    assert!(log.contains("a standby refused the session"), "{log}");
    assert!(connected_to(&c, listed, &leader), "{log}");

    // A standby that knows no leader: on to the next address.
    let next = c
        .add_node_via("next", &format!("{},{leader}", unknowing.url()))
        .await;
    assert!(unknowing.calls() >= 1);
    assert!(connected_to(&c, next, &leader), "{}", c.agent(next).log());

    // Only the standby listed: its hint names a server of the list's
    // scheme, which the agent follows.
    let hinted = c.add_node_via("hinted", naming.url()).await;
    assert!(
        connected_to(&c, hinted, &leader),
        "{}",
        c.agent(hinted).log()
    );

    // The nodes work: the pool fills on one of them.
    c.wait_idle("demo", 1).await;

    // The leader restarts: each agent goes round its list (refused by the
    // standby, the leader down, a backoff) until it is back.
    c.restart_server().await;
    c.wait_ready().await;
}

/// Runs `bh` with the cluster's credentials and `configure`'s changes,
/// without blocking the runtime the fake standby answers on.
async fn run_bh(c: &Cluster, configure: impl FnOnce(&mut std::process::Command)) -> Output {
    let mut command = c.server().bh_command(c.server().admin_token());
    configure(&mut command);
    command.stdin(Stdio::null());
    tokio::process::Command::from(command)
        .output()
        .await
        .expect("run bh")
}

/// `bh --server <servers> args…`.
async fn bh(c: &Cluster, servers: &str, args: &[&str]) -> Output {
    run_bh(c, |command| {
        command.args(["--server", servers]).args(args);
    })
    .await
}

async fn bh_ok(c: &Cluster, servers: &str, args: &[&str]) -> String {
    let out = bh(c, servers, args).await;
    assert!(
        out.status.success(),
        "bh {args:?} failed: {}\n{}",
        stderr(&out),
        c.server().log()
    );
    stdout(&out)
}

#[tokio::test]
async fn bh_reads_and_writes_through_the_leader_a_standby_names() {
    let Some(c) = demo().node("pool").start().await else {
        return;
    };
    let leader = c.url();
    let standby = Standby::beside(c.server(), Some(&leader)).await.unwrap();
    let servers = format!("{},{leader}", standby.url());
    c.wait_idle("demo", 1).await;

    let pools = bh_ok(&c, &servers, &["pool", "list"]).await;
    assert!(pools.contains("demo"), "{pools}");
    assert!(standby.calls() >= 1);
    // A claim is a write with no request_id: safe after a standby's
    // refusal, which did nothing.
    bh_ok(&c, &servers, &["claim", "t1", "demo"]).await;
    let claims = bh_ok(&c, &servers, &["claims", "list"]).await;
    assert!(claims.contains("t1"), "{claims}");
    let status = bh_ok(&c, &servers, &["status"]).await;
    assert!(
        status.contains(&format!("Server:     {leader} ")),
        "{status}"
    );
    // The standby alone, as BOILERHOUSE_ADDR: its hint is followed.
    let out = run_bh(&c, |command| {
        command
            .env("BOILERHOUSE_ADDR", standby.url())
            .args(["claims", "list"]);
    })
    .await;
    assert!(stdout(&out).contains("t1"), "{}", stderr(&out));

    // No leader known, and nothing else listening: every address named.
    let lost = Standby::beside(c.server(), None).await.unwrap();
    let down = "https://127.0.0.1:1";
    let out = bh(&c, &format!("{},{down}", lost.url()), &["pool", "list"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "cannot reach boilerhoused at any of its addresses: {} (this server is a standby; no leader is known yet); {down} (connection refused)",
            lost.url()
        )),
        "{err}"
    );
}
