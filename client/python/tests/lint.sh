#!/usr/bin/env bash
# The Python package's lint: ruff (client/python), mypy --strict on the `logitd`
# package and stubtest of the hand-written logitd/_native.pyi against the built
# extension. Config: [tool.ruff] / [tool.mypy] in client/python/pyproject.toml;
# versions: client/python/requirements-lint.txt.
#
#   client/python/tests/lint.sh
#
# Uses the virtual environment of tests/run.sh (LOGITD_PY_VENV, default
# ~/.cache/logitd-ci/pyvenv) and installs what it needs into it; stubtest imports
# logitd._native, so the package is built and installed there first unless
# LOGITD_LINT_NO_INSTALL=1 (it is already, e.g. right after tests/run.sh).
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=${LOGITD_PY_VENV:-$HOME/.cache/logitd-ci/pyvenv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@" --quiet --disable-pip-version-check; }
echo "== lint: requirements (requirements-test.txt for numpy/torch types, requirements-lint.txt)"
pip install -r client/python/requirements-test.txt -r client/python/requirements-lint.txt
if [ "${LOGITD_LINT_NO_INSTALL:-0}" != 1 ]; then
  echo "== lint: the logitd package (pip install ./client/python)"
  PATH="$VENV/bin:$PATH" MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile dev}" \
    pip install --no-build-isolation --no-deps --force-reinstall ./client/python
fi
status=0
cd client/python
echo "== lint: ruff check python (the logitd package)"
# The package only (tests and examples are not yet ruff-clean).
"$VENV/bin/ruff" check python || status=1
echo "== lint: mypy --strict (python/logitd)"
"$VENV/bin/mypy" || status=1
echo "== lint: stubtest logitd._native (python/logitd/_native.pyi)"
# MYPYPATH: the stub in this checkout, not the copy installed with the package.
MYPYPATH=python "$VENV/bin/python" -m mypy.stubtest logitd._native || status=1
echo "== lint: done (exit $status)"
exit $status
