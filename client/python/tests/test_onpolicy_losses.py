"""The on-policy distillation losses of logitd.torch (reverse_kl_advantage,
on_policy_distill_loss, kl_k1, kl_k3, topk_forward_kl) against float64
references written here element by element with the math module (no call to
the code under test), at several shapes with masks whose padded entries hold
garbage (NaN, -inf, out-of-vocabulary ids); torch.autograd.gradcheck in
float64; the gradient of the on-policy surrogate (-A per token, and the exact
reverse-KL gradient in expectation); the tail bucket's bounds.

Runs without the native extension: if `import logitd.torch` fails (the package
is not built), torch.py is loaded from the source tree by its path.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from pathlib import Path

import pytest
import torch


def _load_module():
    try:
        import logitd.torch as module
    except ImportError:  # no logitd package, or no built native extension
        path = Path(__file__).resolve().parents[1] / "python" / "logitd" / "torch.py"
        spec = importlib.util.spec_from_file_location("_logitd_torch_from_source", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


lt = _load_module()

F64 = torch.float64
NAN = float("nan")
NEG_INF = float("-inf")
SHAPES = [(1, 1), (2, 5), (3, 7)]
REDUCTIONS = ["mean", "sum", "none"]


# ---------------------------------------------------------------------------
# Inputs


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(*parts) -> int:
    """A seed that is the same in every run (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def logprobs(shape, g, low=-6.0, high=-0.05) -> torch.Tensor:
    """Log-probabilities of sampled tokens, in [low, high]."""
    return (low + (high - low) * torch.rand(shape, generator=g, dtype=F64))


def make_mask(shape, g, kind: str) -> torch.Tensor:
    """'bool': random 0/1 with at least one real entry; 'weights': random
    weights in {0, 0.5, 1, 2}; 'none' and 'zero' as named."""
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "bool":
        m = torch.rand(shape, generator=g) < 0.6
        m.view(-1)[0] = True
        return m
    if kind == "weights":
        choices = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64)
        w = choices[torch.randint(0, 4, shape, generator=g)]
        w.view(-1)[0] = 1.0
        return w
    raise ValueError(kind)


def with_garbage(t: torch.Tensor, mask, values) -> torch.Tensor:
    """t with its masked entries (mask == 0) replaced by `values` in turn."""
    if mask is None:
        return t.clone()
    out = t.clone()
    flat_out, flat_m = out.view(-1), torch.as_tensor(mask).reshape(-1)
    j = 0
    for i in range(flat_out.numel()):
        if float(flat_m[i]) == 0.0:
            flat_out[i] = values[j % len(values)]
            j += 1
    return out


def weights_list(mask, shape):
    """The mask as a flat list of float weights (all 1 without a mask)."""
    n = math.prod(shape)
    if mask is None:
        return [1.0] * n
    return [float(v) for v in torch.as_tensor(mask).reshape(-1).tolist()]


def reduce_ref(losses, weights, reduction, shape):
    """Flat per-position losses (already 0 where the weight is 0) -> the reduction."""
    weighted = [l * w for l, w in zip(losses, weights)]
    if reduction == "none":
        return torch.tensor(weighted, dtype=F64).reshape(shape)
    total = sum(weighted)
    if reduction == "sum":
        return torch.tensor(total, dtype=F64)
    wsum = sum(weights)
    return torch.tensor(total / wsum if wsum > 0 else 0.0, dtype=F64)


def close(actual, expected, **kw):
    kw.setdefault("rtol", 1e-12)
    kw.setdefault("atol", 1e-12)
    torch.testing.assert_close(actual.to(F64), expected.to(F64), **kw)


# ---------------------------------------------------------------------------
# References (float64, element by element)


def ref_advantage(student, teacher, weights):
    """Tinker: reverse_kl = (log q - log p) * mask; advantage = -mask * reverse_kl."""
    out = []
    for s, t, w in zip(student, teacher, weights):
        if w == 0.0:
            out.append(0.0)
        else:
            reverse_kl = s - t
            out.append(-reverse_kl)
    return out


