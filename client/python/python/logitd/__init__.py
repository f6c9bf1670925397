"""logitd for Python trainers: sampled teacher targets from a logitd server.

The core is the Rust client crate (``logitd-client``) through PyO3: balancing
over several servers, retries with backoff, deadlines, the tokenizer check,
the streaming prefetcher and the shard reader. Replies arrive as numpy arrays
(no per-element Python objects); ``PaddedTargets.to_torch`` hands them to
PyTorch. Waiting calls release the GIL, and Ctrl-C interrupts them.

    import logitd
    teacher = logitd.TeacherClient("http://127.0.0.1:50051")
    targets = teacher.sample(input_ids, attention_mask=attention_mask, num_samples=64, seed=step)
    padded = targets.padded().to_torch(device)   # [B, T, K] ids, logprobs, counts, mask

On-policy distillation: the teacher's log p of the tokens the student sampled
(row t of sequence b scores token t + 1, like the student's logits), and at
ids of the caller's choosing, with no sampling at all:

    targets = teacher.sample(rollouts, first_position=prompt_lens - 1, method="none",
                             token_logprobs=True, candidates=student_topk_ids)
    p = targets.padded().to_torch(device)  # token_logprobs/token_mask [B, T], candidate_logprobs [B, T, C]
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import _native, errors, shards
from .errors import (
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LogitdError,
    MalformedTargets,
    PermissionDenied,
    ResourceExhausted,
    ShardError,
    TokenizerMismatch,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    VocabMismatch,
)

__version__ = _native.__version__

__all__ = [
    "TeacherClient",
    "Targets",
    "PaddedTargets",
    "Prefetcher",
    "sequence_seed",
    "shards",
    "errors",
]
__all__ += errors.__all__  # the typed exceptions, re-exported


def sequence_seed(batch_seed: int, index: int) -> int:
    """The seed sequence ``index`` of a batch with seed ``batch_seed`` is sent with
    (the Rust client's and ``logitd-client dump``'s derivation)."""
    return _native.sequence_seed(batch_seed, index)


# ---------------------------------------------------------------- targets


@dataclass(frozen=True, eq=False)
class PaddedTargets:
    """Dense, right-padded targets: row ``t`` of sequence ``b`` is the teacher's
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

    token_ids: Any
    logprobs: Any
    counts: Any
    mask: Any
    position_mask: Any
    num_samples: int
    token_logprobs: Any = None
    token_ranks: Any = None
    token_mask: Any = None
    candidate_logprobs: Any = None
    candidate_mask: Any = None

    def to_torch(self, device: Any = None) -> "PaddedTargets":
        """The same fields as torch tensors (same dtypes) on ``device``."""
        import torch  # imported here: the package works without torch

        def conv(a: Any) -> Any:
            if a is None:
                return None
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            return t if device is None else t.to(device, non_blocking=True)

        return PaddedTargets(
            token_ids=conv(self.token_ids),
            logprobs=conv(self.logprobs),
            counts=conv(self.counts),
            mask=conv(self.mask),
            position_mask=conv(self.position_mask),
            num_samples=self.num_samples,
            token_logprobs=conv(self.token_logprobs),
            token_ranks=conv(self.token_ranks),
            token_mask=conv(self.token_mask),
            candidate_logprobs=conv(self.candidate_logprobs),
            candidate_mask=conv(self.candidate_mask),
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
        offsets: np.ndarray,
        token_ids: np.ndarray,
        counts: np.ndarray,
        logprobs: np.ndarray,
        lse: np.ndarray,
        seq_offsets: np.ndarray,
        first_positions: np.ndarray,
        lengths: np.ndarray,
        num_samples: int,
        token_logprobs: np.ndarray | None = None,
        token_ranks: np.ndarray | None = None,
        candidate_offsets: np.ndarray | None = None,
        candidate_logprobs: np.ndarray | None = None,
    ):
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
        """The dense ``[B, T, K]`` form (see :class:`PaddedTargets`), T the
        longest sequence, K ``k_max`` or the most distinct ids of any position,
        C (candidates) ``c_max`` or the most candidates of any position.
        Raises ValueError naming the position when one has more than ``k_max``
        ids or ``c_max`` candidates."""
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
        if self.token_logprobs is not None:
            if len(self.token_logprobs) != p or len(self.token_ranks) != p:
                raise ValueError(
                    f"{len(self.token_logprobs)} token_logprobs and {len(self.token_ranks)} "
                    f"token_ranks for {p} positions"
                )
            real = np.asarray(self.token_ranks) > 0
            tl = np.zeros((b_max, t_max), np.float32)
            tr = np.zeros((b_max, t_max), np.int32)
            tm = np.zeros((b_max, t_max), np.bool_)
            tl[b[real], t[real]] = self.token_logprobs[real]
            tr[b[real], t[real]] = self.token_ranks[real]
            tm[b[real], t[real]] = True
            extra.update(token_logprobs=tl, token_ranks=tr, token_mask=tm)
        if self.candidate_offsets is not None:
            co = np.asarray(self.candidate_offsets, np.int64)
            n = len(self.candidate_logprobs)
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
            q = np.repeat(np.arange(p, dtype=np.int64), widths)
            j = np.arange(n, dtype=np.int64) - co[q]
            cl = np.zeros((b_max, t_max, c), np.float32)
            cm = np.zeros((b_max, t_max, c), np.bool_)
            cl[b[q], t[q], j] = self.candidate_logprobs
            cm[b[q], t[q], j] = True
            extra.update(candidate_logprobs=cl, candidate_mask=cm)
        return PaddedTargets(ids, lp, counts, mask, pos, self.num_samples, **extra)

    def sequence(self, b: int) -> "Targets":
        """Sequence ``b`` alone (views, offsets rebased)."""
        if not -len(self) <= b < len(self):
            raise IndexError(f"sequence {b} of {len(self)}")
        return Targets.concat([self], _select=[b % len(self)])

    @staticmethod
    def concat(parts: Sequence["Targets"], _select: Sequence[int] | None = None) -> "Targets":
        """The sequences of several Targets (same num_samples) as one. The
        on-policy columns must be in every part or in none."""
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
        offs, ids, cs, lps, lses, sos, fps, lens = [np.zeros(1, np.int64)], [], [], [], [], [np.zeros(1, np.int64)], [], []
        tls, trs, coffs, clps = [], [], [np.zeros(1, np.int64)], []
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
                if tokens:
                    tls.append(part.token_logprobs[p0:p1])
                    trs.append(part.token_ranks[p0:p1])
                if cands:
                    c0, c1 = int(part.candidate_offsets[p0]), int(part.candidate_offsets[p1])
                    coffs.append(part.candidate_offsets[p0 + 1 : p1 + 1] - c0 + cand_base)
                    clps.append(part.candidate_logprobs[c0:c1])
                    cand_base += c1 - c0
                position_base += p1 - p0
                entry_base += e1 - e0
                sos.append(np.array([position_base], np.int64))
                fps.append(part.first_positions[b : b + 1])
                lens.append(part.lengths[b : b + 1])

        def cat(xs: list, dtype: Any) -> np.ndarray:
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


