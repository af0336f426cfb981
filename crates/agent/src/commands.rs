//! Carrying out the server's commands.
//!
//! Every command has an id and is idempotent. The agent remembers the
//! results of recent ids and answers a repeat from memory, so a command the
//! server resends after a reconnect is not done twice. Creation is
//! idempotent even across agent restarts, when that memory is gone: the
//! container's name is `bh-<container-id>`, so a repeated create finds its
//! twin instead of making a second container.
//!
//! Creates and local syncs pass the agent's own [`LocalPolicy`] first,
//! whatever the server sent: a refused command fails with the reason and
//! touches neither the engine nor the disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boilerhouse_core::container::{ContainerSpec, ObservedContainer, StateFile};
use boilerhouse_core::workload::{Limits, SyncSink};
use boilerhouse_core::{ContainerId, NodeId};

use crate::policy::LocalPolicy;
use crate::runtime::{ContainerRuntime, RuntimeError};
use crate::state_files::StateFiles;
use crate::sync::{MappingReport, SyncJob, SyncRunner};
use crate::volumes::VolumeLayout;

mod decode;
mod memory;
pub use decode::decode_command;

pub use memory::Admission;
use memory::Memory;

/// A command, decoded from the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Create (and maybe start) a container.
    Create {
        /// What to create.
        spec: ContainerSpec,
        /// Start it too.
        start: bool,
    },
    /// Start a container.
    Start(ContainerId),
    /// Stop a container.
    Stop(ContainerId, Duration),
    /// Stop and remove a container, and maybe its directories.
    Remove {
        /// Which.
        id: ContainerId,
        /// Delete its host directories too.
        remove_volumes: bool,
    },
    /// Change limits in place.
    UpdateLimits(ContainerId, Limits),
    /// Write state files, made durable together.
    WriteStates(Vec<(ContainerId, StateFile)>),
    /// Sync a container's state directory with the sink.
    Sync(ContainerId, crate::sync::SyncJob),
    /// Send a full report now.
    FullReport,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Whether it succeeded.
    pub ok: bool,
    /// Why not.
    pub error: String,
    /// The container afterwards, for container commands.
    pub container: Option<ObservedContainer>,
    /// What a sync moved, for sync commands.
    pub sync: Option<Vec<MappingReport>>,
}

impl Outcome {
    fn ok(container: Option<ObservedContainer>) -> Self {
        Self {
            ok: true,
            error: String::new(),
            container,
            sync: None,
        }
    }

    fn failed(error: impl ToString) -> Self {
        Self {
            ok: false,
            error: error.to_string(),
            container: None,
            sync: None,
        }
    }
}

/// Executes commands against the runtime and the host directories.
#[derive(Clone)]
pub struct Executor {
    runtime: Arc<dyn ContainerRuntime>,
    layout: VolumeLayout,
    state_files: StateFiles,
    node: NodeId,
    extra_labels: BTreeMap<String, String>,
    memory: Arc<Mutex<Memory>>,
    syncs: SyncRunner,
    policy: Arc<LocalPolicy>,
}

