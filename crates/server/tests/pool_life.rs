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
