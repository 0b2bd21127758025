//! Compiles every `.proto` under `proto/` with the vendored protoc (no system protoc).

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // File content as `Bytes`: decoded without a copy out of the receive buffer, and sent
    // without one.
    config.bytes([
        ".penny.files.v1.UploadRequest.chunk",
        ".penny.files.v1.DownloadResponse.chunk",
    ]);

    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let mut files = Vec::new();
    collect(&root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("penny_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &files, &[root])?;

    // The google.rpc error details, for reflection only (tonic-types has the Rust types):
    // compiled to a descriptor set; the code prost writes is left unused in OUT_DIR.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let reflection_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("reflection");
    let details = reflection_root.join("google/rpc/error_details.proto");
    println!("cargo:rerun-if-changed={}", details.display());
    let unused = out_dir.join("unused");
    std::fs::create_dir_all(&unused)?;
    let mut config = prost_build::Config::new();
    config
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        .file_descriptor_set_path(out_dir.join("error_details_descriptor.bin"))
        .out_dir(unused);
    config.compile_protos(&[details], &[reflection_root])?;
    Ok(())
}
