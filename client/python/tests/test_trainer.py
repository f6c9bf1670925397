"""The Hugging Face Trainer example (examples/hf_trainer.py) runs a few steps
against a real logitd server, and its loss falls."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
STEPS = 16


def test_hf_trainer_example_loss_falls(server, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--endpoint", server.uri, "--steps", str(STEPS),
         "--alpha", "0.5", "--out", str(tmp_path), "--batch", "4", "--seq-len", "32", "--num-samples", "32"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, f"the example failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    loss = [float(r["loss"]) for r in rows]
    ce = [float(r["ce"]) for r in rows]
    kd = [float(r["kd"]) for r in rows]
    assert all(math.isfinite(v) for v in loss + ce + kd)
    for r, c, k in zip(loss, ce, kd):
        assert abs(r - (0.5 * c + 0.5 * k)) <= 1e-4 * max(1.0, abs(r))  # the mix the example claims
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    # A random student starts near ln(49152) = 10.8; a few AdamW steps cut that clearly.
    assert first > 9.5, loss
    assert last < first - 1.0, f"loss did not fall: {loss}"
    assert sum(kd[-3:]) / 3 < sum(kd[:3]) / 3 - 0.5, f"distillation loss did not fall: {kd}"
    assert "step   16  loss" in run.stdout
