//! boilerhoused: the Boilerhouse control-plane server, as a library so that
//! tests and benchmarks can drive its parts directly.

pub mod admin_cli;
pub mod admission;
pub mod agents;
pub mod api;
pub mod auth;
pub mod background;
pub mod boosts;
pub mod clock;
pub mod config;
pub mod database;
pub mod error;
pub mod leadership;
pub mod listener;
pub mod locks;
pub mod metrics;
pub mod pools;
pub mod reconcile;
pub mod server;
pub mod store;
pub mod syncs;
pub mod tasks;
pub mod tenancy;
pub mod workloads;
