#!/usr/bin/env bash
# logitd's GPU tests and benchmarks in one bounded run, on a machine with an
# NVIDIA GPU, from the repository root, with binaries built elsewhere
# (tests/gpu/pack.sh) carried in $BIN and real-teacher logits in $DATA.
#
#   tests/gpu/run.sh [STAGE...]        default: every stage, in this order
#   LOGITD_GPU_DRY=1 tests/gpu/run.sh  dry run on a machine without a GPU (below)
#
#   stage      what it proves                                          expected (H100)  cap
#   preflight  GPU, compute capability, driver new enough for the PTX,     ~15 s        60 s
#              every binary's libraries and symbols resolve (ldd -r, and
#              each binary started), data present, the kernel's PTX loads
#              and one launch per dtype runs (its agreement is recorded),
#              cuBLAS runs
#   kernel     the kernel against the CPU reference sampler (random       ~60 s       150 s
#              logits, 3 V x 3 dtypes, sample + top-k, bad rows); the
#              preflight launches' agreement judged
#   teacher    tiny fixture teachers on CUDA vs the CPU; SamplerBackend::sample ~40 s        90 s
#              on CUDA; the kernel on the carried real-teacher logits
#   sanitize   compute-sanitizer memcheck of the kernel tests, 16 rows    ~45 s        90 s
#   sampler    kernel time per row vs the copy floor, vs torch            ~60 s       100 s
#   forward    one random bf16 teacher (Gemma-3-1B shape): logitd vs      ~100 s      150 s
#              transformers, tokens/s and MFU; the bare engine
#   e2e        `logitd serve --device cuda:0` under logitd-bench          ~45 s        75 s
#   report     the table (report.md)                                       ~1 s        20 s
#
# The stages share one budget, LOGITD_GPU_BUDGET_S (default 540 s): each runs
# under `timeout` for the smaller of its cap and what is left, so the whole run
# ends inside the budget (preflight + kernel + teacher inside 3 minutes). A
# failed preflight stops the run; a failed later stage is recorded and the next
# one runs. The preflight fails only when something is missing, does not
# load or does not launch; how many of its launches' rows agree with the CPU is
# data, judged by the kernel stage. Every log and number is written as it is
# produced (line by line, so a stage killed at its limit keeps its lines in
# results.jsonl) under $OUT (the
# folder the GPU machine sends back; default tests/gpu/results/run-<time>), in
# at most 6 files: run.log (this console), results.jsonl (every measurement and
# each stage's status), test.log (the GPU test binary), bench.log (benchmarks,
# server), sanitizer.log, report.md. A run killed at its limit still leaves what
# it had. The exit status is 0 only if every stage that ran passed.
#
# Dry run (LOGITD_GPU_DRY=1): for a machine with no GPU. Each carried binary is
# run against generated stand-ins of the CUDA libraries whose every function
# prints "DRY: <binary> reached its first CUDA call (<function>)" and exits with
# status 86; each stage does all its CPU-side work (unpacking, library and data
# checks, test selection, fixture reading, argument parsing, server start-up
# and its liveness checks, the Python scripts' syntax and imports) and stops
# there. A stage that stops at its first CUDA call is DRY-OK.
#
# Environment: BIN (tests/gpu/bin), DATA (tests/gpu/data): *.xz there are unpacked
# into UNPACK (/tmp/logitd-gpu) with XZ (xz; Python's lzma where it is
# missing), other files used in place;
# LOGITD_REAL_LOGITS (default: every *.safetensors in $DATA; set
# LOGITD_GPU_SKIP_REAL_LOGITS=1 to run without them, which is reported), PYTHON
# (python3), MODELS (/tmp/logitd-gpu-teachers), TEACHER (gemma3-1b), SEQUENCES x
# LENGTH (8 x 1024), REPS (5), ROWS (rows per kernel test case, 1024),
# SANITIZE_TOOLS (memcheck; compute-sanitizer from PATH, else
# $CUDA_HOME/bin, default /usr/local/cuda/bin), E2E_SECONDS (20),
# LOGITD_GPU_BUDGET_S (540).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${BIN:-tests/gpu/bin}
DATA=${DATA:-tests/gpu/data}
PYTHON=${PYTHON:-python3}
MODELS=${MODELS:-/tmp/logitd-gpu-teachers}
TEACHER=${TEACHER:-gemma3-1b}
SEQUENCES=${SEQUENCES:-8}
LENGTH=${LENGTH:-1024}
REPS=${REPS:-5}
ROWS=${ROWS:-1024}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck}
E2E_SECONDS=${E2E_SECONDS:-20}
BUDGET=${LOGITD_GPU_BUDGET_S:-540}
DRY=${LOGITD_GPU_DRY:-}
STAGES=${*:-preflight kernel teacher sanitize sampler forward e2e report}
DRY_RC=86

