"""Two processes under torch.distributed (gloo, CPU) iterate a
TeacherTargetsDataset against a real logitd server: they fetch disjoint batches
whose union is the whole input, and each batch comes with its own targets."""

import json
import socket

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

import logitd
from logitd.data import TeacherTargetsDataset

WORLD = 2
NUM_BATCHES = 7  # uneven: rank 0 gets 4, rank 1 gets 3
OPTIONS = dict(num_samples=16, seed=5)


def make_batches():
    """Batch i: 2 or 3 sequences of 3..9 random ids; the first id of its first
    sequence is 1000 + i, so a batch names itself."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(NUM_BATCHES):
        seqs = [rng.integers(0, 49152, size=int(rng.integers(3, 10))).tolist() for _ in range(2 + i % 2)]
        seqs[0][0] = 1000 + i
        out.append(seqs)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, endpoint, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        client = logitd.TeacherClient([endpoint])
        # rank and world_size come from torch.distributed here.
        ds = TeacherTargetsDataset(client, make_batches(), depth=2, **OPTIONS)
        got = []
        for batch, targets in DataLoader(ds, batch_size=None):
            padded = targets.padded()
            np.savez(
                f"{out_dir}/rank{rank}-batch{batch[0][0] - 1000}.npz",
                token_ids=padded.token_ids, counts=padded.counts, logprobs=padded.logprobs,
                mask=padded.mask, position_mask=padded.position_mask,
            )
            got.append({"batch": batch, "positions": padded.position_mask.sum(axis=1).tolist()})
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, got)
        if rank == 0:
            with open(f"{out_dir}/result.json", "w") as f:
                json.dump(everyone, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_fetch_disjoint_batches_covering_the_input(server, tmp_path):
    mp.spawn(rank_main, args=(server.uri, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = json.loads((tmp_path / "result.json").read_text())
    batches = make_batches()
    assert [len(r) for r in per_rank] == [4, 3]
    seen = []
    for rank, got in enumerate(per_rank):
        ids = [g["batch"][0][0] - 1000 for g in got]
        assert ids == list(range(rank, NUM_BATCHES, WORLD)), f"rank {rank} got batches {ids}"
        for g, i in zip(got, ids):
            assert g["batch"] == batches[i]
        seen += ids
    assert sorted(seen) == list(range(NUM_BATCHES))  # disjoint, and the union is everything

    # Each batch's targets are its own: batch i is sampled with seed 5 + i on
    # whichever rank fetches it, the same as one process fetching it alone.
    client = logitd.TeacherClient(server.uri)
    for rank, got in enumerate(per_rank):
        for g in got:
            i = g["batch"][0][0] - 1000
            saved = np.load(tmp_path / f"rank{rank}-batch{i}.npz")
            direct = client.sample(batches[i], num_samples=OPTIONS["num_samples"], seed=OPTIONS["seed"] + i).padded()
            for name in ("token_ids", "counts", "logprobs", "mask", "position_mask"):
                np.testing.assert_array_equal(saved[name], getattr(direct, name), err_msg=f"batch {i}: {name}")
            # ... and a returned position per token.
            assert g["positions"] == [len(s) for s in batches[i]]


def test_dataloader_workers_with_a_client_factory(server):
    """num_workers=2 (spawned): each worker makes its own client and takes every
    other batch; together they yield every batch once, each with the targets of
    its index's seed."""
    import functools

    batches = make_batches()
    ds = TeacherTargetsDataset(functools.partial(logitd.TeacherClient, server.uri), batches, depth=2, **OPTIONS)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = {}
    for batch, targets in loader:
        i = batch[0][0] - 1000
        assert i not in got
        got[i] = targets.padded()
    assert sorted(got) == list(range(NUM_BATCHES))
    client = logitd.TeacherClient(server.uri)
    for i, padded in got.items():
        direct = client.sample(batches[i], num_samples=OPTIONS["num_samples"], seed=OPTIONS["seed"] + i).padded()
        for name in ("token_ids", "counts", "logprobs", "mask"):
            np.testing.assert_array_equal(getattr(padded, name), getattr(direct, name), err_msg=f"batch {i}: {name}")
