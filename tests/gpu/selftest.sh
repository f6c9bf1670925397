#!/usr/bin/env bash
# Checks the logic of tests/gpu/run.sh (the GPU run) and tests/gpu/pack-size.sh
# on a machine without a GPU, with nothing built, in about half a minute (CI
# runs it). run.sh runs for real, not in its dry mode, against stand-ins made
# here: four "binaries" (one small C program linked against two stand-in CUDA
# libraries, libcuda.so.1 and libcublas.so.13, with a PTX header in its data;
# what it does under each name is a shell script), nvidia-smi, a Python that
# says torch sees a GPU, and compute-sanitizer. Each case names what it checks;
# the run fails if one does not hold.
#
#   tests/gpu/selftest.sh
#
# Needs cc, ldd, python3 (with lzma). Writes only under a temporary folder.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0 failed=0
ok() { echo "selftest: ok: $*"; passed=$((passed + 1)); }
bad() { echo "selftest: FAIL: $*"; failed=$((failed + 1)); }
expect() { # expect FILE REGEX WHAT
  if grep -qE -- "$2" "$1"; then ok "$3"; else
    bad "$3: no line matches /$2/ in $(basename "$1"):"
    sed 's/^/    | /' "$1" | tail -n 30
  fi
}
expect_rc() { # expect_rc CASE RC
  local rc
  rc=$(cat "$work/$1.rc")
  if [[ $rc == "$2" ]]; then ok "$1: run.sh exits $2"; else bad "$1: run.sh exits $rc, not $2"; fi
}

# --- stand-ins -----------------------------------------------------------
mkdir -p "$work/lib/full" "$work/lib/old" "$work/lib/link" "$work/scripts" "$work/path" "$work/cuda/bin"
cat >"$work/cuda.c" <<'EOF'
int cuInit(unsigned flags) { (void)flags; return 100; }
EOF
cat >"$work/cublas.c" <<'EOF'
int cublasCreate_v2(void *handle) { (void)handle; return 1; }
EOF
# A cuBLAS of another version: the same soname, without the function.
cat >"$work/cublas_old.c" <<'EOF'
int cublasGetVersion_v2(void *handle, int *version) { (void)handle; *version = 1; return 0; }
EOF
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/lib/full/libcuda.so.1" "$work/cuda.c" &&
  cc -shared -fPIC -Wl,-soname,libcublas.so.13 -o "$work/lib/full/libcublas.so.13" "$work/cublas.c" &&
  cc -shared -fPIC -Wl,-soname,libcublas.so.13 -o "$work/lib/old/libcublas.so.13" "$work/cublas_old.c" || {
  echo "selftest: cannot build the stand-in libraries (needs cc)" >&2; exit 1; }
ln -s ../full/libcuda.so.1 "$work/lib/old/libcuda.so.1"
ln -s ../full/libcuda.so.1 "$work/lib/link/libcuda.so"
ln -s ../full/libcublas.so.13 "$work/lib/link/libcublas.so"
cat >"$work/fake.c" <<'EOF'
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int cuInit(unsigned flags);
int cublasCreate_v2(void *handle);
/* What run.sh's preflight reads from a binary: the PTX header nvcc writes. */
__attribute__((used)) static const char ptx[] = "\n.version " PTX_ISA "\n.target sm_90\n";
int main(int argc, char **argv) {
  if (argc < 0) { cuInit(0); cublasCreate_v2(0); } /* imported, never called */
  static char script[4096];
  snprintf(script, sizeof script, "%s/%s.sh", getenv("FAKE_SCRIPTS"), basename(argv[0]));
  char **args = calloc((size_t)argc + 2, sizeof *args);
  args[0] = "sh";
  args[1] = script;
  for (int i = 1; i < argc; i++) args[i + 1] = argv[i];
  execv("/bin/sh", args);
  perror(script);
  return 127;
}
EOF
for isa in 9.0 9.1; do
  mkdir -p "$work/bin$isa"
  cc -O0 -DPTX_ISA="\"$isa\"" -o "$work/bin$isa/gpu_sampler" "$work/fake.c" -L"$work/lib/link" -lcuda -lcublas ||
    { echo "selftest: cannot build the stand-in binary" >&2; exit 1; }
  for b in gpu_bench logitd logitd-bench; do cp "$work/bin$isa/gpu_sampler" "$work/bin$isa/$b"; done
done
# The same binaries packed as tests/gpu/pack.sh packs them (xz).
mkdir -p "$work/packed"
python3 - "$work/bin9.0" "$work/packed" <<'EOF'
import lzma, os, shutil, sys
for name in os.listdir(sys.argv[1]):
    with open(os.path.join(sys.argv[1], name), "rb") as src, lzma.open(os.path.join(sys.argv[2], name + ".xz"), "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF

cat >"$work/scripts/gpu_sampler.sh" <<'EOF'
case " $* " in
  *" --list "*)
    for t in kernel_agrees_with_the_reference_on_random_logits kernel_handles_ragged_rows_ties_and_tiny_vocabularies \
      bad_rows_fail_as_on_the_cpu bad_rows_all_masked_at_tiny_vocabularies_fail_as_on_the_cpu \
      kernel_agrees_on_real_teacher_logits teacher_on_cuda_matches_the_cpu \
      teacher_sample_on_cuda_is_the_reference_on_the_same_logits; do echo "$t: test"; done
    exit 0 ;;
