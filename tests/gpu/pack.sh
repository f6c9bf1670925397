#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything tests/gpu/run.sh needs on a GPU
# machine, and packs it (xz) for carrying: tests/gpu/bin/*.xz (the binaries) and
# tests/gpu/data/*.safetensors.xz (real-teacher logits), both git-ignored. From
# anywhere:
#
#   tests/gpu/pack.sh              build (incremental) and pack
#   SKIP_BUILD=1 tests/gpu/pack.sh pack what is built
#
# CUDA build: tests/gpu/build.sh (nvcc from pinned PyPI wheels, link stubs) into
# CUDA_TARGET (default /work/cuda-target, apart from the CPU builds' target/),
# for CUDA_COMPUTE_CAP (default 90: H100/H200). A clean build takes 12+ minutes
# on 2 cores. Built there too: the dump_logits example (run here against the
# link stubs: it never calls CUDA on the CPU) and logitd-bench (a CPU build).
#
# Packs: gpu_sampler (the GPU test binary), gpu_bench, logitd (cuda), and
# logitd-bench; and the logits of the cached real teachers (tests/fetch-teachers.sh
# all) on the four fixture sentences. Fails if the pack and the repository's
# working tree together (what the GPU machine gets, 64 MiB at most) reach
# 60 MiB (tests/gpu/pack-size.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
CUDA_TARGET=${CUDA_TARGET:-/work/cuda-target}
TEACHERS=${TEACHERS:-${LOGITD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/logitd}/teachers}
if [[ -z ${SKIP_BUILD:-} ]]; then
  CARGO_TARGET_DIR=$CUDA_TARGET nice -n 10 "$here/build.sh" --release --locked -p logitd --features cuda \
    --bin logitd --example gpu_bench --example dump_logits --test gpu_sampler
  CARGO_TARGET_DIR=$CUDA_TARGET nice -n 10 cargo build --release --locked -p logitd-client-tools --bin logitd-bench
fi

# Real-teacher logits (bf16), when missing.
mkdir -p tests/gpu/data
# dump_logits runs on the CPU: the link stubs stand in for the driver's
# libraries it never calls, the runtime wheel gives libcudart.so.13.
stubs=$PWD/$(ls -d .cuda-build/stubs-cudarc-*/lib | head -1)
cudart=$(dirname "$(readlink -f "$stubs/libcudart.so")")
dump() { # dump GGUF FIXTURE OUT [ROWS]
  [[ -s tests/gpu/data/$3.xz ]] && return
  [[ -s $TEACHERS/$1 ]] || { echo "pack: $TEACHERS/$1 missing (tests/fetch-teachers.sh all)" >&2; exit 1; }
  LD_LIBRARY_PATH=$stubs:$cudart "$CUDA_TARGET/release/examples/dump_logits" "$TEACHERS/$1" \
    "server/tests/fixtures/real/$2" "tests/gpu/data/$3" ${4:+"$4"}
  xz -T2 -6 -f "tests/gpu/data/$3"
}
dump SmolLM2-135M-Instruct.Q4_1.gguf smollm2_135m.json smollm2-135m.safetensors
dump gemma-3-270m-q4_k_m.gguf gemma3_270m.json gemma3-270m.safetensors 48

mkdir -p tests/gpu/bin
rm -f tests/gpu/bin/*
test_bin=$(ls -t "$CUDA_TARGET"/release/deps/gpu_sampler-* | grep -v '\.d$' | head -1)
cp "$test_bin" tests/gpu/bin/gpu_sampler
cp "$CUDA_TARGET/release/examples/gpu_bench" "$CUDA_TARGET/release/logitd" \
  "$CUDA_TARGET/release/logitd-bench" tests/gpu/bin/
strip tests/gpu/bin/*
xz -T2 -9 tests/gpu/bin/*
ls -la tests/gpu/bin tests/gpu/data
# The GPU machine gets the working tree and the carried folders, 64 MiB in all:
# both count, and the pack fails at 60 MiB.
"$here/pack-size.sh" tests/gpu/bin tests/gpu/data
