"""The distillation loss in PyTorch, against padded sparse teacher targets.

For a position with sampled set S, target weights w_i (i in S, sum w_i = 1) and
student logits x over the vocabulary V, the loss is ``-sum_{i in S} w_i log q_i``:

- ``target="renormalized"`` (Gemma 2/3): ``w_i = p_i / sum_S p``, the teacher's
  probabilities renormalised over the sampled ids;
- ``target="counts"`` (RS-KD): ``w_i = c_i / sum_S c`` (``c_i / k`` when sampling),
  an unbiased estimate of the full teacher distribution;
- ``normalization="full"``: ``log q = log_softmax(x)`` over the whole vocabulary;
- ``normalization="sampled"``: ``log q`` is the log-softmax of x restricted to S.

These are the definitions of the Rust client's ``distill_loss``. Since
``sum w_i = 1`` the loss of a position is ``log Z - sum w_i x_i`` (Z the student's
normaliser over V or over S): one gather and one log-sum-exp per position, with
composed, differentiable ops only. Padded entries (``mask`` False) have weight 0
and never enter a softmax, and no ``-inf`` is ever used as a fill, so padding
neither changes the value nor produces NaN values or gradients.

The targets are the ``[B, T, K]`` padded layout of ``Targets.padded().to_torch()``:
row ``t`` of sequence ``b`` is the teacher's distribution for token ``t + 1``, the
same layout as the student's logits ``[B, T, V]`` for the same input.

On-policy distillation (the student samples, the teacher scores the student's
tokens) has its own losses here, on ``[B, T]`` per-token log-probabilities of
the sampled tokens: :func:`reverse_kl_advantage` and :func:`on_policy_distill_loss`
(the Tinker cookbook's reverse-KL policy gradient), :func:`kl_k1` and
:func:`kl_k3` (verl's ``kl_penalty`` estimators), and :func:`topk_forward_kl`
(forward KL over a top-k support with a tail bucket, as verl's and NeMo-RL's
top-k distillation losses). Their ``mask`` is a ``[B, T]`` 0/1 (or weight) mask
of the real tokens; masked positions may hold anything (``-inf``, NaN, padding
ids) and give exactly 0 with zero gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "distill_loss",
    "distill_loss_chunked",
    "kl_k1",
    "kl_k3",
    "on_policy_distill_loss",
    "reverse_kl_advantage",
    "target_weights",
    "topk_forward_kl",
]

Target = Literal["renormalized", "counts"]
"""The target weights: the teacher's probabilities renormalised over the sampled ids, or the draw counts."""
Normalization = Literal["full", "sampled"]
"""The student's log q: log-softmax over the whole vocabulary, or over the sampled ids."""
Reduction = Literal["mean", "sum", "none"]
"""A weighted mean over positions, their sum, or the per-position values."""

_TARGETS = ("renormalized", "counts")
_NORMALIZATIONS = ("full", "sampled")
_REDUCTIONS = ("mean", "sum", "none")


def _field(targets: Any, name: str, required: bool = True) -> torch.Tensor | None:
    if isinstance(targets, Mapping):
        value = targets.get(name)
    else:
        value = getattr(targets, name, None)
    if value is None and required:
        raise TypeError(
            f"targets has no field {name!r}: pass Targets.padded().to_torch() (a PaddedTargets "
            "with torch tensors) or a mapping with token_ids, logprobs, counts, mask and position_mask"
        )
    if value is not None and not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    return value


