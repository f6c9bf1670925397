#!/usr/bin/env bash
# logitd's CPU teacher pass against transformers and llama.cpp at three batch
# shapes, side by side, interleaved, in one run on this machine: the same GGUF
# (SmolLM2-135M-Instruct), the same token sequences (Twelfth Night, tokenised by
# the GGUF's tokenizer), the same number of threads on every side.
#
#   logitd:       Engine::score (server/examples/engine_bench.rs): forward, LM
#                 head and sampling k = K draws per position, the sparse result
#                 built (no gRPC: compare.sh measures the serving overhead).
#   transformers: torch, SDPA attention, f32 (tests/bench/torch_peer.py); the
#                 ratio uses its forward + LM head alone (the logits, before any
#                 sampling), timed inside the same requests.
#   llama.cpp:    llama-cpp-python, logits at every position, no sampling
#                 (tests/bench/llama_peer.py); one sequence per eval, as its API
#                 takes them.
#
# For each shape (SEQUENCES x LENGTH, default "1x64 8x256 4x1024") the three stay
# loaded and measure ROUNDS times for DURATION seconds each, the order rotating
# every round; ratios are per round and the table gives their median (and
# range). Then the peak RSS of logitd's engine at MEM_SHAPE (8x1024 = 8,192
# positions). The results file starts with the CPU model and its SIMD flags, so
# numbers from different machines are never read as alike.
#
# Run by hand (not in CI). Settings (environment): THREADS (2), DURATION (15 s),
# ROUNDS (5), SHAPES ("1x64 8x256 4x1024"), MEM_SHAPE (8x1024), K (256),
# SKIP_BUILD (set: use target/release as it is), PYTHON (a Python with torch,
# transformers, gguf, numpy and llama_cpp; default: a venv in
# ~/.cache/logitd/bench-venv made from tests/bench/requirements.txt; building
# llama-cpp-python from source takes ~10 minutes once: natively, except on CPUs
# with AMX, where llama.cpp's AMX kernels crash it and it is built without them,
# see llama_cmake_args in lib.sh; the results record the flags), RESULTS
# (directory for shapes-<date>.md, default tests/bench/results).
#
# A peer that crashes or exits early stops the script with a non-zero status and
# a message naming it (logitd, transformers or llama.cpp), its exit status and
# its stderr; no results file is written.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
THREADS=${THREADS:-2}
DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-5}
SHAPES=${SHAPES:-1x64 8x256 4x1024}
MEM_SHAPE=${MEM_SHAPE:-8x1024}
K=${K:-256}
RESULTS=${RESULTS:-$ROOT/tests/bench/results}

