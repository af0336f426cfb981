//! The load generator against a real server, agent and Docker engine: the
//! `--until-granted` probe, a short closed-loop and a short open-loop run
//! and a `--claims-only` run each claim (and release) for real, and their
//! JSON reports say so. A smoke run that asserts it
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
async fn the_probe_both_loops_and_claims_only_claim_through_the_api() {
    let Some(c) = Cluster::builder()
        .node("load")
        .workload("w", |image| {
            format!(
                "id: w\nimage: {image}\ncommand: [sleep, infinity]\n\
                 pool: {{min_size: 7, max_size: 7, affinity_timeout: 5m}}\n"
            )
        })
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("w", 7).await;

    // The probe: one tenant of its own claims until granted, then
    // releases (its container is then reserved for it, so six are left
    // for the six tenants below).
    let probe = run(&c, &["--until-granted", "30s", "--tenant-prefix", "probe"]);
    assert!(
        probe["granted_after_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{probe:#}"
    );
    assert_eq!(probe["source"], "CLAIM_SOURCE_POOL", "{probe:#}");
    assert!(probe["attempts"].as_u64().unwrap() >= 1, "{probe:#}");

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

    // Claims only: each tenant claims once (its reservation) and keeps it.
    let held = run(
        &c,
        &["--claims-only", "--concurrency", "3", "--duration", "2s"],
    );
    let (claims, releases, errors) = counts(&held);
    assert_eq!((claims, releases, errors), (6, 0, 0), "{held:#}");
    assert_eq!(
        held["claim_sources"]["AFFINITY"].as_u64(),
        Some(6),
        "{held:#}"
    );
    let pool = c.wait_idle("w", 0).await;
    assert_eq!(pool.counts.unwrap().claimed, 6);
}