esac
echo "running 1 test (stand-in)"
echo "AGREEMENT stand-in V=7 dtype=F32 Sample k=300 rows=64 identical=64 boundary=0 other=0 fraction=1.000000 max_logprob_ulps=0 max_lse_ulps=0"
if [ -n "${FAKE_TEST_SLEEP:-}" ]; then sleep "$FAKE_TEST_SLEEP"; fi
echo "test stand_in_case ... ok"
EOF
cat >"$work/scripts/gpu_bench.sh" <<'EOF'
case "${1:-}" in
  preflight)
    echo '{"bench":"device","device":"Stand-in GPU","compute_capability":"9.0","sms":132}'
    for d in F32 BF16 F16; do
      same=8
      if [ "$d" = BF16 ]; then same=${FAKE_TOPK_SAME:-8}; fi
      echo "{\"bench\":\"preflight_launch\",\"dtype\":\"$d\",\"method\":\"TopK\",\"rows\":8,\"identical\":$same}"
      echo "{\"bench\":\"preflight_launch\",\"dtype\":\"$d\",\"method\":\"Sample\",\"rows\":8,\"identical\":8}"
    done
    echo '{"bench":"preflight_cublas","ok":true}'
    exit "${FAKE_PREFLIGHT_RC:-0}" ;;
  *) echo "usage: gpu_bench preflight | sampler [REPS] | forward DIR S L REPS | engine DIR S L SECS" >&2; exit 1 ;;
esac
EOF
echo 'echo "logitd 0.1.0"' >"$work/scripts/logitd.sh"
echo 'echo "logitd-bench 0.1.0"' >"$work/scripts/logitd-bench.sh"
cat >"$work/path/nvidia-smi" <<'EOF'
#!/bin/sh
echo "Stand-in GPU, 9.0, ${FAKE_DRIVER:-590.48.01}, 81559 MiB"
EOF
cat >"$work/path/python-standin" <<'EOF'
#!/bin/sh
case "$*" in *"import torch, transformers"*) echo "2.9.0 13.0 4.57.0 True"; exit 0 ;; esac
exec python3 "$@"
EOF
cat >"$work/cuda/bin/compute-sanitizer" <<'EOF'
#!/bin/sh
echo "========= COMPUTE-SANITIZER (stand-in) $*"
echo "========= ERROR SUMMARY: 0 errors"
EOF
chmod +x "$work/path/nvidia-smi" "$work/path/python-standin" "$work/cuda/bin/compute-sanitizer"

run_case() { # run_case NAME "STAGES" VAR=VALUE...: run.sh's console in NAME.log, its $OUT in NAME/
  local name=$1 stages=$2
  shift 2
  # shellcheck disable=SC2086
  env -u LOGITD_GPU_DRY -u LOGITD_REAL_LOGITS PATH="$work/path:$PATH" PYTHON="$work/path/python-standin" \
    CUDA_HOME="$work/cuda" FAKE_SCRIPTS="$work/scripts" OUT="$work/$name" UNPACK="$work/$name-unpack" \
    LD_LIBRARY_PATH="$work/lib/full" LOGITD_GPU_SKIP_REAL_LOGITS=1 BIN="$work/bin9.0" "$@" \
    "$root/tests/gpu/run.sh" $stages >"$work/$name.log" 2>&1 </dev/null
  echo $? >"$work/$name.rc"
}

# --- cases ---------------------------------------------------------------
# 1. A machine without xz (Python's lzma unpacks), compute-sanitizer only in
# $CUDA_HOME/bin, and a preflight launch whose top-k rows disagree: the
# preflight passes (it records, the kernel stage judges), the kernel stage
# fails on it, and the stages after it still run.
run_case recorded "preflight kernel sanitize" BIN="$work/packed" XZ=xz-is-not-here FAKE_TOPK_SAME=7
expect "$work/recorded.log" "no xz-is-not-here here: unpacking .* with Python's lzma" "xz missing: Python's lzma unpacks"
expect "$work/recorded.log" "^preflight: ldd -r gpu_sampler: ok \(libcuda.so.1=.*libcublas.so.13=" "the unpacked binaries resolve (ldd -r)"
expect "$work/recorded.log" "^preflight: logitd --version \(every symbol bound\): ok \(logitd 0.1.0\)" "logitd starts with every symbol bound"
expect "$work/recorded.log" "^preflight: gpu_sampler lists its tests: ok \(7 tests\)" "the test binary lists its tests"
expect "$work/recorded.log" "^preflight: driver 590.48.01 runs PTX ISA 9.0 \(needs >= 580\): ok" "PTX ISA 9.0 on driver 590"
expect "$work/recorded.log" "^preflight: compute-sanitizer: $work/cuda/bin/compute-sanitizer$" "compute-sanitizer found in \$CUDA_HOME/bin"
expect "$work/recorded.log" "== preflight: PASS" "a disagreeing preflight launch does not fail the preflight"
expect "$work/recorded/results.jsonl" '"bench":"preflight_launch","dtype":"BF16","method":"TopK","rows":8,"identical":7' "the preflight's agreement is recorded"
expect "$work/recorded.log" "^kernel: preflight launch BF16 TopK: 7/8 rows identical to the CPU \(at most 0 may differ\): FAIL" "the kernel stage judges the preflight launches"
expect "$work/recorded.log" "== kernel: FAIL" "... and fails on a top-k row that differs"
expect "$work/recorded.log" "== sanitize: PASS" "the stages after it run (sanitize, with the CUDA_HOME compute-sanitizer)"
expect "$work/recorded/sanitizer.log" "COMPUTE-SANITIZER \(stand-in\) --tool memcheck" "the sanitize stage ran compute-sanitizer from \$CUDA_HOME/bin"
expect_rc recorded 1

