"""On-policy scoring against a real `logitd serve` (SmolLM2): the realised
tokens' log-probabilities and ranks (`token_logprobs=True`), candidate ids
(`candidates=`), `method="none"`, their padded [B, T] / [B, T, C] layout, top-k
order, bad input, the prefetcher and dataset, and format 2 shards.

Expected values come from the Rust client (`logitd-client dump
--token-logprobs`, read with the `safetensors` package), from other fields of
the same or another reply (a candidate naming the realised token, the sampled
or top-k entry of the realised id), or from plain numpy here; never from the
code under test alone.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import _binary, sequences, teacher_path
from safetensors.numpy import load_file, save_file
from test_client import assert_same, dump

import logitd

VOCAB = 49152


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def rows_of(t: logitd.Targets):
    """(sequence, position) of every position of `t`, in order."""
    for b in range(len(t)):
        f = int(t.first_positions[b])
        for i in range(int(t.seq_offsets[b + 1] - t.seq_offsets[b])):
            yield b, f + i


def next_token_candidates(seqs, shift: int = 1):
    """Per sequence, per position t: [token t + shift] where it exists, else []."""
    return [[[s[t + shift]] if 0 <= t + shift < len(s) else [] for t in range(len(s))] for s in seqs]


def dumped_token_columns(out) -> dict:
    """token_logprobs / token_ranks of every shard `logitd-client dump` wrote, concatenated."""
    files = sorted(out.glob("targets-*.safetensors"))
    parts = [load_file(str(f)) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("token_logprobs", "token_ranks")}


def repeating(n: int, salt: int) -> list[list[int]]:
    """n sequences of lengths 9..20 that repeat a few ids: the teacher soon
    predicts the repeats, so its draws hit the realised tokens."""
    bases = [s[: 3 + i % 3] for i, s in enumerate(sequences(n, salt=salt))]
    return [(base * 7)[: 9 + (i * 4 + salt) % 12] for i, base in enumerate(bases)]


@pytest.fixture(scope="module")
def seqs():
    return repeating(7, salt=21)


@pytest.fixture(scope="module")
def first():
    return [0, 1, 2, 0, 5, 0, 3]


@pytest.fixture(scope="module")
def scored(client, seqs, first):
    """Sampled targets with the realised tokens scored and, as candidates,
    [token t + 1, token t] at every position t (just [token t] at the last)."""
    cands = [[([s[t + 1]] if t + 1 < len(s) else []) + [s[t]] for t in range(len(s))] for s in seqs]
    t = client.sample(seqs, num_samples=64, seed=5, first_position=first, token_logprobs=True, candidates=cands)
    return t, cands


# ---------------------------------------------------------------- (a) values


def test_model_info_has_max_candidates(client):
    info = subprocess.run(
        [str(_binary("logitd", "LOGITD_BIN")), "info", "--model", str(teacher_path())],
        capture_output=True, text=True, timeout=300, check=True,
    )
    want = json.loads(info.stdout)["max_candidates"]
    assert client.model_info().max_candidates == want > 0


def test_token_logprobs_equal_the_rust_clients_bit_for_bit(client, server, logitd_client_bin, tmp_path):
    """`logitd-client dump --token-logprobs` (the Rust client's decode, stored in
    format 2 shards and read with the safetensors package) against the package."""
    seqs = sequences(9, salt=31)
    first = [i % 3 for i in range(9)]
    ref, out = dump(
        logitd_client_bin, server, tmp_path, seqs, num_samples=32, seed=13, first_positions=first,
        extra=("--token-logprobs",),
    )
    tok = dumped_token_columns(out)
    t = client.sample(seqs, num_samples=32, seed=13, first_position=first, token_logprobs=True)
    assert_same(t, ref)
    assert t.token_logprobs.dtype == np.float32 and t.token_ranks.dtype == np.int32
    np.testing.assert_array_equal(bits(t.token_logprobs), bits(tok["token_logprobs"]))
    np.testing.assert_array_equal(t.token_ranks, tok["token_ranks"].astype(np.int32))
    # NaN / rank 0 exactly at each sequence's last position.
    last = t.seq_offsets[1:] - 1
    assert np.isnan(t.token_logprobs[last]).all() and (t.token_ranks[last] == 0).all()
    others = np.setdiff1d(np.arange(t.num_positions), last)
    assert np.isfinite(t.token_logprobs[others]).all() and (t.token_logprobs[others] <= 0).all()
    assert (t.token_ranks[others] >= 1).all() and (t.token_ranks[others] <= VOCAB).all()
    # Asking for them changes nothing else in the reply.
    plain = client.sample(seqs, num_samples=32, seed=13, first_position=first)
    assert plain.token_logprobs is None and plain.candidate_logprobs is None
    assert_same(plain, ref)


def test_a_candidate_naming_the_realised_token_has_its_logprob_bit_for_bit(scored):
    t, _ = scored
    assert t.candidate_offsets.dtype == np.int64 and t.candidate_logprobs.dtype == np.float32
    for q, (b, pos) in enumerate(rows_of(t)):
        c = t.candidate_logprobs[t.candidate_offsets[q] : t.candidate_offsets[q + 1]]
        if np.isnan(t.token_logprobs[q]):
            assert len(c) == 1, f"sequence {b}: only [token t] at the last position {pos}"
            continue
        assert len(c) == 2
        assert bits(c[:1]) == bits(t.token_logprobs[q : q + 1]), f"sequence {b}, position {pos}"


def test_token_logprobs_equal_the_sampled_entry_of_the_realised_id(scored, seqs):
    """Where the draws hit the realised next token, its sampled entry's logprob
    is the token's log p, bit for bit (the same f32 value)."""
    t, _ = scored
    hits = 0
    for q, (b, pos) in enumerate(rows_of(t)):
        if pos + 1 >= len(seqs[b]):
            continue
        e0, e1 = t.offsets[q], t.offsets[q + 1]
        ids = t.token_ids[e0:e1]
        j = np.nonzero(ids == seqs[b][pos + 1])[0]
        if j.size:
            hits += 1
            assert bits(t.logprobs[e0 + j]) == bits(t.token_logprobs[q : q + 1]), f"sequence {b}, position {pos}"
    assert hits >= 10, f"{hits} realised tokens among the draws: choose other sequences"


