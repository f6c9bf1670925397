#!/usr/bin/env bash
# Does `logitd-client dump` keep the teacher busy? Its positions/s against one
# `logitd serve` compared with what `logitd-bench` gets from the same server with
# the same request shape: SEQUENCES sequences of LENGTH tokens per request, k =
# K, DEPTH requests in flight (the bench: DEPTH unary callers; the dump:
# --depth DEPTH --batch-sequences SEQUENCES over a corpus of LENGTH-token
# sequences). The two sides run interleaved in ROUNDS rounds, in alternating
# order, so a slow spell of the machine falls on both alike; the ratio is per
# round, then the median. The dump's positions/s is its own end line (positions
# written / wall time of the whole process: reading, connecting, writing and
# syncing the shards included).
#
#   tests/bench/dump_throughput.sh            # writes tests/bench/results/dump-throughput-<date>.md
#
# Settings (environment): MODEL (default: SmolLM2-135M-Instruct.Q4_1.gguf in
# ~/.cache/logitd/teachers), BIN (default: target/debug; the binaries are built
# there unless BUILD=0), ROUNDS=4, DURATION=30 (seconds per side per round),
# SEQUENCES=4, LENGTH=128, K=256, DEPTH=2, VOCAB=30000 (ids of the corpus are
# below it), PORT=50871, OUT (the results file).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
MODEL=${MODEL:-$HOME/.cache/logitd/teachers/SmolLM2-135M-Instruct.Q4_1.gguf}
BIN=${BIN:-$ROOT/target/debug}
ROUNDS=${ROUNDS:-4} DURATION=${DURATION:-30} SEQUENCES=${SEQUENCES:-4} LENGTH=${LENGTH:-128}
K=${K:-256} DEPTH=${DEPTH:-2} PORT=${PORT:-50871} VOCAB=${VOCAB:-30000}
START=$(date -u +'%F %H:%M') LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
URI=http://127.0.0.1:$PORT
WORK=$(mktemp -d)
log() { printf '[dump-throughput %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
[[ -e $MODEL ]] || { echo "no teacher at $MODEL (set MODEL)" >&2; exit 1; }
if [[ ${BUILD:-1} == 1 ]]; then
  cargo build -q -p logitd --bin logitd
  cargo build -q -p logitd-client-tools --bin logitd-client --bin logitd-bench
fi

"$BIN/logitd" serve --model "$MODEL" --listen "127.0.0.1:$PORT" --metrics-listen 127.0.0.1:0 \
  --log warn > "$WORK/server.out" 2> "$WORK/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT

# The corpus: sequences of exactly LENGTH ids (deterministic, below VOCAB).
python3 - "$WORK/corpus.jsonl" "$LENGTH" "$VOCAB" <<'PY'
import sys
path, length, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "w") as f:
    for s in range(20000):
        f.write("[" + ",".join(str((s * 7919 + p * 104729) % vocab) for p in range(length)) + "]\n")
PY

log "waiting for the server"
for _ in $(seq 600); do
  if "$BIN/logitd-bench" --server "$URI" --concurrency 1 --sequences 1 --length 8 \
      --input "$WORK/corpus.jsonl" --requests 1 --json "$WORK/ready.json" > /dev/null 2>&1 \
     && grep -q '"requests_ok":1' "$WORK/ready.json"; then break; fi
  sleep 1
done
grep -q '"requests_ok":1' "$WORK/ready.json" || { cat "$WORK/server.log" >&2; exit 1; }

bench() { # bench OUT.json
  "$BIN/logitd-bench" --server "$URI" --mode unary --concurrency "$DEPTH" --sequences "$SEQUENCES" \
    --length "$LENGTH" --num-samples "$K" --input "$WORK/corpus.jsonl" --duration-s "$DURATION" \
    --warmup-requests "$DEPTH" --json "$1" > /dev/null
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["positions_per_s"])' "$1"
}
dump() { # dump N OUTDIR: the first N sequences of the corpus
  head -n "$1" "$WORK/corpus.jsonl" > "$WORK/dump-input.jsonl"
  "$BIN/logitd-client" dump --server "$URI" --input "$WORK/dump-input.jsonl" --out "$2" \
    --num-samples "$K" --batch-sequences "$SEQUENCES" --depth "$DEPTH" --seed 1 > "$2.line" 2> "$2.err"
  grep -o '[0-9.]* positions/s' "$2.line" | cut -d' ' -f1
}

log "warm-up and sizing"
warm=$(bench "$WORK/warm.json")
# Enough sequences for the dump to run about DURATION seconds.
N=$(python3 -c "import math; print(max($SEQUENCES * $DEPTH, math.ceil($warm * $DURATION / $LENGTH)))")
log "bench warm-up: $warm positions/s; the dump gets $N sequences per round"

rows=()
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then
    b=$(bench "$WORK/bench-$r.json"); d=$(dump "$N" "$WORK/dump-$r")
  else
    d=$(dump "$N" "$WORK/dump-$r"); b=$(bench "$WORK/bench-$r.json")
  fi
  ratio=$(python3 -c "print(f'{$d / $b:.3f}')")
  log "round $r: bench $b, dump $d positions/s, ratio $ratio"
  rows+=("$r $b $d $ratio")
done

DATE=$(date -u +%F)
OUT=${OUT:-$ROOT/tests/bench/results/dump-throughput-$DATE.md}
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
CPU=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
python3 - "$OUT" "${rows[@]}" <<PY
import statistics, sys
out, rows = sys.argv[1], [r.split() for r in sys.argv[2:]]
ratios = [float(r[3]) for r in rows]
with open(out, "w") as f:
    f.write("# logitd-client dump vs logitd-bench on one server — $DATE\n\n")
    f.write("Command: \`ROUNDS=$ROUNDS DURATION=$DURATION SEQUENCES=$SEQUENCES LENGTH=$LENGTH K=$K DEPTH=$DEPTH VOCAB=$VOCAB MODEL=$MODEL tests/bench/dump_throughput.sh\`, "
            "started $START UTC, commit $(git rev-parse --short HEAD)"
            "$( [[ -n $(git status --porcelain -- client tests/bench) ]] && echo ' (with uncommitted changes in client/ or tests/bench/)' ).\n\n")
    f.write("Machine: $CPU, $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; binaries from $(basename "$BIN") "
            "(the workspace's dev profile: opt-level 1 for the workspace, 3 for dependencies). "
            "Load average (1, 5, 15 min) at the start $LOAD_START, at the end $LOAD_END: "
            "the machine is shared (other builds ran), hence the interleaving.\n\n")
    f.write("CPU flags: $FLAGS\n\n")
    f.write("Teacher \`$(basename "$MODEL")\` on the CPU (\`logitd serve\`, defaults); requests of $SEQUENCES sequences x $LENGTH tokens, "
            "k = $K, $DEPTH in flight (bench: $DEPTH unary callers for ${DURATION} s; dump: --depth $DEPTH --batch-sequences $SEQUENCES "
            "over $N sequences). Positions/s of the dump: its end line (whole process, shards written and synced).\n\n")
    f.write("| round | logitd-bench positions/s | dump positions/s | dump / bench |\n| ---: | ---: | ---: | ---: |\n")
    for r in rows:
        f.write(f"| {r[0]} | {float(r[1]):.1f} | {float(r[2]):.1f} | {float(r[3]):.3f} |\n")
    med = statistics.median(ratios)
    f.write(f"\nMedian ratio {med:.3f} (range {min(ratios):.3f}–{max(ratios):.3f}); goal >= 0.95: {'met' if med >= 0.95 else 'NOT met'}.\n")
print(out)
PY
log "wrote $OUT"
