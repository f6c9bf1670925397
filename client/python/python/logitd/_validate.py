"""Checks and conversions of the caller's arguments, before anything is sent.

Every mistake raises :class:`logitd.errors.InvalidArgument` (or ConfigError)
naming the value and saying what to do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError, InvalidArgument


def as_numpy(x: Any) -> np.ndarray:
    """Numpy view of an array-like: numpy, torch tensors (any device), lists."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def is_text(dtype: np.dtype[Any]) -> bool:
    """Whether an array of this dtype holds text (str or bytes), not ids."""
    return dtype.kind in "US"


def check_ids(flat: NDArray[Any], what: str) -> NDArray[np.uint32]:
    """Token ids (any integer dtype) as contiguous uint32, or InvalidArgument naming the bad one."""
    if is_text(flat.dtype):
        raise InvalidArgument(f"{what} hold text (dtype {flat.dtype}): {TEXT_HINT}")
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise InvalidArgument(f"{what} must be integers, got dtype {flat.dtype}")
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0:
            raise InvalidArgument(f"token id {lo} in {what} is negative")
        if hi >= 2**32:
            raise InvalidArgument(f"token id {hi} in {what} does not fit in 32 bits")
    return np.ascontiguousarray(flat, dtype=np.uint32)


def bounded_int(name: str, value: Any, hi: int, hint: str = "") -> int:
    """Returns ``value`` as an int in ``0..=hi``, or raises InvalidArgument naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__} {value!r}{hint}")
    v = int(value)
    if not 0 <= v <= hi:
        raise InvalidArgument(f"{name} = {v} is outside 0..={hi}{hint}")
    return v


def num_samples_arg(num_samples: int | None) -> int:
    """Returns the wire's ``num_samples``: None means the server's default, sent as 0."""
    if num_samples is None:
        return 0
    return bounded_int(
        "num_samples",
        num_samples,
        2**32 - 1,
        " (draws per position; None for the server's default_num_samples)",
    )


TEXT_HINT = (
    "logitd takes token ids, not text: tokenize first with the teacher's tokenizer, "
    "e.g. tokenizer(texts)[\"input_ids\"]"
)


def flatten(
    sequences: Any, lengths: Any = None, attention_mask: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a batch as (flat uint32 ids, int64 lengths).

    ``sequences``: a list of lists / 1-D arrays, or a 2-D array (numpy, torch,
    anything with ``__array__``) whose rows are right-padded to a common
    length and cut by ``lengths`` or a right-padded ``attention_mask`` (without
    either, every row is a whole sequence).
    """
    if isinstance(sequences, (str, bytes)):
        raise InvalidArgument(f"sequences is {type(sequences).__name__}: {TEXT_HINT}")
    two_d = isinstance(sequences, np.ndarray) or hasattr(sequences, "__array__") or type(
        sequences
    ).__module__.startswith("torch")
    if two_d:
        arr = as_numpy(sequences)
        if arr.ndim != 2:
            raise InvalidArgument(
                f"a padded batch must be 2-D [batch, length], got shape {arr.shape}"
            )
        b, t = arr.shape
        if lengths is not None and attention_mask is not None:
            raise InvalidArgument("give lengths or attention_mask, not both")
        if attention_mask is not None:
            mask = as_numpy(attention_mask)
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
            return check_ids(arr[mask], "sequences"), lens
        if lengths is not None:
            lens = as_numpy(lengths).astype(np.int64).reshape(-1)
            if lens.shape != (b,):
                raise InvalidArgument(f"{lens.size} lengths for {b} sequences")
            if lens.size and (lens.min() < 0 or lens.max() > t):
                bad_len = int(lens[(lens < 0) | (lens > t)][0])
                raise InvalidArgument(f"length {bad_len} is outside 0..={t}")
            keep = np.arange(t)[None, :] < lens[:, None]
            return check_ids(arr[keep], "sequences"), lens
        return check_ids(arr.reshape(-1), "sequences"), np.full(b, t, np.int64)
    if lengths is not None or attention_mask is not None:
        raise InvalidArgument("lengths and attention_mask go with a padded 2-D batch only")
    sequences = list(sequences)
    for i, seq in enumerate(sequences):
        if isinstance(seq, (str, bytes)):
            raise InvalidArgument(f"sequence {i} is {type(seq).__name__}: {TEXT_HINT}")
    rows = [as_numpy(s) for s in sequences]
    for i, r in enumerate(rows):
        if is_text(r.dtype):
            raise InvalidArgument(f"sequence {i} holds text (dtype {r.dtype}): {TEXT_HINT}")
        if r.ndim != 1:
            raise InvalidArgument(f"sequence {i} has shape {r.shape}, expected 1-D")
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise InvalidArgument(f"sequence {i} must be integers, got dtype {r.dtype}")
    lens = np.fromiter((r.size for r in rows), np.int64, len(rows))
    flat = np.concatenate([r.astype(np.int64, copy=False) for r in rows]) if rows else np.zeros(0, np.int64)
    return check_ids(flat, "sequences"), lens


