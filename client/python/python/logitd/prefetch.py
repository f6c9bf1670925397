"""Targets of training batches fetched ahead, over one streaming call."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _native
from ._types import SamplingMethod, ValueEncoding
from ._validate import bounded_int, first_positions, flatten, num_samples_arg
from .client import TeacherClient
from .errors import InvalidArgument, LogitdError
from .targets import Targets

_NO_PREFETCH_CANDIDATES = (
    "the Prefetcher does not send candidate ids (the Rust prefetcher's batches carry "
    "none, and candidates such as the student's top-k are known only at the training "
    "step); score them with TeacherClient.sample(..., candidates=...)"
)


Request = tuple[NDArray[np.uint32], NDArray[np.int64], NDArray[np.int64], int]


def _prefetch_requests(
    batches: Iterator[Any], pending: collections.deque[Any], seed: int, first_position: Any
) -> Iterator[Request]:
    """Yields each batch as (flat ids, lengths, first positions, seed): the Prefetcher's source.

    The batch itself is queued in ``pending``. Runs on a runtime thread (with
    the GIL) when the Rust prefetcher pulls.
    """
    for i, batch in enumerate(batches):
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise InvalidArgument(f"batch {i} has no 'input_ids'")
            if batch.get("candidates") is not None:
                raise InvalidArgument(f"batch {i} has 'candidates': {_NO_PREFETCH_CANDIDATES}")
            flat, lens = flatten(batch["input_ids"], batch.get("lengths"), batch.get("attention_mask"))
            first = batch.get("first_position", first_position)
            batch_seed = batch.get("seed", seed + i)
        else:
            flat, lens = flatten(batch)
            first, batch_seed = first_position, seed + i
        if len(lens) == 0:
            raise InvalidArgument(f"batch {i} has no sequences: every batch needs at least one sequence of token ids")
        request = (flat, lens, first_positions(first, len(lens)), int(batch_seed) % 2**64)
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

    Args:
        client: The teacher (ClientClosed if it is closed).
        batches: The training batches, read ahead.
        depth: Batches in flight.
        num_samples: Draws per position (k); None (or 0) means the server's
            default, ``client.model_info().default_num_samples``.
        temperature: Softmax temperature; None means the server's default.
        seed: Batch i's seed is ``seed + i`` unless the batch names its own.
        first_position: The first position with targets, for the batch or per
            sequence (a Mapping batch's ``"first_position"`` wins).
        method: As in :meth:`TeacherClient.sample`.
        value_encoding: As in :meth:`TeacherClient.sample`.
        token_logprobs: As in :meth:`TeacherClient.sample`.
        candidates: Not supported: InvalidArgument unless None.
    """

    def __init__(
        self,
        client: TeacherClient,
        batches: Iterable[Any],
        depth: int = 4,
        *,
        num_samples: int | None = None,
        temperature: float | None = 1.0,
        seed: int = 0,
        first_position: int | Sequence[int] | Any = 0,
        method: SamplingMethod = "sample",
        value_encoding: ValueEncoding = "f32",
        token_logprobs: bool = False,
        candidates: Any = None,
    ) -> None:
        if candidates is not None:
            raise InvalidArgument(_NO_PREFETCH_CANDIDATES)
        self._pending: collections.deque[Any] = collections.deque()
        self._native = _native.NativePrefetcher(
            client._native,
            # Not a method: the runtime holds the generator, which must not hold
            # this object (a cycle through Rust that Python's GC cannot see).
            _prefetch_requests(
                iter(batches), self._pending, bounded_int("seed", seed, 2**64 - 1), first_position
            ),
            int(depth),
            num_samples=num_samples_arg(num_samples),
            temperature=None if temperature is None else float(temperature),
            method=method,
            value_encoding=value_encoding,
            token_logprobs=bool(token_logprobs),
        )

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[Any, Targets]:
        try:
            columns = self._native.next_targets()
        except LogitdError as e:
            if self._pending:
                e.batch = self._pending.popleft()
            raise
        return self._pending.popleft(), Targets(*columns)

    def close(self) -> None:
        """Stops fetching; batches in flight are dropped."""
        self._native.close()
        self._pending.clear()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
