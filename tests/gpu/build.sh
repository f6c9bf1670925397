#!/usr/bin/env bash
# Builds logitd with the `cuda` feature on a machine without a GPU or a CUDA
# toolkit: `cargo build ARGS` inside tests/gpu/cuda-env.sh (nvcc from pinned PyPI
# wheels, link stubs for the CUDA libraries). From anywhere:
#
#   CARGO_TARGET_DIR=/work/cuda-target tests/gpu/build.sh --release -p logitd --features cuda
#
# For other cargo commands in the same environment, call cuda-env.sh directly:
#
#   tests/gpu/cuda-env.sh cargo clippy -p logitd --features cuda --all-targets -- -D warnings
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/cuda-env.sh" cargo build "$@"
