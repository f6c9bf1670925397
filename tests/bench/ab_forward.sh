#!/usr/bin/env bash
# A/B of teacher_forward builds, interleaved, in one run: each round runs every
# build once (the order rotating), on the same GGUF, batch and threads, with
# sampling (forward, then chunked LM head + sampler k = 256). Prints one JSON
# line per run, prefixed by the build's name, and the machine first.
#
#   tests/bench/ab_forward.sh GGUF BATCH LEN ROUNDS NAME=PATH/teacher_forward...
#
# Build each variant with `cargo build --release -p logitd --example
# teacher_forward` (plus `--no-default-features` for the AVX2-only matmuls) and
# copy the binary aside between builds.
set -euo pipefail
gguf=$1 batch=$2 len=$3 rounds=$4; shift 4
source "$(dirname "$0")/lib.sh"
machine_header | sed 's/^/# /'
echo "# threads: ${RAYON_NUM_THREADS:=2}; load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
export RAYON_NUM_THREADS
n=$#
for r in $(seq 1 "$rounds"); do
  for i in $(seq 0 $(( n - 1 ))); do
    spec=${@:$(( (i + r) % n + 1 )):1}
    name=${spec%%=*} bin=${spec#*=}
    echo "$name round $r $("$bin" "$gguf" "$batch" "$len" 2 sample 2>/dev/null | tail -n 1)"
  done
done
