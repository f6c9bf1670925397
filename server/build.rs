//! With the `cuda` feature, compiles the CUDA sampling kernel
//! (src/sampler/cuda/sampler.cu) to PTX in OUT_DIR with nvcc, for the virtual
//! architecture compute_$CUDA_COMPUTE_CAP (default 90: H100/H200; 80 for A100,
//! 89 for L4). The driver compiles the PTX for the GPU at first use. Without the
//! feature nothing is built and nvcc is not needed. CI compiles the same file
//! with warnings as errors and reports its registers (tests/gpu/ci-compile.sh).

use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let dir = PathBuf::from("src/sampler/cuda");
    for f in ["sampler.cu", "logitd_math.cuh"] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let cap: String = env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    assert!(!cap.is_empty(), "CUDA_COMPUTE_CAP must be a compute capability such as 90 or 80");
    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("logitd_sampler.ptx");
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--fmad=false", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(dir.join("sampler.cu"))
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the `cuda` feature compiles the sampling kernel with nvcc, which did not run \
                 (`{nvcc}`: {e}); put nvcc (CUDA 12 or 13) on PATH or set NVCC; without a CUDA \
                 toolkit, tests/gpu/cuda-env.sh provides one from PyPI wheels"
            )
        });
    assert!(status.success(), "nvcc failed on {}", dir.join("sampler.cu").display());
}