def ref_on_policy_losses(student, teacher, sampling, weights):
    """Per-token surrogate: -A log q, or -exp(log q - log mu) A (Tinker's IS loss)."""
    adv = ref_advantage(student, teacher, weights)
    out = []
    for i, (s, a, w) in enumerate(zip(student, adv, weights)):
        if w == 0.0:
            out.append(0.0)
        elif sampling is None:
            out.append(-a * s)
        else:
            out.append(-math.exp(s - sampling[i]) * a)
    return out


def ref_k1(lp, ref, weights):
    return [(a - b) if w != 0.0 else 0.0 for a, b, w in zip(lp, ref, weights)]


def ref_k3(lp, ref, weights):
    out = []
    for a, b, w in zip(lp, ref, weights):
        if w == 0.0:
            out.append(0.0)
            continue
        d = min(max(b - a, -20.0), 20.0)
        out.append(min(max(math.exp(d) - d - 1.0, -10.0), 10.0))
    return out


def ref_k3_grad_logprob(lp, ref, weights):
    """d k3 / d logprob by hand: 1 - exp(d) inside both clamps, else 0."""
    out = []
    for a, b, w in zip(lp, ref, weights):
        d_raw = b - a
        if w == 0.0 or not (-20.0 <= d_raw <= 20.0):
            out.append(0.0)
            continue
        value = math.exp(d_raw) - d_raw - 1.0
        out.append(w * (1.0 - math.exp(d_raw)) if value <= 10.0 else 0.0)
    return out


def logsumexp_list(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_topk_position(logits_row, ids, teacher_lps, tail, eps):
    """One position of topk_forward_kl, from its definition."""
    lse = logsumexp_list(logits_row)
    if tail:
        # verl forward_kl_topk_tail: full-vocabulary probabilities on the
        # support, one tail bucket for the rest.
        head = 0.0
        p_sum = q_sum = 0.0
        for i, lp in zip(ids, teacher_lps):
            lq = logits_row[i] - lse
            q_sum += math.exp(lq)
            if lp == NEG_INF:
                continue
            p = math.exp(lp)
            p_sum += p
            head += p * (lp - lq)
        p_tail = min(max(1.0 - p_sum, 0.0), 1.0)
        q_tail = min(max(1.0 - q_sum, eps), 1.0)
        tail_term = 0.0 if p_tail == 0.0 else p_tail * (math.log(p_tail) - math.log(q_tail))
        return head + tail_term
    # NeMo-RL forward, zero_outside_topk=False: both renormalised over the support.
    s_lse = logsumexp_list([logits_row[i] for i in ids])
    finite = [lp for lp in teacher_lps if lp != NEG_INF]
    t_lse = logsumexp_list(finite)
    total = 0.0
    for i, lp in zip(ids, teacher_lps):
        if lp == NEG_INF:
            continue
        lp_n = lp - t_lse
        lq_n = logits_row[i] - s_lse
        total += math.exp(lp_n) * (lp_n - lq_n)
    return total


def ref_topk(logits, ids, teacher, weights, tail, eps=1e-6):
    b, t, v = logits.shape
    rows = logits.reshape(b * t, v).tolist()
    id_rows = ids.reshape(b * t, -1).tolist()
    lp_rows = teacher.reshape(b * t, -1).tolist()
    return [
        ref_topk_position(rows[n], id_rows[n], lp_rows[n], tail, eps) if weights[n] != 0.0 else 0.0
        for n in range(b * t)
    ]


def full_forward_kl(logits_row, teacher_full_row):
    lse_q = logsumexp_list(logits_row)
    lse_p = logsumexp_list(teacher_full_row)
    return sum(
        math.exp(p - lse_p) * ((p - lse_p) - (x - lse_q)) for x, p in zip(logits_row, teacher_full_row)
    )


# ---------------------------------------------------------------------------
# reverse_kl_advantage


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "weights"])
def test_reverse_kl_advantage_matches_reference(shape, mask_kind):
    g = gen(seed_of(shape, mask_kind))
    s, t = logprobs(shape, g), logprobs(shape, g)
    mask = None if mask_kind == "none" else make_mask(shape, g, mask_kind)
    w = weights_list(mask, shape)
    s_in = with_garbage(s, mask, [NEG_INF, NAN]).requires_grad_(True)
    t_in = with_garbage(t, mask, [NAN, 3.0, NEG_INF])
    a = lt.reverse_kl_advantage(s_in, t_in, mask)
    expected = torch.tensor(ref_advantage(s.reshape(-1).tolist(), t.reshape(-1).tolist(), w), dtype=F64)
    close(a, expected.reshape(shape))
    assert not a.requires_grad, "the advantage must be detached"
    assert torch.isfinite(a).all()


