//! The container runtime the agent drives, as a trait so that the session
//! and command logic can be tested without an engine. The real
//! implementation is [`crate::docker::DockerRuntime`].

use std::time::Duration;

use futures::stream::BoxStream;

use boilerhouse_core::NodeId;
use boilerhouse_core::container::{ContainerEvent, ContainerSpec, ObservedContainer};
use boilerhouse_core::workload::Limits;

/// What the engine is and offers.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineInfo {
    /// Engine version, e.g. `20.10.24`.
    pub version: String,
    /// The API version negotiated with it.
    pub api_version: String,
    /// CPUs the engine sees.
    pub cpus: f64,
    /// Memory the engine sees, in bytes.
    pub memory_bytes: u64,
}

/// A host directory to bind-mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Path on the host.
    pub host_path: String,
    /// Path in the container.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
}

/// Why a runtime call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// No such container (or image).
    #[error("not found: {0}")]
    NotFound(String),
    /// A container with that name exists already.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The engine cannot be reached.
    #[error("docker engine unavailable: {0}")]
    Unavailable(String),
    /// The engine refused the request.
    #[error("{0}")]
    Failed(String),
}

/// Operations on the local container engine.
#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Version and capacity.
    async fn engine(&self) -> Result<EngineInfo, RuntimeError>;
    /// Every managed container of `node`, stopped ones included. Lists by
    /// label and never asks for sizes.
    async fn list_managed(&self, node: &NodeId) -> Result<Vec<ObservedContainer>, RuntimeError>;
    /// One container by name or id; `None` when it does not exist.
    async fn inspect(&self, name_or_id: &str) -> Result<Option<ObservedContainer>, RuntimeError>;
    /// Creates (not starts) a container named `spec.container_id.docker_name()`;
    /// returns its Docker id. `Conflict` when the name is taken.
    async fn create(&self, spec: &ContainerSpec, binds: &[Bind]) -> Result<String, RuntimeError>;
    /// Starts it; starting a running container succeeds.
    async fn start(&self, name_or_id: &str) -> Result<(), RuntimeError>;
    /// Stops it, killing after `timeout`; stopping a stopped one succeeds.
    async fn stop(&self, name_or_id: &str, timeout: Duration) -> Result<(), RuntimeError>;
    /// Removes it, running or not; removing a missing one succeeds.
    async fn remove(&self, name_or_id: &str) -> Result<(), RuntimeError>;
    /// Freezes every process of a running container, so that its files
    /// hold still while they are read. Pausing a paused one succeeds; one
    /// that is not running is `Conflict`.
    async fn pause(&self, name_or_id: &str) -> Result<(), RuntimeError>;
    /// Thaws a paused container; unpausing one that is not paused succeeds.
    async fn unpause(&self, name_or_id: &str) -> Result<(), RuntimeError>;
    /// Changes CPU and memory limits in place.
    async fn update_limits(&self, name_or_id: &str, limits: &Limits) -> Result<(), RuntimeError>;
    /// Start, die, oom, health and destroy events of `node`'s managed
    /// containers. The stream ends or errors when the engine goes away.
    fn events(&self, node: &NodeId) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>>;
}
