"""Smoke test of the distillation-table experiment (client/python/experiments/kd_table.py):
a few steps of each of its eight arms on a real SmolLM2 teacher (its own `logitd serve`,
so that it can read the server's byte counter) and logitd's dense teacher
(target/debug/examples/teacher_dense; build it with
`cargo build -p logitd --example teacher_dense`).

Checks, independently of the experiment's own checks, on the CSR targets as the
client returned them: sampled arms' counts sum to k at every position; top-k arms
have exactly k ids per position; the tail bucket's mass is in [0, 1]. What the
experiment trained on, recorded through its own functions while it ran: every
wire arm's first batch of targets is, bit for bit, what a second server returns
for the same rows (`client.sample`, the experiment's seed), and the `full` arm's
dense targets agree with that server's top-20 log-probabilities; every arm of a
seed starts from the same weights and data order (identical step-0 metrics).
Every arm's training loss falls (the batch is the whole training set, so that
alone says little: the checks above say that it falls towards the teacher's
targets); held-out metrics and bytes per position are finite; the outputs are
written and labelled as a pilot. Without a server: the tail-bucket loss and the
held-out metrics (CE, KL, top-1 ECE, mass outside the teacher's top ids) against
float64 NumPy references.
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


def record_training(kd) -> dict:
    """Wraps the experiment's own functions (module globals it calls) to record what
    it trains on: the training rows, and each (arm, seed)'s data order and first
    batch of targets (wire targets as the loss received them; `full`'s dense
    probabilities)."""
    rec = dict(orders={}, first_targets={}, arm=None)
    sequences, data_order, train_arm = kd.sequences, kd.data_order, kd.train_arm
    full_targets, distill_loss, tail_loss = kd.full_targets, kd.distill_loss, kd.tail_loss

    def rec_sequences(*a, **kw):
        rec["train"], heldout = sequences(*a, **kw)
        return rec["train"], heldout

    def rec_train_arm(args, arm, seed, *a, **kw):
        rec["arm"] = (arm, seed)
        return train_arm(args, arm, seed, *a, **kw)

    def rec_data_order(*a, **kw):
        order = data_order(*a, **kw)
        rec["orders"][rec["arm"]] = order.copy()
        return order

    def first(t):
        rec["first_targets"].setdefault(rec["arm"], t)
        return t

    def rec_full_targets(teacher, picks):
        return first(full_targets(teacher, picks))

    def rec_distill_loss(logits, t, **kw):
        first(t)
        return distill_loss(logits, t, **kw)

    def rec_tail_loss(logits, t):
        first(t)
        return tail_loss(logits, t)

    kd.sequences, kd.data_order, kd.train_arm = rec_sequences, rec_data_order, rec_train_arm
    kd.full_targets, kd.distill_loss, kd.tail_loss = rec_full_targets, rec_distill_loss, rec_tail_loss
    return rec


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    kd = load_experiment()
    rec = record_training(kd)
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
    r = kd.run(args, log=lambda *a: None)
    r["recorded"] = rec
    return kd, args, r


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
    # bytes/position over the whole pass, from the server's counter: a number for
    # every configuration, the first (on a server that had answered nothing) too
    for key, w in r["meta"]["wire"].items():
        assert math.isfinite(w["bytes_f32_full"]) and w["bytes_f32_full"] > 0, (key, w)


def test_every_arm_starts_from_the_same_weights_and_data(result):
    """Same initial weights and data order for every arm of a seed: the step-0
    metrics (before any update) are identical, and so are the data orders."""
    kd, args, r = result
    rec = r["recorded"]
    for seed in range(args.seeds):
        step0 = {row["arm"]: row for row in r["rows"] if row["step"] == 0 and row["seed"] == seed}
        assert sorted(step0) == sorted(kd.ARMS), seed
        ref = step0["hard"]
        assert all(math.isfinite(ref[k]) for k in kd.METRICS), ref
        for arm, row in step0.items():
            assert {k: row[k] for k in kd.METRICS} == {k: ref[k] for k in kd.METRICS}, (arm, row, ref)
            assert np.array_equal(rec["orders"][(arm, seed)], rec["orders"][("hard", seed)]), arm
    # ... and training moves them apart: the arms' last-step metrics are not all one
    last = {row["arm"]: row["heldout_kl"] for row in r["rows"] if row["step"] == args.steps and row["seed"] == 0}
    assert len(set(last.values())) == len(last), last


def test_training_targets_are_the_teachers(result, client):
    """Each wire arm's first training batch, as the loss received it, against what
    another server returns for the same training rows with the experiment's seed
    (seed * 1_000_003 + the chunk's first row: 0 for seed 0's only chunk): the same
    ids, counts and f32 log-probabilities, bit for bit, at every position."""
    kd, args, r = result
    rec = r["recorded"]
    inputs = rec["train"][:, : args.seq_len]
    assert len(inputs) <= 64, "one chunk: the experiment's seed for it is 0"
    checked = set()
    for arm, spec in kd.ARMS.items():
        if "method" not in spec:
            continue
        t = rec["first_targets"][(arm, 0)]
        picks = rec["orders"][(arm, 0)][0]  # the rows of step 1
        ref = client.sample(inputs, num_samples=spec["k"], seed=0, method=spec["method"], value_encoding="f32")
        assert tuple(t.mask.shape[:2]) == (len(picks), args.seq_len), (arm, tuple(t.mask.shape))
        for i, row in enumerate(picks):
            s = ref.sequence(int(row))
            assert s.num_positions == args.seq_len
            for j in range(args.seq_len):
                lo, hi = int(s.offsets[j]), int(s.offsets[j + 1])
                m = t.mask[i, j].numpy()
                where = f"{arm}: batch row {i} (training row {row}) position {j}"
                assert m.sum() == hi - lo, where
                assert np.array_equal(t.token_ids[i, j].numpy()[m], s.token_ids[lo:hi]), where
                assert np.array_equal(t.counts[i, j].numpy()[m], s.counts[lo:hi]), where
                assert np.array_equal(t.logprobs[i, j].numpy()[m], s.logprobs[lo:hi]), where
        checked.add(arm)
    assert checked == {a for a, spec in kd.ARMS.items() if "method" in spec}


def test_full_arm_targets_agree_with_the_server(result, client):
    """The `full` arm's first batch of targets, softmax(hidden @ head.T) from
    teacher_dense's outputs (the experiment checks its head only on the held-out
    set, against teacher_dense's own log-probs), against the top-20 ids and
    log-probabilities another server returns for the same training rows: the same
    top ids, probabilities within 2e-4 (measured 2.7e-5 on 2026-12-07, AMD EPYC,
    AVX2: the server's LM head multiplies the quantised weights)."""
    kd, args, r = result
    rec = r["recorded"]
    inputs = rec["train"][:, : args.seq_len]
    p = rec["first_targets"][("full", 0)].double().numpy()
    picks = rec["orders"][("full", 0)][0]
    assert p.shape == (len(picks), args.seq_len, 49152), p.shape
    ref = client.sample(inputs, num_samples=20, seed=0, method="top_k", value_encoding="f32")
    worst = 0.0
    for i, row in enumerate(picks):
        s = ref.sequence(int(row))
        for j in range(args.seq_len):
            lo, hi = int(s.offsets[j]), int(s.offsets[j + 1])
            ids = s.token_ids[lo:hi].astype(np.int64)
            want = set(np.argsort(-p[i, j])[:20].tolist())
            where = f"batch row {i} (training row {row}) position {j}"
            assert len(set(ids.tolist()) & want) >= 19, f"{where}: other top-20 ids"
            worst = max(worst, float(np.abs(p[i, j, ids] - np.exp(s.logprobs[lo:hi].astype(np.float64))).max()))
    print(f"full arm vs the server's top-20: max |p - p_server| = {worst:.2e}")
    assert worst < 2e-4, worst


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