def _targets(columns: tuple) -> Targets:
    return Targets(*columns)


# ---------------------------------------------------------------- inputs


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like: numpy, torch tensors (any device), lists."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_ids(flat: np.ndarray, what: str) -> np.ndarray:
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise InvalidArgument(f"{what} must be integers, got dtype {flat.dtype}")
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0:
            raise InvalidArgument(f"token id {lo} in {what} is negative")
        if hi >= 2**32:
            raise InvalidArgument(f"token id {hi} in {what} does not fit in 32 bits")
    return np.ascontiguousarray(flat, dtype=np.uint32)


def _bounded_int(name: str, value: Any, hi: int) -> int:
    """``value`` as an int in 0..=hi, or InvalidArgument naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if not 0 <= v <= hi:
        raise InvalidArgument(f"{name} = {v} is outside 0..={hi}")
    return v


_TEXT_HINT = (
    "logitd takes token ids, not text: tokenize first with the teacher's tokenizer, "
    "e.g. tokenizer(texts)[\"input_ids\"]"
)


def _flatten(
    sequences: Any, lengths: Any = None, attention_mask: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a batch as (flat uint32 ids, int64 lengths).

    ``sequences``: a list of lists / 1-D arrays, or a 2-D array (numpy, torch,
    anything with ``__array__``) whose rows are right-padded to a common
    length and cut by ``lengths`` or a right-padded ``attention_mask`` (without
    either, every row is a whole sequence)."""
    if isinstance(sequences, (str, bytes)):
        raise InvalidArgument(f"sequences is {type(sequences).__name__}: {_TEXT_HINT}")
    two_d = isinstance(sequences, np.ndarray) or hasattr(sequences, "__array__") or type(
        sequences
    ).__module__.startswith("torch")
    if two_d:
        arr = _as_numpy(sequences)
        if arr.ndim != 2:
            raise InvalidArgument(
                f"a padded batch must be 2-D [batch, length], got shape {arr.shape}"
            )
        b, t = arr.shape
        if lengths is not None and attention_mask is not None:
            raise InvalidArgument("give lengths or attention_mask, not both")
        if attention_mask is not None:
            mask = _as_numpy(attention_mask)
            if mask.shape != arr.shape:
                raise InvalidArgument(
                    f"attention_mask has shape {mask.shape}, the batch {arr.shape}"
                )
            mask = mask.astype(bool, copy=False)
            lens = mask.sum(axis=1).astype(np.int64)
            right = np.arange(t)[None, :] < lens[:, None]
            bad = np.nonzero((mask != right).any(axis=1))[0]
            if bad.size:
                raise InvalidArgument(
                    f"attention_mask row {int(bad[0])} is not right-padded (ones, then zeros)"
                )
            return _check_ids(arr[mask], "sequences"), lens
        if lengths is not None:
            lens = _as_numpy(lengths).astype(np.int64).reshape(-1)
            if lens.shape != (b,):
                raise InvalidArgument(f"{lens.size} lengths for {b} sequences")
            if lens.size and (lens.min() < 0 or lens.max() > t):
                bad = int(lens[(lens < 0) | (lens > t)][0])
                raise InvalidArgument(f"length {bad} is outside 0..={t}")
            mask = np.arange(t)[None, :] < lens[:, None]
            return _check_ids(arr[mask], "sequences"), lens
        return _check_ids(arr.reshape(-1), "sequences"), np.full(b, t, np.int64)
    if lengths is not None or attention_mask is not None:
        raise InvalidArgument("lengths and attention_mask go with a padded 2-D batch only")
    sequences = list(sequences)
    for i, seq in enumerate(sequences):
        if isinstance(seq, (str, bytes)):
            raise InvalidArgument(f"sequence {i} is {type(seq).__name__}: {_TEXT_HINT}")
    rows = [_as_numpy(s) for s in sequences]
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise InvalidArgument(f"sequence {i} has shape {r.shape}, expected 1-D")
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise InvalidArgument(f"sequence {i} must be integers, got dtype {r.dtype}")
    lens = np.fromiter((r.size for r in rows), np.int64, len(rows))
    flat = np.concatenate([r.astype(np.int64, copy=False) for r in rows]) if rows else np.zeros(0, np.int64)
    return _check_ids(flat, "sequences"), lens