RESULTS=${OUT:-$ROOT/tests/gpu/results/run-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/run.log JSONL=$RESULTS/results.jsonl TESTLOG=$RESULTS/test.log
BENCHLOG=$RESULTS/bench.log SANLOG=$RESULTS/sanitizer.log REPORT=$RESULTS/report.md
# Everything this script prints also goes to run.log, line by line.
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
touch "$JSONL"

say() { echo "[$(date -u +%T) +$((SECONDS - START))s] $*"; }
# JSON lines into results.jsonl as they come (--line-buffered: a stage killed
# at its limit would otherwise lose what grep had not yet written).
jsonl() { { grep --line-buffered -E '^\{' || true; } | tee -a "$JSONL"; }
json_str() { "$PYTHON" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null || printf '"%s"' "${1//\"/\'}"; }

say "logitd GPU run: stages: $STAGES; budget ${BUDGET}s; results in $RESULTS${DRY:+; DRY RUN (no GPU)}"

# ---------------------------------------------------------------------------
# Binaries and data: unpack, and put the CUDA libraries on the loader path.
# Packed files are unpacked outside the repository (UNPACK), so the carried
# folders stay small; unpacked ones are used where they are.
UNPACK=${UNPACK:-/tmp/logitd-gpu}
XZ=${XZ:-xz}
unxz() { # unxz FILE.xz: to stdout, with xz or else Python's lzma
  if command -v "$XZ" >/dev/null; then
    "$XZ" -dc "$1"
  else
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer, 1 << 20)' "$1"
  fi
}
unpack() { # unpack DIR SUBDIR: prints the directory to use
  local f dst=$UNPACK/$2
  compgen -G "$1/*.xz" >/dev/null || { echo "$1"; return; }
  command -v "$XZ" >/dev/null || echo "no $XZ here: unpacking $1 with Python's lzma" >&2
  mkdir -p "$dst"
  for f in "$1"/*.xz; do
    local name
    name=$(basename "${f%.xz}")
    if [[ ! -s $dst/$name || $f -nt $dst/$name ]]; then unxz "$f" >"$dst/$name.part" && mv "$dst/$name.part" "$dst/$name"; fi
    [[ $2 == bin ]] && chmod +x "$dst/$name"
  done
  echo "$dst"
}
BIN=$(unpack "$BIN" bin)
DATA=$(unpack "$DATA" data)
say "binaries: $BIN; data: $DATA"

# The dry run's stand-in CUDA libraries, made from what the binaries import:
# libdrycuda.so under every soname of the driver, cuBLAS, cuRAND and NVRTC
# (their symbols are unversioned here: the binaries were linked against stubs),
# and libdrycudart.so as libcudart.so.13 (its symbols carry that version).
# Every function stops the program, except the runtime's registration of the
# fat binaries that candle's statically built kernels make before main().
make_dry_libs() {
  local dir=$UNPACK/dry-cuda bins=() b so
  mkdir -p "$dir"
  for b in "$BIN"/gpu_sampler "$BIN"/gpu_bench "$BIN"/logitd; do [[ -x $b ]] && bins+=("$b"); done
  ((${#bins[@]})) || { echo "no binaries in $BIN" >&2; return 1; }
  local imports
  imports=$(for b in "${bins[@]}"; do nm -D --undefined-only "$b"; done | awk '$1 == "U" {print $2}' | sort -u)
  prologue() {
    echo '#include <stdio.h>'
    echo '#include <unistd.h>'
    echo 'extern const char *__progname;'
    echo 'static void dry_stop(const char *f) {'
    echo '  fprintf(stderr, "DRY: %s reached its first CUDA call (%s): on a GPU machine the GPU work starts here; stopping\n", __progname, f);'
    echo "  fflush(NULL); _exit($DRY_RC);"
    echo '}'
  }
  { prologue; grep -v '@' <<<"$imports" | sed -E 's/.*/void &(void) { dry_stop("&"); }/'; } >"$dir/drycuda.c"
  {
    prologue
    echo 'static void *dry_handle[4];'
    grep '@libcudart' <<<"$imports" | sed 's/@.*//' | while read -r f; do
      case $f in
        __cudaRegisterFatBinary) echo "void **$f(void *fatbin) { (void)fatbin; return dry_handle; }" ;;
        __cudaRegisterFatBinaryEnd | __cudaRegisterFunction | __cudaRegisterVar | __cudaUnregisterFatBinary)
          echo "void $f(void) {}" ;;
        *) echo "void $f(void) { dry_stop(\"$f\"); }" ;;
      esac
    done
  } >"$dir/drycudart.c"
  echo 'libcudart.so.13 { global: *; };' >"$dir/cudart.map"
  cc -shared -fPIC -O0 -o "$dir/libdrycuda.so" "$dir/drycuda.c" || return 1
  cc -shared -fPIC -O0 -Wl,--version-script="$dir/cudart.map" -o "$dir/libdrycudart.so" "$dir/drycudart.c" || return 1
  for so in $(for b in "${bins[@]}"; do readelf -d "$b"; done |
      sed -nE 's/.*NEEDED.*\[(lib(cuda|cublas|cublasLt|curand|nvrtc|cudart)\.so[^]]*)\].*/\1/p' | sort -u); do
    if [[ $so == libcudart.* ]]; then ln -sf libdrycudart.so "$dir/$so"; else ln -sf libdrycuda.so "$dir/$so"; fi
  done
  echo "$dir"
}

