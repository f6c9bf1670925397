#!/usr/bin/env bash
# Builds, on a machine without a GPU, what tests/gpu/run.sh runs on a GPU machine,
# and packs it into tests/gpu/bin (xz-compressed; git-ignored, carried to the GPU
# machine). Run from the repository root:
#
#   tests/gpu/pack.sh            # build (incremental) and pack
#   SKIP_BUILD=1 tests/gpu/pack.sh
#
# CUDA build: tests/gpu/build.sh (../shared/cuda/build.sh: nvcc from PyPI, stub
# CUDA libraries) into CUDA_TARGET (default /work/cuda-target, apart from the CPU
# builds' target/), for CUDA_COMPUTE_CAP (default 90: H100/H200).
# Packs: gpu_sampler (the GPU test binary), gpu_bench (example), logitd (cuda),
# and logitd-bench (the client's load generator, a CPU build) when it exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_TARGET=${CUDA_TARGET:-/work/cuda-target}
if [[ -z ${SKIP_BUILD:-} ]]; then
  CARGO_TARGET_DIR=$CUDA_TARGET nice -n 19 tests/gpu/build.sh --release -p logitd --features cuda \
    --bin logitd --example gpu_bench --test gpu_sampler
  if [[ -f client/src/bin/logitd-bench.rs ]]; then
    nice -n 19 cargo build --release -p logitd-client --bin logitd-bench
  fi
fi
mkdir -p tests/gpu/bin
rm -f tests/gpu/bin/*
test_bin=$(ls -t "$CUDA_TARGET"/release/deps/gpu_sampler-* | grep -v '\.d$' | head -1)
cp "$test_bin" tests/gpu/bin/gpu_sampler
cp "$CUDA_TARGET/release/examples/gpu_bench" "$CUDA_TARGET/release/logitd" tests/gpu/bin/
[[ -x target/release/logitd-bench ]] && cp target/release/logitd-bench tests/gpu/bin/
strip tests/gpu/bin/* 2>/dev/null || true
xz -T2 -9 tests/gpu/bin/*
ls -la tests/gpu/bin
du -ch tests/gpu/bin/* tests/gpu/data/* 2>/dev/null | tail -1