def _first_positions(first_position: Any, batch: int) -> np.ndarray:
    f = np.asarray(_as_numpy(first_position) if not isinstance(first_position, int) else first_position)
    if f.ndim == 0:
        f = np.full(batch, int(f), np.int64)
    f = f.astype(np.int64, copy=False).reshape(-1)
    if f.shape != (batch,):
        raise InvalidArgument(f"{f.size} first positions for {batch} sequences")
    if f.size and f.min() < 0:
        raise InvalidArgument(f"first_position {int(f.min())} is negative")
    return np.ascontiguousarray(f)


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "__array__") or type(x).__module__.startswith("torch")


def _candidate_row(row: Any, b: int, t: int) -> np.ndarray:
    """The candidate ids of position t of sequence b as a 1-D int64 array."""
    if row is None:
        return np.zeros(0, np.int64)
    r = _as_numpy(row)
    if r.ndim != 1:
        raise InvalidArgument(
            f"candidates of sequence {b}, position {t}: expected a list of ids, got shape {r.shape}"
        )
    if r.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(r.dtype, np.integer):
        raise InvalidArgument(
            f"candidates of sequence {b}, position {t} must be integers, got dtype {r.dtype}"
        )
    return r.astype(np.int64, copy=False)


def _candidate_ids(
    ids: np.ndarray, offsets: np.ndarray, first: np.ndarray, returned: np.ndarray
) -> np.ndarray:
    """Candidate ids (int64, CSR by ``offsets`` over the returned positions) as
    uint32; an error names the sequence and position of the first bad id."""
    bad = np.nonzero((ids < 0) | (ids >= 2**32))[0]
    if bad.size:
        i = int(bad[0])
        v = int(ids[i])
        q = int(np.searchsorted(offsets, i, side="right")) - 1
        starts = np.concatenate([[0], np.cumsum(returned)])
        b = int(np.searchsorted(starts, q, side="right")) - 1
        t = int(first[b]) + q - int(starts[b])
        why = "is negative" if v < 0 else "does not fit in 32 bits"
        raise InvalidArgument(f"candidates of sequence {b}, position {t}: id {v} {why}")
    return np.ascontiguousarray(ids, dtype=np.uint32)


