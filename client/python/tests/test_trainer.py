"""The Hugging Face Trainer example (examples/hf_trainer.py), run with the README's
command line (only `--endpoint` and `--out` added), against a real logitd server:
it runs, and its loss falls."""

import csv
import math
import shlex
import subprocess
import sys
from pathlib import Path

from test_readme import example_env, shown

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"


def test_hf_trainer_example_loss_falls(server, tmp_path):
    cmd, _ = shown("python client/python/examples/hf_trainer.py")
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "client/python/examples/hf_trainer.py"], argv
    steps = int(argv[argv.index("--steps") + 1])
    assert steps >= 8, "the checks below need a few steps"
    alpha = float(argv[argv.index("--alpha") + 1]) if "--alpha" in argv else 0.5  # the example's default
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), *argv[2:], "--endpoint", server.uri, "--out", str(tmp_path)],
        env=example_env(), capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, f"the example failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    loss = [float(r["loss"]) for r in rows]
    ce = [float(r["ce"]) for r in rows]
    kd = [float(r["kd"]) for r in rows]
    assert all(math.isfinite(v) for v in loss + ce + kd)
    for r, c, k in zip(loss, ce, kd):
        assert abs(r - (alpha * c + (1 - alpha) * k)) <= 1e-4 * max(1.0, abs(r))  # the mix the example claims
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    # A random student starts near ln(49152) = 10.8; a few AdamW steps cut that clearly.
    assert first > 9.5, loss
    assert last < first - 1.0, f"loss did not fall: {loss}"
    assert sum(kd[-3:]) / 3 < sum(kd[:3]) / 3 - 0.5, f"distillation loss did not fall: {kd}"
    assert f"step {steps:4d}  loss" in run.stdout