if [[ -n $DRY ]]; then
  DRYLIB=$(make_dry_libs) || { say "DRY: could not build the stand-in CUDA libraries (needs cc, nm, readelf)"; exit 1; }
  export LD_LIBRARY_PATH=$DRYLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  say "DRY: stand-in CUDA libraries in $DRYLIB: $(cd "$DRYLIB" && ls *.so.* | paste -sd' ' -)"
else
  # The CUDA 13 libraries that PyTorch's wheels ship (cuBLAS, cuBLASLt, cuRAND,
  # NVRTC, the runtime); the driver's libcuda comes from the system.
  CULIB=$("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
libs = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13")
dirs = []
for base in site.getsitepackages() + [p for p in sys.path if p.endswith("site-packages")]:
    for lib in libs:
        for f in glob.glob(os.path.join(base, "nvidia", "**", lib), recursive=True):
            if os.path.dirname(f) not in dirs:
                dirs.append(os.path.dirname(f))
print(":".join(dirs))
PY
)
  [[ -n $CULIB ]] && export LD_LIBRARY_PATH=$CULIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # The driver's libcuda.so.1, where the loader would not find it by itself
  # (never a toolkit's stubs/ folder: that one fails at the first call).
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
      if [[ -e $d/libcuda.so.1 ]]; then export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d; break; fi
    done
  fi
fi

