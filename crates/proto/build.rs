//! Compiles proto/boilerhouse/v1 with protox (pure Rust, so no system
//! protoc is needed) and generates prost messages and tonic services. The
//! encoded descriptor set is written next to the code for gRPC reflection.

use std::path::PathBuf;

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let files: Vec<PathBuf> = std::fs::read_dir(proto_root.join("boilerhouse/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    let mut files = files;
    files.sort();

    let fds = protox::compile(&files, [&proto_root])?;
    std::fs::write(
        out_dir.join("boilerhouse_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The agent RPC is named Connect, which would collide with the
        // generated `XClient::connect` helper; clients are built from a
        // Channel instead.
        .build_transport(false)
        // prost's codec with stream buffers sized for long-lived streams
        // (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;

    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    Ok(())
}
