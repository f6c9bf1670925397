"""Teacher targets on disk: the shards ``logitd-client dump`` writes.

Teacher targets on disk: the shards ``logitd-client dump`` writes, safetensors or,
with ``--format axolotl|distillkit``, Parquet in those trainers' columns (read back
through logitd's extra columns as the same targets).

    for targets in logitd.shards.read("targets/", batch_size=32):
        ...   # logitd.Targets, in corpus order, bit-identical to live targets

Format 1 shards hold the sampled targets; format 2 shards (``logitd-client dump
--token-logprobs``) also the on-policy columns, which come back as
``Targets.token_logprobs``/``token_ranks`` and, where a shard has them,
``candidate_offsets``/``candidate_logprobs`` (see :class:`logitd.Targets`).

Read by the Rust ``ShardReader``: every shard's metadata must agree (one run),
shards of several folders (the workers of a split dump) are read as one set
in sequence order, and a gap or an overlap between them is an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from . import _native

__all__ = ["read", "ShardReader"]


class ShardReader:
    """Teacher targets read back from shards, in corpus order.

    An iterator of :class:`logitd.Targets` of ``batch_size`` sequences each
    (the last may hold fewer), in corpus order. ``meta`` is what produced the
    targets (model_id, tokenizer_sha256, num_samples, temperature, seed, method,
    value_encoding); ``files`` the shard files in order. A reader thread
    decodes ahead; the sequence lengths are first_position + positions. The
    on-policy columns of format 2 shards come with the targets (None where
    the shards have none).
    """

    def __init__(self, dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], batch_size: int = 64):
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        self._native = _native.ShardIter([os.fspath(d) for d in dirs], int(batch_size))

    @property
    def meta(self) -> dict[str, Any]:
        """What produced the targets (model_id, tokenizer_sha256, num_samples, ...)."""
        return self._native.meta

    @property
    def files(self) -> list[str]:
        """The shard files, in order."""
        return [os.fspath(f) for f in self._native.files]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        from .targets import Targets

        return Targets(*self._native.next_targets())


def read(dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, batch_size: int = 64) -> ShardReader:
    """Returns a reader of the target set in ``dirs``.

    The target set in ``dirs`` (one folder or several) as an iterator of
    :class:`logitd.Targets`, ``batch_size`` sequences at a time. Raises
    :class:`logitd.ShardError` for a missing, damaged or mixed set.
    """
    return ShardReader(dirs, batch_size)
