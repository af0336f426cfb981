//! Upload, restore and unchanged re-upload through the agent's
//! `SyncRunner`, each beside its floor (see `floor.rs`), against one sink.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use serde::Serialize;

use boilerhouse_agent::sync::{MappingReport, Phase, SyncJob, SyncRunner};
use boilerhouse_core::TenantId;
use boilerhouse_core::sync::MANIFEST_KEY;
use boilerhouse_core::workload::{
    OnClaimError, SyncDirection, SyncMapping, SyncMode, SyncPolicy, SyncSink, SyncSpec,
};

use crate::data::{Dataset, check_restored, settle};
use crate::floor;

/// The tenant prefix template the agent's objects go under.
const PREFIX: &str = "bench/${tenantId}";
/// The bucket on moto.
pub const BUCKET: &str = "sync-bench";

/// One measured operation, agent and floor side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `local` or `s3`.
    pub sink: &'static str,
    /// The data set.
    pub data: String,
    /// `upload`, `restore` or `unchanged`.
    pub op: &'static str,
    /// Files in the data set.
    pub files: usize,
    /// Bytes in the data set (moved, except for `unchanged`).
    pub bytes: u64,
    /// Repetitions; the times are their medians.
    pub reps: usize,
    /// The agent's time, seconds.
    pub agent_s: f64,
    /// The floor's time, seconds.
    pub floor_s: f64,
    /// agent_s / floor_s.
    pub ratio: f64,
    /// Every repetition's agent time, seconds.
    pub agent_all_s: Vec<f64>,
    /// Every repetition's floor time, seconds.
    pub floor_all_s: Vec<f64>,
}

/// Where the agent and the floor write.
pub enum Target {
    /// A directory on this host.
    Local {
        /// The agent's sink directory.
        agent: PathBuf,
        /// The floor's copies.
        floor: PathBuf,
    },
    /// moto's S3.
    S3 {
        /// The endpoint, for the agent's sink spec.
        endpoint: String,
        /// A raw client, for the floor.
        store: Arc<dyn ObjectStore>,
    },
}

/// One sink under test.
pub struct Bench {
    /// The sink.
    pub target: Target,
    /// The agent's code, as the agent runs it.
    pub runner: SyncRunner,
    /// Scratch space for restores.
    pub work: PathBuf,
}

fn median(times: &[Duration]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2].as_secs_f64()
}

/// Runs the agent's and the floor's measurement one after the other, in
/// the order asked, so that neither always runs first.
async fn pair(
    floor_first: bool,
    agent: impl Future<Output = anyhow::Result<Duration>>,
    floor: impl Future<Output = anyhow::Result<Duration>>,
) -> anyhow::Result<(Duration, Duration)> {
    if floor_first {
        let floor = floor.await?;
        Ok((agent.await?, floor))
    } else {
        let agent = agent.await?;
        Ok((agent, floor.await?))
    }
}

