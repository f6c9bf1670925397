#!/usr/bin/env bash
# Shared-prefix packing (engine_bench shared): G rollouts of one prompt scored
# with and without sharing, alternating, one batch each per round, completions'
# positions only, k = 256; three shapes: G = 8 after a 1,024-token prompt,
# G = 16 after 2,048, and G = 1 (nothing to share: the cost of looking).
# Prints the machine, then one JSON line per round, prefixed by the shape, and
# for each shape one batch of each variant alone in a fresh process (its peak RSS).
#
#   tests/bench/shared_prefix.sh GGUF TEXT [ROUNDS_8 ROUNDS_16 ROUNDS_1]
#
# TEXT is tokenised with the GGUF's tokenizer (e.g. a play from
# `tests/fetch-teachers.sh corpus`). Build first:
# `cargo build --release --workspace --examples`.
set -euo pipefail
gguf=$1 text=$2 r8=${3:-5} r16=${4:-3} r1=${5:-10}
source "$(dirname "$0")/lib.sh"
machine_header | sed 's/^/# /'
echo "# threads: ${RAYON_NUM_THREADS:=2}; load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
export RAYON_NUM_THREADS
bin=${BIN:-target/release/examples/engine_bench}
for shape in "8 1024 256 $r8" "16 2048 256 $r16" "1 1024 256 $r1"; do
  read -r g prompt completion rounds <<< "$shape"
  "$bin" shared "$gguf" "$text" "$g" "$prompt" "$completion" 256 "$rounds" | sed "s/^/G=$g /"
  # Peak memory: one batch of each variant in a fresh process.
  for only in whole shared; do
    "$bin" shared "$gguf" "$text" "$g" "$prompt" "$completion" 256 1 "$only" | sed "s/^/G=$g /"
  done
done
echo "# load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
