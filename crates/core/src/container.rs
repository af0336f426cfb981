//! Managed containers as the agent creates and observes them: the spec the
//! server sends, the labels that identify a container for life, the state
//! file that holds what labels cannot, and what Docker reports.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{ContainerId, NodeId, TenantId, WorkloadId};
use crate::time::Timestamp;
use crate::workload::{Limits, WorkloadSpec};

mod label_set;
pub use label_set::Labels;

/// Docker labels, set once at creation (Docker labels cannot change).
pub mod labels {
    /// `true` on every container Boilerhouse manages.
    pub const MANAGED: &str = "boilerhouse.managed";
    /// The server-assigned container id.
    pub const CONTAINER_ID: &str = "boilerhouse.container-id";
    /// The pool, which is the workload id.
    pub const POOL_ID: &str = "boilerhouse.pool-id";
    /// The workload id.
    pub const WORKLOAD_ID: &str = "boilerhouse.workload-id";
    /// The node the container was created for.
    pub const NODE_ID: &str = "boilerhouse.node-id";
    /// Creation time, Unix milliseconds.
    pub const CREATED_AT: &str = "boilerhouse.created-at";
    /// Hash of the workload spec the container was built from.
    pub const SPEC_HASH: &str = "boilerhouse.spec-hash";
}

/// Which host directory a volume is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VolumeKind {
    /// The tenant's state; synced.
    State,
    /// Secrets.
    Secrets,
    /// Communication (sockets, pipes).
    Comm,
    /// A named custom volume.
    Custom(String),
}

/// A host directory bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// Which directory.
    pub kind: VolumeKind,
    /// Where it appears in the container.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Docker healthcheck, in the units the engine takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// `["CMD", ...]` or `["CMD-SHELL", "..."]`.
    pub test: Vec<String>,
    /// Between checks.
    pub interval: Duration,
    /// Per check.
    pub timeout: Duration,
    /// Failures before unhealthy.
    pub retries: u32,
    /// Grace after start.
    pub start_period: Duration,
}

/// Where a container's directories live under an agent's state root:
/// `<root>/containers/<id>/{state,secrets,comm,custom/<name>}`. The agent
/// creates them; the server computes the same paths to tell a claimant
/// where its state and comm volumes are on the host.
pub fn volume_host_path(state_root: &str, id: &ContainerId, kind: &VolumeKind) -> String {
    let base = format!("{}/containers/{id}", state_root.trim_end_matches('/'));
    match kind {
        VolumeKind::State => format!("{base}/state"),
        VolumeKind::Secrets => format!("{base}/secrets"),
        VolumeKind::Comm => format!("{base}/comm"),
        VolumeKind::Custom(name) => format!("{base}/custom/{name}"),
    }
}

/// Everything an agent needs to create one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Server-assigned id; the Docker name is `bh-<id>`.
    pub container_id: ContainerId,
    /// Image reference.
    pub image: String,
    /// Command override; empty keeps the image's.
    pub command: Vec<String>,
    /// Labels, identity labels included.
    pub labels: BTreeMap<String, String>,
    /// Environment.
    pub environment: BTreeMap<String, String>,
    /// Bind mounts.
    pub volumes: Vec<VolumeMount>,
    /// CPU and memory limits.
    pub limits: Limits,
    /// Healthcheck, if any.
    pub healthcheck: Option<Healthcheck>,
    /// `uid[:gid]` or a name.
    pub user: Option<String>,
    /// Read-only root filesystem.
    pub read_only: bool,
    /// Docker network mode.
    pub network_mode: Option<String>,
    /// `no-new-privileges`.
    pub no_new_privileges: bool,
    /// Capabilities dropped.
    pub cap_drop: Vec<String>,
    /// Capabilities added.
    pub cap_add: Vec<String>,
    /// Process limit.
    pub pids_limit: i64,
}

