//! The claim latency a restore adds, through the real system: boilerhoused
//! and one agent as processes (the testkit's cluster), busybox containers
//! on the local Docker engine, a local sink.
//!
//! Three kinds of claim, each taking a fresh warm container from a quiet
//! pool (`max_size = min_size`, so nothing refills while they run), one of
//! each kind per round, in rotating order:
//! - `plain`: a workload without sync, the floor;
//! - `synced, nothing saved`: a tenant with no manifest in the sink; the
//!   claim still waits for the agent's restore, which finds nothing;
//! - `synced, N saved`: a tenant whose N files the agent's own
//!   `SyncRunner` uploaded to the sink beforehand; the claim waits until
//!   they are restored into the container's state directory.
//!
//! Beside them, the same restore without a claim: the agent's
//! `SyncRunner` in this process, from the same sink into an empty
//! directory, once per round, so the claim's share of the time shows.

use std::time::{Duration, Instant};

use serde::Serialize;

use boilerhouse_agent::sync::{Phase, SyncJob, SyncRunner};
use boilerhouse_core::TenantId;
use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;

use crate::data;

/// One kind of claim, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimRow {
    /// What was claimed.
    pub what: String,
    /// Claims measured.
    pub n: usize,
    /// Client-side latency around the Claim call, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// The server's own latency, as it reports it, p50 ms (none for the
    /// in-process restore).
    pub server_p50_ms: Option<f64>,
    /// And p90, ms.
    pub server_p90_ms: Option<f64>,
}

fn synced_yaml(image: &str, sink: &str, pool: usize) -> String {
    format!(
        "id: synced\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\n\
         pool: {{min_size: {pool}, max_size: {pool}, fill_concurrency: 8, affinity_timeout: 1h}}\n\
         sync:\n  sink: {{type: local, path: {sink}, prefix: \"tenants/${{tenantId}}\"}}\n\
         \x20 mappings: [{{path: ., direction: bidirectional}}]\n\
         \x20 policy: {{on_claim: true, on_release: true}}\n"
    )
}

fn plain_yaml(image: &str, pool: usize) -> String {
    format!(
        "id: plain\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\n\
         pool: {{min_size: {pool}, max_size: {pool}, fill_concurrency: 8, affinity_timeout: 1h}}\n"
    )
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn summarise(what: String, mut client: Vec<Duration>, mut server: Vec<Duration>) -> ClaimRow {
    client.sort();
    server.sort();
    ClaimRow {
        what,
        n: client.len(),
        p50_ms: percentile(&client, 50.0),
        p90_ms: percentile(&client, 90.0),
        max_ms: percentile(&client, 100.0),
        server_p50_ms: (!server.is_empty()).then(|| percentile(&server, 50.0)),
        server_p90_ms: (!server.is_empty()).then(|| percentile(&server, 90.0)),
    }
}

/// Checks that the binaries the cluster starts were built in this
/// profile: the testkit would otherwise fall back to debug builds, which
/// may be stale and are slower.
fn check_binaries() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let profile = exe
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| anyhow::anyhow!("where is {}?", exe.display()))?;
    for name in ["boilerhoused", "boilerhouse-agent"] {
        anyhow::ensure!(
            profile.join(name).exists(),
            "{} is missing; build the binaries first: \
             cargo build --release --bins -p boilerhouse-server -p boilerhouse-agent \
             (or pass --claims 0)",
            profile.join(name).display()
        );
    }
    Ok(())
}

