#!/usr/bin/env bash
# GPU tests and benchmarks of logitd, in one go, on a machine with an NVIDIA GPU,
# from the repository root, with binaries built elsewhere (tests/gpu/README.md
# says how) in $BIN (default tests/gpu/bin; *.xz files there are unpacked).
#
#   tests/gpu/run.sh [STAGE...]      stages: test sanitize sampler teachers forward e2e report
#                                    (default: all of them, in that order)
#
#   test      the GPU test binary (kernel vs CPU reference, teacher on CUDA vs CPU)
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck, initcheck on the kernel
#             tests with few rows (skipped, and said so, if compute-sanitizer is absent)
#   sampler   kernel time per row vs the device-to-device copy bandwidth, and
#             PyTorch (softmax + multinomial + counts) on the same GPU
#   teachers  random bf16 teachers shaped like Gemma-3-1B/4B and Llama-3-8B
#             (tests/gpu/make_random_teacher.py, into $MODELS)
#   forward   teacher forward tokens/s and MFU, logitd vs transformers, per teacher,
#             and the bare engine (Engine::run)
#   e2e       `logitd serve --device cuda:0` driven by logitd-bench (if $BIN has it)
#   report    the table, printed and written to tests/gpu/results/<date>-<device>.md
#
# Every stage appends JSON lines to tests/gpu/results/<date>-<device>.jsonl, so
# stages can run in separate calls (each under ten minutes on an H100).
# Environment: BIN, MODELS (default /tmp/logitd-gpu-teachers), PYTHON (python3),
# SEQUENCES x LENGTH per forward batch (8 x 1024), REPS (5), E2E_SECONDS (30),
# LOGITD_REAL_LOGITS (real-teacher logits for the test stage, see README).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-tests/gpu/bin}
MODELS=${MODELS:-/tmp/logitd-gpu-teachers}
PYTHON=${PYTHON:-python3}
SEQUENCES=${SEQUENCES:-8}
LENGTH=${LENGTH:-1024}
REPS=${REPS:-5}
E2E_SECONDS=${E2E_SECONDS:-30}
STAGES=${*:-test sanitize sampler teachers forward e2e report}

command -v nvidia-smi >/dev/null || { echo "run.sh: no nvidia-smi, so no NVIDIA GPU here" >&2; exit 1; }

# The CUDA 13 libraries PyTorch ships (the binaries were linked against their sonames).
CULIB=$("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, site
libs = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13")
dirs = []
for base in site.getsitepackages():
    for lib in libs:
        for f in glob.glob(os.path.join(base, "nvidia", "**", lib), recursive=True):
            if os.path.dirname(f) not in dirs:
                dirs.append(os.path.dirname(f))
print(":".join(dirs))
PY
)
if [[ -n $CULIB ]]; then export LD_LIBRARY_PATH=$CULIB:${LD_LIBRARY_PATH:-}; fi

for f in "$BIN"/*.xz; do
  if [[ -e $f ]]; then xz -dkf "$f"; chmod +x "${f%.xz}"; fi
done
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
DATE=$(date -u +%Y-%m-%d)
RESULTS=tests/gpu/results
TAG=$DATE-$(echo "$DEVICE" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
JSONL=$RESULTS/$TAG.jsonl
mkdir -p "$RESULTS"
note() { echo "$*" | tee -a "$RESULTS/$TAG.log" >&2; }
jsonl() { { grep -E '^\{' || true; } | tee -a "$JSONL"; }
note "== $(date -u +%FT%TZ) $DEVICE, stages: $STAGES"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$RESULTS/$TAG.log"

for stage in $STAGES; do
  case $stage in
  test)
    status=0
    "$BIN/gpu_sampler" --test-threads=1 --nocapture >"$RESULTS/$TAG.test.log" 2>&1 || status=$?
    # AGREEMENT / TEACHER lines become JSON for the report.
    "$PYTHON" tests/gpu/report.py --from-test <"$RESULTS/$TAG.test.log" | jsonl
    grep -E "^test |test result" "$RESULTS/$TAG.test.log" >&2 || true
    if [[ $status != 0 ]]; then note "GPU tests FAILED (exit $status, see $RESULTS/$TAG.test.log)"; exit 1; fi
    ;;
  sanitize)
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
    if [[ -z $SAN ]]; then
      note "compute-sanitizer: not present on this machine, sanitize stage skipped"
      echo '{"bench":"sanitizer","tool":"all","result":"not run: compute-sanitizer absent"}' | jsonl
      continue
    fi
    for tool in memcheck racecheck synccheck initcheck; do
      log=$RESULTS/$TAG.sanitizer-$tool.log
      if LOGITD_GPU_TEST_ROWS=16 "$SAN" --tool "$tool" --error-exitcode 99 \
          "$BIN/gpu_sampler" --test-threads=1 kernel_ bad_rows >"$log" 2>&1; then
        result=clean
      else
        result="errors (see $log)"
      fi
      summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1 || true)
      note "compute-sanitizer $tool: $result $summary"
      printf '{"bench":"sanitizer","tool":"%s","result":"%s","summary":"%s"}\n' "$tool" "$result" "$summary" | jsonl
    done
    ;;
  sampler)
    "$BIN/gpu_bench" sampler 20 | jsonl
    "$PYTHON" tests/gpu/torch_sampler.py --reps 20 | jsonl
    ;;
  teachers)
    "$PYTHON" tests/gpu/make_random_teacher.py "$MODELS"
    ;;
  forward)
    for m in gemma3-1b gemma3-4b llama3-8b; do
      [[ -d $MODELS/$m ]] || { note "$MODELS/$m missing: run the teachers stage"; continue; }
      "$BIN/gpu_bench" forward "$MODELS/$m" "$SEQUENCES" "$LENGTH" "$REPS" | jsonl
      "$PYTHON" tests/gpu/hf_forward.py "$MODELS/$m" "$SEQUENCES" "$LENGTH" "$REPS" | jsonl
      "$BIN/gpu_bench" engine "$MODELS/$m" "$SEQUENCES" "$LENGTH" 20 | jsonl
    done
    ;;
  e2e)
    if [[ ! -x $BIN/logitd || ! -x $BIN/logitd-bench ]]; then
      note "e2e: needs $BIN/logitd (cuda) and $BIN/logitd-bench, skipped"
      continue
    fi
    for m in gemma3-1b gemma3-4b llama3-8b; do
      [[ -d $MODELS/$m ]] || continue
      log=$RESULTS/$TAG.serve-$m.log
      "$BIN/logitd" serve --model "$MODELS/$m" --device cuda:0 --listen 127.0.0.1:50151 \
        --metrics-listen 127.0.0.1:50152 --max-batch-tokens $((SEQUENCES * LENGTH)) >"$log" 2>&1 &
      pid=$!
      for _ in $(seq 600); do grep -q '"serving"\|serving' "$log" && break; sleep 1; done
      "$BIN/logitd-bench" --server http://127.0.0.1:50151 --concurrency 2 --mode stream --depth 2 \
        --sequences "$SEQUENCES" --length "$LENGTH" --duration-s "$E2E_SECONDS" --warmup-requests 2 \
        --label "$m" --json - | "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); d["bench"]="e2e"; print(json.dumps(d))' | jsonl
      kill -TERM $pid; wait $pid || true
    done
    ;;
  report)
    "$PYTHON" tests/gpu/report.py "$JSONL" --device "$DEVICE" --date "$DATE" | tee "$RESULTS/$TAG.md"
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
