//! The load generator against a real server, agent and Docker engine: a
//! short closed-loop and a short open-loop run each claim and release
//! for real, and their JSON reports say so. A smoke run that asserts it
//! worked, not how fast (figures belong in docs/BENCHMARKS.md).

use std::process::Command;

use boilerhouse_testkit::binary;
use boilerhouse_testkit::cluster::Cluster;

fn run(c: &Cluster, extra: &[&str]) -> serde_json::Value {
    let credentials = c.server().credentials().expect("a secure server");
    let out = Command::new(binary("boilerhouse-load"))
        .args(["--server", &c.url(), "--workload", "w", "--tenants", "6"])
        .arg("--ca")
        .arg(credentials.ca())
        .args(["--token", &credentials.admin_token, "--json", "-"])
        .args(extra)
        .env_remove("BOILERHOUSE_ADDR")
        .output()
        .expect("run boilerhouse-load");
    assert!(
        out.status.success(),
        "boilerhouse-load {extra:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "a JSON report ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Claims and releases granted, and the calls answered otherwise.
fn counts(report: &serde_json::Value) -> (u64, u64, u64) {
    let n = |p: &str| report.pointer(p).and_then(|v| v.as_u64()).unwrap_or(0);
    (
        n("/claim/ok"),
        n("/release/ok"),
        n("/claim/errors") + n("/release/errors"),
    )
}

#[tokio::test]
async fn closed_and_open_loops_claim_and_release_through_the_api() {
    let Some(c) = Cluster::builder()
        .node("load")
        .workload("w", |image| {
            format!(
                "id: w\nimage: {image}\ncommand: [sleep, infinity]\n\
                 pool: {{min_size: 6, max_size: 6, affinity_timeout: 5m}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("w", 6).await;

    let closed = run(&c, &["--concurrency", "3", "--duration", "2s"]);
    let (claims, releases, errors) = counts(&closed);
    assert!(claims > 0 && releases > 0, "{closed:#}");
    assert_eq!(errors, 0, "{closed:#}");
    // Six tenants, six containers: each tenant's first claim takes one
    // from the pool and every later one its reservation.
    let sources = &closed["claim_sources"];
    assert!(sources["POOL"].as_u64().unwrap_or(0) <= 6, "{closed:#}");
    assert!(sources["AFFINITY"].as_u64().unwrap_or(0) > 0, "{closed:#}");
    assert!(closed["claim"]["client_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(closed["claim"]["server_ms"]["count"].as_u64().unwrap() == claims);
    // The floor: health checks before the run, all answered.
    assert_eq!(
        closed["floor_health_check"]["ok"].as_u64(),
        Some(200),
        "{closed:#}"
    );

    let open = run(&c, &["--rate", "20", "--duration", "2s", "--hold", "50ms"]);
    let (claims, releases, errors) = counts(&open);
    assert!(claims > 0 && releases > 0, "{open:#}");
    assert_eq!(errors, 0, "{open:#}");
    assert!(
        open["mode"]
            .as_str()
            .unwrap()
            .starts_with("open loop at 20/s"),
        "{open:#}"
    );
    // The server holds what the generator saw: nothing left claimed.
    let pool = c.wait_idle("w", 0).await;
    assert_eq!(pool.counts.unwrap().claimed, 0);
}