# 2. A cuBLAS of another version that lacks a function the binaries import:
# plain ldd resolves every library; ldd -r and the start with every symbol
# bound do not, and the preflight stops the run.
run_case old-cublas "preflight kernel" LD_LIBRARY_PATH="$work/lib/old"
expect "$work/old-cublas.log" "^preflight: ldd -r gpu_sampler: FAIL \(.*undefined symbol: cublasCreate_v2" "ldd -r finds the missing symbol"
expect "$work/old-cublas.log" "^preflight: logitd --version \(every symbol bound\): FAIL" "a binary started with every symbol bound fails"
expect "$work/old-cublas.log" "preflight failed: stopping" "the preflight stops the run"
expect_rc old-cublas 1

# 3. PTX ISA 9.1 (CUDA 13.1) needs driver 590: 580 fails, 590 passes.
run_case ptx91-580 "preflight" BIN="$work/bin9.1" FAKE_DRIVER=580.95.05
expect "$work/ptx91-580.log" "^preflight: driver 580.95.05 runs PTX ISA 9.1 \(needs >= 590\): FAIL" "PTX ISA 9.1 on driver 580 fails"
expect_rc ptx91-580 1
run_case ptx91-590 "preflight" BIN="$work/bin9.1" FAKE_DRIVER=590.44.01
expect "$work/ptx91-590.log" "^preflight: driver 590.44.01 runs PTX ISA 9.1 \(needs >= 590\): ok" "PTX ISA 9.1 on driver 590 passes"
expect_rc ptx91-590 0

# 4. A stage killed at its time limit keeps the lines it printed in
# results.jsonl (the kernel stage alone, in a 13 s budget, its test hanging).
run_case killed "kernel" LOGITD_GPU_BUDGET_S=13 FAKE_TEST_SLEEP=60
expect "$work/killed.log" "== kernel: TIMEOUT after 1[0-3]s" "the hanging stage is killed at its limit"
expect "$work/killed/results.jsonl" '"bench": "agreement", "what": "stand-in V=7 dtype=F32 Sample k=300", .*"identical": "64"' "the killed stage's AGREEMENT line is in results.jsonl"

# 5. The pack's size counts the working tree with the carried folders: carried
# folders 1 MiB over what the 60 MiB limit leaves the tree fail (alone they are
# far under the 64 MiB that the carried files alone were held to), 1 MiB under
# pass. Sized from this tree, so the case holds as the tree grows or shrinks.
mkdir -p "$work/carried-none" "$work/carried-over" "$work/carried-under"
tree=$("$here/pack-size.sh" "$work/carried-none" | sed -nE 's/^pack: working tree ([0-9]+) bytes.*/\1/p')
if [[ -z $tree ]]; then bad "pack-size.sh printed no working-tree size"; tree=0; fi
truncate -s $((60 * 1048576 - tree + 1048576)) "$work/carried-over/blob"
truncate -s $((60 * 1048576 - tree - 1048576)) "$work/carried-under/blob"
for c in over under; do
  "$here/pack-size.sh" "$work/carried-$c" >"$work/pack-$c.log" 2>&1
  echo $? >"$work/pack-$c.rc"
done
expect "$work/pack-over.log" "^pack: FAIL: 6[0-9.]+ MiB is over the 60 MiB allowed" "the tree + carried 1 MiB over 60 MiB fails"
expect "$work/pack-under.log" "^pack: working tree $tree bytes .* \+ carried [0-9]+ bytes .* = [0-9]+ bytes \(5[89]\.[0-9] MiB\)" "the tree and the carried folders are counted together"
if [[ $(cat "$work/pack-over.rc") != 0 && $(cat "$work/pack-under.rc") == 0 ]]; then ok "pack-size.sh exits 1 at 1 MiB over, 0 at 1 MiB under"; else
  bad "pack-size.sh exits $(cat "$work/pack-over.rc") at 1 MiB over, $(cat "$work/pack-under.rc") at 1 MiB under"; fi

echo "selftest: $passed passed, $failed failed"
((failed == 0))