impl Executor {
    /// An executor for `node`. `extra_labels` go on every created
    /// container; `policy` judges every create and local sync.
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        state_files: StateFiles,
        node: NodeId,
        extra_labels: BTreeMap<String, String>,
        syncs: SyncRunner,
        policy: LocalPolicy,
    ) -> Self {
        Self {
            runtime,
            layout: state_files.layout().clone(),
            state_files,
            node,
            extra_labels,
            memory: Arc::default(),
            syncs,
            policy: Arc::new(policy),
        }
    }

    /// Runs one container command. `FullReport` is the session's job. A
    /// Create marks its container [`Executor::creating`] until
    /// [`Executor::created`].
    pub async fn execute(&self, command: Command) -> Outcome {
        if let Command::Create { spec, .. } = &command {
            self.begin_create(spec.container_id);
        }
        if let Command::Sync(id, job) = command {
            return self.sync(&id, &job).await;
        }
        let result = match command {
            Command::Create { spec, start } => self.create(spec, start).await,
            Command::Start(id) => self.start(&id).await,
            Command::Stop(id, timeout) => self.stop(&id, timeout).await,
            Command::Remove { id, remove_volumes } => self.remove(&id, remove_volumes).await,
            Command::UpdateLimits(id, limits) => self.update_limits(&id, &limits).await,
            Command::WriteStates(files) => self.write_states(files).await,
            Command::FullReport => Err("a full report is sent by the session".to_owned()),
            Command::Sync(..) => unreachable!("handled above"),
        };
        match result {
            Ok(container) => Outcome::ok(container),
            Err(e) => Outcome::failed(e),
        }
    }

    async fn observe(&self, id: &ContainerId) -> Result<Option<ObservedContainer>, String> {
        let mut observed = self
            .runtime
            .inspect(&id.docker_name())
            .await
            .map_err(|e| e.to_string())?;
        if let Some(c) = observed.as_mut() {
            c.state_file = self.layout.read_state(id);
        }
        Ok(observed)
    }

    async fn create(
        &self,
        mut spec: ContainerSpec,
        start: bool,
    ) -> Result<Option<ObservedContainer>, String> {
        let id = spec.container_id;
        if spec
            .labels
            .get(boilerhouse_core::container::labels::NODE_ID)
            .map(String::as_str)
            != Some(self.node.as_str())
        {
            return Err(format!(
                "the spec is labelled for another node, not {}",
                self.node
            ));
        }
        self.policy.check_create(&spec)?;
        for (k, v) in &self.extra_labels {
            spec.labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let name = id.docker_name();
        if self
            .runtime
            .inspect(&name)
            .await
            .map_err(|e| e.to_string())?
            .is_none()
        {
            let binds = self
                .layout
                .prepare(&spec)
                .map_err(|e| format!("cannot prepare host directories: {e}"))?;
            match self.runtime.create(&spec, &binds).await {
                Ok(_) => {}
                // A concurrent or earlier create won: that container is ours.
                Err(RuntimeError::Conflict(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        } else {
            // Its directory, made again if it went (a state file is only
            // written into its container's directory); the volumes it
            // mounts are left as they are.
            self.layout
                .ensure_container_dir(&id)
                .map_err(|e| format!("cannot make the container's directory: {e}"))?;
        }
        if start {
            self.runtime.start(&name).await.map_err(|e| e.to_string())?;
        }
        self.observe(&id).await
    }

    async fn start(&self, id: &ContainerId) -> Result<Option<ObservedContainer>, String> {
        self.runtime
            .start(&id.docker_name())
            .await
            .map_err(|e| e.to_string())?;
        self.observe(id).await
    }

    async fn stop(
        &self,
        id: &ContainerId,
        timeout: Duration,
    ) -> Result<Option<ObservedContainer>, String> {
        match self.runtime.stop(&id.docker_name(), timeout).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        self.observe(id).await
    }

    async fn remove(
        &self,
        id: &ContainerId,
        remove_volumes: bool,
    ) -> Result<Option<ObservedContainer>, String> {
        self.runtime
            .remove(&id.docker_name())
            .await
            .map_err(|e| e.to_string())?;
        if remove_volumes {
            // Through the state-file writer: a write queued for the
            // container cannot make its directory again afterwards.
            self.state_files
                .remove(*id)
                .await
                .map_err(|e| format!("cannot remove host directories: {e}"))?;
        }
        Ok(None)
    }

    async fn update_limits(
        &self,
        id: &ContainerId,
        limits: &Limits,
    ) -> Result<Option<ObservedContainer>, String> {
        self.runtime
            .update_limits(&id.docker_name(), limits)
            .await
            .map_err(|e| e.to_string())?;
        // Confirm by inspecting: the answer carries the limits really in force.
        self.observe(id).await
    }

    async fn write_states(
        &self,
        files: Vec<(ContainerId, StateFile)>,
    ) -> Result<Option<ObservedContainer>, String> {
        let ids: Vec<ContainerId> = files.iter().map(|(id, _)| *id).collect();
        let results = self.state_files.write_all(files).await;
        let failed: Vec<String> = ids
            .iter()
            .zip(&results)
            .filter_map(|(id, r)| r.as_ref().err().map(|e| format!("{id}: {e}")))
            .collect();
        match failed.as_slice() {
            // The containers themselves did not change: no need to ask Docker.
            [] => Ok(None),
            [one] if ids.len() == 1 => Err(format!("cannot write the state file of {one}")),
            // Every failure is named: the server logs the answer, and a
            // file it names is one whose tenant record is still stale.
            _ => Err(format!(
                "cannot write {} of {} state files: {}",
                failed.len(),
                ids.len(),
                failed.join("; ")
            )),
        }
    }

    /// Runs a sync of the container's state directory. The report comes
    /// back even when something failed, so the server can say what.
    async fn sync(&self, id: &ContainerId, job: &SyncJob) -> Outcome {
        let state_dir = self
            .layout
            .volume_dir(id, &boilerhouse_core::container::VolumeKind::State);
        let job = match self.admit_sink(job) {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "sync refused");
                return Outcome::failed(e);
            }
        };
        let pause = if job.pause {
            Some(Pause::begin(self.runtime.clone(), id.docker_name()).await)
        } else {
            None
        };
        let result = self.syncs.run(&state_dir, &job).await;
        let (paused, pause_error) = match pause {
            Some(pause) => pause.end().await,
            None => (false, None),
        };
        match result {
            Ok(mut reports) => {
                for r in &mut reports {
                    r.paused = paused;
                    r.pause_error.clone_from(&pause_error);
                }
                let failures: Vec<String> = reports
                    .iter()
                    .filter(|r| r.pending > 0 || !r.errors.is_empty())
                    .map(|r| {
                        format!(
                            "mapping {}: {}",
                            r.path,
                            r.errors.first().map(String::as_str).unwrap_or("incomplete")
                        )
                    })
                    .collect();
                Outcome {
                    ok: failures.is_empty(),
                    error: failures.join("; "),
                    container: None,
                    sync: Some(reports),
                }
            }
            Err(e) => Outcome::failed(e),
        }
    }

    /// `job` with a local sink's path replaced by the real directory the
    /// policy allows, so the check and the writes agree on the place.
    fn admit_sink(&self, job: &SyncJob) -> Result<SyncJob, String> {
        let SyncSink::Local { path, prefix } = &job.spec.sink else {
            return Ok(job.clone());
        };
        let real = self.policy.sink_dir(path)?;
        let real = real
            .to_str()
            .ok_or_else(|| format!("local sink {} is not UTF-8", real.display()))?
            .to_owned();
        let mut admitted = job.clone();
        admitted.spec.sink = SyncSink::Local {
            path: real,
            prefix: prefix.clone(),
        };
        Ok(admitted)
    }

    /// Unpauses this node's managed containers that a sync left paused
    /// (the agent died before its unpause). Best effort: a failure is
    /// logged and the next start tries again.
    pub async fn thaw_leftovers(&self) {
        let containers = match self.runtime.list_managed(&self.node).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for containers left paused");
                return;
            }
        };
        for c in containers.iter().filter(|c| c.docker_state == "paused") {
            match self.runtime.unpause(&c.name).await {
                Ok(()) => {
                    tracing::warn!(container = %c.name, "unpaused a container an interrupted sync left paused")
                }
                Err(e) => {
                    tracing::error!(container = %c.name, error = %e, "cannot unpause a container an interrupted sync left paused")
                }
            }
        }
    }

    /// Every managed container of this node, with state files.
    pub async fn full_report(&self) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let mut containers = self.runtime.list_managed(&self.node).await?;
        for c in &mut containers {
            if let Some(id) = c.container_id() {
                c.state_file = self.layout.read_state(&id);
            }
        }
        Ok(containers)
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<dyn ContainerRuntime> {
        &self.runtime
    }
}

