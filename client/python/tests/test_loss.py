"""logitd.torch.distill_loss against independent float64 references (a NumPy
implementation over the unpadded CSR targets written here, and the Rust client's
distill_loss through the extension), gradcheck, the analytic gradient q - w, the
chunked variant, and padding (never NaN, never changes the value)."""

import math

import numpy as np
import pytest
import torch

from logitd.torch import distill_loss, distill_loss_chunked

COMBOS = [(t, n) for t in ("renormalized", "counts") for n in ("full", "sampled")]


# ---------------------------------------------------------------------------
# Synthetic targets: CSR per sequence (the reference's input) and the padded
# [B, T, K] layout (built here, independently of the package).


def make_csr(rng, lengths, vocab, k=16, num_samples=32):
    """Per sequence, a list of positions (ids, counts, logprobs); a teacher
    distribution over `vocab` is drawn per position and `num_samples` draws taken."""
    seqs = []
    for n in lengths:
        positions = []
        for _ in range(n):
            z = rng.normal(size=vocab) * 2.0
            logp = z - np.logaddexp.reduce(z)
            draws = rng.choice(vocab, size=int(rng.integers(1, num_samples + 1)), p=np.exp(logp))
            ids, counts = np.unique(draws, return_counts=True)
            ids, counts = ids[:k], counts[:k]
            positions.append((ids.astype(np.int64), counts.astype(np.int64), logp[ids].astype(np.float32)))
        seqs.append(positions)
    return seqs


def pad(seqs, t_len=None, k_max=None, garbage=None, device="cpu"):
    """The padded layout; `garbage` (an rng) fills padded slots with random
    finite junk instead of zeros, to show the mask alone decides."""
    b = len(seqs)
    t_len = t_len or max(len(s) for s in seqs)
    k_max = k_max or max(len(p[0]) for s in seqs for p in s)
    ids = np.zeros((b, t_len, k_max), np.int64)
    lp = np.zeros((b, t_len, k_max), np.float32)
    cn = np.zeros((b, t_len, k_max), np.int32)
    mask = np.zeros((b, t_len, k_max), bool)
    pmask = np.zeros((b, t_len), bool)
    if garbage is not None:
        ids[:] = garbage.integers(0, 8, size=ids.shape)
        lp[:] = garbage.normal(size=lp.shape) * 50
        cn[:] = garbage.integers(0, 1000, size=cn.shape)
    for i, s in enumerate(seqs):
        for t, (pid, pc, pl) in enumerate(s):
            n = len(pid)
            ids[i, t, :n], cn[i, t, :n], lp[i, t, :n], mask[i, t, :n] = pid, pc, pl, True
            pmask[i, t] = True
    return {
        "token_ids": torch.from_numpy(ids).to(device),
        "logprobs": torch.from_numpy(lp).to(device),
        "counts": torch.from_numpy(cn).to(device),
        "mask": torch.from_numpy(mask).to(device),
        "position_mask": torch.from_numpy(pmask).to(device),
    }


def ref_position_loss(x, ids, counts, logprobs, target, normalization):
    """-sum_S w_i log q_i for one position, float64, from the definitions."""
    x = np.asarray(x, np.float64)
    if target == "renormalized":
        p = np.exp(logprobs.astype(np.float64))
        w = p / p.sum()
    else:
        w = counts.astype(np.float64) / counts.sum()
    if normalization == "full":
        m = x.max()
        logq = x[ids] - (m + math.log(np.exp(x - m).sum()))
    else:
        xs = x[ids]
        m = xs.max()
        logq = xs - (m + math.log(np.exp(xs - m).sum()))
    return -(w * logq).sum()


def ref_loss(logits, seqs, target, normalization, weights=None, reduction="mean"):
    logits = np.asarray(logits, np.float64)
    out = np.zeros(logits.shape[:2])
    total = 0.0
    for b, s in enumerate(seqs):
        for t, (ids, counts, lp) in enumerate(s):
            m = 1.0 if weights is None else float(weights[b, t])
            out[b, t] = m * ref_position_loss(logits[b, t], ids, counts, lp, target, normalization)
            total += m
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    return out.sum() / total if total > 0 else 0.0


