//! Tenant state sync throughput, each figure beside its floor measured in
//! the same run over the same data.
//!
//! ```sh
//! cargo build --release --bins -p boilerhouse-server -p boilerhouse-agent -p boilerhouse-testkit
//! export BOILERHOUSE_TEST_RUN=bench-$$
//! cargo run --release -p boilerhouse-agent --example sync_bench -- [options]
//! ./target/release/boilerhouse-test-image clean "$BOILERHOUSE_TEST_RUN"
//! ```
//!
//! Everything is written below one temporary directory (`TMPDIR`), removed
//! at the end; moto and Docker containers are stopped and removed too, and
//! the test image of the run is left for the `clean` above.
//!
//! Sync: upload (state directory → sink) and restore (sink → an empty
//! state directory) through the agent's `SyncRunner`, as the agent runs
//! it, of 1 file, `--small` and `--large` files of `--file-kib` KiB, and one
//! file of `--big-mib` MiB (`--no-big` or `SYNC_BENCH_NO_BIG=1` skips it);
//! plus an unchanged re-upload of the `--large` files. Against a local
//! sink and against moto's S3 server (`moto_server`, from `moto[server]`).
//! The floors are in `floor.rs`. Agent and floor alternate which goes
//! first; the 1-file case runs `--reps-one` times, the others `--reps`
//! times but no more once `--budget-s` is spent, and medians are reported.
//!
//! Claims (`--claims` rounds, 0 skips): the latency a restore of
//! `--claim-files` files adds to Claim through boilerhoused, an agent and
//! Docker; see `claims.rs`. Needs the release binaries built first.
//!
//! Prints markdown tables, then one JSON line with every figure.

mod claims;
mod data;
mod floor;
mod sinks;

use std::sync::Arc;

use clap::Parser;
use object_store::ObjectStore;

use boilerhouse_agent::sync::SyncRunner;

use crate::claims::ClaimRow;
use crate::sinks::{Bench, Row, Target};

/// Tenant state sync throughput against its floors, and the claim
/// latency a restore adds.
#[derive(Parser, Debug)]
struct Args {
    /// Files in the "many files" case.
    #[arg(long, default_value_t = 1000)]
    small: usize,
    /// Files in the "very many files" case (also re-uploaded unchanged).
    #[arg(long, default_value_t = 10_000)]
    large: usize,
    /// Size of each small file, KiB.
    #[arg(long, default_value_t = 4)]
    file_kib: usize,
    /// Size of the one large file, MiB.
    #[arg(long, default_value_t = 1024)]
    big_mib: usize,
    /// Skip the large file.
    #[arg(long, env = "SYNC_BENCH_NO_BIG")]
    no_big: bool,
    /// Repetitions of the 1-file case (its figures are medians).
    #[arg(long, default_value_t = 21)]
    reps_one: usize,
    /// Repetitions of every other case (figures are medians), as many as
    /// fit in --budget-s seconds per case and sink, at least one.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per case and sink after which no repetition starts.
    #[arg(long, default_value_t = 30)]
    budget_s: u64,
    /// Sinks to measure: local, s3, or none.
    #[arg(long, value_delimiter = ',', default_value = "local,s3")]
    sinks: Vec<String>,
    /// Claim rounds (one claim of each kind per round); 0 skips.
    #[arg(long, default_value_t = 20)]
    claims: usize,
    /// Files a saved tenant has, for the claims.
    #[arg(long, default_value_t = 1000)]
    claim_files: usize,
}

