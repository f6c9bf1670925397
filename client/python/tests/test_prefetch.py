"""logitd.Prefetcher: order, equality with unary calls, the depth + 1 bound,
errors on their own batch, and a source that raises."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import sequences

import logitd


def same(a: logitd.Targets, b: logitd.Targets) -> None:
    for f in ("offsets", "token_ids", "counts", "lse", "seq_offsets", "first_positions", "lengths"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    np.testing.assert_array_equal(a.logprobs.view(np.uint32), b.logprobs.view(np.uint32))


def test_batches_come_back_in_order_with_the_unary_targets(client):
    batches = [sequences(3 + i % 4, salt=i) for i in range(12)]
    got = list(logitd.Prefetcher(client, iter(batches), depth=3, num_samples=32, seed=100))
    assert [b for b, _ in got] == batches, "order kept, batches handed back as given"
    for i, (batch, t) in enumerate(got):
        same(t, client.sample(batch, num_samples=32, seed=100 + i))


def test_mapping_batches_with_mask_and_seed(client):
    seqs = sequences(4, salt=9)
    lengths = np.array([len(s) for s in seqs])
    ids = np.zeros((4, lengths.max()), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    batch = {"input_ids": ids, "attention_mask": mask, "seed": 42, "labels": "carried"}
    [(b, t)] = list(logitd.Prefetcher(client, [batch], num_samples=16))
    assert b is batch
    same(t, client.sample(seqs, num_samples=16, seed=42))


@pytest.mark.parametrize("depth", [1, 4])
def test_at_most_depth_plus_one_batches_are_read_ahead(client, depth):
    pulled = [0]

    def source():
        for i in range(depth + 8):
            pulled[0] += 1
            yield sequences(2, salt=i)

    total = depth + 8
    ahead = []
    with logitd.Prefetcher(client, source(), depth=depth, num_samples=8) as p:
        for consumed, _ in enumerate(p, start=1):
            # A slow training step: the prefetcher fills up meanwhile. Wait (with a
            # deadline) until it has read depth + 1 ahead or the source is done,
            # then a little longer to catch it reading more.
            want = min(depth + 1, total - consumed)
            deadline = time.monotonic() + 60
            while pulled[0] - consumed < want and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
            ahead.append(pulled[0] - consumed)
    assert max(ahead) <= depth + 1, ahead
    assert ahead[: total - depth - 1] == [depth + 1] * (total - depth - 1), f"the prefetcher did not read ahead: {ahead}"


def test_an_error_surfaces_on_its_own_batch(client):
    batches = [sequences(2, salt=i) for i in range(6)]
    batches[3] = [[1, 2, 3], [4, 77777777]]
    p = logitd.Prefetcher(client, batches, depth=4, num_samples=8, seed=5)
    for i in range(6):
        if i == 3:
            with pytest.raises(logitd.InvalidArgument) as e:
                next(p)
            assert e.value.batch is batches[3]
            assert "77777777" in str(e.value)
        else:
            b, t = next(p)
            assert b is batches[i]
            same(t, client.sample(b, num_samples=8, seed=5 + i))
    with pytest.raises(StopIteration):
        next(p)


def test_a_failing_source_raises_after_the_batches_before_it(client):
    def source():
        yield sequences(2, salt=1)
        yield sequences(2, salt=2)
        raise RuntimeError("the data loader broke")

    p = logitd.Prefetcher(client, source(), depth=2, num_samples=8)
    assert len(next(p)[1]) == 2 and len(next(p)[1]) == 2
    with pytest.raises(RuntimeError, match="the data loader broke"):
        next(p)


def test_an_abandoned_prefetcher_is_freed(client):
    """Nothing the runtime holds refers back to the Prefetcher (no cycle through
    Rust, which Python's garbage collector cannot see)."""
    import gc
    import weakref

    def source():
        for i in range(100):
            yield sequences(2, salt=i)

    p = logitd.Prefetcher(client, source(), depth=2, num_samples=8)
    next(p)
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None, "the prefetcher (and the batches it holds) leaked"