source tests/bench/lib.sh
log() { printf '[shapes %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

bench_python torch,transformers,gguf,numpy,llama_cpp

GGUF=$(tests/fetch-teachers.sh smollm2)
PLAY=$(tests/fetch-teachers.sh corpus)/twelfth-night.md
if [[ -z ${SKIP_BUILD:-} ]]; then
  log "building engine_bench (release)"
  cargo build --release -q -p logitd --example engine_bench
fi
BIN=$ROOT/target/release

WORK=$(mktemp -d -t logitd-shapes.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; wait "$pid" 2>/dev/null || true; fi
  done
}
trap cleanup EXIT
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# The machine, first: the model and the SIMD flags that decide which kernels run.
{
  machine_header
  echo "commit: $(git rev-parse --short HEAD)$([[ -n $(git status --porcelain -- server client proto tests/bench) ]] && echo ' (with uncommitted changes)')"
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PYTHON" -c 'import torch, transformers, llama_cpp; print(f"torch {torch.__version__}, transformers {transformers.__version__}, llama-cpp-python {llama_cpp.__version__}")'
  # What the llama.cpp peer was built with: the CMake flags, and what its
  # library says it was compiled for (AMX_INT8 = 1 there: AMX kernels).
  echo "llama.cpp build: $LLAMA_CPP_BUILD"
  echo "llama.cpp system info: $("$PYTHON" -c 'import llama_cpp; i = llama_cpp.llama_print_system_info(); print((i.decode() if isinstance(i, bytes) else i).strip())')"
} > "$WORK/machine.txt"
cat "$WORK/machine.txt" >&2
if grep -q ' amx_' /proc/cpuinfo && grep -q 'AMX_INT8 = 1' "$WORK/machine.txt"; then
  log "warning: this CPU has AMX and the llama.cpp peer was built with AMX kernels, which crash it; see llama_cmake_args in tests/bench/lib.sh"
fi

max_len=0
for shape in $SHAPES $MEM_SHAPE; do (( ${shape#*x} > max_len )) && max_len=${shape#*x}; done
log "tokenising the play into 16 sequences of $max_len tokens"
"$PYTHON" tests/bench/torch_peer.py corpus "$GGUF" "$PLAY" "$WORK/corpus.jsonl" 16 "$max_len" 2>/dev/null


# finish NAME PID: a peer whose stdin was closed must exit with status 0; a
# crash on the way out fails the run too.
finish() {
  local status=0
  wait "$2" || status=$?
  if (( status != 0 )); then
    log "the $1 peer (pid $2) exited with status $status after shape $shape; its stderr:"
    cat "$WORK/$1.err" >&2
    exit 1
  fi
}

for shape in $SHAPES; do
  S=${shape%x*} L=${shape#*x}
  log "shape $S x $L: loading the three"
  rm -f "$WORK/logitd.in" "$WORK/transformers.in" "$WORK/llama.cpp.in"
  mkfifo "$WORK/logitd.in" "$WORK/transformers.in" "$WORK/llama.cpp.in"
  "$BIN/examples/engine_bench" engine "$GGUF" "$WORK/corpus.jsonl" "$S" "$L" "$K" stdin 1 \
    < "$WORK/logitd.in" > "$WORK/logitd.out" 2> "$WORK/logitd.err" &
  L_PID=$!; PIDS+=("$L_PID"); exec 7> "$WORK/logitd.in"
  "$PYTHON" tests/bench/torch_peer.py forward "$GGUF" "$WORK/corpus.jsonl" "$S" "$L" "$K" stdin "$THREADS" \
    < "$WORK/transformers.in" > "$WORK/transformers.out" 2> "$WORK/transformers.err" &
  T_PID=$!; PIDS+=("$T_PID"); exec 8> "$WORK/transformers.in"
  "$PYTHON" tests/bench/llama_peer.py forward "$GGUF" "$WORK/corpus.jsonl" "$S" "$L" stdin "$THREADS" \
    < "$WORK/llama.cpp.in" > "$WORK/llama.cpp.out" 2> "$WORK/llama.cpp.err" &
  M_PID=$!; PIDS+=("$M_PID"); exec 9> "$WORK/llama.cpp.in"
  ask logitd 7 "$L_PID" 0 /dev/null; ask transformers 8 "$T_PID" 0 /dev/null; ask llama.cpp 9 "$M_PID" 0 /dev/null
  run_l() { log "$shape round $1: logitd"; ask logitd 7 "$L_PID" "$DURATION" "$WORK/$shape-logitd-$1.json"; }
  run_t() { log "$shape round $1: transformers"; ask transformers 8 "$T_PID" "$DURATION" "$WORK/$shape-torch-$1.json"; }
  run_m() { log "$shape round $1: llama.cpp"; ask llama.cpp 9 "$M_PID" "$DURATION" "$WORK/$shape-llama-$1.json"; }
  for r in $(seq 1 "$ROUNDS"); do
    case $(( (r - 1) % 3 )) in
      0) run_l "$r"; run_t "$r"; run_m "$r" ;;
      1) run_t "$r"; run_m "$r"; run_l "$r" ;;
      2) run_m "$r"; run_l "$r"; run_t "$r" ;;
    esac
  done
  exec 7>&- 8>&- 9>&-
  finish logitd "$L_PID"; finish transformers "$T_PID"; finish llama.cpp "$M_PID"
done

S=${MEM_SHAPE%x*} L=${MEM_SHAPE#*x}
log "peak RSS of the engine at $S x $L"
"$PYTHON" - "$BIN/examples/engine_bench" engine "$GGUF" "$WORK/corpus.jsonl" "$S" "$L" "$K" 1 1 \
  > "$WORK/memory.json" <<'EOF'
import json, resource, subprocess, sys
out = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True).stdout
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(json.dumps({"positions": json.loads(out.splitlines()[-1])["positions"], "peak_rss_mib": rss / 1024}))
EOF

mkdir -p "$RESULTS"
out=$RESULTS/shapes-$(date -u +%Y-%m-%d-%H%M).md
"$PYTHON" - "$WORK" "$ROUNDS" "$THREADS" "$DURATION" "$K" "$out" $SHAPES <<'EOF'
import json, statistics, sys
from pathlib import Path
work, rounds, threads, duration, k, out, shapes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
load = lambda shape, who, r: json.loads((work / f"{shape}-{who}-{r}.json").read_text())
def med(xs): return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"
lines = [f"# logitd vs transformers vs llama.cpp at three batch shapes (tests/bench/shapes.sh)", ""]
lines += [f"- {l}" for l in (work / "machine.txt").read_text().splitlines()]
lines += [f"- {threads} threads everywhere; {rounds} interleaved rounds of {duration} s per side and shape; k = {k}",
          f"- command: `THREADS={threads} ROUNDS={rounds} DURATION={duration} tests/bench/shapes.sh`", "",
          "positions/s: median of the rounds; ratios: per round, then the median (min–max).", "",
          "| shape | logitd fwd+head+sampling | logitd fwd | transformers fwd+logits | llama.cpp fwd+logits | logitd / transformers | logitd / llama.cpp | logitd µs/pos: fwd / head / sampler |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
for shape in shapes:
    lg, tr, ll, rt, rl, fw = [], [], [], [], [], []
    parts = {"forward": [], "lm_head": [], "sampler": []}
    for r in range(1, rounds + 1):
        a, t, m = load(shape, "logitd", r), load(shape, "torch", r), load(shape, "llama", r)
        b = t["breakdown_us_per_position"]
        t_rate = 1e6 / (b["forward"] + b["lm_head"])
        lg.append(a["positions_per_s"]); tr.append(t_rate); ll.append(m["positions_per_s"])
        fw.append(1e6 / a["breakdown_us_per_position"]["forward"])
        rt.append(a["positions_per_s"] / t_rate); rl.append(a["positions_per_s"] / m["positions_per_s"])
        for p in parts:
            parts[p].append(a["breakdown_us_per_position"][p])
    s, l = shape.split("x")
    br = " / ".join(f"{statistics.median(v):.0f}" for v in parts.values())
    lines.append(f"| {s} × {l} | {statistics.median(lg):.0f} | {statistics.median(fw):.0f} | {statistics.median(tr):.0f} | "
                 f"{statistics.median(ll):.0f} | {med(rt)} | {med(rl)} | {br} |")
mem = json.loads((work / "memory.json").read_text())
lines += ["", f"logitd's engine, peak RSS for {mem['positions']} positions (forward, chunked head, sampling): "
          f"{mem['peak_rss_mib']:.0f} MiB.", "",
          "logitd fwd: the forward alone, from engine_bench's step-by-step pass after each round.",
          "transformers fwd+logits: its forward + LM head time inside requests that also sample (not counted).", ""]
Path(out).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
log "wrote $out"
