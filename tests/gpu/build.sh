#!/usr/bin/env bash
# Builds logitd with the `cuda` feature on a machine without a GPU or CUDA
# toolkit, through ../shared/cuda/build.sh (nvcc from PyPI wheels, stub CUDA
# libraries). Run from the workspace root; arguments go to `cargo build`:
#
#   CARGO_TARGET_DIR=/work/cuda-target tests/gpu/build.sh --release -p logitd --features cuda
#
# The shared script finds cudarc's source with a plain `cargo metadata`, which
# lists only the packages of the default features, so cudarc (an optional
# dependency behind `cuda`) is missing and the script stops. This wrapper puts a
# `cargo` first on PATH that adds `--all-features` to `cargo metadata` and passes
# every other call through unchanged. With LOGITD_CARGO_SUBCOMMAND (e.g. clippy)
# the shared script's final `cargo build` runs that subcommand instead, in the
# same environment:
#
#   LOGITD_CARGO_SUBCOMMAND=clippy CARGO_TARGET_DIR=/work/cuda-target tests/gpu/build.sh \
#       --release -p logitd --features cuda --all-targets -- -D warnings
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${LOGITD_CUDA_BUILD:-$root/../shared/cuda/build.sh}
real_cargo=$(command -v cargo)
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
cat > "$shim/cargo" <<SHIM
#!/usr/bin/env bash
if [[ \${1:-} == metadata ]]; then exec "$real_cargo" "\$@" --all-features; fi
if [[ \${1:-} == build && -n "\${LOGITD_CARGO_SUBCOMMAND:-}" ]]; then
  shift
  exec "$real_cargo" "\$LOGITD_CARGO_SUBCOMMAND" "\$@"
fi
exec "$real_cargo" "\$@"
SHIM
chmod +x "$shim/cargo"
cd "$root"
PATH="$shim:$PATH" "$shared" "$@"
