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
# copy the binary aside between builds. A build that fails (non-zero exit, a
# signal) or prints no JSON line stops the script with a non-zero status and a
# message naming it, its exit status and the end of its stderr.
set -euo pipefail
gguf=$1 batch=$2 len=$3 rounds=$4; shift 4
source "$(dirname "$0")/lib.sh"
machine_header | sed 's/^/# /'
echo "# threads: ${RAYON_NUM_THREADS:=2}; load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
export RAYON_NUM_THREADS
err=$(mktemp -t ab_forward.XXXXXX)
trap 'rm -f "$err"' EXIT
n=$#
for r in $(seq 1 "$rounds"); do
  for i in $(seq 0 $(( n - 1 ))); do
    spec=${@:$(( (i + r) % n + 1 )):1}
    name=${spec%%=*} bin=${spec#*=}
    # Not inside echo's arguments: a failed command substitution there is
    # ignored even under `set -e`, and a crashed build printed an empty result.
    status=0
    out=$("$bin" "$gguf" "$batch" "$len" 2 sample 2>"$err") || status=$?
    line=$(tail -n 1 <<< "$out")
    if (( status != 0 )) || [[ $line != "{"* ]]; then
      why="exit status $status"
      (( status > 128 )) && why+=" (signal $(kill -l $(( status - 128 )) 2>/dev/null || echo $(( status - 128 ))))"
      (( status == 0 )) && why+=" but no JSON line (last line: ${line:-none})"
      echo "ab_forward: build $name ($bin) failed in round $r: $why; its stderr ends:" >&2
      tail -n 20 "$err" | sed 's/^/  /' >&2
      exit 1
    fi
    echo "$name round $r $line"
  done
done