def test_ranks_against_top_k(client):
    """Top-k with k = 256: where the realised token is listed (at index j), its
    entry has the token's logprob bit for bit and its rank is between 1 + the
    entries with a larger logprob and j + 1 (equal but for ties); where it is
    not, every listed entry has a logprob at least its, and the rank is past
    those with a larger one."""
    seqs = repeating(6, salt=40)
    t = client.sample(seqs, num_samples=256, method="top_k", token_logprobs=True)
    listed = exact = 0
    for q, (b, pos) in enumerate(rows_of(t)):
        if pos + 1 >= len(seqs[b]):
            assert t.token_ranks[q] == 0
            continue
        e0, e1 = t.offsets[q], t.offsets[q + 1]
        lp, tl, rank = t.logprobs[e0:e1], t.token_logprobs[q], int(t.token_ranks[q])
        larger = int((lp > tl).sum())
        j = np.nonzero(t.token_ids[e0:e1] == seqs[b][pos + 1])[0]
        if j.size:
            listed += 1
            assert bits(lp[j]).tolist() == bits(np.float32([tl])).tolist(), f"sequence {b}, position {pos}"
            assert 1 + larger <= rank <= 1 + int(j[0]), f"sequence {b}, position {pos}"
            exact += rank == 1 + larger
        else:
            assert (lp >= tl).all() and rank >= 1 + larger, f"sequence {b}, position {pos}"
    assert listed >= 1 and exact >= listed * 9 // 10, (listed, exact)


# ---------------------------------------------------------------- (b) alignment


def test_position_t_scores_token_t_plus_1(client, seqs, first, scored):
    """Candidates [token t + 1, token t] at position t: the first (the next token)
    is what token_logprobs holds, the second (shifted by one) is not."""
    t, _ = scored
    p = t.padded()
    differ = same_as_shifted = 0
    for b, s in enumerate(seqs):
        for pos in range(first[b], len(s) - 1):
            assert p.token_mask[b, pos]
            assert bits(p.candidate_logprobs[b, pos, :1]) == bits(p.token_logprobs[b, pos : pos + 1])
            if s[pos] != s[pos + 1]:
                differ += 1
                same_as_shifted += int(p.candidate_logprobs[b, pos, 1] == p.token_logprobs[b, pos])
    assert differ > 20 and same_as_shifted <= differ // 10, (differ, same_as_shifted)