# Real-teacher logits for the teacher stage.
if [[ -z ${LOGITD_REAL_LOGITS:-} ]]; then
  LOGITD_REAL_LOGITS=$(ls "$DATA"/*.safetensors 2>/dev/null | paste -sd: -)
fi
export LOGITD_REAL_LOGITS

# ---------------------------------------------------------------------------
# Stages. Each is a function run in a child bash under `timeout`; it returns 0
# (pass), DRY_RC (dry run: stopped at its first CUDA call) or anything else
# (fail). A binary's dry stop propagates as DRY_RC.

# Runs a binary; in a dry run, exit status DRY_RC means it reached CUDA.
runbin() { "$@"; }

check() { # check NAME CONDITION-RC DETAIL [DETAIL-IF-FAILED]
  if [[ $2 == 0 ]]; then
    echo "preflight: $1: ok${3:+ ($3)}"
  else
    local d=${4:-${3:-}}
    echo "preflight: $1: FAIL${d:+ ($d)}"
    PREFLIGHT_FAILED=1
  fi
}

stage_preflight() {
  PREFLIGHT_FAILED=
  local b rc missing
  # GPU, compute capability, driver.
  if [[ -n $DRY ]]; then
    echo "preflight: GPU: DRY (no GPU checks on this machine)"
  else
    if ! command -v nvidia-smi >/dev/null; then
      check "nvidia-smi" 1 "not on PATH: no NVIDIA driver here"; return 1
    fi
    local q name cap driver
    q=$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | head -1)
    name=$(cut -d, -f1 <<<"$q" | xargs); cap=$(cut -d, -f2 <<<"$q" | xargs); driver=$(cut -d, -f3 <<<"$q" | xargs)
    check "GPU" "$([[ -n $name ]]; echo $?)" "$q"
    printf '{"bench":"gpu","name":%s,"compute_cap":"%s","driver":"%s"}\n' "$(json_str "$name")" "$cap" "$driver" | jsonl >/dev/null
    # The PTX in the binaries (logitd's kernel and candle's): ISA versions and
    # targets, as nvcc wrote them at build time.
    local ptx_version need_driver t built_cap
    ptx_version=$(grep -a -oE '^\.version [0-9]+\.[0-9]+' "$BIN/gpu_sampler" | awk '{print $2}' | sort -V | tail -1)
    # The driver a PTX ISA version needs (the CUDA release notes: ISA 9.1 came
    # with CUDA 13.1 and driver 590, 9.0 with 13.0 and 580). An ISA newer than
    # this table asks for at least the newest driver in it.
    case $ptx_version in
      9.0) need_driver=580 ;; 9.*) need_driver=590 ;; 8.8) need_driver=575 ;; 8.7) need_driver=570 ;;
      8.6) need_driver=560 ;; 8.5) need_driver=555 ;; 8.4) need_driver=550 ;; 8.3) need_driver=545 ;;
      [1-9][0-9].*) need_driver=590 ;; *) need_driver=525 ;;
    esac
    check "driver $driver runs PTX ISA ${ptx_version:-?} (needs >= $need_driver)" \
      "$([[ -n $ptx_version && ${driver%%.*} -ge $need_driver ]]; echo $?)" "" "this driver would fail the first launch with CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
    for t in $(grep -a -oE '^\.target sm_[0-9]+a?' "$BIN/gpu_sampler" | awk '{print $2}' | sort -u); do
      built_cap=${t#sm_}
      if [[ $built_cap == *a ]]; then # arch-specific PTX runs on that exact generation only
        check "GPU compute capability $cap runs PTX for $t" "$([[ ${cap/./} == "${built_cap%a}" ]]; echo $?)" "" "rebuild with CUDA_COMPUTE_CAP=${cap/./}"
      else
        check "GPU compute capability $cap runs PTX for $t" "$([[ ${cap/./} -ge $built_cap ]]; echo $?)" "" "rebuild with CUDA_COMPUTE_CAP=${cap/./}"
      fi
    done
  fi
  # Binaries present, and every library they need resolves, with every symbol
  # they import from it: the CUDA libraries are load-time dependencies (cudarc's
  # dynamic linking), and a library of another version can lack a function
  # that plain ldd does not look for. `ldd -r` does, and each binary is also
  # started with LD_BIND_NOW=1 (every symbol bound at start; no GPU touched).
  local out
  for b in gpu_sampler gpu_bench logitd logitd-bench; do
    if [[ ! -x $BIN/$b ]]; then check "binary $b" 1 "missing from $BIN"; continue; fi
    out=$(ldd -r "$BIN/$b" 2>&1)
    missing=$(grep -E 'not found|not a dynamic|undefined symbol' <<<"$out" | head -n 5 || true)
    check "ldd -r $b" "$([[ -z $missing ]]; echo $?)" \
      "${missing:-$(grep -oE 'lib(cuda|cublas|cublasLt|curand|nvrtc|cudart)\.so[.0-9]* => [^ ]+' <<<"$out" | sed 's/ => /=/' | paste -sd' ' -)}"
  done
  for b in logitd logitd-bench; do
    [[ -x $BIN/$b ]] || continue
    out=$(LD_BIND_NOW=1 "$BIN/$b" --version 2>&1)
    check "$b --version (every symbol bound)" "$?" "$(head -n 3 <<<"$out" | paste -sd' ' -)"
  done
  if [[ -x $BIN/gpu_bench ]]; then
    out=$(LD_BIND_NOW=1 "$BIN/gpu_bench" 2>&1)
    check "gpu_bench starts (every symbol bound)" "$([[ $out == *"usage: gpu_bench"* ]]; echo $?)" "" "$(head -n 3 <<<"$out" | paste -sd' ' -)"
  fi
  # The test binary runs and lists its tests (no GPU touched).
  local n
  n=$(LD_BIND_NOW=1 "$BIN/gpu_sampler" --list 2>/dev/null | grep -c ': test$')
  check "gpu_sampler lists its tests" "$([[ $n -ge 7 ]]; echo $?)" "$n tests"
  # Data.
  local f
  if [[ -n ${LOGITD_GPU_SKIP_REAL_LOGITS:-} ]]; then
    echo "preflight: real-teacher logits: NOT USED (LOGITD_GPU_SKIP_REAL_LOGITS is set)"
  else
    check "real-teacher logits" "$([[ -n $LOGITD_REAL_LOGITS ]]; echo $?)" "${LOGITD_REAL_LOGITS:-none in $DATA: run tests/gpu/pack.sh, or set LOGITD_GPU_SKIP_REAL_LOGITS=1}"
    for f in ${LOGITD_REAL_LOGITS//:/ }; do check "data $f" "$([[ -s $f ]]; echo $?)" "$(du -h "$f" 2>/dev/null | cut -f1)"; done
  fi
  for f in llama llama3_rope mistral qwen2 qwen3 gemma2 gemma3 gemma3_multimodal; do
    [[ -s server/tests/fixtures/tiny/$f/expected.safetensors ]] || { check "fixture $f" 1 "server/tests/fixtures/tiny/$f missing"; }
  done
  check "tiny fixtures" 0 "server/tests/fixtures/tiny"
  # Python side: torch on the GPU, transformers; compute-sanitizer.
  local py
  py=$("$PYTHON" -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.is_available())' 2>&1 | tail -1)
  if [[ -n $DRY ]]; then
    echo "preflight: python torch/transformers: DRY (here: $py)"
  else
    check "python torch, transformers, torch sees the GPU" "$([[ $py == *True ]]; echo $?)" "$py"
  fi
  for f in tests/gpu/*.py; do "$PYTHON" -m py_compile "$f" || check "python syntax $f" 1; done
  if [[ -n $SANITIZER ]]; then echo "preflight: compute-sanitizer: $SANITIZER"; else echo "preflight: compute-sanitizer: absent from PATH and ${CUDA_HOME:-/usr/local/cuda}/bin (the sanitize stage will FAIL)"; fi
  [[ -z $PREFLIGHT_FAILED ]] || return 1
  # The kernel's PTX loads, one launch per dtype and method runs, cuBLAS runs;
  # registers, spills and resident blocks per SM of each kernel. How many rows
  # of each launch are the CPU's is recorded (preflight_launch) and judged by
  # the kernel stage: only a load or launch error fails here.
  runbin "$BIN/gpu_bench" preflight 2> >(tee -a "$BENCHLOG" >&2) | tee -a "$BENCHLOG" | jsonl
  rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] && echo "preflight: kernel module loads and launches: ok (agreement judged in the kernel stage)"
  return "$rc"
}

gpu_tests() { # gpu_tests FILTER-ARGS...
  local rc from
  echo "== gpu_sampler $*" >>"$TESTLOG"
  from=$(($(wc -l <"$TESTLOG") + 1))
  # Each AGREEMENT / TEACHER line becomes a JSON record as it is printed, so
  # that a stage killed at its limit keeps what it had measured.
  runbin "$BIN/gpu_sampler" --test-threads=1 --nocapture "$@" 2>&1 | tee -a "$TESTLOG" |
    "$PYTHON" -u tests/gpu/report.py --from-test | jsonl >/dev/null
  rc=${PIPESTATUS[0]}
  tail -n +"$from" "$TESTLOG" | grep -E "^test |test result|DRY:|panicked|^AGREEMENT|^DIFFER|^TEACHER" | tail -n 60
  return "$rc"
}

stage_kernel() {
  local rc prc
  LOGITD_GPU_TEST_ROWS=$ROWS gpu_tests kernel_ bad_rows --skip real_teacher
  rc=$?
  # The preflight's launches (8 rows a dtype and method), recorded, judged here.
  "$PYTHON" tests/gpu/report.py --check-preflight "$JSONL"
  prc=$?
  [[ $rc == 0 ]] || return "$rc"
  return "$prc"
}

stage_teacher() {
  if [[ -n ${LOGITD_GPU_SKIP_REAL_LOGITS:-} ]]; then
    gpu_tests teacher_
  else
    gpu_tests teacher_ real_teacher
  fi
}

stage_sanitize() {
  local tool rc=0 r
  if [[ -z $SANITIZER ]]; then
    if [[ -z $DRY ]]; then echo "compute-sanitizer: not on PATH nor in ${CUDA_HOME:-/usr/local/cuda}/bin"; return 1; fi
    echo "DRY: compute-sanitizer is not here; running the selection without it"
    LOGITD_GPU_TEST_ROWS=16 runbin "$BIN/gpu_sampler" --test-threads=1 kernel_agrees_with kernel_handles bad_rows >>"$SANLOG" 2>&1
    return $?
  fi
  for tool in $SANITIZE_TOOLS; do
    echo "== compute-sanitizer --tool $tool" >>"$SANLOG"
    LOGITD_GPU_TEST_ROWS=16 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
      "$BIN/gpu_sampler" --test-threads=1 kernel_agrees_with kernel_handles bad_rows >>"$SANLOG" 2>&1
    r=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported|DRY:" "$SANLOG" | tail -1)
    echo "compute-sanitizer $tool: exit $r: $summary"
    if grep -q "Device not supported" "$SANLOG"; then
      echo "compute-sanitizer $tool: the platform refused the device (seen on gVisor machines): NOT a finding about the kernel, and NOT a pass"
    fi
    printf '{"bench":"sanitizer","tool":"%s","exit":%d,"summary":%s}\n' "$tool" "$r" "$(json_str "$summary")" | jsonl >/dev/null
    [[ $r == 0 ]] || rc=$r
  done
  return "$rc"
}

python_gpu() { # python_gpu SCRIPT ARGS...: torch scripts; in a dry run, only imports.
  if [[ -n $DRY ]] && ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "DRY: $1 needs torch, which is not installed here; syntax checked only" >&2
    "$PYTHON" -m py_compile "$1"
    return $?
  fi
  # Unbuffered: its JSON lines reach results.jsonl as they are printed.
  "$PYTHON" -u "$@"
}

stage_sampler() {
  local rc
  runbin "$BIN/gpu_bench" sampler 10 2> >(tee -a "$BENCHLOG" >&2) | jsonl
  rc=${PIPESTATUS[0]}
  [[ $rc == 0 || $rc == "$DRY_RC" ]] || return "$rc"
  python_gpu tests/gpu/torch_sampler.py --reps 10 2> >(tee -a "$BENCHLOG" >&2) | jsonl
  local prc=${PIPESTATUS[0]}
  [[ $prc == 0 ]] || return "$prc"
  return "$rc"
}

stage_forward() {
  local dir=$MODELS/$TEACHER rc
  if [[ ! -s $dir/config.json ]]; then
    if [[ -n $DRY ]] && ! "$PYTHON" -c 'import torch, transformers' 2>/dev/null; then
      echo "DRY: no torch/transformers here to make the random $TEACHER; using the tiny gemma3 fixture's directory for the CPU-side steps"
      dir=server/tests/fixtures/tiny/gemma3
    else
      python_gpu tests/gpu/make_random_teacher.py "$MODELS" --only "$TEACHER" 2>&1 | tail -n 5
      [[ ${PIPESTATUS[0]} == 0 && -s $dir/config.json ]] || { echo "forward: making $dir failed"; return 1; }
    fi
  fi
  runbin "$BIN/gpu_bench" forward "$dir" "$SEQUENCES" "$LENGTH" "$REPS" 2> >(tee -a "$BENCHLOG" >&2) | jsonl
  rc=${PIPESTATUS[0]}
  [[ $rc == 0 || $rc == "$DRY_RC" ]] || return "$rc"
  python_gpu tests/gpu/hf_forward.py "$dir" "$SEQUENCES" "$LENGTH" "$REPS" 2> >(tee -a "$BENCHLOG" >&2) | jsonl
  [[ ${PIPESTATUS[0]} == 0 ]] || return 1
  runbin "$BIN/gpu_bench" engine "$dir" "$SEQUENCES" "$LENGTH" 10 2> >(tee -a "$BENCHLOG" >&2) | jsonl
  local erc=${PIPESTATUS[0]}
  [[ $erc == 0 ]] || return "$erc"
  return "$rc"
}

stage_e2e() {
  local dir=$MODELS/$TEACHER i
  # Global (not local): the EXIT/TERM traps use them after the function returns.
  pid="" log=$UNPACK/serve.log
  [[ -s $dir/config.json ]] || {
    if [[ -n $DRY ]]; then dir=server/tests/fixtures/tiny/gemma3; else echo "e2e: $dir missing (the forward stage makes it)"; return 1; fi
  }
  [[ -x $BIN/logitd-bench ]] || { echo "e2e: $BIN/logitd-bench missing"; return 1; }
  # The server dies with this stage, however the stage ends.
  stop_server() {
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null; sleep 2; kill -KILL "$pid" 2>/dev/null
    fi
    pid=""
    [[ -s $log ]] && { echo "== logitd serve"; cat "$log"; } >>"$BENCHLOG"; : >"$log"
  }
  trap stop_server EXIT
  trap 'stop_server; exit 143' TERM INT
  : >"$log"
  "$BIN/logitd" serve --model "$dir" --device cuda:0 --listen 127.0.0.1:50151 \
    --metrics-listen 127.0.0.1:50152 --max-batch-tokens $((SEQUENCES * LENGTH)) >"$log" 2>&1 &
  pid=$!
  for ((i = 0; i < 1200; i++)); do
    if grep -q 'serving' "$log"; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"; local rc=$?
      echo "e2e: logitd serve exited with status $rc before serving:"; tail -n 5 "$log"
      pid=""
      return "$rc"
    fi
    sleep 0.25
  done
  grep -q serving "$log" || { echo "e2e: logitd serve not serving after 300 s"; return 1; }
  echo "e2e: logitd serve is serving (pid $pid) after $((i / 4)) s"
  "$BIN/logitd-bench" --server http://127.0.0.1:50151 --concurrency 2 --mode stream --depth 2 \
    --sequences "$SEQUENCES" --length "$LENGTH" --duration-s "$E2E_SECONDS" --warmup-requests 2 \
    --label "$TEACHER" --json - 2>>"$BENCHLOG" |
    "$PYTHON" -u -c 'import json,sys; d=json.load(sys.stdin); d["bench"]="e2e"; print(json.dumps(d))' | jsonl
  return "${PIPESTATUS[0]}"
}

stage_report() {
  local device
  device=$(grep -m1 '"bench": *"gpu"' "$JSONL" 2>/dev/null | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["name"])' 2>/dev/null)
  "$PYTHON" tests/gpu/report.py "$JSONL" --device "${device:-${DRY:+dry run, no GPU}}" --date "$(date -u +%F)" >"$REPORT" || return 1
  cat "$REPORT"
}

# compute-sanitizer: on PATH, else where a CUDA toolkit installs it.
SANITIZER=$(command -v compute-sanitizer 2>/dev/null || true)
if [[ -z $SANITIZER && -x ${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer ]]; then
  SANITIZER=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
fi

export BIN DATA PYTHON MODELS SANITIZER XZ TEACHER SEQUENCES LENGTH REPS ROWS SANITIZE_TOOLS E2E_SECONDS DRY DRY_RC
export UNPACK RESULTS LOG JSONL TESTLOG BENCHLOG SANLOG REPORT LOGITD_REAL_LOGITS START
export -f say jsonl json_str unxz runbin check stage_preflight gpu_tests stage_kernel stage_teacher \
  stage_sanitize python_gpu stage_sampler stage_forward stage_e2e stage_report

declare -A CAP=([preflight]=60 [kernel]=150 [teacher]=90 [sanitize]=90 [sampler]=100 [forward]=150 [e2e]=75 [report]=20)
FAILED=0
for stage in $STAGES; do
  [[ -n ${CAP[$stage]:-} ]] || { say "unknown stage $stage (stages: ${!CAP[*]})"; exit 2; }
  left=$((BUDGET - (SECONDS - START)))
  cap=${CAP[$stage]}
  ((cap > left)) && cap=$left
  if ((cap < 10)) && [[ $stage != report ]]; then
    say "== $stage: NOT RUN (budget: ${left}s left of ${BUDGET}s)"
    printf '{"bench":"stage","stage":"%s","status":"not run (budget)","seconds":0}\n' "$stage" >>"$JSONL"
    FAILED=1
    continue
  fi
  ((cap < 5)) && cap=5
  say "== $stage (limit ${cap}s)"
  t0=$SECONDS
  timeout -k 5 "$cap" bash -c "stage_$stage"
  rc=$?
  secs=$((SECONDS - t0))
  case $rc in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT after ${cap}s" ;;
    "$DRY_RC") status=DRY-OK ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  # In a dry run the binaries stop at their first CUDA call, so a stage that
  # ran to its CUDA call (or has none) passes.
  if [[ -n $DRY && $status == PASS ]]; then status="DRY-OK (no CUDA call)"; fi
  say "== $stage: $status in ${secs}s"
  printf '{"bench":"stage","stage":"%s","status":"%s","seconds":%d,"limit":%d}\n' "$stage" "$status" "$secs" "$cap" >>"$JSONL"
  [[ $status == PASS || $status == DRY-OK* ]] || FAILED=1
  if [[ $stage == preflight && $status != PASS && $status != DRY-OK* ]]; then
    say "preflight failed: stopping (the lines above say which check)"
    exit 1
  fi
done
say "done in $((SECONDS - START))s; $([[ $FAILED == 0 ]] && echo "every stage ${DRY:+dry-}passed" || echo "some stage FAILED or did not run")"
exit "$FAILED"
