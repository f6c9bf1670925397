"""TeacherTargetsDataset without a server: the sharding by rank and DataLoader
worker, option pass-through and the worker rules, with logitd.Prefetcher
replaced by a recording stand-in. (tests/test_distributed.py runs it for real.)"""

import pytest
import torch
from torch.utils.data import DataLoader

import logitd
from logitd.data import TeacherTargetsDataset, shard_of


class FakePrefetcher:
    """Like logitd.Prefetcher, takes Mappings with "input_ids" and "seed" (other
    keys ride along) and yields (batch, ("targets", input_ids, seed)) in order;
    records its arguments."""

    made = []

    def __init__(self, client, batches, depth=4, **options):
        FakePrefetcher.made.append((client, depth, options))
        self.batches = iter(batches)

    def __iter__(self):
        for b in self.batches:
            yield b, ("targets", b["input_ids"], b["seed"])


class FakeClient:
    def sample(self, *a, **kw):  # only its presence matters
        raise AssertionError("not called")


@pytest.fixture(autouse=True)
def fake_prefetcher(monkeypatch):
    FakePrefetcher.made = []
    monkeypatch.setattr(logitd, "Prefetcher", FakePrefetcher, raising=False)


BATCHES = [[[i, i + 1, i + 2]] for i in range(0, 110, 10)]  # 11 batches: uneven splits


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 12])
def test_ranks_take_disjoint_batches_whose_union_is_the_input(world_size):
    seen = []
    for rank in range(world_size):
        ds = TeacherTargetsDataset(FakeClient(), BATCHES, rank=rank, world_size=world_size)
        mine = [b for b, _ in ds]
        assert mine == BATCHES[rank::world_size]  # i % world_size == rank, in order
        seen += mine
    assert sorted(seen) == sorted(BATCHES) and len(seen) == len(BATCHES)


def test_options_and_depth_reach_the_prefetcher_and_targets_pair_with_batches():
    client = FakeClient()
    ds = TeacherTargetsDataset(client, BATCHES, depth=2, num_samples=16, seed=7, temperature=0.5)
    items = list(ds)
    assert [b for b, _ in items] == BATCHES  # the batches as given, not the requests
    assert [t for _, t in items] == [("targets", b, 7 + i) for i, b in enumerate(BATCHES)]
    assert FakePrefetcher.made == [(client, 2, {"num_samples": 16, "temperature": 0.5})]
    # A list is re-iterable: a second epoch sees the same batches.
    assert [b for b, _ in ds] == BATCHES


def test_transform_runs_on_each_pair():
    ds = TeacherTargetsDataset(FakeClient(), BATCHES, transform=lambda b, t: (len(b), t[0]))
    assert list(ds) == [(1, "targets")] * len(BATCHES)


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_batch_gets_the_seed_of_its_index_whatever_the_world_size(world_size):
    """Batch i is sampled with seed + i on whichever rank fetches it, so the
    targets do not depend on the world size; a Mapping batch's own seed wins."""
    batches = [{"input_ids": b, "note": i} for i, b in enumerate(BATCHES)]
    batches[4]["seed"] = 99
    for rank in range(world_size):
        ds = TeacherTargetsDataset(FakeClient(), batches, rank=rank, world_size=world_size, seed=100)
        for batch, (_, ids, seed) in ds:
            i = batch["note"]
            assert batch is batches[i] and ids == BATCHES[i]
            assert seed == (99 if i == 4 else 100 + i)


def test_without_torch_distributed_one_process_takes_everything():
    assert not torch.distributed.is_initialized()
    assert shard_of() == (0, 1)
    assert [b for b, _ in TeacherTargetsDataset(FakeClient(), BATCHES)] == BATCHES


def test_bad_shard_arguments_name_the_values():
    with pytest.raises(ValueError, match="rank=1, world_size=None"):
        TeacherTargetsDataset(FakeClient(), BATCHES, rank=1)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        list(TeacherTargetsDataset(FakeClient(), BATCHES, rank=2, world_size=2))
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        TeacherTargetsDataset(FakeClient(), BATCHES, depth=0)


def test_workers_need_a_client_factory():
    ds = TeacherTargetsDataset(FakeClient(), BATCHES)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(RuntimeError, match="zero-argument callable"):
        list(loader)


@pytest.mark.parametrize("world_size", [1, 2])
def test_workers_split_a_ranks_batches(world_size):
    """With a client factory, the workers of each rank split its batches."""
    seen = []
    for rank in range(world_size):
        ds = TeacherTargetsDataset(FakeClient, BATCHES, rank=rank, world_size=world_size)
        loader = DataLoader(ds, batch_size=None, num_workers=3, multiprocessing_context="fork")
        mine = [b for b, _ in loader]
        assert sorted(mine) == sorted(BATCHES[rank::world_size])
        seen += mine
    assert sorted(seen) == sorted(BATCHES) and len(seen) == len(BATCHES)