def _unpack(
    targets: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    ids = _field(targets, "token_ids")
    mask = _field(targets, "mask")
    assert ids is not None and mask is not None  # required fields
    logprobs = _field(targets, "logprobs", required=False)
    counts = _field(targets, "counts", required=False)
    position_mask = _field(targets, "position_mask", required=False)
    if ids.dim() != 3:
        raise ValueError(f"targets.token_ids must be [B, T, K], got shape {tuple(ids.shape)}")
    for name, t in (("mask", mask), ("logprobs", logprobs), ("counts", counts)):
        if t is not None and tuple(t.shape) != tuple(ids.shape):
            raise ValueError(
                f"targets.{name} has shape {tuple(t.shape)} but token_ids has {tuple(ids.shape)}"
            )
    if position_mask is None:
        position_mask = mask.any(dim=-1)
    elif tuple(position_mask.shape) != tuple(ids.shape[:2]):
        raise ValueError(
            f"targets.position_mask has shape {tuple(position_mask.shape)}, expected {tuple(ids.shape[:2])}"
        )
    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return (
        to(ids).long(),
        to(mask).bool(),
        None if logprobs is None else to(logprobs),
        None if counts is None else to(counts),
        to(position_mask).bool(),
    )


def target_weights(
    mask: torch.Tensor,
    *,
    target: Target = "renormalized",
    logprobs: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Returns the target weights of each position.

    The target weights ``w`` ``[..., K]`` of each position (they sum to 1 over the
    real entries of a position, and are exactly 0 at padded entries and at
    positions without entries), computed in ``dtype`` (float64 by default, as the
    Rust client does) without ``-inf`` fills.
    """
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    if target == "renormalized":
        if logprobs is None:
            raise ValueError('target="renormalized" needs the teacher logprobs')
        lp = logprobs.to(dtype)
        if not bool(torch.isfinite(torch.where(mask, lp, zero)).all()):
            raise ValueError("teacher logprobs contain a non-finite value at a real entry")
        # Shift by the max over real entries (a finite fill: padded entries never win).
        lowest = torch.finfo(dtype).min
        shift = torch.where(mask, lp, torch.full_like(lp, lowest)).amax(dim=-1, keepdim=True)
        shift = torch.where(mask.any(dim=-1, keepdim=True), shift, zero)
        e = torch.where(mask, torch.exp(torch.where(mask, lp - shift, zero)), zero)
    else:
        if counts is None:
            raise ValueError('target="counts" needs the draw counts')
        e = torch.where(mask, counts.to(dtype), zero)
        if bool((e < 0).any()):
            raise ValueError("draw counts must be >= 0")
    total = e.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), zero)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision logits are upcast (as Hugging Face does for cross-entropy).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _position_losses(
    logits: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, normalization: str
) -> torch.Tensor:
    """Returns the per-position losses of a block of logits.

    Per-position ``log Z - sum_i w_i x_i`` for logits ``[N, V]``, ids/w/mask ``[N, K]``
    (``w`` already 0 at padding, summing to 1 or 0 per position). Composed ops only.
    """
    x = logits.to(_compute_dtype(logits.dtype))
    w = w.to(x.dtype)
    gathered = x.gather(-1, ids)  # padded entries gather a valid id (0) with weight 0
    share = w.sum(dim=-1)  # 1 at positions with entries, 0 otherwise
    if normalization == "full":
        log_z = torch.logsumexp(x, dim=-1)
    else:
        # log-sum-exp over the real entries only, with a detached shift; padded
        # entries become exp(0) * 0 before any exp can overflow (no -inf fill).
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        lowest = torch.finfo(x.dtype).min
        has = mask.any(dim=-1, keepdim=True)
        shift = torch.where(mask, gathered, torch.full_like(gathered, lowest)).amax(-1, keepdim=True)
        shift = torch.where(has, shift, zero).detach()
        e = torch.where(mask, torch.exp(torch.where(mask, gathered - shift, zero)), zero)
        s = e.sum(dim=-1, keepdim=True)
        log_z = (torch.log(torch.where(has, s, torch.ones_like(s))) + shift).squeeze(-1)
    # share * log_z is exactly 0 at positions without entries (log_z is finite there).
    return share * log_z - (w * gathered).sum(dim=-1)


def _weight_dtype(device: torch.device) -> torch.dtype:
    # Weights in float64 as in the Rust client; MPS has no float64.
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _position_weights(
    position_mask: torch.Tensor, mask: torch.Tensor | None, shape: Sequence[int], device: torch.device
) -> torch.Tensor:
    pw = position_mask.to(_weight_dtype(device))
    if mask is not None:
        m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
        if tuple(m.shape) != tuple(shape):
            raise ValueError(f"mask has shape {tuple(m.shape)}, expected [B, T] = {tuple(shape)}")
        m = m.to(device=device, dtype=pw.dtype)
        bad = ~(torch.isfinite(m) & (m >= 0))
        if bool(bad.any()):
            b, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"mask value {m[b, t].item()} at [{b}, {t}] is not a finite value >= 0")
        pw = pw * m
    return pw


def _prepare(
    targets: Any,
    shape_bt: Sequence[int],
    vocab: int,
    device: torch.device,
    target: Target,
    normalization: str,
    reduction: str,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ids, emask, logprobs, counts, position_mask = _unpack(targets, device)
    b, t = ids.shape[:2]
    if b != shape_bt[0] or t > shape_bt[1]:
        raise ValueError(
            f"targets cover [B, T] = [{b}, {t}] positions but the student has [{shape_bt[0]}, {shape_bt[1]}]"
        )
    emask = emask & position_mask.unsqueeze(-1)
    real_ids = torch.where(emask, ids, torch.zeros_like(ids))
    if real_ids.numel() and (bool((real_ids < 0).any()) or int(real_ids.max()) >= vocab):
        bad = (emask & ((ids < 0) | (ids >= vocab))).nonzero()[0]
        raise ValueError(
            f"teacher id {int(ids[tuple(bad)])} at target position [{int(bad[0])}, {int(bad[1])}] "
            f"is outside the student vocabulary of {vocab}"
        )
    w = target_weights(emask, target=target, logprobs=logprobs, counts=counts, dtype=_weight_dtype(device))
    # A position counts only where it has entries (as in the Rust reference).
    pw = _position_weights(position_mask & emask.any(dim=-1), mask, (b, t), device)
    return real_ids, emask, w, pw


def _reduce(losses: torch.Tensor, pw: torch.Tensor, reduction: str) -> torch.Tensor:
    weighted = losses * pw.to(losses.dtype)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    total = float(pw.sum())
    return weighted.sum() * (1.0 / total if total > 0 else 0.0)


def distill_loss(
    student_logits: torch.Tensor,
    targets: Any,
    *,
    target: Target = "renormalized",
    normalization: Normalization = "full",
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The distillation loss of ``student_logits`` ``[B, T, V]`` against padded targets.

    ``targets``: ``Targets.padded().to_torch()`` (fields ``token_ids`` ``[B, T', K]``,
    ``logprobs``, ``counts``, ``mask`` and ``position_mask`` ``[B, T']``), or a mapping
    with those keys; ``T' <= T`` (student rows past ``T'`` get no loss).
    ``mask``: optional ``[B, T']`` position weights (e.g. a 0/1 loss mask), finite and
    ``>= 0``, multiplied with ``position_mask``.
    ``reduction``: ``"mean"`` is the weighted mean over positions
    ``sum_p m_p l_p / sum_p m_p`` (0, with zero gradients, if every weight is 0), as
    in the Rust client; ``"sum"`` is ``sum_p m_p l_p``; ``"none"`` gives ``m_p l_p``
    as ``[B, T']``.

    Half-precision logits are computed in float32; the result has the compute dtype.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    bsz, tlen, vocab = student_logits.shape
    ids, emask, w, pw = _prepare(
        targets, (bsz, tlen), vocab, student_logits.device, target, normalization, reduction, mask
    )
    t = ids.shape[1]
    logits = student_logits[:, :t] if t < tlen else student_logits
    losses = _position_losses(
        logits.reshape(bsz * t, vocab), ids.reshape(bsz * t, -1), w.reshape(bsz * t, -1),
        emask.reshape(bsz * t, -1), normalization,
    ).reshape(bsz, t)
    return _reduce(losses, pw, reduction)


class _ChunkedLosses(torch.autograd.Function):
    """Per-position losses computed in row chunks, recomputed in backward.

    Per-position losses of ``hidden @ weight.T (+ bias)`` over row chunks; the
    logits of a chunk are recomputed in backward, so at most ``chunk_size`` rows of
    logits exist at any time.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        w: torch.Tensor,
        emask: torch.Tensor,
        normalization: str,
        chunk_size: int,
    ) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=_compute_dtype(hidden.dtype), device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk_size):
            hi = min(lo + chunk_size, hidden.shape[0])
            logits = torch.nn.functional.linear(hidden[lo:hi], weight, bias)
            out[lo:hi] = _position_losses(logits, ids[lo:hi], w[lo:hi], emask[lo:hi], normalization)
        ctx.save_for_backward(hidden, weight, bias, ids, w, emask)
        ctx.normalization = normalization
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, ids, w, emask = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _compute_dtype(weight.dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b and bias is not None else None
        )
        for lo in range(0, hidden.shape[0], ctx.chunk_size):
            hi = min(lo + ctx.chunk_size, hidden.shape[0])
            g = grad_out[lo:hi]
            with torch.enable_grad():
                h = hidden[lo:hi].detach().requires_grad_(need_h)
                wt = weight.detach().requires_grad_(need_w)
                b = None if bias is None else bias.detach().requires_grad_(need_b)
                logits = torch.nn.functional.linear(h, wt, b)
                losses = _position_losses(logits, ids[lo:hi], w[lo:hi], emask[lo:hi], ctx.normalization)
                inputs = [x for x, need in ((h, need_h), (wt, need_w), (b, need_b)) if need and x is not None]
                grads = list(torch.autograd.grad(losses, inputs, g.to(losses.dtype)))
            if grad_h is not None:
                grad_h[lo:hi] = grads.pop(0)
            if grad_w is not None:
                grad_w += grads.pop(0)
            if grad_b is not None:
                grad_b += grads.pop(0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def distill_loss_chunked(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: Any,
    *,
    lm_head_bias: torch.Tensor | None = None,
    target: Target = "renormalized",
    normalization: Normalization = "full",
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The distillation loss of ``hidden @ lm_head_weight.T`` without the full logits.

    :func:`distill_loss` of the logits ``hidden @ lm_head_weight.T (+ lm_head_bias)``
    without materialising them: ``hidden`` ``[B, T, H]`` (the student's last hidden
    states, after the final norm), ``lm_head_weight`` ``[V, H]``. Positions with no
    loss (padding, mask 0) are skipped; the others are processed ``chunk_size`` rows
    at a time in forward and recomputed chunk by chunk in backward, so at most
    ``[chunk_size, V]`` logits exist at once. Same value and gradients (to
    ``hidden``, the weight and the bias) as ``distill_loss`` on the full logits.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = {hidden.shape[2]}, got {tuple(lm_head_weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bsz, tlen, dim = hidden.shape
    vocab = lm_head_weight.shape[0]
    ids, emask, w, pw = _prepare(
        targets, (bsz, tlen), vocab, hidden.device, target, normalization, reduction, mask
    )
    t = ids.shape[1]
    h = (hidden[:, :t] if t < tlen else hidden).reshape(bsz * t, dim)
    k = ids.shape[-1]
    flat_pw = pw.reshape(-1)
    active = ((flat_pw > 0) & emask.reshape(bsz * t, k).any(-1)).nonzero().squeeze(-1)
    losses = torch.zeros(bsz * t, dtype=_compute_dtype(hidden.dtype), device=hidden.device)
    if active.numel():
        part = _ChunkedLosses.apply(
            h.index_select(0, active), lm_head_weight, lm_head_bias,
            ids.reshape(bsz * t, k).index_select(0, active),
            w.reshape(bsz * t, k).index_select(0, active),
            emask.reshape(bsz * t, k).index_select(0, active),
            normalization, chunk_size,
        )
        losses = losses.index_put((active,), part)
    else:
        # No position has a loss: 0, still connected to the inputs (zero gradients).
        losses = losses + (h[:0].sum() + lm_head_weight[:0].sum()).to(losses.dtype)
    return _reduce(losses.reshape(bsz, t), pw, reduction)


# ---------------------------------------------------------------------------
# On-policy distillation: per-token losses on the student's own samples.


def _token_weights(mask: torch.Tensor | None, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Returns the validated ``[B, T]`` position weights.

    ``[B, T]`` position weights (all 1 without a mask), validated finite and
    ``>= 0``, in the weight dtype (float64 except on MPS).
    """
    dtype = _weight_dtype(device)
    if mask is None:
        return torch.ones(tuple(shape), dtype=dtype, device=device)
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(m.shape)}, expected {tuple(shape)}")
    m = m.to(device=device, dtype=dtype)
    bad = ~(torch.isfinite(m) & (m >= 0))
    if bool(bad.any()):
        idx = [int(v) for v in bad.nonzero()[0]]
        raise ValueError(f"mask value {m[tuple(idx)].item()} at {idx} is not a finite value >= 0")
    return m


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _real_only(real: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Returns ``t`` with masked entries set to 0.

    ``t`` where ``real``, else 0: whatever a masked entry holds (-inf, NaN)
    never reaches an op, so it can't make a NaN value or gradient.
    """
    return torch.where(real, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _token_pair(
    a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks and converts two per-token tensors.

    Checks two per-token tensors of one shape; returns them in the compute
    dtype (half precision upcast to float32) with masked entries set to 0, the
    position weights and the bool mask of the real positions.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)} but {names[1]} has {tuple(b.shape)}"
        )
    dtype = _compute_dtype(torch.promote_types(a.dtype, b.dtype))
    pw = _token_weights(mask, a.shape, a.device)
    real = pw > 0
    return _real_only(real, a.to(dtype)), _real_only(real, b.to(dtype)), pw, real


def reverse_kl_advantage(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token advantage of on-policy distillation.

    The per-token advantage of on-policy distillation: minus the reverse-KL
    estimate of each sampled token, ``A_t = -(log q(x_t) - log p(x_t))
    = log p(x_t) - log q(x_t)``, detached.

    This is the signal of the Tinker cookbook's on-policy distillation
    (thinking-machines-lab/tinker-cookbook, ``tinker_cookbook/distillation/
    train_on_policy.py``, ``incorporate_kl_penalty``): the reverse KL
    ``KL(q || p)`` of the student ``q`` to the teacher ``p`` is estimated at the
    student's own sample ``x_t ~ q`` by ``log q(x_t) - log p(x_t)``, and the
    advantage is its negative. The sign is that of an advantage to *maximise*
    (Tinker adds it to the RL advantages): ``A_t > 0`` where the teacher gives
    the sampled token more probability than the student does, so a policy
    gradient step raises the token's probability, which lowers the reverse KL.
    Tinker scales it by ``kl_penalty_coef`` (default 1) and can discount it
    over future tokens (``kl_discount_factor``, default 0, i.e. off); multiply
    or discount the result yourself for those.

    Args:
        student_logprobs: ``[B, T]``: ``log q(x_t)`` of the sampled token ``x_t``.
            Tinker uses the sampler's log-probabilities of the rollout.
        teacher_logprobs: ``[B, T]``: ``log p(x_t)`` of the same token (teacher
            log-probabilities over its full vocabulary).
        mask: Optional ``[B, T]`` mask (bool, or weights ``>= 0``) of the real tokens;
            where it is 0 the advantage is exactly 0, whatever the inputs hold there.
            Weights are not applied to ``A`` (apply them in the loss).

    Returns:
        ``[B, T]``, without gradient; half-precision inputs give float32.
    """
    s, t, _, _ = _token_pair(
        student_logprobs.detach(), teacher_logprobs.detach(),
        ("student_logprobs", "teacher_logprobs"), mask,
    )
    return t - s


def on_policy_distill_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    sampling_logprobs: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The policy-gradient surrogate loss of on-policy distillation.

    The policy-gradient surrogate of on-policy distillation, whose gradient is
    the REINFORCE gradient of the reverse KL ``KL(q || p)``.

    With ``A = reverse_kl_advantage(student_logprobs, teacher_logprobs, mask)``
    (detached) and ``log q = student_logprobs`` (with gradient) the per-token loss is

    - ``-A * log q`` without ``sampling_logprobs``;
    - ``-exp(log q - log mu) * A`` with the rollout's own log-probabilities
      ``log mu = sampling_logprobs`` (detached): Tinker's ``importance_sampling``
      loss (``prob_ratio = exp(target_logprobs - sampling_logprobs)``,
      ``loss = -(prob_ratio * advantages)``) for samples drawn by a sampler
      that may lag the learner.

    Both have gradient ``-A * d log q`` at the rollout (``exp(log q - log mu) = 1``
    when learner and sampler agree), so ``d loss / d log q = -A`` per token with
    ``reduction="sum"``; in expectation over ``x ~ q`` (or over ``x ~ mu`` with
    the ratio) that is ``E[(log q - log p) d log q] = d KL(q || p)``, because
    ``E_q[d log q] = 0``. The values are surrogates (not the KL); use
    ``-A`` averaged over the tokens for the KL itself.

    One deliberate difference from the Tinker cookbook: there ``A`` is computed
    from the *sampler's* log-probabilities (``log mu - log p``) and held fixed
    over the optimizer substeps; here ``A`` uses the learner's current
    ``student_logprobs`` (detached), which makes the importance-sampled
    gradient exactly the reverse-KL gradient. The two agree when learner and
    sampler agree (the first step on fresh samples). For Tinker's exact signal,
    compute ``A = reverse_kl_advantage(sampling_logprobs, teacher_logprobs, mask)``
    and form ``-(exp(log q - log mu) * A)`` yourself.

    Args:
        student_logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the student
            being trained (they carry the gradient).
        teacher_logprobs: ``[B, T]`` teacher log-probabilities of the same tokens (constant).
        mask: ``[B, T]`` mask of the real (completion) tokens, bool or weights
            ``>= 0``, or ``None`` for all. Masked entries may hold anything.
        sampling_logprobs: Optional ``[B, T]`` log-probabilities the sampler gave the tokens when
            it drew them (constant).
        reduction: ``"mean"``: ``sum_t m_t l_t / sum_t m_t`` (0, with zero gradients, if
            every weight is 0), Tinker's per-token mean; ``"sum"``: ``sum_t m_t l_t``
            (Tinker's ``importance_sampling`` sums over a datum's tokens);
            ``"none"``: ``m_t l_t`` as ``[B, T]``.

    Returns:
        A scalar, or ``[B, T]`` with ``reduction="none"``.
    """
    _check_reduction(reduction)
    advantage = reverse_kl_advantage(student_logprobs, teacher_logprobs, mask)
    pw = _token_weights(mask, student_logprobs.shape, student_logprobs.device)
    real = pw > 0
    log_q = _real_only(real, student_logprobs.to(advantage.dtype))
    if sampling_logprobs is None:
        losses = -(advantage * log_q)
    else:
        if tuple(sampling_logprobs.shape) != tuple(student_logprobs.shape):
            raise ValueError(
                f"sampling_logprobs has shape {tuple(sampling_logprobs.shape)} "
                f"but student_logprobs has {tuple(student_logprobs.shape)}"
            )
        log_mu = _real_only(real, sampling_logprobs.detach().to(advantage.dtype))
        losses = -(torch.exp(log_q - log_mu) * advantage)
    return _reduce(losses, pw, reduction)


def kl_k1(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """The k1 estimate of ``KL(pi || ref)``.

    The k1 estimate of ``KL(pi || ref)`` at tokens sampled from ``pi``:
    ``log pi(x) - log ref(x)``.

    As verl defines ``"kl"``/``"k1"`` (volcengine/verl,
    ``verl/trainer/ppo/core_algos.py``, ``kl_penalty`` / ``kl_penalty_forward``;
    J. Schulman, "Approximating KL divergence", 2020). Unbiased for the KL, but
    its expected gradient is not the KL's gradient.

    Args:
        logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the policy.
        ref_logprobs: ``[B, T]`` log-probabilities of the same tokens under the reference.
        mask: Optional ``[B, T]`` mask (bool, or weights ``>= 0``); masked entries may
            hold anything and give 0.
        reduction: ``"none"`` (the default, like verl's per-token ``kl_penalty``):
            ``m_t k_t`` as ``[B, T]``; ``"mean"``: ``sum_t m_t k_t / sum_t m_t``
            (verl's ``agg_loss`` ``"token-mean"`` on one rank); ``"sum"``.
    """
    _check_reduction(reduction)
    lp, ref, pw, _ = _token_pair(logprobs, ref_logprobs, ("logprobs", "ref_logprobs"), mask)
    return _reduce(lp - ref, pw, reduction)


def kl_k3(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """The k3 ("low_var_kl") estimate of ``KL(pi || ref)``.

    The k3 ("low_var_kl") estimate of ``KL(pi || ref)`` at tokens sampled from
    ``pi``, with verl's clamps: ``d = clamp(log ref(x) - log pi(x), -20, 20)``,
    ``k3 = clamp(exp(d) - d - 1, -10, 10)``.

    As verl defines ``"low_var_kl"``/``"k3"`` (volcengine/verl,
    ``verl/trainer/ppo/core_algos.py``, ``kl_penalty_forward``; J. Schulman,
    "Approximating KL divergence", 2020): ``exp(d) - d - 1 >= 0``, unbiased for
    the KL, with lower variance than k1. The clamps are verl's, gradients
    included: a log-ratio outside ``[-20, 20]`` or a value above 10 has zero
    gradient.

    Parameters are those of :func:`kl_k1`.
    """
    _check_reduction(reduction)
    lp, ref, pw, _ = _token_pair(logprobs, ref_logprobs, ("logprobs", "ref_logprobs"), mask)
    d = torch.clamp(ref - lp, min=-20.0, max=20.0)
    k3 = torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)
    return _reduce(k3, pw, reduction)


def topk_forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    tail: bool = True,
    reduction: Reduction = "mean",
    *,
    tail_mass_eps: float = 1e-6,
) -> torch.Tensor:
    """Forward KL of the teacher to the student over a top-k support.

    Forward KL ``KL(p || q)`` of the teacher ``p`` to the student ``q`` over a
    top-k support ``S`` (the student's own top-k ids, in on-policy distillation).

    With ``log q_i = log_softmax(student_logits)_i`` over the whole vocabulary and
    ``log p_i = teacher_logprobs`` (full-vocabulary teacher log-probabilities) at
    the ``K`` ids ``i`` of ``S``:

    - ``tail=True``: the support plus one tail bucket for all the other ids,
      ``sum_{i in S} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)``,
      ``p_tail = clamp(1 - sum_S p, 0, 1)``, ``q_tail = clamp(1 - sum_S q,
      tail_mass_eps, 1)`` (a zero teacher tail contributes 0). This is the
      exact KL between the two coarse-grained distributions (``K + 1``
      categories), so it lies in ``[0, KL(p || q)]`` and equals it when ``S``
      is the whole vocabulary. It is verl's tail-aware ``forward_kl_topk_tail``
      (verl-project/verl pull request 7855, ``verl/trainer/distillation/
      tail_kl.py`` ``compute_tail_bucket_kl`` plus the top-k head of
      ``verl/trainer/distillation/fsdp/losses.py``), which it matches exactly,
      ``tail_mass_eps`` included (verl requires it in ``(0, 1)``).
    - ``tail=False``: both distributions renormalised over ``S``,
      ``sum_{i in S} p~_i (log p~_i - log q~_i)`` with ``log q~ = log_softmax``
      of the student's logits at ``S`` and ``log p~ = log_softmax`` of the
      teacher's. This is NeMo-RL's ``DistillationLossFn`` with
      ``kl_type="forward"`` and ``zero_outside_topk=False``
      (NVIDIA-NeMo/RL, ``nemo_rl/algorithms/loss/loss_functions.py`` and
      ``get_distillation_topk_logprobs_from_logits`` in
      ``nemo_rl/distributed/model_utils.py``), which it matches exactly.

    How the others differ: verl's plain ``forward_kl_topk`` (no tail) uses the
    full-vocabulary probabilities without renormalising and no tail bucket,
    and clamps the per-token loss at 0 (the truncated sum can be negative);
    NeMo-RL has no tail bucket: its ``zero_outside_topk=True`` uses unnormalised
    full-vocabulary student log-probabilities and, for reverse or mixed KL
    only, adds the student's out-of-support entropy against a teacher log-prob
    floor of -100. Both projects take ``S`` from the *teacher's* top-k; the
    formulas here don't depend on who chose ``S``. The choice of ``S`` is not
    differentiated (ids are constants).

    Args:
        student_logits: ``[B, T, V]``.
        topk_ids: ``[B, T, K]`` distinct ids of the support per position (e.g.
            ``student_logits.topk(K).indices``); with repeated ids the tail mass is
            wrong.
        teacher_logprobs: ``[B, T, K]`` the teacher's full-vocabulary log-probabilities at
            ``topk_ids`` (constants: no gradient flows to them). ``-inf`` (p = 0)
            is allowed; NaN and ``+inf`` are not at real positions, and with
            ``tail=False`` a real position needs one finite entry.
        mask: Optional ``[B, T]`` position mask (bool, or weights ``>= 0``); masked
            positions may hold any ids and log-probabilities.
        tail: Add the tail bucket (verl) or renormalise over the support (NeMo-RL).
        reduction: ``"mean"``: ``sum_p m_p l_p / sum_p m_p`` (0, with zero gradients, if
            every weight is 0); ``"sum"``; ``"none"``: ``m_p l_p`` as ``[B, T]``.
        tail_mass_eps: The floor of ``q_tail`` inside its logarithm (``tail=True``).

    Half-precision logits are computed in float32; the result has the compute dtype.
    """
    _check_reduction(reduction)
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    bsz, tlen, vocab = student_logits.shape
    if topk_ids.dim() != 3 or tuple(topk_ids.shape[:2]) != (bsz, tlen) or topk_ids.shape[2] < 1:
        raise ValueError(
            f"topk_ids must be [B, T, K] = [{bsz}, {tlen}, K >= 1], got shape {tuple(topk_ids.shape)}"
        )
    if tuple(teacher_logprobs.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"teacher_logprobs has shape {tuple(teacher_logprobs.shape)} "
            f"but topk_ids has {tuple(topk_ids.shape)}"
        )
    if tail and not (0.0 < tail_mass_eps < 1.0):
        raise ValueError(f"tail_mass_eps must be in (0, 1), got {tail_mass_eps}")
    device = student_logits.device
    pw = _token_weights(mask, (bsz, tlen), device)
    real = (pw > 0).unsqueeze(-1)  # [B, T, 1]
    x = student_logits.to(_compute_dtype(student_logits.dtype))
    ids = topk_ids.to(device).long()
    ids = torch.where(real, ids, torch.zeros_like(ids))
    if ids.numel() and (bool((ids < 0).any()) or int(ids.max()) >= vocab):
        b, t, k = (int(v) for v in ((ids < 0) | (ids >= vocab)).nonzero()[0])
        raise ValueError(
            f"topk id {int(ids[b, t, k])} at [{b}, {t}, {k}] is outside the student vocabulary of {vocab}"
        )
    lp_in = teacher_logprobs.detach().to(device=device, dtype=x.dtype)
    lp_in = torch.where(real, lp_in, torch.zeros((), dtype=x.dtype, device=device))
    if bool((torch.isnan(lp_in) | (lp_in == float("inf"))).any()):
        raise ValueError("teacher_logprobs has a NaN or +inf at a real position")
    present = lp_in > float("-inf")  # p_i > 0
    zero = torch.zeros((), dtype=x.dtype, device=device)
    gathered = x.gather(-1, ids)  # [B, T, K]
    if tail:
        log_q = gathered - torch.logsumexp(x, dim=-1, keepdim=True)
        log_p = torch.where(present, lp_in, zero)
        p = torch.where(present, torch.exp(log_p), zero)
        head = torch.where(present, p * (log_p - log_q), zero).sum(dim=-1)
        p_tail = torch.clamp(1.0 - p.sum(dim=-1), min=0.0, max=1.0)
        q_tail = torch.clamp(1.0 - torch.exp(log_q).sum(dim=-1), min=tail_mass_eps, max=1.0)
        log_p_tail = torch.log(torch.clamp(p_tail, min=torch.finfo(x.dtype).tiny))
        losses = head + p_tail * (log_p_tail - torch.log(q_tail))
    else:
        if bool((real.squeeze(-1) & ~present.any(dim=-1)).any()):
            raise ValueError("teacher_logprobs is -inf at every id of a real position (tail=False)")
        log_q = torch.log_softmax(gathered, dim=-1)
        # log p~ = lp - logsumexp(lp) over the present entries (absent ones: p~ = 0).
        lowest = torch.full_like(lp_in, torch.finfo(x.dtype).min)
        shift = torch.where(present, lp_in, lowest).amax(-1, keepdim=True)
        shift = torch.where(present.any(-1, keepdim=True), shift, zero)
        e = torch.where(present, torch.exp(torch.where(present, lp_in - shift, zero)), zero)
        s = e.sum(dim=-1, keepdim=True)
        log_s = torch.log(torch.where(s > 0, s, torch.ones_like(s)))
        log_p = torch.where(present, lp_in - shift - log_s, zero)
        p = torch.where(present, torch.exp(log_p), zero)
        losses = torch.where(present, p * (log_p - log_q), zero).sum(dim=-1)
    return _reduce(losses, pw, reduction)