def test_token_logprob_at_t_is_the_next_token_given_the_prefix(client):
    """Causality: the teacher's log p of token t + 1 at position t of the whole
    sequence equals (to float tolerance: another forward pass) the log p of
    that token as a candidate at the last position of the prefix 0..=t, which
    has no next token to score."""
    [s] = sequences(1, salt=50)
    whole = client.sample([s], method="none", token_logprobs=True)
    for t_ in (0, len(s) // 2, len(s) - 2):
        prefix = s[: t_ + 1]
        cands = [[[] for _ in prefix[:-1]] + [[s[t_ + 1]]]]
        got = client.sample([prefix], method="none", token_logprobs=True, candidates=cands)
        assert np.isnan(got.token_logprobs[-1])
        np.testing.assert_allclose(got.candidate_logprobs[-1], whole.token_logprobs[t_], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- (c) padded layout


def test_padded_token_and_candidate_layout(scored, seqs, first):
    t, cands = scored
    p = t.padded()
    b_, tmax = len(seqs), max(len(s) for s in seqs)
    assert p.token_logprobs.shape == p.token_ranks.shape == p.token_mask.shape == (b_, tmax)
    assert (p.token_logprobs.dtype, p.token_ranks.dtype, p.token_mask.dtype) == (np.float32, np.int32, np.bool_)
    assert p.candidate_logprobs.shape == p.candidate_mask.shape == (b_, tmax, 2)
    assert p.candidate_logprobs.dtype == np.float32 and p.candidate_mask.dtype == np.bool_
    want_mask = np.zeros((b_, tmax), bool)
    for b, s in enumerate(seqs):
        want_mask[b, first[b] : len(s) - 1] = True
    np.testing.assert_array_equal(p.token_mask, want_mask)
    np.testing.assert_array_equal(p.token_mask, p.position_mask & (np.arange(tmax)[None] < np.array([len(s) - 1 for s in seqs])[:, None]))
    assert (p.token_ranks[p.token_mask] >= 1).all() and (p.token_ranks[~p.token_mask] == 0).all()
    assert (p.token_logprobs[~p.token_mask] == 0.0).all() and np.isfinite(p.token_logprobs).all()
    for q, (b, pos) in enumerate(rows_of(t)):
        if pos < len(seqs[b]) - 1:
            assert bits(p.token_logprobs[b, pos : pos + 1]) == bits(t.token_logprobs[q : q + 1])
            assert p.token_ranks[b, pos] == t.token_ranks[q]
        c = t.candidate_logprobs[t.candidate_offsets[q] : t.candidate_offsets[q + 1]]
        n = len(cands[b][pos])
        assert len(c) == n
        assert p.candidate_mask[b, pos, :n].all() and not p.candidate_mask[b, pos, n:].any()
        np.testing.assert_array_equal(bits(p.candidate_logprobs[b, pos, :n]), bits(c))
    # Nothing before first_position or past the end; padding is 0.0.
    assert not p.candidate_mask[~p.position_mask].any()
    assert (p.candidate_logprobs[~p.candidate_mask] == 0.0).all()
    with pytest.raises(ValueError, match="c_max = 1 is smaller than the 2 candidates of position"):
        t.padded(c_max=1)
    assert t.padded(c_max=5).candidate_logprobs.shape == (b_, tmax, 5)


def test_to_torch_carries_the_on_policy_fields(scored):
    import torch

    t, _ = scored
    p = t.padded()
    tt = p.to_torch("cpu")
    assert tt.token_logprobs.dtype == torch.float32 and tt.token_ranks.dtype == torch.int32
    assert tt.token_mask.dtype == torch.bool and tt.candidate_mask.dtype == torch.bool
    assert tt.candidate_logprobs.dtype == torch.float32
    np.testing.assert_array_equal(tt.token_logprobs.numpy(), p.token_logprobs)
    np.testing.assert_array_equal(tt.candidate_logprobs.numpy(), p.candidate_logprobs)
    np.testing.assert_array_equal(tt.token_mask.numpy(), p.token_mask)
    plain = logitd.Targets(*[getattr(t, f) for f in (
        "offsets", "token_ids", "counts", "logprobs", "lse", "seq_offsets", "first_positions", "lengths", "num_samples")])
    pt = plain.padded().to_torch()
    assert pt.token_logprobs is None and pt.token_mask is None and pt.candidate_logprobs is None


def test_sequence_and_concat_keep_the_on_policy_columns(scored):
    t, _ = scored
    whole = logitd.Targets.concat([t.sequence(b) for b in range(len(t))])
    for f in ("token_ranks", "candidate_offsets"):
        np.testing.assert_array_equal(getattr(whole, f), getattr(t, f), err_msg=f)
    for f in ("token_logprobs", "candidate_logprobs"):
        np.testing.assert_array_equal(bits(getattr(whole, f)), bits(getattr(t, f)), err_msg=f)
    one = t.sequence(4)
    np.testing.assert_array_equal(one.padded().token_mask[0], t.padded().token_mask[4, : int(one.lengths[0])])
    bare = logitd.Targets(*[getattr(t, f) for f in (
        "offsets", "token_ids", "counts", "logprobs", "lse", "seq_offsets", "first_positions", "lengths", "num_samples")])
    with pytest.raises(ValueError, match="with and without token_logprobs"):
        logitd.Targets.concat([t, bare])


def test_candidate_forms_agree(client, seqs, first):
    """[B, T, C] array, torch tensor, per-sequence [L_b, C] arrays and lists of
    lists: the same ids give the same values; rows before first_position and
    past a sequence's end are not sent (garbage there is fine)."""
    import torch

    rng = np.random.default_rng(0)
    tmax = max(len(s) for s in seqs)
    dense = rng.integers(0, VOCAB, (len(seqs), tmax, 3))
    for b, s in enumerate(seqs):
        dense[b, : first[b]] = -1  # not sent
        dense[b, len(s) :] = 10**12  # not sent
    kw = dict(num_samples=8, seed=2, first_position=first, method="none")
    want = client.sample(seqs, candidates=dense, **kw)
    forms = {
        "torch": torch.from_numpy(dense),
        "arrays": [dense[b, : len(s)] for b, s in enumerate(seqs)],
        "lists": [[list(map(int, dense[b, t])) if t >= first[b] else None for t in range(len(s))] for b, s in enumerate(seqs)],
    }
    for name, form in forms.items():
        got = client.sample(seqs, candidates=form, **kw)
        np.testing.assert_array_equal(got.candidate_offsets, want.candidate_offsets, err_msg=name)
        np.testing.assert_array_equal(bits(got.candidate_logprobs), bits(want.candidate_logprobs), err_msg=name)
    np.testing.assert_array_equal(np.diff(want.candidate_offsets), 3)
    # A sequence without candidates (None) has none at each of its positions.
    some = [None if b % 2 else dense[b, : len(s)] for b, s in enumerate(seqs)]
    got = client.sample(seqs, candidates=some, **kw).padded()
    assert not got.candidate_mask[1::2].any()
    np.testing.assert_array_equal(got.candidate_mask[0::2], want.padded().candidate_mask[0::2])


# ---------------------------------------------------------------- method none, top-k


def test_method_none_scores_without_ids(client, seqs, first, scored):
    t, cands = scored
    n = client.sample(seqs, first_position=first, method="none", token_logprobs=True, candidates=cands, num_samples=99999)
    assert n.num_samples == 0 and len(n.token_ids) == 0 and (n.offsets == 0).all()
    # The scores do not depend on the method (nor on the seed).
    np.testing.assert_array_equal(bits(n.token_logprobs), bits(t.token_logprobs))
    np.testing.assert_array_equal(n.token_ranks, t.token_ranks)
    np.testing.assert_array_equal(bits(n.candidate_logprobs), bits(t.candidate_logprobs))
    np.testing.assert_array_equal(bits(n.lse), bits(t.lse))
    p = n.padded()
    assert p.token_ids.shape == (len(seqs), max(map(len, seqs)), 0)
    np.testing.assert_array_equal(p.token_mask, t.padded().token_mask)


def test_top_k_ids_by_descending_logprob_with_counts_of_1(client, server, logitd_client_bin, tmp_path):
    seqs = sequences(5, salt=60)
    t = client.sample(seqs, num_samples=24, method="top_k", token_logprobs=True, seed=1)
    assert t.num_samples == 24
    assert (t.counts == 1).all() and len(t.counts) == len(t.token_ids) == 24 * t.num_positions
    for q in range(t.num_positions):
        lp = t.logprobs[t.offsets[q] : t.offsets[q + 1]]
        ids = t.token_ids[t.offsets[q] : t.offsets[q + 1]]
        assert (np.diff(lp) <= 0).all(), f"position {q}: not by descending logprob"
        tie = np.diff(lp) == 0
        assert (np.diff(ids)[tie] > 0).all(), f"position {q}: ties not by ascending id"
        assert len(set(ids.tolist())) == len(ids)
    p = t.padded()
    assert (p.counts[p.mask] == 1).all()
    # The Rust client restores the same counts (its shards store them).
    ref, _ = dump(logitd_client_bin, server, tmp_path, seqs, num_samples=24, seed=1, extra=("--top-k",))
    assert_same(client.sample(seqs, num_samples=24, method="top_k", seed=1), ref)


# ---------------------------------------------------------------- (e) bad input


def test_a_candidate_outside_the_vocabulary_is_named(client):
    seqs = [[1, 2, 3], [4, 5, 6, 7]]
    cands = [[[1], [2], [3]], [[4], [5], [6, VOCAB + 7], [7]]]
    with pytest.raises(logitd.InvalidArgument) as e:
        client.sample(seqs, candidates=cands, method="none")
    msg = str(e.value)
    assert f"candidate id {VOCAB + 7}" in msg and "sequence 1, position 2" in msg and str(VOCAB) in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(logitd.InvalidArgument, match=r"sequence 0, position 1: id -5 is negative"):
        client.sample(seqs, candidates=[[[1], [-5], []], None], method="none")
    dense = np.zeros((2, 4, 2), np.int64)
    dense[1, 3, 1] = 2**40
    with pytest.raises(logitd.InvalidArgument, match=r"sequence 1, position 3: id 1099511627776 does not fit"):
        client.sample(seqs, candidates=dense, method="none")


def test_too_many_candidates_are_refused(client):
    limit = client.model_info().max_candidates
    seqs = [[1, 2, 3]]
    ok = [[[], list(range(limit)), []]]
    assert len(client.sample(seqs, candidates=ok, method="none").candidate_logprobs) == limit
    bad = [[[], list(range(limit + 1)), []]]
    with pytest.raises(logitd.InvalidArgument, match=rf"sequence 0, position 1: {limit + 1} candidate ids, more than the server's max_candidates of {limit}"):
        client.sample(seqs, candidates=bad, method="none")


def test_candidate_shapes_are_checked(client):
    seqs = [[1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(logitd.InvalidArgument, match="1 candidate lists for 2 sequences"):
        client.sample(seqs, candidates=[[[1], [2], [3]]])
    with pytest.raises(logitd.InvalidArgument, match="candidates of sequence 1 have 3 rows but the sequence has 4 tokens"):
        client.sample(seqs, candidates=[[[1], [2], [3]], [[4], [5], [6]]])
    with pytest.raises(logitd.InvalidArgument, match=r"candidates has 3 rows .* but sequence 1 has 4 tokens"):
        client.sample(seqs, candidates=np.zeros((2, 3, 1), np.int64))
    with pytest.raises(logitd.InvalidArgument, match="but the batch has 2 sequences"):
        client.sample(seqs, candidates=np.zeros((3, 4, 1), np.int64))
    with pytest.raises(logitd.InvalidArgument, match="must be integers"):
        client.sample(seqs, candidates=np.zeros((2, 4, 1), np.float32))
    with pytest.raises(logitd.InvalidArgument, match=r"candidates of sequence 0, position 2 must be integers"):
        client.sample(seqs, candidates=[[[1], [2], [0.5]], None])
    with pytest.raises(logitd.InvalidArgument, match=r"method \"beam\": expected \"sample\", \"top_k\" or \"none\""):
        client.sample(seqs, method="beam")


# ---------------------------------------------------------------- prefetcher, dataset


def test_prefetcher_passes_token_logprobs_and_method(client):
    batches = [sequences(3, salt=70 + i) for i in range(4)]
    for method in ("sample", "none"):
        got = list(logitd.Prefetcher(client, batches, depth=2, num_samples=16, seed=9, token_logprobs=True, method=method))
        for i, (batch, t) in enumerate(got):
            want = client.sample(batch, num_samples=16, seed=9 + i, token_logprobs=True, method=method)
            np.testing.assert_array_equal(bits(t.token_logprobs), bits(want.token_logprobs))
            np.testing.assert_array_equal(t.token_ranks, want.token_ranks)
            np.testing.assert_array_equal(t.token_ids, want.token_ids)
            assert t.candidate_logprobs is None and t.num_samples == want.num_samples


def test_prefetcher_refuses_candidates(client):
    with pytest.raises(logitd.InvalidArgument, match="Prefetcher does not send candidate ids"):
        logitd.Prefetcher(client, [], candidates=[[[1]]])
    p = logitd.Prefetcher(client, [{"input_ids": [[1, 2]], "candidates": [[[1], [2]]]}])
    with pytest.raises(logitd.InvalidArgument, match="batch 0 has 'candidates': the Prefetcher does not send"):
        next(p)


def test_dataset_passes_token_logprobs(client):
    from logitd.data import TeacherTargetsDataset

    batches = [sequences(2, salt=80 + i) for i in range(3)]
    ds = TeacherTargetsDataset(client, batches, depth=2, num_samples=8, seed=4, token_logprobs=True)
    for i, (batch, t) in enumerate(ds):
        want = client.sample(batch, num_samples=8, seed=4 + i, token_logprobs=True)
        np.testing.assert_array_equal(bits(t.token_logprobs), bits(want.token_logprobs))
    with pytest.raises(ValueError, match="does not send candidate ids"):
        TeacherTargetsDataset(client, batches, candidates=[[[1]]])


# ---------------------------------------------------------------- (f) shards


def test_format_2_shards_read_back_with_token_logprobs(client, server, logitd_client_bin, tmp_path):
    seqs = sequences(8, salt=90)
    first = [i % 3 for i in range(8)]
    ref, out = dump(
        logitd_client_bin, server, tmp_path, seqs, num_samples=16, seed=3, first_positions=first,
        extra=("--token-logprobs", "--shard-entries", "200"),
    )
    files = sorted(out.glob("targets-*.safetensors"))
    assert len(files) > 1
    from safetensors import safe_open

    with safe_open(str(files[0]), "np") as f:
        assert f.metadata()["logitd.format"] == "2"
    tok = dumped_token_columns(out)
    read = logitd.Targets.concat(list(logitd.shards.read(out, batch_size=3)))
    live = client.sample(seqs, num_samples=16, seed=3, first_position=first, token_logprobs=True)
    assert_same(read, ref)
    for t in (read, live):
        np.testing.assert_array_equal(bits(t.token_logprobs), bits(tok["token_logprobs"]))
        np.testing.assert_array_equal(t.token_ranks, tok["token_ranks"].astype(np.int32))
        assert t.candidate_offsets is None
    np.testing.assert_array_equal(read.padded().token_mask, live.padded().token_mask)


def test_a_format_2_shard_with_candidates_reads_back(client, scored, seqs, first, tmp_path):
    """A shard written here with the safetensors package from live targets (the
    format's documented columns and metadata) reads back bit for bit."""
    t, _ = scored
    info = client.model_info()
    u32 = lambda a: np.ascontiguousarray(a, np.uint32)  # noqa: E731
    tensors = {
        "sequence_offsets": u32(t.seq_offsets),
        "first_position": u32(t.first_positions),
        "offsets": u32(t.offsets),
        "token_ids": u32(t.token_ids),
        "counts": u32(t.counts),
        "logprobs": t.logprobs,
        "lse": t.lse,
        "token_logprobs": t.token_logprobs,
        "token_ranks": u32(t.token_ranks),
        "candidate_offsets": u32(t.candidate_offsets),
        "candidate_logprobs": t.candidate_logprobs,
    }
    meta = {
        "logitd.format": "2", "model_id": info.model_id, "tokenizer_sha256": info.tokenizer_sha256,
        "num_samples": "64", "temperature": "1", "seed": "5", "method": "1", "value_encoding": "1",
    }
    save_file(tensors, str(tmp_path / "targets-000000000000.safetensors"), metadata=meta)
    back = logitd.Targets.concat(list(logitd.shards.read(tmp_path, batch_size=2)))
    for f in ("offsets", "token_ids", "counts", "seq_offsets", "first_positions", "lengths", "token_ranks", "candidate_offsets"):
        np.testing.assert_array_equal(getattr(back, f), getattr(t, f), err_msg=f)
    for f in ("logprobs", "lse", "token_logprobs", "candidate_logprobs"):
        np.testing.assert_array_equal(bits(getattr(back, f)), bits(getattr(t, f)), err_msg=f)