impl Bench {
    fn name(&self) -> &'static str {
        match self.target {
            Target::Local { .. } => "local",
            Target::S3 { .. } => "s3",
        }
    }

    /// The workload sync section the agent gets: the whole state directory,
    /// bidirectional, copy mode.
    fn spec(&self) -> SyncSpec {
        let sink = match &self.target {
            Target::Local { agent, .. } => SyncSink::Local {
                path: agent.display().to_string(),
                prefix: PREFIX.into(),
            },
            Target::S3 { endpoint, .. } => SyncSink::S3 {
                bucket: BUCKET.into(),
                region: Some("us-east-1".into()),
                endpoint: Some(endpoint.clone()),
                prefix: PREFIX.into(),
            },
        };
        SyncSpec {
            sink,
            mappings: vec![SyncMapping {
                path: ".".into(),
                dir: None,
                pattern: None,
                sink_path: None,
                direction: SyncDirection::Bidirectional,
                mode: SyncMode::Copy,
            }],
            policy: SyncPolicy {
                on_claim: true,
                on_release: true,
                interval: None,
                on_claim_error: OnClaimError::Fail,
                manual: false,
            },
        }
    }

    /// Runs the agent's sync of `state` for `tenant` and checks that it
    /// did what it should without an error.
    async fn agent(
        &self,
        state: &Path,
        tenant: &str,
        phase: Phase,
        want: (u32, u32, u32),
    ) -> anyhow::Result<Duration> {
        let job = SyncJob {
            tenant: TenantId::new(tenant)?,
            spec: self.spec(),
            phase,
            force: None,
            pause: false,
        };
        settle();
        let t = Instant::now();
        let reports = self.runner.run(state, &job).await?;
        let took = t.elapsed();
        let [
            MappingReport {
                uploaded,
                downloaded,
                unchanged,
                errors,
                ..
            },
        ] = reports.as_slice()
        else {
            anyhow::bail!("one mapping report expected: {reports:?}");
        };
        anyhow::ensure!(
            errors.is_empty() && (*uploaded, *downloaded, *unchanged) == want,
            "{tenant} {phase:?}: uploaded, downloaded, unchanged {:?}, expected {want:?}: {errors:?}",
            (uploaded, downloaded, unchanged)
        );
        Ok(took)
    }

    /// Runs a blocking floor operation on the blocking pool, timed.
    async fn timed_blocking(
        f: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<Duration> {
        settle();
        let t = Instant::now();
        tokio::task::spawn_blocking(f).await??;
        Ok(t.elapsed())
    }

    async fn floor_upload(&self, set: &Dataset, tenant: &str) -> anyhow::Result<Duration> {
        match &self.target {
            Target::Local { floor, .. } => {
                let (from, to, files) = (set.dir.clone(), floor.join(tenant), set.files.clone());
                Self::timed_blocking(move || floor::copy_files(&from, &to, &files, true)).await
            }
            Target::S3 { store, .. } => {
                settle();
                let t = Instant::now();
                floor::s3_upload(store, set, &format!("floor/{tenant}")).await?;
                Ok(t.elapsed())
            }
        }
    }

    async fn floor_restore(
        &self,
        set: &Dataset,
        tenant: &str,
        to: &Path,
    ) -> anyhow::Result<Duration> {
        match &self.target {
            Target::Local { floor, .. } => {
                let (from, to, files) = (floor.join(tenant), to.to_owned(), set.files.clone());
                Self::timed_blocking(move || floor::copy_files(&from, &to, &files, false)).await
            }
            Target::S3 { store, .. } => {
                settle();
                let t = Instant::now();
                floor::s3_restore(store, set, &format!("floor/{tenant}"), to).await?;
                Ok(t.elapsed())
            }
        }
    }

    async fn floor_unchanged(&self, set: &Dataset, tenant: &str) -> anyhow::Result<Duration> {
        let manifest = format!("bench/{tenant}/{MANIFEST_KEY}");
        let want = set.files.len();
        match &self.target {
            Target::Local { agent, .. } => {
                let (state, manifest) = (set.dir.clone(), agent.join(manifest));
                Self::timed_blocking(move || {
                    let n = floor::local_unchanged(&state, &manifest)?;
                    anyhow::ensure!(n == want, "listed {n} files, expected {want}");
                    Ok(())
                })
                .await
            }
            Target::S3 { store, .. } => {
                settle();
                let t = Instant::now();
                let n = floor::s3_unchanged(store, &set.dir, &manifest).await?;
                let took = t.elapsed();
                anyhow::ensure!(n == want, "listed {n} files, expected {want}");
                Ok(took)
            }
        }
    }

    /// Measures `set`: upload, then (when asked) an unchanged re-upload,
    /// then a restore into an empty directory, each by the agent and by
    /// the floor, in alternating order; `reps` times (but no more once
    /// `budget` is spent), each under a tenant of its own.
    pub async fn case(
        &self,
        set: &Dataset,
        reps: usize,
        budget: Duration,
        unchanged: bool,
    ) -> anyhow::Result<Vec<Row>> {
        let n = u32::try_from(set.files.len())?;
        let started = Instant::now();
        let mut times: [(Vec<Duration>, Vec<Duration>); 3] = Default::default();
        let mut rep = 0;
        while rep < reps && (rep == 0 || started.elapsed() < budget) {
            let floor_first = rep % 2 == 1;
            let tenant = format!("{}-{rep}", set.name);
            let (agent, floor) = pair(
                floor_first,
                self.agent(&set.dir, &tenant, Phase::Upload, (n, 0, 0)),
                self.floor_upload(set, &tenant),
            )
            .await?;
            times[0].0.push(agent);
            times[0].1.push(floor);
            if unchanged {
                let (agent, floor) = pair(
                    floor_first,
                    self.agent(&set.dir, &tenant, Phase::Upload, (0, 0, n)),
                    self.floor_unchanged(set, &tenant),
                )
                .await?;
                times[1].0.push(agent);
                times[1].1.push(floor);
            }
            let (by_agent, by_floor) = (
                self.work.join(format!("{}-{tenant}-agent", self.name())),
                self.work.join(format!("{}-{tenant}-floor", self.name())),
            );
            std::fs::create_dir_all(&by_agent)?;
            std::fs::create_dir_all(&by_floor)?;
            let (agent, floor) = pair(
                floor_first,
                self.agent(&by_agent, &tenant, Phase::Download, (0, n, 0)),
                self.floor_restore(set, &tenant, &by_floor),
            )
            .await?;
            times[2].0.push(agent);
            times[2].1.push(floor);
            check_restored(set, &by_agent)?;
            check_restored(set, &by_floor)?;
            self.clean(set, &tenant, &[by_agent, by_floor]).await?;
            rep += 1;
        }
        let ops = ["upload", "unchanged", "restore"];
        Ok(times
            .into_iter()
            .zip(ops)
            .filter(|((agent, _), _)| !agent.is_empty())
            .map(|((agent, floor), op)| {
                let (agent_s, floor_s) = (median(&agent), median(&floor));
                Row {
                    sink: self.name(),
                    data: set.name.clone(),
                    op,
                    files: set.files.len(),
                    bytes: set.bytes,
                    reps: agent.len(),
                    agent_s,
                    floor_s,
                    ratio: agent_s / floor_s,
                    agent_all_s: agent.iter().map(Duration::as_secs_f64).collect(),
                    floor_all_s: floor.iter().map(Duration::as_secs_f64).collect(),
                }
            })
            .collect())
    }

    /// Removes the large files a repetition wrote (not timed), so the
    /// 1 GiB case does not fill the disk or moto's memory. Many-file data
    /// stays until the end of the run: on ext4, creating files soon after
    /// thousands were deleted is slow (the allocator scans past recently
    /// freed inodes, `recently_deleted()`, for up to a minute or more), and
    /// that would be measured in the next operation instead of the sync.
    async fn clean(&self, set: &Dataset, tenant: &str, restored: &[PathBuf]) -> anyhow::Result<()> {
        if set.files.len() > 1 {
            return Ok(());
        }
        for dir in restored {
            std::fs::remove_dir_all(dir)?;
        }
        match &self.target {
            Target::Local { agent, floor } => {
                std::fs::remove_dir_all(agent.join("bench").join(tenant))?;
                std::fs::remove_dir_all(floor.join(tenant))?;
            }
            Target::S3 { store, .. } => {
                floor::s3_delete_prefix(store, &format!("bench/{tenant}")).await?;
                floor::s3_delete_prefix(store, &format!("floor/{tenant}")).await?;
            }
        }
        Ok(())
    }
}
