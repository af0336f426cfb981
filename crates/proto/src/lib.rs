//! The public gRPC API of Boilerhouse (package `boilerhouse.v1`) and the one
//! module where proto messages become domain types and back.
//!
//! Handlers and the CLI never read raw proto fields themselves: they go
//! through [`convert`], which returns a typed error naming the field.

/// Generated messages and services for `boilerhouse.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
    tonic::include_proto!("boilerhouse.v1");
}

pub mod codec;
pub mod convert;
pub mod leader;
pub mod servers;

/// The encoded `FileDescriptorSet` of every `boilerhouse.v1` file, for gRPC
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/boilerhouse_descriptor.bin"));

pub mod tls;