impl ContainerSpec {
    /// The spec for a new container of `workload` on `node`, with the
    /// identity labels of the design.
    pub fn for_workload(
        workload: &WorkloadSpec,
        container_id: ContainerId,
        node: &NodeId,
        created_at: Timestamp,
    ) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(labels::MANAGED.to_owned(), "true".to_owned());
        labels.insert(labels::CONTAINER_ID.to_owned(), container_id.to_string());
        labels.insert(labels::POOL_ID.to_owned(), workload.id.to_string());
        labels.insert(labels::WORKLOAD_ID.to_owned(), workload.id.to_string());
        labels.insert(labels::NODE_ID.to_owned(), node.to_string());
        labels.insert(
            labels::CREATED_AT.to_owned(),
            created_at.as_millis().to_string(),
        );
        labels.insert(labels::SPEC_HASH.to_owned(), workload.spec_hash());
        let v = &workload.volumes;
        let mut volumes = Vec::new();
        let mut push = |kind: VolumeKind, m: &crate::workload::Mount| {
            volumes.push(VolumeMount {
                kind,
                target: m.target.clone(),
                read_only: m.read_only,
            });
        };
        if let Some(m) = &v.state {
            push(VolumeKind::State, m);
        }
        if let Some(m) = &v.secrets {
            push(VolumeKind::Secrets, m);
        }
        if let Some(m) = &v.comm {
            push(VolumeKind::Comm, m);
        }
        for c in &v.custom {
            push(VolumeKind::Custom(c.name.clone()), &c.mount);
        }
        ContainerSpec {
            container_id,
            image: workload.image.clone(),
            command: workload.command.clone(),
            labels,
            environment: workload.environment.clone(),
            volumes,
            limits: workload.limits,
            healthcheck: workload.healthcheck.as_ref().map(|h| Healthcheck {
                test: h.test.clone(),
                interval: h.interval,
                timeout: h.timeout,
                retries: h.retries,
                start_period: h.start_period,
            }),
            user: workload.user.clone(),
            read_only: workload.read_only,
            network_mode: workload.network_mode.clone(),
            no_new_privileges: workload.security.no_new_privileges,
            cap_drop: workload.security.cap_drop.clone(),
            cap_add: workload.security.cap_add.clone(),
            pids_limit: workload.security.pids_limit,
        }
    }
}

/// The contents of a container's state file: the mutable facts Docker
/// labels cannot hold. With it, tenant assignments can be rebuilt even
/// when the database is lost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// The tenant holding the container now.
    pub tenant_id: Option<TenantId>,
    /// The tenant that held it last.
    pub last_tenant_id: Option<TenantId>,
    /// When the current claim began.
    pub claimed_at: Option<Timestamp>,
    /// Last activity of the tenant.
    pub last_activity_at: Option<Timestamp>,
    /// Fencing generation of the current or last claim.
    pub claim_generation: u64,
}

impl StateFile {
    /// Whether this state is newer than `incoming`, which must then not
    /// replace it: a later claim generation, or, within one generation,
    /// the release after the claim. Writes may arrive in any order (a
    /// resend after a reconnect, two batches in flight), and a state file
    /// only moves forward.
    pub fn supersedes(&self, incoming: &StateFile) -> bool {
        if self.claim_generation != incoming.claim_generation {
            return self.claim_generation > incoming.claim_generation;
        }
        let released = self.tenant_id.is_none() && self.last_tenant_id.is_some();
        released && incoming.tenant_id.is_some() && incoming.tenant_id == self.last_tenant_id
    }
}

/// A managed container as Docker reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedContainer {
    /// Docker's id.
    pub docker_id: String,
    /// Docker's name, without the leading '/'.
    pub name: String,
    /// All labels.
    pub labels: Labels,
    /// created, running, paused, restarting, removing, exited or dead.
    pub docker_state: String,
    /// starting, healthy or unhealthy; None without a healthcheck.
    pub health: Option<String>,
    /// What the last healthcheck printed (trimmed, bounded): the engine's
    /// reason for `unhealthy`.
    #[serde(default)]
    pub health_output: Option<String>,
    /// Last exit code.
    pub exit_code: i64,
    /// When it last started.
    pub started_at: Option<Timestamp>,
    /// Whether the kernel OOM-killed it.
    pub oom_killed: bool,
    /// Limits in force.
    pub limits: Limits,
    /// Its state file, when present and readable.
    pub state_file: Option<StateFile>,
}