/// A container paused for a consistent snapshot, and unpaused however the
/// sync ends: at [`Pause::end`], or, if the sync's task is dropped midway,
/// by a task spawned from the drop.
struct Pause {
    runtime: Arc<dyn ContainerRuntime>,
    name: String,
    /// Whether the container is paused and still owed an unpause.
    paused: bool,
    /// Why it could not be paused.
    error: Option<String>,
}

impl Pause {
    async fn begin(runtime: Arc<dyn ContainerRuntime>, name: String) -> Self {
        let (paused, error) = match runtime.pause(&name).await {
            Ok(()) => (true, None),
            // A stopped container cannot change its files: its snapshot is
            // consistent as it is.
            Err(RuntimeError::Conflict(m)) if m.contains("not running") => (false, None),
            Err(e) => {
                tracing::warn!(container = %name, error = %e, "cannot pause the container; syncing it live");
                (false, Some(e.to_string()))
            }
        };
        Self {
            runtime,
            name,
            paused,
            error,
        }
    }

    /// Unpauses; returns whether the sync ran paused, and why not if it
    /// was meant to.
    async fn end(mut self) -> (bool, Option<String>) {
        let paused = std::mem::take(&mut self.paused);
        if paused && let Err(e) = self.runtime.unpause(&self.name).await {
            tracing::error!(container = %self.name, error = %e, "cannot unpause the container after a sync");
        }
        (paused, self.error.take())
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        if self.paused {
            let (runtime, name) = (self.runtime.clone(), std::mem::take(&mut self.name));
            tokio::spawn(async move {
                if let Err(e) = runtime.unpause(&name).await {
                    tracing::error!(container = %name, error = %e, "cannot unpause the container after a cancelled sync");
                }
            });
        }
    }
}
