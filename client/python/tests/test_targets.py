"""Targets: the padded [B, T, K] form against the CSR columns (rebuilt by plain
Python loops here), fill values, k_max, concat, to_torch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sequences

import logitd


@pytest.fixture(scope="module")
def targets(client):
    seqs = sequences(7, salt=4)
    first = [0, 1, 2, 0, 5, 0, 1]
    return client.sample(seqs, num_samples=48, seed=11, first_position=first)


def test_padded_agrees_with_csr(targets):
    t = targets
    p = t.padded()
    b, tmax = len(t), int(t.lengths.max())
    widths = np.diff(t.offsets)
    assert p.token_ids.shape == p.logprobs.shape == p.counts.shape == p.mask.shape == (b, tmax, widths.max())
    assert p.position_mask.shape == (b, tmax)
    assert (p.token_ids.dtype, p.logprobs.dtype, p.counts.dtype, p.mask.dtype, p.position_mask.dtype) == (
        np.int64, np.float32, np.int32, np.bool_, np.bool_,
    )
    assert p.num_samples == 48
    seen = np.zeros((b, tmax), bool)
    for s in range(b):
        f, n = int(t.first_positions[s]), int(t.lengths[s])
        positions = range(int(t.seq_offsets[s]), int(t.seq_offsets[s + 1]))
        assert len(positions) == n - f, "one position per token from first_position on"
        for i, q in enumerate(positions):
            row = f + i
            seen[s, row] = True
            e0, e1 = int(t.offsets[q]), int(t.offsets[q + 1])
            k = e1 - e0
            assert p.mask[s, row, :k].all() and not p.mask[s, row, k:].any()
            assert list(p.token_ids[s, row, :k]) == list(t.token_ids[e0:e1])
            assert list(p.counts[s, row, :k]) == list(t.counts[e0:e1])
            assert p.logprobs[s, row, :k].tobytes() == t.logprobs[e0:e1].tobytes()
    np.testing.assert_array_equal(p.position_mask, seen)
    # Padding: finite fill values, nothing masked-in outside positions with targets.
    assert not p.mask[~seen].any()
    assert (p.token_ids[~p.mask] == 0).all() and (p.counts[~p.mask] == 0).all()
    assert (p.logprobs[~p.mask] == 0.0).all() and np.isfinite(p.logprobs).all()


def test_k_max(targets):
    widest = int(np.diff(targets.offsets).max())
    p = targets.padded(k_max=widest + 5)
    assert p.token_ids.shape[2] == widest + 5
    np.testing.assert_array_equal(p.mask[..., :widest], targets.padded().mask)
    with pytest.raises(ValueError, match=f"k_max = {widest - 1} is smaller than the {widest} sampled ids of position"):
        targets.padded(k_max=widest - 1)


def test_sequence_and_concat_round_trip(targets):
    parts = [targets.sequence(b) for b in range(len(targets))]
    assert all(len(p) == 1 for p in parts)
    whole = logitd.Targets.concat(parts)
    for f in ("offsets", "token_ids", "counts", "logprobs", "lse", "seq_offsets", "first_positions", "lengths"):
        np.testing.assert_array_equal(getattr(whole, f), getattr(targets, f), err_msg=f)
    one = targets.sequence(3)
    mine, all_ = one.padded(), targets.padded()
    n, k = int(one.lengths[0]), mine.token_ids.shape[2]
    np.testing.assert_array_equal(mine.token_ids[0, :n], all_.token_ids[3, :n, :k])
    assert not all_.mask[3, :, k:].any()


def test_to_torch(targets):
    import torch

    p = targets.padded()
    tt = p.to_torch()
    assert tt.token_ids.dtype == torch.int64 and tt.logprobs.dtype == torch.float32
    assert tt.counts.dtype == torch.int32 and tt.mask.dtype == torch.bool and tt.position_mask.dtype == torch.bool
    np.testing.assert_array_equal(tt.logprobs.numpy(), p.logprobs)
    assert tt.to_torch("cpu").mask.device.type == "cpu"


def test_package_imports_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import logitd, logitd.shards, numpy as np\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("target", ["renormalized", "counts"])
@pytest.mark.parametrize("normalization", ["full", "sampled"])
def test_distill_loss_reference_is_the_documented_float64_math(target, normalization):
    """_native.distill_loss_reference (the Rust loss, for the torch loss' tests)
    against its definition in float64 numpy, with an empty row and weights."""
    from logitd import _native

    rng = np.random.default_rng(3)
    n, v, k = 6, 40, 5
    logits = rng.normal(size=(n, v)) * 3
    ids = np.stack([rng.choice(v, k, replace=False) for _ in range(n)]).astype(np.int64)
    mask = rng.random((n, k)) < 0.7
    mask[:, 0] = True
    mask[2] = False  # a row without targets
    logprobs = np.log(rng.dirichlet(np.ones(k), n)).astype(np.float32)
    counts = rng.integers(1, 9, (n, k)).astype(np.int32)
    pw = rng.random(n).astype(np.float32)
    for weights in (None, pw):
        num = den = 0.0
        for p in range(n):
            s = mask[p]
            if not s.any():
                continue
            if target == "renormalized":
                w = np.exp(logprobs[p, s].astype(np.float64))
            else:
                w = counts[p, s].astype(np.float64)
            w /= w.sum()
            x = logits[p] if normalization == "full" else logits[p, ids[p, s]]
            log_z = np.log(np.exp(x - x.max()).sum()) + x.max()
            loss = -(w * (logits[p, ids[p, s]] - log_z)).sum()
            m = 1.0 if weights is None else float(weights[p])
            num, den = num + m * loss, den + m
        got = _native.distill_loss_reference(
            logits, ids, logprobs, counts, mask, 8, target=target, normalization=normalization,
            position_weights=weights,
        )
        assert abs(got - num / den) < 1e-12, (got, num / den)
