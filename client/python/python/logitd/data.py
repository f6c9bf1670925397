"""Teacher targets as a PyTorch ``IterableDataset``, prefetched.

    ds = TeacherTargetsDataset(client, batches, depth=4, num_samples=256)
    for batch, targets in torch.utils.data.DataLoader(ds, batch_size=None):
        ...

Each item is one of the given batches with its teacher targets, fetched ahead by
``logitd.Prefetcher`` (the Rust prefetcher; the GIL is released while it waits).
Under ``torch.distributed`` (or with explicit ``rank``/``world_size``) each rank
fetches only the batches ``i`` with ``i % world_size == rank``, so the ranks'
batches are disjoint and together cover the input.

DataLoader workers: the prefetcher already fetches in background threads, so
``num_workers=0`` is the intended use. With ``num_workers > 0`` the batches are
split further between the workers (worker ``w`` of rank ``r`` takes the batches
``i`` of the rank with ``(i // world_size) % num_workers == w``); then
``client`` must be a zero-argument callable that makes a ``TeacherClient`` inside
the worker (a client's connections and runtime cannot cross a process boundary),
and the DataLoader should use ``multiprocessing_context="spawn"``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from .client import TeacherClient

__all__ = ["TeacherTargetsDataset", "shard_of"]

# The key under which a request carries its batch through the prefetcher.
_ORIGINAL = "_logitd_batch"


def shard_of(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Returns this process's (rank, world_size).

    (rank, world_size): the explicit values, else torch.distributed's when it is
    initialised, else (0, 1).
    """
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither (rank={rank}, world_size={world_size})")
    if rank is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    assert rank is not None and world_size is not None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size) for world_size {world_size}")
    return rank, world_size


class TeacherTargetsDataset(IterableDataset[Any]):
    """Batches with their teacher targets, prefetched, for a DataLoader.

    An ``IterableDataset`` of ``(batch, targets)``: each batch of ``batches`` (in
    any form ``TeacherClient.sample`` takes: a list of token-id lists, a list of
    numpy arrays, a padded 2-D array...) with its teacher targets, prefetched
    ``depth`` batches ahead with ``logitd.Prefetcher``.

    ``client``: a ``logitd.TeacherClient``, or a zero-argument callable returning one
    (needed for DataLoader workers, see the module docs).
    ``rank``/``world_size``: this process's share of the batches (default: from
    ``torch.distributed`` when initialised, else everything).
    ``transform``: optional ``f(batch, targets) -> item`` applied to each pair (e.g.
    to pad the targets and build the model's inputs), run in the iterating process.
    ``sample_options``: passed to the prefetcher (``num_samples``, ``temperature``,
    ``method``, ``token_logprobs``, ...; not ``candidates``, which the prefetcher
    does not send: ValueError); batch ``i`` of ``batches`` is sampled with seed
    ``seed + i`` (``seed`` defaults to 0; a Mapping batch's own ``"seed"`` wins),
    so its targets equal ``client.sample(batch, seed=seed + i, ...)`` whatever the
    rank, world size or worker that fetches it.

    ``batches`` is iterated once per epoch (``iter(ds)``); give a list (or another
    re-iterable) to iterate more than once. Use ``DataLoader(ds, batch_size=None)``:
    the items are already batches.
    """

    def __init__(
        self,
        client: TeacherClient | Callable[[], TeacherClient],
        batches: Iterable[Any],
        depth: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[Any, Any], Any] | None = None,
        **sample_options: Any,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.client = client
        self.batches = batches
        self.depth = depth
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.sample_options = sample_options
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither (rank={rank}, world_size={world_size})")
        if sample_options.get("candidates") is not None:
            raise ValueError(
                "TeacherTargetsDataset does not send candidate ids (its prefetcher cannot; candidates "
                "such as the student's top-k are known only at the training step): score them with "
                "TeacherClient.sample(..., candidates=...)"
            )

    def shard(self) -> tuple[int, int]:
        """(index, count): this iterator takes the batches ``i`` with ``i % count == index``."""
        rank, world_size = shard_of(self.rank, self.world_size)
        info = get_worker_info()
        if info is None:
            return rank, world_size
        # Worker w of rank r: i % world_size == r and (i // world_size) % num_workers == w.
        return rank + world_size * info.id, world_size * info.num_workers

    def _is_factory(self) -> bool:
        c = self.client
        return callable(c) and (isinstance(c, type) or not hasattr(c, "sample"))

    def _client(self) -> TeacherClient:
        if self._is_factory():
            return self.client()  # type: ignore[operator]
        if get_worker_info() is not None:
            raise RuntimeError(
                "TeacherTargetsDataset in a DataLoader worker needs client to be a zero-argument "
                "callable that makes the TeacherClient inside the worker (or use num_workers=0: "
                "the prefetcher already fetches in the background)"
            )
        if not hasattr(self.client, "sample"):
            raise TypeError(
                f"client must be a logitd.TeacherClient or a callable returning one, got {type(self.client)!r}"
            )
        return self.client  # type: ignore[return-value]

    def _numbered(self, index: int, count: int) -> Iterator[Mapping[str, Any]]:
        """Yields this shard's batches as request Mappings.

        This shard's batches, each as a request Mapping that carries its seed
        (``seed + i``, i the batch's index in ``batches``) and the batch itself.
        """
        base = int(self.sample_options.get("seed", 0))
        for i, batch in enumerate(itertools.islice(self.batches, index, None, count)):
            g = index + i * count  # the index in `batches`, the same for every world size
            if isinstance(batch, Mapping):
                request = dict(batch)
                request.setdefault("seed", base + g)
            else:
                request = {"input_ids": batch, "seed": base + g}
            request[_ORIGINAL] = batch
            yield request

    def __iter__(self) -> Iterator[Any]:
        from logitd import Prefetcher  # the extension; imported here to keep this module light

        index, count = self.shard()
        options = {k: v for k, v in self.sample_options.items() if k != "seed"}
        prefetcher = Prefetcher(self._client(), self._numbered(index, count), depth=self.depth, **options)
        try:
            for request, targets in prefetcher:
                batch = request[_ORIGINAL]
                yield (batch, targets) if self.transform is None else self.transform(batch, targets)
        finally:
            close = getattr(prefetcher, "close", None)
            if close is not None:
                close()
