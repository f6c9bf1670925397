"""stubtest checks the hand-written ``logitd/_native.pyi`` against the built
extension (tests/lint.sh runs it in CI): it passes on the stub as it is and
fails, naming the function, on a stub whose signature is wrong."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "logitd"


def stubtest(stub_root: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """stubtest of the installed ``logitd._native`` against the stubs under ``stub_root``."""
    env = dict(os.environ, MYPYPATH=str(stub_root))
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "logitd._native"],
        capture_output=True, text=True, timeout=600, env=env, cwd=cwd,
    )


def test_stubtest_passes_on_the_stub_and_fails_on_a_wrong_signature(tmp_path):
    good = stubtest(PACKAGE.parent, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr

    bad_root = tmp_path / "stubs"
    shutil.copytree(PACKAGE, bad_root / "logitd", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    stub = bad_root / "logitd" / "_native.pyi"
    text = stub.read_text()
    # A function the package does not call (a benchmark helper), so that mypy
    # builds the copy and stubtest gets to compare it with the runtime.
    right = "def decode_response(data: bytes) -> _Columns:"
    assert right in text
    stub.write_text(text.replace(right, "def decode_response(data: bytes, strict: bool) -> _Columns:"))
    bad = stubtest(bad_root, tmp_path)
    assert bad.returncode != 0, bad.stdout + bad.stderr
    assert "logitd._native.decode_response" in bad.stdout, bad.stdout + bad.stderr
