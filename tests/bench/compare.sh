#!/usr/bin/env bash
# logitd against what a user would use instead, side by side, in one run on this
# machine: the same teacher (SmolLM2-135M-Instruct GGUF, f32 on the CPU), the same
# token sequences (Twelfth Night, tokenised by the GGUF's tokenizer), the same
# number of threads on both sides.
#
#   (a) logitd end to end: `logitd serve` + the load generator `logitd-bench`
#       (closed loop, CONCURRENCY unary callers, SEQUENCES x LENGTH per request;
#       the server batches the callers' requests together)
#   (b) logitd's engine alone (server/examples/engine_bench.rs: Engine::score on
#       batches of CONCURRENCY x SEQUENCES sequences, the batches the server
#       forms, no gRPC, no queue): (a)/(b) is the serving overhead
#   (c) the peer: Hugging Face transformers on torch, the same forward on the
#       same batches, then torch.softmax, torch.multinomial(p, K,
#       replacement=True), unique/counts and log p per position
#       (tests/bench/torch_peer.py)
#   (d) the sampler alone vs torch's sampling alone, on the same logits
#   (e) response bytes per position vs top-K (int32 id, f32 logprob) pairs and vs
#       the dense f16 row
# plus where the server's time goes (metrics, a step-by-step engine pass, and a
# perf profile of the server under load when perf works).
#
# (a), (b) and (c) run ROUNDS times for DURATION seconds each, interleaved (the
# order rotates every round; the engine and torch stay loaded between rounds),
# so load from other processes falls on all sides alike; ratios are per round,
# and the table gives their median. Prints the table and writes
# tests/bench/results/compare-<date>.md.
#
# Run by hand (not in CI). Settings (environment): THREADS (default nproc),
# DURATION (s per measurement, 40), ROUNDS (6), SEQUENCES (2), LENGTH (128),
# K (256), CONCURRENCY (2), SAMPLER_ROWS (512), SAMPLER_TIME (10 s), SKIP_BUILD (set:
# use the binaries already in target/release),
# PYTHON (a Python with torch, transformers, gguf and numpy; default: a venv in
# ~/.cache/logitd/bench-venv made from tests/bench/requirements.txt, pinned).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
THREADS=${THREADS:-$(nproc)}
DURATION=${DURATION:-40}
ROUNDS=${ROUNDS:-6}
SEQUENCES=${SEQUENCES:-2}
LENGTH=${LENGTH:-128}
K=${K:-256}
CONCURRENCY=${CONCURRENCY:-2}
SAMPLER_ROWS=${SAMPLER_ROWS:-512}
SAMPLER_TIME=${SAMPLER_TIME:-10}
RESULTS=${RESULTS:-$ROOT/tests/bench/results}

source tests/bench/lib.sh
log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# --- Python with torch, transformers, gguf -----------------------------------
bench_python torch,transformers,gguf,numpy

# --- teacher, text, binaries --------------------------------------------------
GGUF=$(tests/fetch-teachers.sh smollm2)
PLAY=$(tests/fetch-teachers.sh corpus)/twelfth-night.md
if [[ -z ${SKIP_BUILD:-} ]]; then
  log "building logitd, engine_bench and logitd-bench (release)"
  cargo build --release -q -p logitd --bin logitd --example engine_bench
  cargo build --release -q -p logitd-client-tools --bin logitd-bench
fi
BIN=$ROOT/target/release

WORK=$(mktemp -d -t logitd-compare.XXXXXX)
SERVER_PID=
B_PID= C_PID=
cleanup() {
  for pid in $SERVER_PID $B_PID $C_PID; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; wait "$pid" 2>/dev/null || true; fi
  done
}
trap cleanup EXIT
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
uptime > "$WORK/load-start.txt"
machine_header > "$WORK/machine.txt"
{ git rev-parse --short HEAD
  if [[ -n $(git status --porcelain -- server client proto tests/bench) ]]; then echo "(with uncommitted changes)"; fi
} 2>/dev/null | paste -sd' ' > "$WORK/commit.txt" || true

log "tokenising the play into 64 sequences of $LENGTH tokens"
"$PYTHON" tests/bench/torch_peer.py corpus "$GGUF" "$PLAY" "$WORK/corpus.jsonl" 64 "$LENGTH" 2>/dev/null

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); MPORT=$(free_port)
URI=http://127.0.0.1:$PORT
"$BIN/logitd" serve --model "$GGUF" --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$MPORT" --log warn > "$WORK/server.out" 2> "$WORK/server.log" &
SERVER_PID=$!
metrics() { # metrics FILE: the server's /metrics, with the time of the scrape first
  { echo "# scraped_at $(date +%s.%N)"
    curl -sf "http://127.0.0.1:$MPORT/metrics" || "$PYTHON" -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode())' "$MPORT"
  } > "$1"
}
bench() { # bench NAME EXTRA_ARGS...
  local name=$1; shift
  "$BIN/logitd-bench" --server "$URI" --concurrency "$CONCURRENCY" --sequences "$SEQUENCES" \
    --length "$LENGTH" --num-samples "$K" --input "$WORK/corpus.jsonl" --json "$WORK/$name.json" \
    "$@" > "$WORK/$name.txt"
}
log "waiting for the server"
for _ in $(seq 1 120); do
  if "$BIN/logitd-bench" --server "$URI" --concurrency 1 --sequences 1 --length 8 \
      --input "$WORK/corpus.jsonl" --requests 1 --json "$WORK/ready.json" > /dev/null 2>&1 \
     && grep -q '"requests_ok":1' "$WORK/ready.json"; then
    break
  fi
  sleep 1
done
grep -q '"requests_ok":1' "$WORK/ready.json" || { cat "$WORK/server.log" >&2; exit 1; }

