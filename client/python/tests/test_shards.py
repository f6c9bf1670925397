"""logitd.shards.read: the shards `logitd-client dump` writes, bit-identical to
live targets of the same requests."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sequences
from test_client import assert_same, dump

import logitd


def test_shards_read_back_bit_identical_to_live_targets(client, server, logitd_client_bin, tmp_path):
    seqs = sequences(13, salt=6)
    first = [i % 3 for i in range(13)]
    # Small shards: the set spans several files.
    ref, out = dump(
        logitd_client_bin, server, tmp_path, seqs, num_samples=32, seed=77, first_positions=first,
        extra=("--shard-entries", "300"),
    )
    reader = logitd.shards.read(out, batch_size=5)
    assert len(reader.files) > 1
    assert reader.meta["num_samples"] == 32 and reader.meta["seed"] == 77
    assert reader.meta["model_id"] == client.model_info().model_id
    parts = list(reader)
    assert [len(p) for p in parts] == [5, 5, 3]
    whole = logitd.Targets.concat(parts)
    assert_same(whole, ref)  # what the files hold (read with the safetensors package)
    live = client.sample(seqs, num_samples=32, seed=77, first_position=first)
    assert_same(live, ref)
    np.testing.assert_array_equal(whole.lengths, [len(s) for s in seqs])
    np.testing.assert_array_equal(whole.padded().logprobs.view(np.uint32), live.padded().logprobs.view(np.uint32))


def test_a_folder_without_shards_is_a_shard_error(tmp_path):
    with pytest.raises(logitd.ShardError, match="holds no target shards"):
        logitd.shards.read(tmp_path)
