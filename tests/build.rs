//! Compiles the test-only echo service with the vendored protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = root.join("penny/testing/v1/echo.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("echo_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_with_config(config, &[file], &[root])?;
    Ok(())
}
