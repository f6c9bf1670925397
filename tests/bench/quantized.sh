#!/usr/bin/env bash
# A GGUF teacher kept quantized (`--dtype auto`) against the same file widened to
# f32 (`--dtype f32`): teacher_forward in both modes, interleaved rounds, through
# ab_forward.sh (forward, then the chunked LM head and the sampler at k = 256).
#
#   tests/bench/quantized.sh GGUF BATCH LEN ROUNDS
#
# TEACHER_FORWARD names the binary (default target/release/examples/teacher_forward;
# build it with `cargo build --release -p logitd --example teacher_forward`).
set -euo pipefail
bin=$(realpath "${TEACHER_FORWARD:-target/release/examples/teacher_forward}")
dir=$(mktemp -d -t quantized-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
for mode in kept f32; do
  printf '#!/bin/sh\nexec %q "$@" %s\n' "$bin" "$mode" > "$dir/$mode"
  chmod +x "$dir/$mode"
done
"$(dirname "$0")/ab_forward.sh" "$1" "$2" "$3" "$4" kept="$dir/kept" f32="$dir/f32"
