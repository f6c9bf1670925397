#!/usr/bin/env python3
"""check_layers.py must fail on each kind of violation: planted in a copy of
the sources, each must be reported (and the clean copy must pass).

    tests/arch/test_check_layers.py
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "tests/arch/check_layers.py"
COPIED = ["server/src", "client/src", "client/python/src", "proto/src", "tests/src"]


def run(root: Path) -> tuple[int, str]:
    p = subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True)
    return p.returncode, p.stdout


def copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="check-layers-"))
    for d in COPIED:
        if (ROOT / d).exists():
            shutil.copytree(ROOT / d, tmp / d)
    return tmp


def plant(rel: str, text: str, append: bool = True) -> tuple[int, str]:
    root = copy()
    try:
        f = root / rel
        f.write_text((f.read_text() if append else "") + text)
        return run(root)
    finally:
        shutil.rmtree(root)


def main() -> int:
    failures = []
    root = copy()
    try:
        code, out = run(root)
        if code != 0:
            failures.append(f"the unchanged sources fail: {out}")
    finally:
        shutil.rmtree(root)
    cases = [
        ("server/src/model/batch.rs", "\nuse crate::sampler::Method;\n", "`model` (layer 1) refers to `sampler`"),
        ("server/src/sampler/mod.rs", "\nfn f(_: crate::model::ModelError) {}\n", "`sampler` (layer 1) refers to `model`"),
        ("server/src/model/mod.rs", "\nuse crate::{\n    kernels::exp_f32,\n    scoring::{LmHead, ScoringError},\n};\n", "`model` (layer 1) refers to `scoring`"),
        ("server/src/queue.rs", "\nuse crate::engine::Engine;\n", "`queue` (layer 4) refers to `engine`"),
        ("server/src/kernels/exp.rs", "\n" + "// padding\n" * 700, "server/src/kernels/exp.rs: "),
    ]
    for rel, text, want in cases:
        code, out = plant(rel, text)
        if code == 0 or want not in out:
            failures.append(f"{rel} + {text.strip()[:40]!r}: exit {code}, wanted {want!r} in {out!r}")
    # A comment or a string naming another layer is not a reference.
    code, out = plant("server/src/model/batch.rs", '\n// crate::sampler::Method\nconst S: &str = "crate::sampler";\n')
    if code != 0:
        failures.append(f"a comment or string counted as a reference: {out}")
    for f in failures:
        print("FAIL:", f)
    print(f"test_check_layers: {len(cases) + 2 - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