# (b) and (c) stay loaded: each reads a duration per line and prints a JSON line.
BATCH=$(( CONCURRENCY * SEQUENCES ))
mkfifo "$WORK/b.in" "$WORK/c.in"
log "loading the teacher in transformers"
"$PYTHON" tests/bench/torch_peer.py forward "$GGUF" "$WORK/corpus.jsonl" "$BATCH" "$LENGTH" "$K" \
  stdin "$THREADS" < "$WORK/c.in" > "$WORK/c.out" 2> "$WORK/c.err" &
C_PID=$!
exec 8> "$WORK/c.in"
ask c 8 "$C_PID" 0 "$WORK/c-ready.json"
log "loading the teacher in engine_bench"
"$BIN/examples/engine_bench" engine "$GGUF" "$WORK/corpus.jsonl" "$BATCH" "$LENGTH" "$K" stdin 1 \
  < "$WORK/b.in" > "$WORK/b.out" 2> "$WORK/b.err" &
B_PID=$!
exec 7> "$WORK/b.in"
ask b 7 "$B_PID" 0 "$WORK/b-ready.json"

run_a() {
  log "round $1: (a) logitd end to end, ${DURATION}s"
  bench "a-$1-warmup" --requests "$CONCURRENCY"
  metrics "$WORK/metrics-a-$1-before.txt"
  bench "a-$1" --duration-s "$DURATION" --label "round $1"
  metrics "$WORK/metrics-a-$1-after.txt"
}
run_b() { log "round $1: (b) engine alone, ${DURATION}s"; ask b 7 "$B_PID" "$DURATION" "$WORK/b-$1.json"; }
run_c() { log "round $1: (c) transformers + torch, ${DURATION}s"; ask c 8 "$C_PID" "$DURATION" "$WORK/c-$1.json"; }
for r in $(seq 1 "$ROUNDS"); do
  case $(( (r - 1) % 3 )) in
    0) run_b "$r"; run_a "$r"; run_c "$r" ;;
    1) run_a "$r"; run_c "$r"; run_b "$r" ;;
    2) run_c "$r"; run_b "$r"; run_a "$r" ;;
  esac
done
exec 7>&- 8>&-
# Their stdin is closed: each must exit 0. A crash on the way out fails the run.
for peer in b:"$B_PID" c:"$C_PID"; do
  status=0
  wait "${peer#*:}" || status=$?
  if (( status != 0 )); then
    echo "the ${peer%%:*} peer (pid ${peer#*:}) exited with status $status; its stderr:" >&2
    cat "$WORK/${peer%%:*}.err" >&2
    exit 1
  fi
done

log "(a') streaming: $CONCURRENCY streams, depth 2, ${DURATION}s"
bench a-stream --mode stream --depth 2 --duration-s "$DURATION" --warmup-requests 2
log "(e') f16 values"
bench a-f16 --value-encoding f16 --requests 8

if perf record -e cpu-clock -o "$WORK/perf-check.data" -- true > /dev/null 2>&1; then
  log "profile of the server under load, ${DURATION}s"
  bench a-profile --duration-s "$DURATION" --warmup-requests "$CONCURRENCY" &
  bench_pid=$!
  sleep 5
  perf record -e cpu-clock -F 499 -p "$SERVER_PID" -o "$WORK/perf.data" -- sleep $(( DURATION - 10 > 5 ? DURATION - 10 : 5 )) \
    > /dev/null 2>&1 || true
  wait "$bench_pid"
  perf report -i "$WORK/perf.data" --stdio --no-children --sort dso,sym --percent-limit 0.01 \
    > "$WORK/perf.txt" 2> /dev/null || true
else
  log "perf does not work here: no profile"
fi
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=

log "(d) sampler alone vs torch sampling on $SAMPLER_ROWS rows of the teacher's logits"
"$PYTHON" tests/bench/torch_peer.py dump "$GGUF" "$WORK/corpus.jsonl" "$SAMPLER_ROWS" \
  "$WORK/logits.f32" "$THREADS" > "$WORK/dump.json" 2> /dev/null
VOCAB=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$WORK/dump.json")
for r in $(seq 1 "$ROUNDS"); do
  "$BIN/examples/engine_bench" sampler "$WORK/logits.f32" "$VOCAB" "$K" "$SAMPLER_TIME" > "$WORK/d-logitd-$r.json"
  "$PYTHON" tests/bench/torch_peer.py sampling "$WORK/logits.f32" "$VOCAB" "$K" "$SAMPLER_TIME" "$THREADS" > "$WORK/d-torch-$r.json"
  RAYON_NUM_THREADS=1 "$BIN/examples/engine_bench" sampler "$WORK/logits.f32" "$VOCAB" "$K" "$SAMPLER_TIME" > "$WORK/d-logitd1-$r.json"
  "$PYTHON" tests/bench/torch_peer.py sampling "$WORK/logits.f32" "$VOCAB" "$K" "$SAMPLER_TIME" 1 > "$WORK/d-torch1-$r.json"
done
uptime > "$WORK/load-end.txt"

mkdir -p "$RESULTS"
"$PYTHON" tests/bench/summarize.py "$WORK" "$RESULTS" \
  "threads=$THREADS duration=$DURATION rounds=$ROUNDS sequences=$SEQUENCES length=$LENGTH k=$K concurrency=$CONCURRENCY sampler_rows=$SAMPLER_ROWS sampler_time=$SAMPLER_TIME" \
  "$GGUF" "$PYTHON"
( cd "$WORK" && tar -cJf "$RESULTS/compare-$(date -u -r load-end.txt +%F)-raw.tar.xz" ./*.json ./*.txt )
log "raw results kept in $WORK, and packed next to the summary"
