"""Smoke test of the distillation-table experiment (client/python/experiments/kd_table.py):
a few steps of each of its eight arms on a real SmolLM2 teacher (its own `logitd serve`,
so that it can read the server's byte counter) and logitd's dense teacher
(target/debug/examples/teacher_dense; build it with
`cargo build -p logitd --example teacher_dense`).

Checks, independently of the experiment's own checks, on the CSR targets as the
client returned them: sampled arms' counts sum to k at every position; top-k arms
have exactly k ids per position; the tail bucket's mass is in [0, 1]. Every arm's
training loss falls; held-out metrics are finite; the outputs are written and
labelled as a pilot. Without a server: the tail-bucket loss and the held-out metrics
(CE, KL, top-1 ECE, mass outside the teacher's top ids) against float64 NumPy references.
"""

from __future__ import annotations

import importlib.util
import math
import os
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
    dense_bin = Path(os.environ.get("LOGITD_TEACHER_DENSE_BIN", REPO / "target/debug/examples/teacher_dense"))
    if not dense_bin.is_file():
        pytest.fail(f"{dense_bin} is missing: cargo build -p logitd --example teacher_dense "
                    "(or set LOGITD_TEACHER_DENSE_BIN)", pytrace=False)
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


# ---------------------------------------------------------------- the experiment's losses and
# metrics against float64 NumPy references (no server)


def _padded(rng, b, t, k, vocab, method):
    """Random PaddedTargets-like torch fields: distinct ids per row, full-vocabulary
    teacher log-probs of those ids, counts (1 for top-k), some padding."""
    import torch

    ids = np.zeros((b, t, k), np.int64)
    lp = np.zeros((b, t, k), np.float32)
    counts = np.zeros((b, t, k), np.int32)
    mask = np.zeros((b, t, k), bool)
    teacher = rng.normal(size=(b, t, vocab)) * 2
    teacher = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    for i in range(b):
        for j in range(t):
            n = k if method == "top_k" else int(rng.integers(1, k + 1))
            row = np.argsort(-teacher[i, j])[:n] if method == "top_k" else rng.choice(vocab, n, replace=False)
            ids[i, j, :n], lp[i, j, :n], mask[i, j, :n] = row, teacher[i, j, row], True
            counts[i, j, :n] = 1 if method == "top_k" else rng.integers(1, 5, n)
    import logitd

    return logitd.PaddedTargets(torch.from_numpy(ids), torch.from_numpy(lp), torch.from_numpy(counts),
                                torch.from_numpy(mask), torch.ones(b, t, dtype=torch.bool), 0)


def test_tail_loss_matches_float64_reference():
    import torch

    kd = load_experiment()
    rng = np.random.default_rng(3)
    b, t, k, vocab = 2, 5, 7, 40
    tg = _padded(rng, b, t, k, vocab, "top_k")
    tg.mask[0, 1, 5:] = False  # a shorter row: padding must not count
    logits = rng.normal(size=(b, t, vocab)) * 3
    got = kd.tail_loss(torch.tensor(logits, dtype=torch.float32), tg).item()
    ref = []
    for i in range(b):
        for j in range(t):
            m = tg.mask[i, j].numpy()
            s, p = tg.token_ids[i, j].numpy()[m], np.exp(tg.logprobs[i, j].numpy()[m].astype(np.float64))
            lq = logits[i, j] - np.log(np.exp(logits[i, j]).sum())
            qs = np.exp(lq[s]).sum()
            ref.append(-(p * lq[s]).sum() - (1 - p.sum()) * np.log(1 - qs))
    assert abs(got - np.mean(ref)) < 1e-4 * max(1.0, abs(np.mean(ref))), (got, np.mean(ref))


def test_evaluate_matches_float64_reference():
    import torch

    kd = load_experiment()
    rng = np.random.default_rng(4)
    n, L, vocab = 4, 16, 50

    class Fixed(torch.nn.Module):  # a "student" whose logits are given
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits, dtype=torch.float32)

        def forward(self, x):
            assert x.shape == self.logits.shape[:2]
            return self.logits

    logits = rng.normal(size=(n, L, vocab)) * 3
    tokens = rng.integers(0, vocab, size=(n, L + 1))
    hit = rng.random((n, L)) < 0.5  # about half the top-1 predictions right, so ECE depends on the bins
    tokens[:, 1:][hit] = logits.argmax(-1)[hit]
    tlp = rng.normal(size=(n, L, vocab))
    tlp = tlp - np.log(np.exp(tlp).sum(-1, keepdims=True))
    top = np.argsort(-tlp, -1)[..., :4]
    got = kd.evaluate(Fixed(logits), torch.from_numpy(tokens), torch.tensor(tlp).half(), torch.from_numpy(top), chunk=n)
    lq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = tokens[:, 1:]
    ce = -np.take_along_axis(lq, y[..., None], -1).mean()
    tl = torch.tensor(tlp).half().double().numpy()  # the experiment reads the teacher in f16
    kl = (np.exp(tl) * (tl - lq)).sum(-1).mean()
    outside = (1 - np.take_along_axis(np.exp(lq), top, -1).sum(-1)).mean()
    conf, acc = np.exp(lq.max(-1)).ravel(), (lq.argmax(-1) == y).ravel()
    ece = 0.0
    for lo in np.arange(15) / 15:
        sel = (conf >= lo) & (conf < lo + 1 / 15)
        if sel.any():
            ece += sel.mean() * abs(acc[sel].mean() - conf[sel].mean())
    assert abs(got["heldout_ce"] - ce) < 1e-5
    assert abs(got["heldout_kl"] - kl) < 1e-4
    assert abs(got["mass_outside_top256"] - outside) < 1e-5
    assert abs(got["ece"] - ece) < 1e-5