def setup(seed=0, lengths=(5, 3, 7), vocab=40, k=12, extra_t=2, extra_k=3, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    seqs = make_csr(rng, lengths, vocab, k=k)
    t_len = max(lengths) + extra_t
    k_max = max(len(p[0]) for s in seqs for p in s) + extra_k
    targets = pad(seqs, t_len, k_max, garbage=np.random.default_rng(seed + 1))
    logits = torch.from_numpy(rng.normal(size=(len(lengths), t_len, vocab)) * 3).to(dtype)
    return seqs, targets, logits


# ---------------------------------------------------------------------------
# The Rust reference (logitd._native.distill_loss_reference).


def rust_loss(logits, targets, target, normalization, weights=None):
    """The Rust client's distill_loss on the padded targets flattened to [B*T, K]
    rows (rows without entries get weight 0 there), float64 logits."""
    from logitd import _native

    b, t, k = targets["token_ids"].shape
    flat = lambda name: np.ascontiguousarray(targets[name].numpy().reshape(b * t, k))  # noqa: E731
    return _native.distill_loss_reference(
        np.ascontiguousarray(np.asarray(logits, np.float64)[:, :t].reshape(b * t, -1)),
        flat("token_ids").astype(np.int64),
        flat("logprobs").astype(np.float32),
        flat("counts").astype(np.int32),
        flat("mask") & targets["position_mask"].numpy().reshape(b * t, 1),
        32,
        target=target,
        normalization=normalization,
        position_weights=None if weights is None else np.asarray(weights, np.float32).reshape(b * t),
    )


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target,normalization", COMBOS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_f64_matches_numpy_reference(target, normalization, reduction):
    seqs, targets, logits = setup(seed=1)
    weights = np.random.default_rng(5).uniform(0, 2, size=logits.shape[:2])
    for w in (None, weights):
        got = distill_loss(
            logits, targets, target=target, normalization=normalization, reduction=reduction,
            mask=None if w is None else torch.from_numpy(w),
        )
        want = ref_loss(logits.numpy(), seqs, target, normalization, w, reduction)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("target,normalization", COMBOS)
def test_matches_rust_distill_loss(target, normalization):
    seqs, targets, logits = setup(seed=2)
    weights = np.random.default_rng(6).uniform(0, 2, size=logits.shape[:2]).astype(np.float32)
    for w in (None, weights):
        want = rust_loss(logits.numpy(), targets, target, normalization, w)
        # ... which is also the float64 NumPy reference's value
        assert abs(want - ref_loss(logits.numpy(), seqs, target, normalization, w)) <= 1e-9
        m = None if w is None else torch.from_numpy(w.astype(np.float64))
        got64 = distill_loss(logits, targets, target=target, normalization=normalization, mask=m)
        assert abs(got64.item() - want) <= 1e-9, (got64.item(), want)
        got32 = distill_loss(logits.float(), targets, target=target, normalization=normalization, mask=m)
        assert got32.dtype == torch.float32
        assert abs(got32.item() - want) <= 1e-5, (got32.item(), want)


@pytest.mark.parametrize("target,normalization", COMBOS)
def test_f32_within_1e5_of_f64_reference(target, normalization):
    seqs, targets, logits = setup(seed=3, vocab=300)
    got = distill_loss(logits.float(), targets, target=target, normalization=normalization)
    want = ref_loss(logits.numpy(), seqs, target, normalization)
    assert abs(got.item() - want) <= 1e-5


@pytest.mark.parametrize("target,normalization", COMBOS)
def test_gradcheck(target, normalization):
    seqs, targets, logits = setup(seed=4, lengths=(3, 2), vocab=9, k=5)
    logits.requires_grad_(True)
    mask = torch.tensor(np.random.default_rng(0).uniform(0.5, 2, size=logits.shape[:2]))
    for reduction in ("mean", "sum"):
        f = lambda x: distill_loss(  # noqa: E731
            x, targets, target=target, normalization=normalization, mask=mask, reduction=reduction
        )
        assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)
    f = lambda x: distill_loss(x, targets, target=target, normalization=normalization, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", ["renormalized", "counts"])
def test_full_normalization_gradient_is_q_minus_w(target):
    seqs, targets, logits = setup(seed=7)
    logits.requires_grad_(True)
    distill_loss(logits, targets, target=target, normalization="full", reduction="sum").backward()
    x = logits.detach().numpy()
    want = np.zeros_like(x)
    for b, s in enumerate(seqs):
        for t, (ids, counts, lp) in enumerate(s):
            q = np.exp(x[b, t] - x[b, t].max())
            q /= q.sum()
            w = np.exp(lp.astype(np.float64)) if target == "renormalized" else counts.astype(np.float64)
            want[b, t] = q
            want[b, t, ids] -= w / w.sum()  # ids are distinct within a position
    np.testing.assert_allclose(logits.grad.numpy(), want, rtol=0, atol=1e-12)
    # Rows without a target position get no gradient at all.
    assert (logits.grad[~targets["position_mask"]] == 0).all()


@pytest.mark.parametrize("target,normalization", COMBOS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_matches_plain(target, normalization, reduction, chunk_size):
    rng = np.random.default_rng(8)
    seqs, targets, _ = setup(seed=8, vocab=50)
    b, t = targets["position_mask"].shape
    hidden = torch.tensor(rng.normal(size=(b, t + 1, 6)), requires_grad=True)
    weight = torch.tensor(rng.normal(size=(50, 6)), requires_grad=True)
    bias = torch.tensor(rng.normal(size=50), requires_grad=True)
    mask = torch.from_numpy(rng.uniform(0, 2, size=(b, t)) * (rng.uniform(size=(b, t)) > 0.2))
    kw = dict(target=target, normalization=normalization, reduction=reduction, mask=mask)
    plain = distill_loss(hidden @ weight.T + bias, targets, **kw)
    chunked = distill_loss_chunked(hidden, weight, targets, lm_head_bias=bias, chunk_size=chunk_size, **kw)
    np.testing.assert_allclose(chunked.detach().numpy(), plain.detach().numpy(), rtol=0, atol=1e-12)
    g = torch.from_numpy(rng.normal(size=plain.shape))
    gp = torch.autograd.grad(plain, (hidden, weight, bias), g)
    gc = torch.autograd.grad(chunked, (hidden, weight, bias), g)
    for a, c in zip(gp, gc):
        np.testing.assert_allclose(c.numpy(), a.numpy(), rtol=0, atol=1e-12)


def test_chunked_gradcheck_and_no_bias():
    seqs, targets, _ = setup(seed=9, lengths=(3, 2), vocab=7, k=4)
    b, t = targets["position_mask"].shape
    hidden = torch.randn(b, t, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    for normalization in ("full", "sampled"):
        f = lambda h, w: distill_loss_chunked(h, w, targets, normalization=normalization, chunk_size=2)  # noqa: E731
        assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-7)


def test_chunked_never_holds_more_than_a_chunk_of_logits(monkeypatch):
    """Every logits tensor the chunked loss makes has at most chunk_size rows."""
    seqs, targets, _ = setup(seed=10, lengths=(9, 8, 7), vocab=64)
    b, t = targets["position_mask"].shape
    hidden = torch.randn(b, t, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(64, 5, dtype=torch.float64, requires_grad=True)
    rows = []
    real_linear = torch.nn.functional.linear

    def spy(x, w, bias=None):
        rows.append(x.shape[0])
        return real_linear(x, w, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    distill_loss_chunked(hidden, weight, targets, chunk_size=5).backward()
    assert rows and max(rows) <= 5
    assert sum(rows) == 2 * int(targets["position_mask"].sum())  # forward + backward, real positions only


# ---------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("target,normalization", COMBOS)
def test_padding_never_changes_the_value_or_gradient(target, normalization):
    rng = np.random.default_rng(11)
    lengths = (4, 1, 6)
    seqs = make_csr(rng, lengths, 30, k=10)
    x = torch.from_numpy(rng.normal(size=(3, 6, 30)) * 4)
    tight = pad(seqs)  # the smallest T and K
    for t_extra, k_extra, junk in ((0, 5, 1), (3, 0, 2), (4, 7, 3)):
        wide = pad(seqs, 6 + t_extra, tight["mask"].shape[-1] + k_extra, garbage=np.random.default_rng(junk))
        xw = torch.cat([x, torch.from_numpy(rng.normal(size=(3, t_extra, 30)) * 1e4)], 1)
        xa = x.clone().requires_grad_(True)
        xb = xw.clone().requires_grad_(True)
        a = distill_loss(xa, tight, target=target, normalization=normalization)
        b = distill_loss(xb, wide, target=target, normalization=normalization)
        a.backward()
        b.backward()
        assert torch.isfinite(b) and torch.isfinite(xb.grad).all()
        assert abs(a.item() - b.item()) <= 1e-12
        np.testing.assert_allclose(xb.grad[:, :6].numpy(), xa.grad.numpy(), rtol=0, atol=1e-14)
        assert (xb.grad[:, 6:] == 0).all()
        # Per sequence, the unpadded computation of that sequence alone.
        per = distill_loss(x, tight, target=target, normalization=normalization, reduction="none")
        for i, n in enumerate(lengths):
            alone = pad([seqs[i]])
            v = distill_loss(x[i : i + 1, :n], alone, target=target, normalization=normalization, reduction="sum")
            assert abs(per[i].sum().item() - v.item()) <= 1e-12


@pytest.mark.parametrize("target,normalization", COMBOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padding_never_nan_even_with_extreme_logits(target, normalization, dtype):
    seqs, targets, logits = setup(seed=12)
    logits = (logits * 1e4).clamp(-6e4, 6e4).to(dtype).requires_grad_(True)
    for mask in (None, torch.zeros(logits.shape[:2])):
        loss = distill_loss(logits, targets, target=target, normalization=normalization, mask=mask)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        if mask is not None:  # every weight 0: loss 0 with zero gradients (as in Rust)
            assert loss.item() == 0 and (g == 0).all()
        hc = torch.randn(*logits.shape[:2], 4, dtype=dtype, requires_grad=True)
        wc = (torch.randn(logits.shape[-1], 4) * 1e3).to(dtype).requires_grad_(True)
        loss = distill_loss_chunked(hc, wc, targets, target=target, normalization=normalization, mask=mask)
        gh, gw = torch.autograd.grad(loss, (hc, wc))
        assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_position_with_a_single_entry_and_empty_rows():
    """A position whose only entry is id 0 with weight 1 is plain cross-entropy."""
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    targets = {
        "token_ids": torch.tensor([[[0, 0], [3, 0], [0, 0]]]),
        "logprobs": torch.tensor([[[-0.5, 0.0], [-2.0, 0.0], [0.0, 0.0]]]),
        "counts": torch.tensor([[[7, 0], [1, 0], [0, 0]]]),
        "mask": torch.tensor([[[True, False], [True, False], [False, False]]]),
        "position_mask": torch.tensor([[True, True, False]]),
    }
    ce = torch.nn.functional.cross_entropy(x[0, :2], torch.tensor([0, 3]))
    for target in ("renormalized", "counts"):
        got = distill_loss(x, targets, target=target)
        assert abs(got.item() - ce.item()) <= 1e-12
        # Sampled normalisation over a single id: log q = 0.
        assert distill_loss(x, targets, target=target, normalization="sampled").item() == 0
        # A position marked real but without entries has no loss and no share of the mean.
        odd = dict(targets, position_mask=torch.tensor([[True, True, True]]))
        assert abs(distill_loss(x, odd, target=target).item() - ce.item()) <= 1e-12


def test_errors_name_the_value():
    seqs, targets, logits = setup(seed=13, vocab=40)
    top = int(targets["token_ids"][targets["mask"]].max())
    with pytest.raises(ValueError, match=f"teacher id {top} at target position .* outside the student vocabulary of {top}$"):
        distill_loss(logits[..., :top], targets)
    with pytest.raises(ValueError, match="not a finite value >= 0"):
        distill_loss(logits, targets, mask=-torch.ones(logits.shape[:2]))
    with pytest.raises(ValueError, match="target must be one of"):
        distill_loss(logits, targets, target="topk")
    with pytest.raises(ValueError, match="student has"):
        distill_loss(logits[:, :2], targets)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        distill_loss(logits[0], targets)


# ---------------------------------------------------------------------------
# Real targets from a live server


@pytest.mark.parametrize("target,normalization", COMBOS)
def test_live_targets_through_padded_to_torch(client, target, normalization):
    """Targets from the server, padded by the package and handed to torch, give the
    loss the float64 reference computes from the CSR columns, with row t of the
    logits matched to sequence position t (and the Rust reference agrees)."""
    seqs = [[(7 * i + 13 * j) % 49152 for j in range(n)] for i, n in enumerate((9, 4, 12))]
    t = client.sample(seqs, num_samples=32, seed=3, first_position=[0, 2, 0])
    padded = t.padded().to_torch()
    vocab = 49152
    logits = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 12, vocab)) * 2)
    csr = []
    for b in range(len(t)):
        positions = [((), (), ())] * int(t.first_positions[b])  # placeholders, weight 0 below
        for p in range(int(t.seq_offsets[b]), int(t.seq_offsets[b + 1])):
            e0, e1 = int(t.offsets[p]), int(t.offsets[p + 1])
            positions.append((t.token_ids[e0:e1], t.counts[e0:e1], t.logprobs[e0:e1]))
        csr.append(positions)
    weights = np.zeros((3, 12))
    for b, s in enumerate(csr):
        for p in range(int(t.first_positions[b]), len(s)):
            weights[b, p] = 1
    csr = [[p if len(p[0]) else (np.array([0]), np.array([1]), np.array([0.0], np.float32)) for p in s] for s in csr]
    want = ref_loss(logits.numpy(), csr, target, normalization, weights)
    got = distill_loss(logits, padded, target=target, normalization=normalization)
    assert abs(got.item() - want) <= 1e-9
    assert abs(rust_loss(logits.numpy(), {k: getattr(padded, k) for k in
                                          ("token_ids", "logprobs", "counts", "mask", "position_mask")},
                         target, normalization) - want) <= 1e-9
    assert padded.position_mask.sum().item() == 9 + 2 + 12  # positions first_position..length-1
