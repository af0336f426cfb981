//! Authentication and authorization of callers: bearer tokens for people
//! and programs, client certificates for agents, and the PKI that makes
//! the certificates. Who may call what is decided in
//! [`boilerhouse_core::auth`]; this module finds out who is calling.

pub mod caller;
pub mod files;
pub mod layer;
pub mod pki;
pub mod tokens;

pub use caller::{current, serving};
pub use layer::{AuthLayer, Authenticator};
