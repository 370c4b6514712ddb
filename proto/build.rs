//! Generates the freshet.v1 client, server and the descriptor set that gRPC
//! reflection serves. protoc comes from `protoc-bin-vendored` so a fresh
//! machine needs no system protobuf compiler.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("freshet_descriptor.bin")).compile_with_config(
        config,
        &["freshet/v1/feature_service.proto"],
        &["."],
    )?;
    Ok(())
}
