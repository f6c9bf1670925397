"""Targets of a batch: the CSR columns the server sends and their dense form."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from . import _native

if TYPE_CHECKING:  # torch is optional: PaddedTargets.to_torch imports it
    import torch

I64 = NDArray[np.int64]
I32 = NDArray[np.int32]
F32 = NDArray[np.float32]
Bool = NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class PaddedTargets:
    """Dense, right-padded targets ``[B, T, K]`` (see ``Targets.padded``).

    Dense, right-padded targets: row ``t`` of sequence ``b`` is the teacher's
    distribution for token ``t + 1`` (position ``t``).

    ``token_ids`` int64, ``logprobs`` float32 and ``counts`` int32 are
    ``[B, T, K]``; ``mask`` (bool ``[B, T, K]``) is True for real entries;
    ``position_mask`` (bool ``[B, T]``) is True where position ``t`` has
    targets (not before ``first_position``, not beyond the sequence). Padding
    holds finite values (id 0, logprob 0.0, count 0), never -inf.

    With ``sample(..., token_logprobs=True)``: ``token_logprobs`` (float32
    ``[B, T]``) is the teacher's log p of token ``t + 1`` of the sequence (the
    realised next token) given tokens ``0..=t``, ``token_ranks`` (int32
    ``[B, T]``) its rank (1 = the teacher's most likely id) and ``token_mask``
    (bool ``[B, T]``) True where a realised token was scored: every position
    with targets except a sequence's last, which has no next token. With
    candidates: ``candidate_logprobs`` (float32 ``[B, T, C]``) is the teacher's
    log p of the candidate ids of position ``t``, in the order they were given,
    and ``candidate_mask`` (bool ``[B, T, C]``) True for real entries. Padding
    is 0 (0.0, rank 0), never NaN; the fields are None when not asked for.
    """

    token_ids: I64 | torch.Tensor
    logprobs: F32 | torch.Tensor
    counts: I32 | torch.Tensor
    mask: Bool | torch.Tensor
    position_mask: Bool | torch.Tensor
    num_samples: int
    token_logprobs: F32 | torch.Tensor | None = None
    token_ranks: I32 | torch.Tensor | None = None
    token_mask: Bool | torch.Tensor | None = None
    candidate_logprobs: F32 | torch.Tensor | None = None
    candidate_mask: Bool | torch.Tensor | None = None

    def to_torch(self, device: torch.device | str | int | None = None) -> PaddedTargets:
        """Returns the same fields as torch tensors (same dtypes) on ``device``.

        Args:
            device: Where the tensors go (copied without blocking); None keeps
                them on the CPU, sharing memory with the numpy arrays.
        """
        import torch  # imported here: the package works without torch

        def conv(a: NDArray[Any] | torch.Tensor) -> torch.Tensor:
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            return t if device is None else t.to(device, non_blocking=True)

        def opt(a: NDArray[Any] | torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else conv(a)

        return PaddedTargets(
            token_ids=conv(self.token_ids),
            logprobs=conv(self.logprobs),
            counts=conv(self.counts),
            mask=conv(self.mask),
            position_mask=conv(self.position_mask),
            num_samples=self.num_samples,
            token_logprobs=opt(self.token_logprobs),
            token_ranks=opt(self.token_ranks),
            token_mask=opt(self.token_mask),
            candidate_logprobs=opt(self.candidate_logprobs),
            candidate_mask=opt(self.candidate_mask),
        )


class Targets:
    """The teacher targets of a batch of B sequences in CSR form, as numpy arrays.

    Positions of all sequences are concatenated: position ``p`` owns entries
    ``offsets[p]:offsets[p + 1]`` of ``token_ids`` (int64; distinct ids,
    ascending when sampling, by descending logprob with ``method="top_k"``),
    ``counts`` (int32; draws per id, all 1 for top-k) and ``logprobs``
    (float32; teacher log-probabilities over the whole vocabulary); ``lse``
    (float32, one per position) is the log-sum-exp of the teacher's logits / T.
    Sequence ``b`` owns positions ``seq_offsets[b]:seq_offsets[b + 1]``, which
    are its sequence positions ``first_positions[b]``, ``first_positions[b] + 1``,
    … ``lengths[b] - 1``. ``len(targets)`` is B.

    The on-policy columns, None unless asked for:

    - ``token_logprobs`` (float32) and ``token_ranks`` (int32), one per
      position: the teacher's log p at temperature T of the realised next token
      (position ``t`` of a sequence scores its token ``t + 1``) and that token's
      rank, 1 + the number of ids with a larger logit (vLLM's rank). A
      sequence's last position has no next token: NaN and rank 0 there.
    - ``candidate_offsets`` (int64, positions + 1) and ``candidate_logprobs``
      (float32): position ``p``'s candidate log-probabilities are
      ``candidate_logprobs[candidate_offsets[p]:candidate_offsets[p + 1]]``, in
      the order the candidate ids were given.
    """

    __slots__ = (
        "offsets",
        "token_ids",
        "counts",
        "logprobs",
        "lse",
        "seq_offsets",
        "first_positions",
        "lengths",
        "num_samples",
        "token_logprobs",
        "token_ranks",
        "candidate_offsets",
        "candidate_logprobs",
    )

    def __init__(
        self,
        offsets: I64,
        token_ids: I64,
        counts: I32,
        logprobs: F32,
        lse: F32,
        seq_offsets: I64,
        first_positions: I64,
        lengths: I64,
        num_samples: int,
        token_logprobs: F32 | None = None,
        token_ranks: I32 | None = None,
        candidate_offsets: I64 | None = None,
        candidate_logprobs: F32 | None = None,
    ) -> None:
        self.offsets = offsets
        self.token_ids = token_ids
        self.counts = counts
        self.logprobs = logprobs
        self.lse = lse
        self.seq_offsets = seq_offsets
        self.first_positions = first_positions
        self.lengths = lengths
        self.num_samples = int(num_samples)
        if (token_logprobs is None) != (token_ranks is None):
            raise ValueError("token_logprobs and token_ranks go together")
        if (candidate_offsets is None) != (candidate_logprobs is None):
            raise ValueError("candidate_offsets and candidate_logprobs go together")
        self.token_logprobs = token_logprobs
        self.token_ranks = token_ranks
        self.candidate_offsets = candidate_offsets
        self.candidate_logprobs = candidate_logprobs

    def __len__(self) -> int:
        return len(self.first_positions)

    def __repr__(self) -> str:
        extra = ""
        if self.token_logprobs is not None:
            extra += ", token_logprobs"
        if self.candidate_logprobs is not None:
            extra += f", candidates={len(self.candidate_logprobs)}"
        return (
            f"Targets(sequences={len(self)}, positions={len(self.lse)}, "
            f"entries={len(self.token_ids)}, num_samples={self.num_samples}{extra})"
        )

    @property
    def num_positions(self) -> int:
        """Returned positions of all sequences."""
        return len(self.lse)

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequence, row) of every position in the padded layout."""
        per = np.diff(self.seq_offsets).astype(np.int64)
        b = np.repeat(np.arange(len(self), dtype=np.int64), per)
        t = (
            np.arange(self.num_positions, dtype=np.int64)
            - np.repeat(self.seq_offsets[:-1].astype(np.int64), per)
            + np.repeat(self.first_positions.astype(np.int64), per)
        )
        return b, t

    def _where(self, q: int) -> str:
        """Position ``q`` of the batch as "position t of sequence b"."""
        s = int(np.searchsorted(self.seq_offsets, q, side="right")) - 1
        return f"position {int(self.first_positions[s]) + q - int(self.seq_offsets[s])} of sequence {s}"

    def padded(self, k_max: int | None = None, c_max: int | None = None) -> PaddedTargets:
        """Returns the dense, right-padded form.

        The dense ``[B, T, K]`` form (see :class:`PaddedTargets`), T the
        longest sequence, K ``k_max`` or the most distinct ids of any position,
        C (candidates) ``c_max`` or the most candidates of any position.
        Raises ValueError naming the position when one has more than ``k_max``
        ids or ``c_max`` candidates.
        """
        if k_max is not None and k_max < 0:
            raise ValueError(f"k_max = {k_max} is negative")
        if c_max is not None and c_max < 0:
            raise ValueError(f"c_max = {c_max} is negative")
        ids, lp, counts, mask, pos = _native.pad(
            self.offsets,
            self.token_ids,
            self.counts,
            self.logprobs,
            self.seq_offsets,
            self.first_positions,
            self.lengths,
            k_max,
        )
        b_max, t_max = pos.shape
        p = self.num_positions
        extra: dict[str, Any] = {}
        if self.token_logprobs is not None or self.candidate_offsets is not None:
            b, t = self._rows()
        if self.token_logprobs is not None and self.token_ranks is not None:
            tlp, trk = self.token_logprobs, self.token_ranks
            if len(tlp) != p or len(trk) != p:
                raise ValueError(f"{len(tlp)} token_logprobs and {len(trk)} token_ranks for {p} positions")
            real = np.asarray(trk) > 0
            tl = np.zeros((b_max, t_max), np.float32)
            tr = np.zeros((b_max, t_max), np.int32)
            tm = np.zeros((b_max, t_max), np.bool_)
            tl[b[real], t[real]] = tlp[real]
            tr[b[real], t[real]] = trk[real]
            tm[b[real], t[real]] = True
            extra.update(token_logprobs=tl, token_ranks=tr, token_mask=tm)
        if self.candidate_offsets is not None and self.candidate_logprobs is not None:
            co = np.asarray(self.candidate_offsets, np.int64)
            clp = self.candidate_logprobs
            n = len(clp)
            if len(co) != p + 1 or co[0] != 0 or co[-1] != n or (np.diff(co) < 0).any():
                raise ValueError(
                    f"candidate_offsets ({len(co)} entries) do not fit {p} positions and "
                    f"{n} candidate_logprobs"
                )
            widths = np.diff(co)
            need = int(widths.max()) if p else 0
            if c_max is not None and need > c_max:
                q = int(np.argmax(widths > c_max))
                raise ValueError(
                    f"c_max = {c_max} is smaller than the {int(widths[q])} candidates of {self._where(q)}"
                )
            c = need if c_max is None else c_max
            rep = np.repeat(np.arange(p, dtype=np.int64), widths)
            j = np.arange(n, dtype=np.int64) - co[rep]
            cl = np.zeros((b_max, t_max, c), np.float32)
            cm = np.zeros((b_max, t_max, c), np.bool_)
            cl[b[rep], t[rep], j] = clp
            cm[b[rep], t[rep], j] = True
            extra.update(candidate_logprobs=cl, candidate_mask=cm)
        return PaddedTargets(ids, lp, counts, mask, pos, self.num_samples, **extra)

    def sequence(self, b: int) -> Targets:
        """Sequence ``b`` alone (views, offsets rebased)."""
        if not -len(self) <= b < len(self):
            raise IndexError(f"sequence {b} of {len(self)}")
        return Targets.concat([self], _select=[b % len(self)])

    @staticmethod
    def concat(parts: Sequence[Targets], _select: Sequence[int] | None = None) -> Targets:
        """Returns the sequences of several Targets as one.

        The sequences of several Targets (same num_samples) as one. The
        on-policy columns must be in every part or in none.
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        k = parts[0].num_samples
        if any(p.num_samples != k for p in parts):
            raise ValueError(
                f"cannot concatenate targets with num_samples {sorted({p.num_samples for p in parts})}"
            )
        has_tokens = {p.token_logprobs is not None for p in parts}
        has_cands = {p.candidate_offsets is not None for p in parts}
        if len(has_tokens) > 1:
            raise ValueError("cannot concatenate targets with and without token_logprobs")
        if len(has_cands) > 1:
            raise ValueError("cannot concatenate targets with and without candidate_logprobs")
        tokens, cands = has_tokens.pop(), has_cands.pop()
        Parts = list[NDArray[Any]]
        offs: Parts = [np.zeros(1, np.int64)]
        sos: Parts = [np.zeros(1, np.int64)]
        coffs: Parts = [np.zeros(1, np.int64)]
        ids: Parts = []
        cs: Parts = []
        lps: Parts = []
        lses: Parts = []
        fps: Parts = []
        lens: Parts = []
        tls: Parts = []
        trs: Parts = []
        clps: Parts = []
        entry_base = position_base = cand_base = 0
        for part in parts:
            seqs = range(len(part)) if _select is None else _select
            for b in seqs:
                p0, p1 = int(part.seq_offsets[b]), int(part.seq_offsets[b + 1])
                e0, e1 = int(part.offsets[p0]), int(part.offsets[p1])
                offs.append(part.offsets[p0 + 1 : p1 + 1] - e0 + entry_base)
                ids.append(part.token_ids[e0:e1])
                cs.append(part.counts[e0:e1])
                lps.append(part.logprobs[e0:e1])
                lses.append(part.lse[p0:p1])
                if part.token_logprobs is not None and part.token_ranks is not None:
                    tls.append(part.token_logprobs[p0:p1])
                    trs.append(part.token_ranks[p0:p1])
                if part.candidate_offsets is not None and part.candidate_logprobs is not None:
                    c0, c1 = int(part.candidate_offsets[p0]), int(part.candidate_offsets[p1])
                    coffs.append(part.candidate_offsets[p0 + 1 : p1 + 1] - c0 + cand_base)
                    clps.append(part.candidate_logprobs[c0:c1])
                    cand_base += c1 - c0
                position_base += p1 - p0
                entry_base += e1 - e0
                sos.append(np.array([position_base], np.int64))
                fps.append(part.first_positions[b : b + 1])
                lens.append(part.lengths[b : b + 1])

        def cat(xs: Parts, dtype: Any) -> NDArray[Any]:
            return np.concatenate(xs).astype(dtype, copy=False) if xs else np.zeros(0, dtype)

        return Targets(
            cat(offs, np.int64),
            cat(ids, np.int64),
            cat(cs, np.int32),
            cat(lps, np.float32),
            cat(lses, np.float32),
            cat(sos, np.int64),
            cat(fps, np.int64),
            cat(lens, np.int64),
            k,
            token_logprobs=cat(tls, np.float32) if tokens else None,
            token_ranks=cat(trs, np.int32) if tokens else None,
            candidate_offsets=cat(coffs, np.int64) if cands else None,
            candidate_logprobs=cat(clps, np.float32) if cands else None,
        )