impl ObservedContainer {
    /// The container id from its label, if it carries a valid one.
    pub fn container_id(&self) -> Option<ContainerId> {
        self.labels.get(labels::CONTAINER_ID)?.parse().ok()
    }

    /// The node label.
    pub fn node_id(&self) -> Option<&str> {
        self.labels.get(labels::NODE_ID)
    }

    /// The workload label, if valid.
    pub fn workload_id(&self) -> Option<WorkloadId> {
        WorkloadId::new(self.labels.get(labels::WORKLOAD_ID)?.to_owned()).ok()
    }

    /// Whether the process is up.
    pub fn is_running(&self) -> bool {
        // A paused container (frozen for a consistent sync) is still up.
        matches!(self.docker_state.as_str(), "running" | "paused")
    }
}

/// What happened to a container, from Docker's event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerEventKind {
    /// Started.
    Start,
    /// Its process exited.
    Die,
    /// The kernel OOM-killed it.
    Oom,
    /// Its health status changed.
    Health,
    /// Removed.
    Destroy,
    /// Files changed in its state directory.
    Activity,
}

/// One container event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerEvent {
    /// What happened.
    pub kind: ContainerEventKind,
    /// Docker's id.
    pub docker_id: String,
    /// Our id, from the labels.
    pub container_id: Option<ContainerId>,
    /// When.
    pub at: Timestamp,
    /// New health status, for Health events.
    pub health: Option<String>,
    /// What the last healthcheck printed, for Health events.
    pub health_output: Option<String>,
    /// Exit code, for Die events.
    pub exit_code: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::parse_workload;

    #[test]
    fn specs_carry_every_identity_label_and_the_workload_settings() {
        let workload = parse_workload(
            "w.yaml",
            "id: demo\nimage: busybox\ncommand: [sleep, '10']\nvolumes:\n  state: {target: /data}\n  custom: [{name: c, target: /c}]\ndeploy: {resources: {limits: {cpus: 0.5, memory: 64M}}}\n",
        )
        .unwrap();
        let id = ContainerId::from_uuid(uuid::Uuid::nil());
        let node = NodeId::new("node-a").unwrap();
        let spec = ContainerSpec::for_workload(&workload, id, &node, Timestamp::from_millis(42));
        for label in [
            labels::MANAGED,
            labels::CONTAINER_ID,
            labels::POOL_ID,
            labels::WORKLOAD_ID,
            labels::NODE_ID,
            labels::CREATED_AT,
            labels::SPEC_HASH,
        ] {
            assert!(spec.labels.contains_key(label), "missing {label}");
        }
        assert_eq!(spec.labels[labels::NODE_ID], "node-a");
        assert_eq!(spec.labels[labels::SPEC_HASH], workload.spec_hash());
        assert_eq!(spec.volumes.len(), 2);
        assert_eq!(spec.volumes[1].kind, VolumeKind::Custom("c".into()));
        assert_eq!(spec.limits.memory_bytes, Some(64 << 20));
        assert_eq!(spec.cap_drop, ["ALL"]);
        assert_eq!(spec.user.as_deref(), Some("65534:65534"));
    }

    #[test]
    fn state_files_round_trip_as_json() {
        let file = StateFile {
            tenant_id: Some(TenantId::new("t1").unwrap()),
            last_tenant_id: None,
            claimed_at: Some(Timestamp::from_millis(5)),
            last_activity_at: Some(Timestamp::from_millis(6)),
            claim_generation: 3,
        };
        let json = serde_json::to_string(&file).unwrap();
        assert_eq!(serde_json::from_str::<StateFile>(&json).unwrap(), file);
    }
}
