//! A pool's life over time against the real engine: what it says when it
//! cannot reach its min_size.

use std::time::{Duration, Instant};

use boilerhouse_testkit::cluster::Cluster;

#[tokio::test]
async fn a_pool_below_min_size_says_why_once() {
    let Some(c) = Cluster::builder()
        .node("short")
        .workload("big", |image| {
            format!(
                "id: big\nimage: {image}\ncommand: [sleep, infinity]\n\
                 deploy: {{resources: {{limits: {{cpus: 64}}}}}}\npool: {{min_size: 1, max_size: 2}}\n"
            )
        })
        .workload("small", |image| {
            format!(
                "id: small\nimage: {image}\ncommand: [sleep, infinity]\n\
                 pool: {{min_size: 1, max_size: 2}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    let shown = c
        .eventually("bh pool get to say why big is empty", || async {
            let out = c.bh_ok(&["pool", "get", "big"]);
            (out.contains("below min") && out.contains("needs 64 cpu")).then_some(out)
        })
        .await;
    assert!(
        shown.contains(c.node(0)),
        "names the roomiest node: {shown}"
    );
    let json = c.bh_ok(&["pool", "list", "-o", "json"]);
    let pools: serde_json::Value = serde_json::from_str(&json).unwrap();
    let small = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pool"] == "small")
        .unwrap();
    assert!(
        small.get("shortfall").is_none(),
        "a pool that fills says nothing: {small}"
    );

    // Once the reason has held a few seconds, one event says it.
    c.eventually("the shortfall event", || async {
        c.bh_ok(&["events", "--kind", "pool.shortfall"])
            .contains("pool big cannot reach min_size 1: needs 64 cpu")
            .then_some(())
    })
    .await;
    // More refill rounds (a scale wakes one; the period runs others) repeat
    // the reason but do not repeat the event.
    c.bh_ok(&["pool", "scale", "big", "--min", "2"]);
    let since = Instant::now();
    c.eventually("a few more refill rounds", || async {
        (since.elapsed() > Duration::from_secs(3)).then_some(())
    })
    .await;
    let events = c.bh_ok(&["events", "--kind", "pool.shortfall"]);
    assert_eq!(
        events
            .lines()
            .filter(|l| l.contains("pool big cannot reach"))
            .count(),
        1,
        "{events}"
    );
}

#[tokio::test]
async fn containers_that_never_become_healthy_are_replaced_with_the_engines_reason() {
    let Some(c) = Cluster::builder()
        .node("sick")
        .workload("sick", |image| {
            format!(
                "id: sick\nimage: {image}\ncommand: [sleep, infinity]\n\
                 healthcheck: {{test: [CMD-SHELL, 'echo database unreachable; exit 1'], interval: 1s, timeout: 10s, retries: 1}}\n\
                 pool: {{min_size: 1, max_size: 3}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    // The engine says unhealthy; the container is destroyed, the pool
    // backs off, and both the event and the pool say why.
    let events = c
        .eventually("an event about the unhealthy container", || async {
            let out = c.bh_ok(&["events", "--kind", "pool.create_failed"]);
            out.contains("never became healthy").then_some(out)
        })
        .await;
    assert!(events.contains("database unreachable"), "{events}");
    let pool = c
        .eventually("bh pool get to say why", || async {
            let out = c.bh_ok(&["pool", "get", "sick"]);
            out.contains("database unreachable").then_some(out)
        })
        .await;
    assert!(pool.contains("below min"), "{pool}");
    // It is replaced, and the replacement, failing the same way, is too.
    c.eventually("a second unhealthy container replaced", || async {
        let out = c.bh_ok(&["events", "--kind", "pool.create_failed"]);
        (out.matches("never became healthy").count() >= 2).then_some(())
    })
    .await;

    // A claim waiting for one is told it is unhealthy, as UNAVAILABLE.
    let err = c.try_claim("t1", "sick").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("unhealthy"), "{err:?}");
    assert!(err.message().contains("database unreachable"), "{err:?}");
}

fn versioned(image: &str, version: u32) -> String {
    format!(
        "id: roll\nimage: {image}\ncommand: [sleep, infinity]\n\
         environment: {{VERSION: \"{version}\"}}\n\
         pool: {{min_size: 2, max_size: 6, fill_concurrency: 1}}\n"
    )
}

#[tokio::test]
async fn a_changed_workload_replaces_idle_containers_and_claimed_ones_keep_theirs() {
    let Some(c) = Cluster::builder()
        .node("roll")
        .workload("roll", |image| versioned(image, 1))
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("roll", 2).await;
    let old = c.claim("t1", "roll").await;
    assert_eq!(c.exec(&old.docker_id, "echo $VERSION").await, "1\n");
    c.wait_idle("roll", 2).await;

    // The operator changes the environment. Idle containers of the old
    // spec are replaced, one create at a time (fill_concurrency 1).
    c.write_workload("roll", &versioned(c.image(), 2));
    let pool = c
        .eventually("the idle containers to be of the new spec", || async {
            let out = c.bh_ok(&["pool", "get", "roll", "-o", "json"]);
            let pools: serde_json::Value = serde_json::from_str(&out).ok()?;
            let p = &pools[0];
            // Only the claimed container is still stale.
            (p["stale"] == 1 && p["idle"] == 2 && p["warming"] == 0).then_some(p.clone())
        })
        .await;
    assert_eq!(pool["claimed"], 1, "{pool}");

    // New tenants get the new spec; the claimed container keeps its own.
    let new = c.claim("t2", "roll").await;
    assert_eq!(c.exec(&new.docker_id, "echo $VERSION").await, "2\n");
    assert_eq!(c.exec(&old.docker_id, "echo $VERSION").await, "1\n");
    let events = c.bh_ok(&["events", "--kind", "container.draining"]);
    assert!(events.contains("spec changed"), "{events}");
}

/// Docker ids of this run's containers on `node`, sorted.
async fn docker_ids(c: &Cluster, node: &str) -> Vec<String> {
    let mut ids: Vec<String> =
        boilerhouse_testkit::docker::containers_with(c.docker(), "boilerhouse.node-id", node)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|s| s.id)
            .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_fresh_database_adopts_what_runs_before_it_fills_and_a_surplus_is_trimmed() {
    let Some(mut c) = Cluster::builder()
        .node("adopt")
        .workload("keep", |image| {
            format!(
                "id: keep\nimage: {image}\ncommand: [sleep, infinity]\n\
                 pool: {{min_size: 2, max_size: 6}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("keep", 2).await;
    let node = c.node(0).to_owned();
    let before = docker_ids(&c, &node).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // The database is lost; the agent and its containers live on. The
    // rebuild from them is asked for (never done silently).
    c.stop_server().await;
    c.lose_database().await;
    c.start_server_with(&["--rebuild-from-agents"]).await;
    c.wait_idle("keep", 2).await;
    // A few refill rounds later there are still exactly the two adopted
    // containers: nothing was created beside them.
    let since = Instant::now();
    c.eventually("a few refill rounds", || async {
        (since.elapsed() > Duration::from_secs(3)).then_some(())
    })
    .await;
    assert_eq!(docker_ids(&c, &node).await, before, "adopted, not doubled");
    let pool = c.pool("keep").await;
    assert_eq!(pool.counts.unwrap().total, 2, "{pool:?}");

    // Scaled down, the idle surplus goes after its grace (short here).
    c.stop_server().await;
    c.extend_config(r#"pool_surplus_grace = "1s""#);
    c.start_server().await;
    c.wait_idle("keep", 2).await;
    c.bh_ok(&["pool", "scale", "keep", "--min", "1"]);
    c.eventually("the surplus to be drained", || async {
        let counts = c.pool("keep").await.counts?;
        (counts.idle == 1 && counts.total == 1).then_some(())
    })
    .await;
}