/// Times one claim; returns client and server latency.
async fn claim(
    client: &mut pb::claim_service_client::ClaimServiceClient<
        boilerhouse_proto::tls::AuthedChannel,
    >,
    tenant: &str,
    workload: &str,
    source: pb::ClaimSource,
) -> anyhow::Result<(Duration, Duration, pb::ClaimInfo)> {
    let t = Instant::now();
    let response = client
        .claim(pb::ClaimRequest {
            tenant_id: tenant.into(),
            workload_id: workload.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let took = t.elapsed();
    let info = response
        .claim
        .ok_or_else(|| anyhow::anyhow!("no claim in the answer"))?;
    anyhow::ensure!(
        info.source == source as i32,
        "{tenant}/{workload}: source {:?}, expected {source:?} (a cold start would distort the figures)",
        pb::ClaimSource::try_from(info.source)
    );
    let server = response
        .server_latency
        .map(|d| Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs()))
        .unwrap_or_default();
    Ok((took, server, info))
}

/// Runs the claims: `rounds` of each kind, the saved tenants with `files`
/// files of `size` bytes.
pub async fn run(rounds: usize, files: usize, size: usize) -> anyhow::Result<Vec<ClaimRow>> {
    check_binaries()?;
    let builder = Cluster::builder()
        .node("syncbench")
        .timeout(Duration::from_secs(600));
    let sink = builder.dir().join("sink").display().to_string();
    let spec = boilerhouse_core::workload::parse_workload(
        "synced.yaml",
        &synced_yaml("busybox", &sink, 2 * rounds),
    )?
    .sync
    .ok_or_else(|| anyhow::anyhow!("the workload has no sync section"))?;
    let sink2 = sink.clone();
    let Some(cluster) = builder
        .workload("synced", move |image| {
            synced_yaml(image, &sink2, 2 * rounds)
        })
        .workload("plain", move |image| plain_yaml(image, rounds + 1))
        .start()
        .await
    else {
        anyhow::bail!("the claim benchmark needs a Docker engine (or pass --claims 0)");
    };

    // The saved tenants' files, put in the sink by the agent's own code
    // while the pools fill.
    let seed = tempfile::tempdir()?;
    let set = data::many(seed.path(), "seed", files, size)?;
    let runner = SyncRunner::default();
    let t = Instant::now();
    for i in 0..rounds {
        let job = SyncJob {
            tenant: TenantId::new(format!("saved-{i}"))?,
            spec: spec.clone(),
            phase: Phase::Upload,
            force: None,
            pause: false,
        };
        let reports = runner.run(&set.dir, &job).await?;
        anyhow::ensure!(
            reports.len() == 1 && reports[0].uploaded as usize == files,
            "seeding saved-{i}: {reports:?}"
        );
    }
    eprintln!(
        "seeded {rounds} tenants with {files} files each in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    cluster
        .wait_idle("synced", u32::try_from(2 * rounds)?)
        .await;
    cluster.wait_idle("plain", u32::try_from(rounds + 1)?).await;
    eprintln!("pools filled {:.1} s later", t.elapsed().as_secs_f64());

    let mut client = cluster.claims().await;
    // The connection and the server's first claim, not measured.
    claim(&mut client, "warmup", "plain", pb::ClaimSource::Pool).await?;
    let kinds = [
        ("plain", "plain", pb::ClaimSource::Pool),
        ("empty", "synced", pb::ClaimSource::PoolWithData),
        ("saved", "synced", pb::ClaimSource::PoolWithData),
    ];
    let mut times: [(Vec<Duration>, Vec<Duration>); 4] = Default::default();
    let mut last: [Option<pb::ClaimInfo>; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..kinds.len() {
            let kind = (round + k) % kinds.len();
            let (tenant, workload, source) = kinds[kind];
            let (client_t, server_t, info) =
                claim(&mut client, &format!("{tenant}-{round}"), workload, source).await?;
            times[kind].0.push(client_t);
            times[kind].1.push(server_t);
            last[kind] = Some(info);
        }
        let into = seed.path().join(format!("restore-{round}"));
        std::fs::create_dir_all(&into)?;
        let job = SyncJob {
            tenant: TenantId::new(format!("saved-{round}"))?,
            spec: spec.clone(),
            phase: Phase::Download,
            force: None,
            pause: false,
        };
        let t = Instant::now();
        let reports = runner.run(&into, &job).await?;
        times[3].0.push(t.elapsed());
        anyhow::ensure!(
            reports.len() == 1 && reports[0].downloaded as usize == files,
            "restoring saved-{round} in process: {reports:?}"
        );
    }
    // The restores really happened: the last saved tenant's container
    // holds its files, the last empty tenant's holds none.
    for (kind, want) in [(1, 0), (2, files)] {
        let info = last[kind]
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no claims"))?;
        let got = data::listing(std::path::Path::new(&info.state_path))?.len();
        anyhow::ensure!(
            got == want,
            "{}: {got} files in {}, expected {want}",
            info.tenant_id,
            info.state_path
        );
    }
    let names = [
        "no sync (floor)".to_owned(),
        "sync, nothing saved".to_owned(),
        format!("sync, {files} x {} KiB saved", size / 1024),
        format!(
            "the same restore alone: SyncRunner in the benchmark process, {files} x {} KiB, no claim",
            size / 1024
        ),
    ];
    Ok(times
        .into_iter()
        .zip(names)
        .map(|((client, server), what)| summarise(what, client, server))
        .collect())
}
