//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed,
//! and keeps the encoded descriptor set for gRPC server reflection.
//!
//! Two passes: messages and servers first, the servers decoding with
//! `crate::codec::RequestCodec` (an undecodable request is INVALID_ARGUMENT);
//! then the clients alone (every `flotilla.v1` type extern, so nothing is
//! generated twice) with tonic-prost's codec, for which an undecodable
//! response stays INTERNAL.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["types", "bus", "fleet", "worker", "provider"]
        .map(|f| root.join(format!("flotilla/v1/{f}.proto")));
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("flotilla_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .codec_path("crate::codec::RequestCodec")
        .compile_fds(fds.clone())?;
    let clients = out.join("clients");
    std::fs::create_dir_all(&clients)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .extern_path(".flotilla.v1", "crate::v1")
        .out_dir(&clients)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
