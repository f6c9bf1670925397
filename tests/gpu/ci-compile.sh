#!/usr/bin/env bash
# CI's check that the GPU path still compiles, on a machine without a GPU or a
# CUDA toolkit (nvcc comes from pinned PyPI wheels through tests/gpu/cuda-env.sh):
#
#   tests/gpu/ci-compile.sh            logitd's sampling kernel to PTX, warnings
#                                      as errors, for compute_80 and compute_90,
#                                      plus ptxas's register/spill report for
#                                      sm_90 (H100/H200)
#   tests/gpu/ci-compile.sh --check    also `cargo check -p logitd --features cuda
#                                      --all-targets` (candle's CUDA kernels are
#                                      compiled by their build script: minutes)
#
# Fails when nvcc warns, when the kernel needs more than 64 registers a thread
# (then two 512-thread blocks no longer fit an SM, which __launch_bounds__
# promises), or when the type check fails.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
check=
[[ ${1:-} == --check ]] && check=1

src=server/src/sampler/cuda/sampler.cu
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
t0=$SECONDS
"$here/cuda-env.sh" nvcc --version | tail -2
echo "ci-compile: nvcc ready after $((SECONDS - t0)) s"

t1=$SECONDS
for cap in 80 90; do
  # The flags of server/build.rs, and every warning an error.
  "$here/cuda-env.sh" nvcc --ptx -O3 --fmad=false -std=c++17 -arch=compute_$cap \
    -Werror all-warnings -o "$out/sampler_$cap.ptx" "$root/$src"
done
# Registers and spills of each entry point, as ptxas compiles them for sm_90.
"$here/cuda-env.sh" nvcc -cubin -O3 --fmad=false -std=c++17 -arch=sm_90 -Werror all-warnings \
  -Xptxas -v -o "$out/sampler_90.cubin" "$root/$src" 2>"$out/ptxas.txt"
awk '/Compiling entry function/ {name=$7} /spill/ {spill=$0} /Used [0-9]+ registers/ {
       gsub(/'"'"'/, "", name); print "ci-compile: " name ": " $5 " registers," spill }' "$out/ptxas.txt"
max_regs=$(grep -oE 'Used [0-9]+ registers' "$out/ptxas.txt" | awk '{print $2}' | sort -n | tail -1)
if ((max_regs > 64)); then
  echo "ci-compile: FAIL: $max_regs registers a thread; 2 blocks of 512 threads need <= 64" >&2
  exit 1
fi
echo "ci-compile: kernel compiled (PTX for compute_80 and compute_90, sm_90 cubin) in $((SECONDS - t1)) s"

if [[ -n $check ]]; then
  t2=$SECONDS
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/cuda-check} \
    "$here/cuda-env.sh" cargo check -p logitd --features cuda --all-targets --locked
  echo "ci-compile: cargo check --features cuda in $((SECONDS - t2)) s"
fi
