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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

__all__ = ["distill_loss", "distill_loss_chunked", "target_weights"]

_TARGETS = ("renormalized", "counts")
_NORMALIZATIONS = ("full", "sampled")
_REDUCTIONS = ("mean", "sum", "none")


def _field(targets: Any, name: str, required: bool = True):
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


def _unpack(targets: Any, device: torch.device):
    ids = _field(targets, "token_ids")
    mask = _field(targets, "mask")
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
    to = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return (
        to(ids).long(),
        to(mask).bool(),
        to(logprobs),
        to(counts),
        to(position_mask).bool(),
    )


def target_weights(
    mask: torch.Tensor,
    *,
    target: str = "renormalized",
    logprobs: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The target weights ``w`` ``[..., K]`` of each position (they sum to 1 over the
    real entries of a position, and are exactly 0 at padded entries and at
    positions without entries), computed in ``dtype`` (float64 by default, as the
    Rust client does) without ``-inf`` fills."""
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
    """Per-position ``log Z - sum_i w_i x_i`` for logits ``[N, V]``, ids/w/mask ``[N, K]``
    (``w`` already 0 at padding, summing to 1 or 0 per position). Composed ops only."""
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
    position_mask: torch.Tensor, mask: Optional[torch.Tensor], shape, device
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


def _prepare(targets, shape_bt, vocab, device, target, normalization, reduction, mask):
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
    target: str = "renormalized",
    normalization: str = "full",
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
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
    """Per-position losses of ``hidden @ weight.T (+ bias)`` over row chunks; the
    logits of a chunk are recomputed in backward, so at most ``chunk_size`` rows of
    logits exist at any time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, w, emask, normalization, chunk_size):
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
    def backward(ctx, grad_out):
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
            if need_h:
                grad_h[lo:hi] = grads.pop(0)
            if need_w:
                grad_w += grads.pop(0)
            if need_b and bias is not None:
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
    lm_head_bias: Optional[torch.Tensor] = None,
    target: str = "renormalized",
    normalization: str = "full",
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """:func:`distill_loss` of the logits ``hidden @ lm_head_weight.T (+ lm_head_bias)``
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