/// MiB/s, or files/s, from an amount and seconds, with the digits that
/// matter.
fn rate(amount: f64, seconds: f64) -> String {
    let r = amount / seconds;
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 10.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A duration in the unit that reads best.
fn secs(s: f64) -> String {
    if s < 0.01 {
        format!("{:.2} ms", s * 1000.0)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

fn print_rows(rows: &[Row]) {
    println!(
        "| sink | data | operation | agent | agent files/s | agent MiB/s | floor | floor files/s | floor MiB/s | agent / floor |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let files = r.files as f64;
        // An unchanged sync moves nothing: its rate is files checked.
        let (agent_mib, floor_mib) = if r.op == "unchanged" {
            ("-".to_owned(), "-".to_owned())
        } else {
            (rate(mib(r.bytes), r.agent_s), rate(mib(r.bytes), r.floor_s))
        };
        println!(
            "| {} | {} | {}{} | {} | {} | {agent_mib} | {} | {} | {floor_mib} | {:.1}x |",
            r.sink,
            r.data,
            r.op,
            if r.reps > 1 {
                format!(" (median of {})", r.reps)
            } else {
                String::new()
            },
            secs(r.agent_s),
            rate(files, r.agent_s),
            secs(r.floor_s),
            rate(files, r.floor_s),
            r.ratio
        );
    }
}

fn print_claims(rows: &[ClaimRow]) {
    println!("| claim (fresh warm container each) | n | p50 | p90 | max | server-side p50 / p90 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let server = match (r.server_p50_ms, r.server_p90_ms) {
            (Some(p50), Some(p90)) => format!("{p50:.2} ms / {p90:.2} ms"),
            _ => "-".to_owned(),
        };
        println!(
            "| {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {server} |",
            r.what, r.n, r.p50_ms, r.p90_ms, r.max_ms
        );
    }
    if let [plain, empty, saved, ..] = rows {
        println!();
        println!(
            "added at p50: sync with nothing saved {:+.2} ms over no sync; the saved files {:+.2} ms more",
            empty.p50_ms - plain.p50_ms,
            saved.p50_ms - empty.p50_ms
        );
    }
}

/// The S3 target on a fresh moto, or `None` when moto is not installed
/// (the testkit says so loudly; `BOILERHOUSE_REQUIRE_S3=1` makes it fail).
fn s3_target(
    dir: &std::path::Path,
) -> anyhow::Result<Option<(boilerhouse_testkit::s3::MotoServer, Target, SyncRunner)>> {
    let Some(moto) = boilerhouse_testkit::s3::moto_server()? else {
        return Ok(None);
    };
    moto.create_bucket(sinks::BUCKET)?;
    let credentials = dir.join("credentials");
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )?;
    let store: Arc<dyn ObjectStore> = Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(sinks::BUCKET)
            .with_region("us-east-1")
            .with_endpoint(moto.endpoint())
            .with_allow_http(true)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()?,
    );
    let target = Target::S3 {
        endpoint: moto.endpoint(),
        store,
    };
    Ok(Some((
        moto,
        target,
        SyncRunner::with_credentials_file(Some(credentials)),
    )))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let size = args.file_kib * 1024;
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    let sinks: Vec<&str> = args
        .sinks
        .iter()
        .map(String::as_str)
        .filter(|s| *s != "none")
        .collect();
    if !sinks.is_empty() {
        let started = std::time::Instant::now();
        let root = tmp.path().join("data");
        let kib = args.file_kib;
        let mut sets = vec![
            (
                data::many(&root, &format!("1x{kib}KiB"), 1, size)?,
                args.reps_one,
                false,
            ),
            (
                data::many(&root, &format!("{}x{kib}KiB", args.small), args.small, size)?,
                args.reps,
                false,
            ),
            (
                data::many(&root, &format!("{}x{kib}KiB", args.large), args.large, size)?,
                args.reps,
                true,
            ),
        ];
        if !args.no_big {
            sets.push((
                data::big(&root, &format!("1x{}MiB", args.big_mib), args.big_mib)?,
                args.reps,
                false,
            ));
        }
        eprintln!("data sets made in {:.1} s", started.elapsed().as_secs_f64());
        for sink in sinks {
            let dir = tmp.path().join(sink);
            std::fs::create_dir_all(&dir)?;
            let (moto, target, runner) = match sink {
                "local" => (
                    None,
                    Target::Local {
                        agent: dir.join("sink"),
                        floor: dir.join("floor"),
                    },
                    SyncRunner::default(),
                ),
                "s3" => match s3_target(&dir)? {
                    Some((moto, target, runner)) => (Some(moto), target, runner),
                    None => continue,
                },
                other => anyhow::bail!("unknown sink {other:?}: local, s3 or none"),
            };
            let bench = Bench {
                target,
                runner,
                work: dir.join("restores"),
            };
            for (set, reps, unchanged) in &sets {
                let t = std::time::Instant::now();
                let budget = std::time::Duration::from_secs(args.budget_s);
                let measured = bench.case(set, *reps, budget, *unchanged).await?;
                eprintln!(
                    "{sink} {}: {:.1} s in all",
                    set.name,
                    t.elapsed().as_secs_f64()
                );
                rows.extend(measured);
            }
            drop(moto);
        }
        println!();
        print_rows(&rows);
    }
    let mut claim_rows = Vec::new();
    if args.claims > 0 {
        claim_rows = claims::run(args.claims, args.claim_files, size).await?;
        println!();
        print_claims(&claim_rows);
    }
    println!();
    println!(
        "{}",
        serde_json::json!({
            "bench": "sync_bench",
            "args": {
                "small": args.small,
                "large": args.large,
                "file_kib": args.file_kib,
                "big_mib": if args.no_big { 0 } else { args.big_mib },
                "reps_one": args.reps_one,
                "reps": args.reps,
                "budget_s": args.budget_s,
                "claims": args.claims,
                "claim_files": args.claim_files,
            },
            "sync": rows,
            "claims": claim_rows,
        })
    );
    Ok(())
}
