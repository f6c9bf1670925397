//! Compiles `logitd/v1/teacher.proto` with a vendored protoc: no system protoc is
//! needed. The generated code and the file descriptor set (for gRPC reflection)
//! stay in OUT_DIR.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("logitd_v1_descriptor.bin"))
        .compile_protos(&["logitd/v1/teacher.proto"], &["."])?;
    println!("cargo:rerun-if-changed=logitd/v1/teacher.proto");
    Ok(())
}