def test_reverse_kl_advantage_sign():
    # The teacher likes the sampled token more than the student: a positive
    # advantage (raise its probability); the opposite: negative.
    s = torch.tensor([[math.log(0.1), math.log(0.5)]], dtype=F64)
    t = torch.tensor([[math.log(0.5), math.log(0.1)]], dtype=F64)
    a = lt.reverse_kl_advantage(s, t)
    close(a, torch.tensor([[math.log(5.0), -math.log(5.0)]], dtype=F64))


# ---------------------------------------------------------------------------
# on_policy_distill_loss


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "weights"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_sampling", [False, True])
def test_on_policy_distill_loss_matches_reference(shape, mask_kind, reduction, with_sampling):
    g = gen(seed_of(shape, mask_kind, reduction, with_sampling))
    s, t, mu = logprobs(shape, g), logprobs(shape, g), logprobs(shape, g)
    mask = None if mask_kind == "none" else make_mask(shape, g, mask_kind)
    w = weights_list(mask, shape)
    sampling = with_garbage(mu, mask, [NAN, NEG_INF]) if with_sampling else None
    out = lt.on_policy_distill_loss(
        with_garbage(s, mask, [NEG_INF, NAN]), with_garbage(t, mask, [NAN]), mask,
        sampling_logprobs=sampling, reduction=reduction,
    )
    losses = ref_on_policy_losses(
        s.reshape(-1).tolist(), t.reshape(-1).tolist(),
        mu.reshape(-1).tolist() if with_sampling else None, w,
    )
    close(out, reduce_ref(losses, w, reduction, shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sampling", ["none", "same", "other"])
def test_on_policy_distill_loss_gradient_is_minus_advantage(shape, sampling):
    g = gen(seed_of(shape, sampling))
    s, t, mu = logprobs(shape, g), logprobs(shape, g), logprobs(shape, g)
    mask = make_mask(shape, g, "bool")
    w = weights_list(mask, shape)
    s_in = with_garbage(s, mask, [NEG_INF, NAN]).requires_grad_(True)
    mu_arg = {"none": None, "same": s.clone(), "other": mu}[sampling]
    loss = lt.on_policy_distill_loss(s_in, t, mask, sampling_logprobs=mu_arg, reduction="sum")
    (grad,) = torch.autograd.grad(loss, s_in)
    sl, tl, ml = s.reshape(-1).tolist(), t.reshape(-1).tolist(), mu.reshape(-1).tolist()
    expected = []
    for i in range(len(sl)):
        if w[i] == 0.0:
            expected.append(0.0)
            continue
        a = tl[i] - sl[i]
        ratio = math.exp(sl[i] - ml[i]) if sampling == "other" else 1.0
        expected.append(-ratio * a)  # -A (times the importance ratio)
    close(grad, torch.tensor(expected, dtype=F64).reshape(shape))
    if sampling != "other":
        close(grad, -lt.reverse_kl_advantage(s, t, mask))
    # mean: the same divided by the number of real tokens
    s_in2 = s.clone().requires_grad_(True)
    loss = lt.on_policy_distill_loss(s_in2, t, mask, sampling_logprobs=mu_arg, reduction="mean")
    (grad_mean,) = torch.autograd.grad(loss, s_in2)
    close(grad_mean, torch.tensor(expected, dtype=F64).reshape(shape) / sum(w))


@pytest.mark.parametrize("vocab", [2, 7])
@pytest.mark.parametrize("importance_sampling", [False, True])
def test_on_policy_distill_loss_is_reinforce_gradient_of_reverse_kl(vocab, importance_sampling):
    """Summing the surrogate's gradient over every token x, weighted by the
    probability of drawing x (q, or the sampler's mu with the ratio), gives the
    exact gradient of KL(q || p) with respect to the student's logits."""
    g = gen(vocab * 10 + importance_sampling)
    theta = torch.randn(vocab, generator=g, dtype=F64, requires_grad=True)
    teacher_lp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=F64) * 2, dim=-1)
    mu_lp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=F64), dim=-1)
    log_q = torch.log_softmax(theta, dim=-1)
    # KL(q || p) in closed form, by hand
    kl = sum(torch.exp(log_q[x]) * (log_q[x] - teacher_lp[x]) for x in range(vocab))
    (expected,) = torch.autograd.grad(kl, theta, retain_graph=True)
    # Each x is one "sampled token" position of a [1, V] batch.
    per_token = lt.on_policy_distill_loss(
        log_q.unsqueeze(0), teacher_lp.unsqueeze(0), None,
        sampling_logprobs=mu_lp.unsqueeze(0) if importance_sampling else None, reduction="none",
    )
    draw = (mu_lp if importance_sampling else log_q).exp().detach()
    (estimate,) = torch.autograd.grad((draw * per_token[0]).sum(), theta)
    close(estimate, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_sampling", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_on_policy_distill_loss_gradcheck(with_sampling, reduction):
    """gradcheck needs A held fixed while log q is perturbed (A is detached by
    design): pass teacher = c + log q, so that A = c for every perturbation."""
    shape = (2, 4)
    g = gen(7 + with_sampling)
    s = logprobs(shape, g).requires_grad_(True)
    c = torch.randn(shape, generator=g, dtype=F64)
    mu = logprobs(shape, g)
    mask = make_mask(shape, g, "weights")

    def f(log_q):
        return lt.on_policy_distill_loss(
            log_q, c + log_q, mask, sampling_logprobs=mu if with_sampling else None, reduction=reduction
        )

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-8)


