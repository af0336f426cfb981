//! boilerhouse-agent: one per Docker host. It connects to boilerhoused over
//! `AgentService.Connect`, reports every managed container of its node, and
//! carries out the server's commands against the local Docker engine.
//!
//! Docker is the source of truth for what runs. The agent keeps almost no
//! state of its own: after a restart it lists its containers by label and
//! reports them again, so it re-attaches to what runs and never recreates.

pub mod activity;
pub mod backoff;
pub mod beneath;
pub mod commands;
pub mod config;
pub mod docker;
pub mod heartbeat;
pub mod host;
pub mod policy;
pub mod runtime;
pub mod session;
pub mod state_files;
pub mod sync;
pub mod volumes;
