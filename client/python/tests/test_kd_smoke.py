"""Smoke test of the distillation-table experiment (client/python/experiments/kd_table.py):
a few steps of each of its eight arms on a real SmolLM2 teacher (its own `logitd serve`,
so that it can read the server's byte counter) and logitd's dense teacher
(target/debug/examples/teacher_dense; build it with
`cargo build -p logitd --example teacher_dense`).

Checks, independently of the experiment's own checks, on the CSR targets as the
client returned them: sampled arms' counts sum to k at every position; top-k arms
have exactly k ids per position; the tail bucket's mass is in [0, 1]. Every arm's
training loss falls; held-out metrics are finite; the outputs are written and
labelled as a pilot.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, _binary, teacher_path

EXPERIMENT = REPO / "client" / "python" / "experiments" / "kd_table.py"


def load_experiment():
    spec = importlib.util.spec_from_file_location("kd_table", EXPERIMENT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kd_table"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    kd = load_experiment()
    out = tmp_path_factory.mktemp("kd-smoke")
    dense_bin = _binary("examples/teacher_dense", "LOGITD_TEACHER_DENSE_BIN")
    args = kd.parse_args([
        "--out", str(out), "--teacher", str(teacher_path()),
        "--logitd-bin", str(_binary("logitd", "LOGITD_BIN")), "--dense-bin", str(dense_bin),
        "--steps", "4", "--eval-every", "4", "--seeds", "1",
        # batch == training set: every step sees the same sequences, so each loss must fall
        "--batch", "4", "--train-sequences", "4", "--seq-len", "16",
        "--heldout-sequences", "2", "--bytes-sequences", "2", "--lr", "1e-2", "--threads", "2", "--pilot",
    ])
    return kd, args, kd.run(args, log=lambda *a: None)


def per_position(t, values):
    return np.add.reduceat(values, t.offsets[:-1]) if len(values) else np.zeros(0)


def test_every_arm_trains_and_its_loss_falls(result):
    kd, args, r = result
    assert sorted(a for a, _ in r["train_losses"]) == sorted(kd.ARMS)
    for (arm, seed), losses in r["train_losses"].items():
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), (arm, losses)
        assert losses[-1] < losses[0] - 0.1, f"{arm}: loss did not fall: {losses}"
    for row in r["rows"]:
        for k in ("heldout_ce", "heldout_kl", "ece", "mass_outside_top256", "train_ce"):
            assert math.isfinite(row[k]), (row["arm"], k, row[k])
        assert 0 <= row["ece"] <= 1 and 0 <= row["mass_outside_top256"] <= 1 and row["heldout_kl"] > 0


def test_targets_have_each_arms_structure(result):
    kd, args, r = result
    seen = set()
    for arm, spec in kd.ARMS.items():
        if "method" not in spec:
            continue
        w = r["wire"][(spec["method"], spec["k"], 0)]
        assert len(w.per_sequence) == args.train_sequences
        for t in w.per_sequence:
            assert t.num_positions == args.seq_len  # every position of the sequence
            n_ids = np.diff(t.offsets)
            if spec["method"] == "top_k":
                assert (n_ids == spec["k"]).all(), f"{arm}: ids per position {set(n_ids.tolist())}"
            else:
                sums = per_position(t, t.counts.astype(np.int64))
                assert (sums == spec["k"]).all(), f"{arm}: counts sum to {set(sums.tolist())}, not {spec['k']}"
                assert (n_ids < spec["k"]).any(), f"{arm}: never a repeated draw (not sampling?)"
            if spec["kind"] == "tail":
                tail = 1.0 - per_position(t, np.exp(t.logprobs.astype(np.float64)))
                assert (tail >= -1e-5).all() and (tail <= 1).all(), f"{arm}: tail mass {tail.min()}..{tail.max()}"
                assert (tail > 0).any()
        seen.add((spec["method"], spec["k"]))
        # bytes per position were measured from the server's counter; f16 is smaller
        assert w.bytes_f32 > 0 and w.bytes_f16 > 0 and w.bytes_f16 < w.bytes_f32, (arm, w.bytes_f32, w.bytes_f16)
    assert seen == {("top_k", 20), ("top_k", 256), ("sample", 256), ("sample", 50)}


def test_outputs_are_written_and_labelled_pilot(result):
    kd, args, r = result
    for name in ("kd_curves.csv", "kd_summary.csv", "kd_table.md", "kd_table.png", "kd_run.json"):
        assert (args.out / name).stat().st_size > 0, name
    assert "PILOT" in (args.out / "kd_table.md").read_text()
    assert r["meta"]["head_check_max_abs_p"] < 2e-3