def test_on_policy_distill_loss_all_masked_is_zero_without_nan():
    s = torch.full((2, 3), NEG_INF, dtype=F64, requires_grad=True)
    t = torch.full((2, 3), NAN, dtype=F64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in REDUCTIONS:
        loss = lt.on_policy_distill_loss(s, t, mask, sampling_logprobs=t, reduction=reduction)
        assert bool((loss == 0).all())
        (grad,) = torch.autograd.grad(loss.sum(), s)
        assert bool((grad == 0).all())


# ---------------------------------------------------------------------------
# kl_k1, kl_k3


KL_FNS = {"k1": (lambda: lt.kl_k1, ref_k1), "k3": (lambda: lt.kl_k3, ref_k3)}


@pytest.mark.parametrize("name", ["k1", "k3"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "weights"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_estimators_match_reference(name, shape, mask_kind, reduction):
    fn, ref = KL_FNS[name][0](), KL_FNS[name][1]
    g = gen(seed_of(name, shape, mask_kind, reduction))
    lp, rf = logprobs(shape, g, -8.0), logprobs(shape, g, -8.0)
    mask = None if mask_kind == "none" else make_mask(shape, g, mask_kind)
    w = weights_list(mask, shape)
    lp_in = with_garbage(lp, mask, [NAN, NEG_INF]).requires_grad_(True)
    out = fn(lp_in, with_garbage(rf, mask, [NEG_INF, NAN]), mask=mask, reduction=reduction)
    losses = ref(lp.reshape(-1).tolist(), rf.reshape(-1).tolist(), w)
    close(out, reduce_ref(losses, w, reduction, shape))
    (grad,) = torch.autograd.grad(out.sum(), lp_in)
    assert torch.isfinite(grad).all()
    if mask is not None:
        assert bool((grad[torch.as_tensor(mask) == 0] == 0).all())


def test_kl_defaults_are_verl_per_token():
    # Without mask and reduction the result is verl's per-token kl_penalty.
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    rf = torch.tensor([[-1.5, -1.0, -0.5]], dtype=F64)
    close(lt.kl_k1(lp, rf), torch.tensor([[0.5, -1.0, 0.0]], dtype=F64))
    close(
        lt.kl_k3(lp, rf),
        torch.tensor([[math.exp(-0.5) + 0.5 - 1.0, math.exp(1.0) - 2.0, 0.0]], dtype=F64),
    )


def test_kl_k3_clamps_value_and_gradient():
    # log-ratios d = ref - logprob inside and outside verl's clamps:
    # |d| > 20 is clamped before exp; exp(d) - d - 1 > 10 is clamped to 10.
    # 800: exp would overflow to inf without the first clamp (a NaN gradient).
    d = [0.3, -1.5, 2.0, 2.5, 3.0, -12.0, 15.0, 25.0, -30.0, 21.0, -20.5, 800.0, -800.0]
    lp = torch.full((1, len(d)), -3.0, dtype=F64, requires_grad=True)
    rf = lp.detach() + torch.tensor([d], dtype=F64)
    w = [1.0] * len(d)
    out = lt.kl_k3(lp, rf)
    close(out, torch.tensor([ref_k3([-3.0] * len(d), rf[0].tolist(), w)], dtype=F64))
    assert out.max().item() == 10.0  # the clamp is reached
    (grad,) = torch.autograd.grad(out.sum(), lp)
    assert torch.isfinite(grad).all()
    close(grad, torch.tensor([ref_k3_grad_logprob([-3.0] * len(d), rf[0].tolist(), w)], dtype=F64))
    # -30 clamps to -20 first: exp(-20) + 20 - 1 > 10 -> 10, zero gradient
    assert out[0, d.index(-30.0)].item() == 10.0 and grad[0, d.index(-30.0)].item() == 0.0


@pytest.mark.parametrize("name", ["k1", "k3"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_estimators_gradcheck(name, reduction):
    fn = KL_FNS[name][0]()
    g = gen(11 if name == "k1" else 12)
    shape = (3, 4)
    lp = logprobs(shape, g, -4.0, -0.1).requires_grad_(True)
    # |ref - lp| < 2 keeps k3 away from its clamps (exp(2) - 3 < 10)
    rf = (lp.detach() + (torch.rand(shape, generator=g, dtype=F64) * 3.8 - 1.9)).requires_grad_(True)
    mask = make_mask(shape, g, "weights")
    assert torch.autograd.gradcheck(
        lambda a, b: fn(a, b, mask=mask, reduction=reduction), (lp, rf), eps=1e-6, atol=1e-8
    )


# ---------------------------------------------------------------------------
# topk_forward_kl

# (B, T, V, K); the last has K = V.
TOPK_SHAPES = [(1, 1, 5, 1), (2, 4, 9, 3), (3, 5, 6, 6)]


def topk_inputs(shape, seed, minus_inf_entry=False):
    """Student logits, the student's own top-k ids, the teacher's full-vocabulary
    log-probabilities there, and the teacher's full row."""
    b, t, v, k = shape
    g = gen(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=F64) * 2.0
    teacher_full = torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=F64) * 2.0, dim=-1)
    ids = logits.topk(k, dim=-1).indices
    teacher = teacher_full.gather(-1, ids)
    if minus_inf_entry and k > 1:
        teacher[0, 0, k - 1] = NEG_INF  # p = 0 at a real entry
    return logits, ids, teacher, teacher_full


@pytest.mark.parametrize("shape", TOPK_SHAPES)
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "weights"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_topk_forward_kl_matches_reference(shape, tail, mask_kind, reduction):
    seed = seed_of(shape, tail, mask_kind, reduction)
    logits, ids, teacher, _ = topk_inputs(shape, seed, minus_inf_entry=True)
    b, t = shape[:2]
    g = gen(seed + 1)
    mask = None if mask_kind == "none" else make_mask((b, t), g, mask_kind)
    w = weights_list(mask, (b, t))
    ids_in, teacher_in = ids.clone(), teacher.clone()
    if mask is not None:
        pad = torch.as_tensor(mask) == 0
        ids_in[pad] = -1
        ids_in[pad.nonzero()[:1].unbind(-1)] = shape[2] + 100  # out of the vocabulary
        teacher_in[pad] = NAN
    logits_in = logits.clone().requires_grad_(True)
    out = lt.topk_forward_kl(logits_in, ids_in, teacher_in, mask, tail=tail, reduction=reduction)
    losses = ref_topk(logits, ids, teacher, w, tail)
    close(out, reduce_ref(losses, w, reduction, (b, t)), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), logits_in)
    assert torch.isfinite(grad).all()
    if mask is not None:
        assert bool((grad[torch.as_tensor(mask) == 0] == 0).all())


@pytest.mark.parametrize("shape", TOPK_SHAPES)
def test_topk_forward_kl_tail_is_a_coarse_grained_kl(shape):
    """With the tail bucket the loss is a true KL of K + 1 categories: in
    [0, KL(p || q)] over the full vocabulary, and equal to it when K = V (where
    the renormalised loss is the full KL too)."""
    logits, ids, teacher, teacher_full = topk_inputs(shape, 99)
    b, t, v, k = shape
    per_tail = lt.topk_forward_kl(logits, ids, teacher, tail=True, reduction="none")
    per_renorm = lt.topk_forward_kl(logits, ids, teacher, tail=False, reduction="none")
    rows, trows = logits.reshape(b * t, v).tolist(), teacher_full.reshape(b * t, v).tolist()
    full = torch.tensor([full_forward_kl(r, tr) for r, tr in zip(rows, trows)], dtype=F64).reshape(b, t)
    assert bool((per_tail >= -1e-12).all())
    assert bool((per_tail <= full + 1e-12).all())
    if k == v:
        close(per_tail, full, rtol=1e-10, atol=1e-12)
        close(per_renorm, full, rtol=1e-10, atol=1e-12)
    else:
        assert bool((per_tail < full - 1e-9).any())  # coarse-graining loses information


def test_topk_forward_kl_tail_eps_guards_an_empty_student_tail():
    # The student's support holds all its mass (V = K + 1 with the last logit
    # far below): q_tail is floored at tail_mass_eps, value and gradient finite.
    logits = torch.tensor([[[5.0, 4.0, -800.0]]], dtype=F64, requires_grad=True)
    ids = torch.tensor([[[0, 1]]])
    teacher = torch.log(torch.tensor([[[0.5, 0.3]]], dtype=F64))
    eps = 1e-4
    out = lt.topk_forward_kl(logits, ids, teacher, tail=True, tail_mass_eps=eps)
    expected = ref_topk_position(logits[0, 0].tolist(), [0, 1], teacher[0, 0].tolist(), True, eps)
    close(out, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-12)
    # q_tail = eps exactly: moving the floor moves the value by p_tail * log ratio
    out2 = lt.topk_forward_kl(logits, ids, teacher, tail=True, tail_mass_eps=100 * eps)
    assert out.item() - out2.item() == pytest.approx(0.2 * math.log(100.0), rel=1e-9)
    (grad,) = torch.autograd.grad(out, logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_topk_forward_kl_gradcheck(tail, reduction):
    logits, ids, teacher, _ = topk_inputs((2, 3, 7, 3), 5, minus_inf_entry=True)
    mask = make_mask((2, 3), gen(6), "weights")
    logits = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: lt.topk_forward_kl(x, ids, teacher, mask, tail=tail, reduction=reduction),
        (logits,), eps=1e-6, atol=1e-8,
    )


def test_topk_forward_kl_all_masked_and_errors():
    logits, ids, teacher, _ = topk_inputs((1, 2, 5, 2), 3)
    x = logits.clone().requires_grad_(True)
    zero = torch.zeros(1, 2, dtype=torch.bool)
    loss = lt.topk_forward_kl(x, ids, torch.full_like(teacher, NAN), zero)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, x)
    assert bool((grad == 0).all())
    bad = teacher.clone()
    bad[0, 1, 0] = NAN
    with pytest.raises(ValueError, match="NaN"):
        lt.topk_forward_kl(logits, ids, bad)
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        lt.topk_forward_kl(logits, ids + 10, teacher)
    with pytest.raises(ValueError, match="reduction"):
        lt.topk_forward_kl(logits, ids, teacher, reduction="avg")
    with pytest.raises(ValueError, match="tail_mass_eps"):
        lt.topk_forward_kl(logits, ids, teacher, tail_mass_eps=0.0)
    with pytest.raises(ValueError, match="shape"):
        lt.kl_k1(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mask"):
        lt.on_policy_distill_loss(torch.zeros(2, 3), torch.zeros(2, 3), -torch.ones(2, 3))


def test_exported():
    for name in ("reverse_kl_advantage", "on_policy_distill_loss", "kl_k1", "kl_k3", "topk_forward_kl"):
        assert name in lt.__all__ and callable(getattr(lt, name))
    # the existing losses are still there
    assert {"distill_loss", "distill_loss_chunked", "target_weights"} <= set(lt.__all__)
