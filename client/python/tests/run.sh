#!/usr/bin/env bash
# The Python package's tests: a virtual environment of their own with the pinned
# client/python/requirements-test.txt (torch from PyPI), the package built into it
# (`pip install ./client/python`, maturin), the server binaries, then pytest
# against a real `logitd serve` on the SmolLM2 teacher. Prints how long each step took.
#
#   client/python/tests/run.sh [PYTEST ARGS...]
#
# LOGITD_PY_VENV: the virtual environment (default ~/.cache/logitd-ci/pyvenv; kept
# between runs, pip makes it match). PYTHON: the interpreter that creates it
# (default python3, 3.10 or later).
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=${LOGITD_PY_VENV:-$HOME/.cache/logitd-ci/pyvenv}
PYTHON=${PYTHON:-python3}

start=$(date +%s)
last=$start
step() {
  local now
  now=$(date +%s)
  echo "== python: $* (previous step $((now - last)) s, total $((now - start)) s)"
  last=$now
}

step "virtual environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" --version

step "requirements (client/python/requirements-test.txt, requirements-lint.txt)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r client/python/requirements-test.txt \
  -r client/python/requirements-lint.txt

step "TRL 1.1 apart ($VENV/trl-1.1; its client calls /get_sequence_logprobs/)"
# One TRL per environment: 1.16 is in the requirements; 1.1 goes to its own
# folder, without dependencies (those of 1.16 serve it), for one test's subprocess.
if [ ! -f "$VENV/trl-1.1/trl-1.1.0.dist-info/METADATA" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$VENV/trl-1.1" 'trl==1.1.0'
fi

step "the logitd package (pip install ./client/python)"
# maturin is pinned in the requirements, hence no build isolation; the dev profile
# reuses the workspace's debug build (dependencies are optimised there). maturin's
# build hook runs the `maturin` executable: the environment's bin/ goes first on PATH.
PATH="$VENV/bin:$PATH" MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile dev}" \
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps --force-reinstall ./client/python

step "server binaries (target/debug/logitd, logitd-client, examples/teacher_dense)"
# --workspace, not -p: the feature set `cargo test --workspace` built with, so
# CI reuses its build instead of rebuilding candle (-p took 333 s more there).
cargo build --quiet --workspace --bin logitd --bin logitd-client \
  --example teacher_dense   # the distillation-table smoke test

step "pytest client/python/tests"
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -q client/python/tests "$@" || status=$?
step "done (exit $status)"
exit $status