def first_positions(first_position: Any, batch: int) -> np.ndarray:
    f = np.asarray(as_numpy(first_position) if not isinstance(first_position, int) else first_position)
    if f.ndim == 0:
        f = np.full(batch, int(f), np.int64)
    f = f.astype(np.int64, copy=False).reshape(-1)
    if f.shape != (batch,):
        raise InvalidArgument(f"{f.size} first positions for {batch} sequences")
    if f.size and f.min() < 0:
        raise InvalidArgument(f"first_position {int(f.min())} is negative")
    return np.ascontiguousarray(f)


def is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "__array__") or type(x).__module__.startswith("torch")


def candidate_row(row: Any, b: int, t: int) -> np.ndarray:
    """The candidate ids of position t of sequence b as a 1-D int64 array."""
    if row is None:
        return np.zeros(0, np.int64)
    r = as_numpy(row)
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


def candidate_ids(
    ids: np.ndarray, offsets: np.ndarray, first: np.ndarray, returned: np.ndarray
) -> np.ndarray:
    """Returns candidate ids as uint32, or InvalidArgument naming the first bad one.

    Candidate ids (int64, CSR by ``offsets`` over the returned positions) as
    uint32; an error names the sequence and position of the first bad id.
    """
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


def candidates_csr(candidates: Any, lens: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns candidate ids as the CSR the native client sends.

    Candidate ids in the layout of the padded targets (row t of sequence b:
    the ids whose log p the teacher gives at position t) as the CSR the native
    client sends: (int64 offsets over the batch's returned positions, uint32 ids).

    Forms: an int array / tensor ``[B, T, C]`` (T at least every sequence's
    length; C ids at every position), or a list with one entry per sequence,
    each None (no candidates), an int array ``[L_b, C_b]`` or a list of
    ``L_b`` per-position lists of ids (any number each, None = none), L_b the
    sequence's length. Rows before ``first_position`` and (for ``[B, T, C]``)
    rows past a sequence's end are not sent and may hold anything.
    """
    batch = len(lens)
    returned = np.maximum(lens - first, 0)
    if is_array(candidates):
        arr = as_numpy(candidates)
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
        return offsets, candidate_ids(rows, offsets, first, returned)
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
        if is_array(per):
            a = as_numpy(per)
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
        per_position = [candidate_row(per[t], b, t) for t in range(f, n)]
        widths.append(np.fromiter((r.size for r in per_position), np.int64, len(per_position)))
        parts.extend(per_position)
    w = np.concatenate(widths) if widths else np.zeros(0, np.int64)
    offsets = np.zeros(len(w) + 1, np.int64)
    np.cumsum(w, out=offsets[1:])
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return offsets, candidate_ids(flat, offsets, first, returned)


def endpoint_uris(endpoints: str | os.PathLike[str] | Sequence[str], tls: bool) -> list[str]:
    """Returns the endpoints as URIs: ``host:port`` gets ``http://`` (``https://`` with TLS)."""
    if isinstance(endpoints, (str, os.PathLike)):
        endpoints = [os.fspath(endpoints)]
    out = []
    for e in endpoints:
        e = str(e)
        if "://" not in e:
            e = ("https://" if tls else "http://") + e
        out.append(e)
    if not out:
        raise ConfigError("no endpoints")
    return out