def _candidates(candidates: Any, lens: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids in the layout of the padded targets (row t of sequence b:
    the ids whose log p the teacher gives at position t) as the CSR the native
    client sends: (int64 offsets over the batch's returned positions, uint32 ids).

    Forms: an int array / tensor ``[B, T, C]`` (T at least every sequence's
    length; C ids at every position), or a list with one entry per sequence,
    each None (no candidates), an int array ``[L_b, C_b]`` or a list of
    ``L_b`` per-position lists of ids (any number each, None = none), L_b the
    sequence's length. Rows before ``first_position`` and (for ``[B, T, C]``)
    rows past a sequence's end are not sent and may hold anything."""
    batch = len(lens)
    returned = np.maximum(lens - first, 0)
    if _is_array(candidates):
        arr = _as_numpy(candidates)
        if arr.ndim != 3:
            raise InvalidArgument(
                f"candidates as one array must be [batch, length, candidates], got shape {arr.shape}"
            )
        if arr.shape[0] != batch:
            raise InvalidArgument(f"candidates has shape {arr.shape} but the batch has {batch} sequences")
        short = np.nonzero(lens > arr.shape[1])[0]
        if short.size:
            b = int(short[0])
            raise InvalidArgument(
                f"candidates has {arr.shape[1]} rows (shape {arr.shape}) but sequence {b} has "
                f"{int(lens[b])} tokens (row t holds the candidate ids of position t)"
            )
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InvalidArgument(f"candidates must be integers, got dtype {arr.dtype}")
        c = arr.shape[2]
        t = np.arange(arr.shape[1])[None, :]
        sent = (t >= first[:, None]) & (t < lens[:, None])
        rows = arr[sent].astype(np.int64, copy=False).reshape(-1)  # [P * C], sequence by sequence
        offsets = np.arange(int(returned.sum()) + 1, dtype=np.int64) * c
        return offsets, _candidate_ids(rows, offsets, first, returned)
    if isinstance(candidates, (str, bytes, Mapping)) or not hasattr(candidates, "__len__"):
        raise InvalidArgument(
            f"candidates must be an int array [batch, length, candidates] or a list with one entry "
            f"per sequence, got {type(candidates).__name__}"
        )
    if len(candidates) != batch:
        raise InvalidArgument(f"{len(candidates)} candidate lists for {batch} sequences")
    widths: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    for b, per in enumerate(candidates):
        f, n = int(first[b]), int(lens[b])
        if per is None:
            widths.append(np.zeros(int(returned[b]), np.int64))
            continue
        if _is_array(per):
            a = _as_numpy(per)
            if a.ndim != 2:
                raise InvalidArgument(
                    f"candidates of sequence {b}: expected [length, candidates] or a list of "
                    f"per-position id lists, got shape {a.shape}"
                )
            if a.shape[0] != n:
                raise InvalidArgument(
                    f"candidates of sequence {b} have {a.shape[0]} rows but the sequence has {n} "
                    f"tokens (row t holds the candidate ids of position t; rows before "
                    f"first_position {f} are not sent)"
                )
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise InvalidArgument(f"candidates of sequence {b} must be integers, got dtype {a.dtype}")
            a = a[f:n].astype(np.int64, copy=False)
            widths.append(np.full(a.shape[0], a.shape[1], np.int64))
            parts.append(a.reshape(-1))
            continue
        if isinstance(per, (str, bytes)) or not hasattr(per, "__len__"):
            raise InvalidArgument(
                f"candidates of sequence {b}: expected a list of per-position id lists, got "
                f"{type(per).__name__}"
            )
        if len(per) != n:
            raise InvalidArgument(
                f"candidates of sequence {b} have {len(per)} rows but the sequence has {n} "
                f"tokens (row t holds the candidate ids of position t; rows before "
                f"first_position {f} are not sent)"
            )
        rows = [_candidate_row(per[t], b, t) for t in range(f, n)]
        widths.append(np.fromiter((r.size for r in rows), np.int64, len(rows)))
        parts.extend(rows)
    w = np.concatenate(widths) if widths else np.zeros(0, np.int64)
    offsets = np.zeros(len(w) + 1, np.int64)
    np.cumsum(w, out=offsets[1:])
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return offsets, _candidate_ids(flat, offsets, first, returned)


def _endpoints(endpoints: str | Sequence[str], tls: bool) -> list[str]:
    if isinstance(endpoints, (str, os.PathLike)):
        endpoints = [str(endpoints)]
    out = []
    for e in endpoints:
        e = str(e)
        if "://" not in e:
            e = ("https://" if tls else "http://") + e
        out.append(e)
    if not out:
        raise ConfigError("no endpoints")
    return out


# ---------------------------------------------------------------- client


class TeacherClient:
    """A logitd teacher: one or several servers behind one balanced channel.

    Args:
        endpoints: a URI (``"http://10.0.0.7:50051"``; ``"host:port"`` means
            http, or https with ``tls``) or a list of them, balanced per call.
        bearer_token: sent as ``authorization: Bearer <token>``.
        tls: None (plaintext), the path of a PEM CA certificate the server's
            certificate must chain to, or a dict with ``ca`` (path), ``domain``
            (the name to verify instead of the endpoint's host), ``cert`` and
            ``key`` (paths of a client certificate for mutual TLS).
        expect_tokenizer_sha256: refuse (TokenizerMismatch) a server with
            another tokenizer digest.
        expect_vocab_size: refuse (VocabMismatch) a server with another
            vocabulary size.
        timeout_s: the deadline of each call (DeadlineExceeded after it).
        max_attempts: attempts per call; UNAVAILABLE, RESOURCE_EXHAUSTED and
            broken connections are retried with jittered exponential backoff.

    Connecting fetches the server's ModelInfo (with retries) and runs the checks.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        bearer_token: str | None = None,
        tls: str | os.PathLike | Mapping[str, str] | None = None,
        expect_tokenizer_sha256: str | None = None,
        expect_vocab_size: int | None = None,
        timeout_s: float = 60.0,
        max_attempts: int = 8,
        max_sequences_per_request: int = 64,
        max_concurrent_requests: int = 8,
    ):
        if isinstance(tls, bool):
            raise ConfigError(
                "tls=True: give the path of the CA certificate (or a dict with ca/domain/cert/key)"
            )
        if tls is None:
            tls_args: dict[str, str | None] = {}
        elif isinstance(tls, Mapping):
            unknown = set(tls) - {"ca", "domain", "cert", "key"}
            if unknown:
                raise ConfigError(f"unknown tls keys {sorted(unknown)} (ca, domain, cert, key)")
            tls_args = {f"tls_{k}": (None if v is None else os.fspath(v)) for k, v in tls.items()}
        else:
            tls_args = {"tls_ca": os.fspath(tls)}
        self._native = _native.Client(
            _endpoints(endpoints, tls is not None),
            bearer_token=bearer_token,
            expect_tokenizer_sha256=expect_tokenizer_sha256,
            expect_vocab_size=expect_vocab_size,
            timeout_s=float(timeout_s),
            max_attempts=int(max_attempts),
            max_sequences_per_request=int(max_sequences_per_request),
            max_concurrent_requests=int(max_concurrent_requests),
            **tls_args,
        )

    def model_info(self) -> dict[str, Any]:
        """What the server reported on connect: ``model_id``, ``architecture``,
        ``vocab_size``, ``max_seq_len``, ``dtype``, ``device``,
        ``tokenizer_sha256``, ``default_num_samples``, ``max_num_samples``,
        ``max_candidates`` (most candidate ids per position)."""
        return self._native.model_info()

    def sample(
        self,
        sequences: Any,
        *,
        num_samples: int = 256,
        temperature: float | None = 1.0,
        seed: int = 0,
        first_position: int | Sequence[int] = 0,
        method: str = "sample",
        value_encoding: str = "f32",
        lengths: Any = None,
        attention_mask: Any = None,
        token_logprobs: bool = False,
        candidates: Any = None,
    ) -> Targets:
        """Teacher targets of every position from ``first_position`` on of each sequence.

        ``sequences``: a list of lists or 1-D arrays of token ids, or a padded
        2-D array / tensor with ``lengths`` or a right-padded
        ``attention_mask``. ``num_samples``: draws per position (k; 0 = the
        server default). ``seed``: the batch seed; sequence b is sampled with
        ``sequence_seed(seed, b)``, so results do not depend on how the batch
        is split into requests. ``method``: ``"sample"`` (i.i.d. draws),
        ``"top_k"`` (the k most likely ids, by descending logprob, counts 1)
        or ``"none"`` (no ids at all: scoring alone, with ``token_logprobs``
        and/or ``candidates``; ``num_samples`` is ignored and the targets'
        is 0). ``value_encoding``: ``"f32"``, ``"f16"`` or ``"bf16"`` on the
        wire (decoded to float32; token and candidate log-probabilities are
        always f32). Large batches are split into concurrent requests and
        reassembled in order.

        On-policy scoring (see :class:`Targets` and :class:`PaddedTargets`):

        - ``token_logprobs=True``: the teacher's log p and rank of the realised
          next token at every returned position (position t scores token t + 1).
        - ``candidates``: ids whose teacher log p to return, in the layout of
          the padded targets: row ``t`` of sequence ``b`` holds the ids for
          position ``t`` (the distribution of token ``t + 1``), e.g. the
          student's top-k, ``student_logits.topk(c).indices``. Either one int
          array / tensor ``[B, T, C]`` (T at least every sequence's length, C
          ids at every position), or a list with one entry per sequence: None
          (none), an int array ``[L_b, C_b]``, or a list of ``L_b``
          per-position lists of ids (any number each, None or ``[]`` for none),
          ``L_b`` the sequence's length. Only rows from ``first_position`` to
          the sequence's end are sent; the others may hold anything (e.g.
          padding). Ids may repeat and come in any order; at most
          ``model_info()["max_candidates"]`` per position, each below the
          vocabulary size. Errors (InvalidArgument) name the sequence, the
          position and the value.
        """
        flat, lens = _flatten(sequences, lengths, attention_mask)
        if len(lens) == 0:
            raise InvalidArgument("no sequences: sample() needs at least one sequence of token ids")
        num_samples = _bounded_int("num_samples", num_samples, 2**32 - 1)
        seed = _bounded_int("seed", seed, 2**64 - 1)
        first = _first_positions(first_position, len(lens))
        cand_offsets = cand_ids = None
        if candidates is not None:
            cand_offsets, cand_ids = _candidates(candidates, lens, first)
        return _targets(
            self._native.sample(
                flat,
                lens,
                first,
                num_samples=int(num_samples),
                temperature=None if temperature is None else float(temperature),
                seed=int(seed),
                method=method,
                value_encoding=value_encoding,
                token_logprobs=bool(token_logprobs),
                candidate_offsets=cand_offsets,
                candidate_ids=cand_ids,
            )
        )


# ---------------------------------------------------------------- prefetcher


_NO_PREFETCH_CANDIDATES = (
    "the Prefetcher does not send candidate ids (the Rust prefetcher's batches carry "
    "none, and candidates such as the student's top-k are known only at the training "
    "step); score them with TeacherClient.sample(..., candidates=...)"
)


def _prefetch_requests(
    batches: Iterator[Any], pending: collections.deque, seed: int, first_position: Any
) -> Iterator[tuple]:
    """The Prefetcher's source: each batch as (flat ids, lengths, first positions,
    seed), the batch itself queued in `pending`. Runs on a runtime thread (with
    the GIL) when the Rust prefetcher pulls."""
    for i, batch in enumerate(batches):
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise InvalidArgument(f"batch {i} has no 'input_ids'")
            if batch.get("candidates") is not None:
                raise InvalidArgument(f"batch {i} has 'candidates': {_NO_PREFETCH_CANDIDATES}")
            flat, lens = _flatten(batch["input_ids"], batch.get("lengths"), batch.get("attention_mask"))
            first = batch.get("first_position", first_position)
            batch_seed = batch.get("seed", seed + i)
        else:
            flat, lens = _flatten(batch)
            first, batch_seed = first_position, seed + i
        request = (flat, lens, _first_positions(first, len(lens)), int(batch_seed) % 2**64)
        pending.append(batch)
        yield request


class Prefetcher:
    """Targets of training batches fetched ahead, over one streaming call.

    Iterating yields ``(batch, targets)`` in the order of ``batches``, with
    ``depth`` batches in flight: the source is read ahead by at most
    ``depth + 1`` batches. A batch is anything ``TeacherClient.sample`` takes
    as ``sequences``, or a Mapping with ``"input_ids"`` and optionally
    ``"attention_mask"``, ``"lengths"``, ``"first_position"`` and ``"seed"``
    (other keys ride along). Batch i is sampled with seed ``batch["seed"]``
    or ``seed + i``. UNAVAILABLE / RESOURCE_EXHAUSTED reopen the stream and
    re-send (a restarting server); any other failure raises its typed
    exception (``exc.batch`` is the batch) from ``next()`` for that batch only,
    and iterating may go on. An exception raised by ``batches`` itself comes
    after the batches before it. The GIL is released while waiting.

    ``token_logprobs=True`` and ``method="none"`` work as in
    :meth:`TeacherClient.sample`. Candidate ids are not supported here: a
    ``candidates`` argument, or a Mapping batch with a ``"candidates"`` entry,
    raises InvalidArgument (use ``TeacherClient.sample(..., candidates=...)``).
    """

    def __init__(
        self,
        client: TeacherClient,
        batches: Iterable[Any],
        depth: int = 4,
        *,
        num_samples: int = 256,
        temperature: float | None = 1.0,
        seed: int = 0,
        first_position: int | Sequence[int] = 0,
        method: str = "sample",
        value_encoding: str = "f32",
        token_logprobs: bool = False,
        candidates: Any = None,
    ):
        if candidates is not None:
            raise InvalidArgument(_NO_PREFETCH_CANDIDATES)
        self._pending: collections.deque = collections.deque()
        self._native = _native.NativePrefetcher(
            client._native,
            # Not a method: the runtime holds the generator, which must not hold
            # this object (a cycle through Rust that Python's GC cannot see).
            _prefetch_requests(iter(batches), self._pending, _bounded_int("seed", seed, 2**64 - 1),
                               first_position),
            int(depth),
            num_samples=_bounded_int("num_samples", num_samples, 2**32 - 1),
            temperature=None if temperature is None else float(temperature),
            method=method,
            value_encoding=value_encoding,
            token_logprobs=bool(token_logprobs),
        )

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[Any, Targets]:
        try:
            columns = self._native.next_targets()
        except LogitdError as e:
            if self._pending:
                e.batch = self._pending.popleft()
            raise
        return self._pending.popleft(), _targets(columns)

    def close(self) -> None:
        """Stops fetching; batches in flight are dropped."""
        self._native.close()
        self._pending.clear()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
