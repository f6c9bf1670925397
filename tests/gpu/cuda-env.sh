#!/usr/bin/env bash
# Runs a command (cargo build, cargo clippy, nvcc, ...) in an environment that can
# build logitd's `cuda` feature on a Linux x86_64 machine with no GPU and no CUDA
# toolkit installed. Run from anywhere; the command runs in the repository root:
#
#   tests/gpu/cuda-env.sh cargo build --release -p logitd --features cuda
#   tests/gpu/cuda-env.sh cargo clippy -p logitd --features cuda --all-targets -- -D warnings
#   tests/gpu/cuda-env.sh nvcc --version
#
# What it sets up (once, under $CUDA_WORK, default <repo>/.cuda-build, git-ignored):
#   * a Python venv holding NVIDIA's CUDA 13.0 compiler wheels from PyPI, pinned
#     (nvcc, its front end and NVVM, the runtime headers, CCCL); their bin/ goes
#     first on PATH. CUDA 13.0 PTX needs an NVIDIA driver >= 580 on the GPU machine.
#   * link stubs: candle 0.11.1 uses cudarc 0.19.10 with `dynamic-linking`, so the
#     binaries link against libcuda.so.1, libcublas.so.13, libcublasLt.so.13,
#     libcurand.so.10, libnvrtc.so.13 and libcudart.so.13. Without a driver or a
#     toolkit those do not exist here, so each is replaced, at link time only, by an
#     empty shared library with the real soname that defines every function cudarc
#     declares for it. On the GPU machine the loader finds the real libraries
#     (the driver's libcuda, and cuBLAS/cuRAND/NVRTC from a CUDA 13 toolkit or from
#     the nvidia-* wheels PyTorch ships; tests/gpu/run.sh puts those on the path).
#     After an upgrade of candle or cudarc, compare `nm -D --undefined-only` of a
#     binary with the real libraries: a stub hides a missing symbol until load time.
#
# On a machine WITH a CUDA 13 toolkit (nvcc on PATH, /usr/local/cuda), none of this
# is needed: `cargo build --release -p logitd --features cuda` builds directly.
#
# Environment: CUDA_WORK (see above), CUDA_COMPUTE_CAP (default 90 = H100/H200;
# 80 = A100, 89 = L4/Ada, 100 = B200), CUDAFORGE_THREADS (default 2), PIP_ARGS
# (extra pip arguments, e.g. --no-cache-dir). A clean CUDA release build of logitd
# takes 12+ minutes on 2 cores (candle's kernels); later builds are incremental.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
(($# > 0)) || { echo "usage: $0 COMMAND [ARGS...]   (e.g. cargo build -p logitd --features cuda)" >&2; exit 2; }

work=${CUDA_WORK:-$root/.cuda-build}
say() { echo "cuda-env: $*" >&2; }

# 1. nvcc and headers from pinned PyPI wheels (CUDA 13.0.x).
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
stamp=$work/wheels.txt
if [[ ! -x $work/venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]]; then
  say "installing ${wheels[*]} into $work/venv"
  python3 -m venv "$work/venv"
  # shellcheck disable=SC2086
  "$work/venv/bin/pip" install -q --disable-pip-version-check --no-deps ${PIP_ARGS:-} "${wheels[@]}"
  echo "${wheels[*]}" > "$stamp"
fi
cu=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
[[ -x $cu/bin/nvcc ]] || { say "no nvcc at $cu/bin/nvcc after installing the wheels"; exit 1; }

# 2. Link stubs, made from cudarc's own declarations (only once per cudarc
# version), when the command is cargo (nvcc alone needs none).
export PATH="$cu/bin:$PATH" NVCC=$cu/bin/nvcc
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
[[ $(basename "$1") == cargo ]] || exec "$@"
cudarc_src() {
  # --all-features: cudarc is an optional dependency (behind `cuda`), and a plain
  # `cargo metadata` resolves only the default features.
  cargo metadata -q --format-version 1 --all-features | python3 -c '
import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
if not pkgs: sys.exit("cudarc is not in the dependency graph")
print(os.path.dirname(pkgs[0]["manifest_path"]) + "/src")'
}
cudarc_version=$(awk '/^name = "cudarc"/{getline; gsub(/[^0-9.]/,""); print; exit}' Cargo.lock)
stubs=$work/stubs-cudarc-$cudarc_version
if [[ ! -e $stubs/.done ]]; then
  cargo fetch -q
  src=$(cudarc_src)
  say "making link stubs for cudarc $cudarc_version in $stubs/lib"
  rm -rf "$stubs"; mkdir -p "$stubs/lib"
  make_stub() { # make_stub MODULE SONAME
    local decls=$src/$1/sys/mod.rs name=${2%%.so*}.so
    [[ -f $decls ]] || { say "cudarc has no $decls (layout changed?)"; exit 1; }
    grep -oE '^\s+(pub )?fn [A-Za-z_][A-Za-z0-9_]*\(' "$decls" | sed -E 's/^\s+(pub )?fn //; s/\($//' \
      | sort -u | awk '{print "void " $1 "(void) {}"}' > "$stubs/$1.c"
    [[ -s $stubs/$1.c ]] || { say "found no functions in $decls"; exit 1; }
    cc -shared -fPIC -nostdlib -Wl,-soname,"$2" -o "$stubs/lib/$2" "$stubs/$1.c"
    ln -sf "$2" "$stubs/lib/$name"
  }
  make_stub driver libcuda.so.1
  make_stub cublas libcublas.so.13
  make_stub cublaslt libcublasLt.so.13
  make_stub curand libcurand.so.10
  make_stub nvrtc libnvrtc.so.13
  # The runtime is real (it comes with the runtime wheel); only linked, never run here.
  ln -sf "$cu/lib/libcudart.so.13" "$stubs/lib/libcudart.so"
  touch "$stubs/.done"
fi

export CUDA_ROOT=$stubs
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
exec "$@"
