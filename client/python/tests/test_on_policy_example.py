"""The on-policy distillation example (examples/on_policy.py) against a real
logitd server: the teacher's scores of the student's samples are the right
tokens' log-probabilities at the right rows, and a few training steps run.

Independent paths for the expected values: (a) a second request naming the
realised completion tokens as candidates (method "none", no token_logprobs);
(b) prefixes: the prompt plus the first j completion tokens, asking for token
P + j as a candidate at the prefix's last position, which can only predict the
token after it; and, for the student's side, the log-probabilities generate
sampled from. A shift by one row fails (b) and the student check.
"""

import csv
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import teacher_path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "on_policy.py"
NEW = 8


@pytest.fixture(scope="module")
def ex():
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    spec = importlib.util.spec_from_file_location("on_policy_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the example's dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def client(server):
    """A client once the teacher has loaded (the server listens before that)."""
    import logitd

    deadline = time.time() + 120
    while True:
        try:
            c = logitd.TeacherClient(server.uri, timeout_s=120.0)
            c.model_info()
            return c
        except logitd.errors.Unavailable:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def tok(ex):
    return ex.load_tokenizer(teacher_path())


@pytest.fixture(scope="module")
def scored(ex, tok, client):
    student = ex.build_student(len(tok), 64, seed=3)
    torch.manual_seed(11)
    prompts = ex.PROMPTS[:5]  # prompts of different lengths: left padding in generate
    r = ex.rollout(student, tok, prompts, NEW)
    teacher_lp, token_mask = ex.teacher_scores(client, r)
    return student, r, teacher_lp, token_mask


def test_rows_are_the_completion_tokens(scored):
    _, r, teacher_lp, token_mask = scored
    assert len(set(int(p) for p in r.prompt_lens)) > 1, "want prompts of different lengths"
    for b, s in enumerate(r.sequences):
        p = int(r.prompt_lens[b])
        assert len(s) == p + NEW
        want = np.zeros(r.mask.shape[1], bool)
        want[p - 1 : p - 1 + NEW] = True
        np.testing.assert_array_equal(r.mask[b].numpy(), want)
    assert torch.equal(token_mask, r.mask)
    assert torch.isfinite(teacher_lp).all() and (teacher_lp[r.mask] <= 0).all()
    assert (teacher_lp[~r.mask] == 0).all()


def test_teacher_scores_equal_candidates_naming_the_realised_tokens(scored, client):
    """(a) A second request: row t's candidate is token t + 1 of the sequence
    (the completion token the row stands for); its log p is the score, bit for bit."""
    _, r, teacher_lp, _ = scored
    cands = [[[s[t + 1]] if p - 1 <= t < len(s) - 1 else [] for t in range(len(s))]
             for s, p in zip(r.sequences, r.prompt_lens)]
    got = client.sample(r.sequences, method="none", first_position=r.prompt_lens - 1, candidates=cands)
    assert got.token_logprobs is None
    c = got.padded().to_torch()
    m = r.mask
    assert torch.equal(c.candidate_mask[..., 0], m)
    assert torch.equal(c.candidate_logprobs[..., 0][m].view(torch.int32), teacher_lp[m].view(torch.int32))


def test_teacher_score_of_completion_token_j_is_log_p_given_the_prefix(scored, client):
    """(b) Completion token j of sequence b (index P + j), scored at row P + j - 1,
    equals the teacher's log p of that token after the prefix 0..P + j - 1 (the
    prefix's last position, which has no next token of its own): another
    forward pass, so to 1e-4. A request off by one position (row P + j scoring
    token P + j + 1, or P + j - 1) does not match."""
    _, r, teacher_lp, _ = scored
    prefixes, cands, want, shifted = [], [], [], []
    for b, s in enumerate(r.sequences[:3]):
        p = int(r.prompt_lens[b])
        for j in range(NEW):
            prefix = s[: p + j]
            prefixes.append(prefix)
            cands.append([[] for _ in prefix[:-1]] + [[s[p + j]]])
            want.append(float(teacher_lp[b, p + j - 1]))
            if j + 1 < NEW:
                shifted.append((len(prefixes) - 1, float(teacher_lp[b, p + j])))
    got = client.sample(prefixes, method="none", first_position=[len(x) - 1 for x in prefixes], candidates=cands)
    ref = np.array([got.candidate_logprobs[got.candidate_offsets[i]] for i in range(len(prefixes))])
    np.testing.assert_allclose(np.array(want), ref, rtol=0, atol=1e-4)
    # The same comparison one row later (a misaligned request) is far off.
    off = [abs(v - ref[i]) > 1e-2 for i, v in shifted]
    assert sum(off) >= 0.9 * len(off), (sum(off), len(off))


def test_student_logprobs_are_the_samplers(ex, scored):
    """The training forward's log q of token t + 1 at row t (right-padded) equals
    what generate drew it with (left-padded prompts, raw logits); the row before
    does not."""
    student, r, _, _ = scored
    with torch.no_grad():
        lq = ex.student_logprobs(student, r)
    m = r.mask
    torch.testing.assert_close(lq[m], r.sampler_logprobs[m], rtol=0, atol=1e-4)
    rolled = torch.roll(r.sampler_logprobs, 1, dims=1)
    assert ((lq - rolled)[m].abs() > 1e-3).float().mean() > 0.9


def test_the_example_runs_and_logs_its_metrics(ex, server, client, tmp_path):
    steps = 3
    rows = ex.main(["--endpoint", server.uri, "--steps", str(steps), "--batch", "4", "--new-tokens", str(NEW),
                    "--out", str(tmp_path), "--teacher", str(teacher_path()), "--no-plot",
                    "--warmup-steps", "0"])
    assert len(rows) == steps
    csv_rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(x["step"]) for x in csv_rows] == list(range(1, steps + 1))
    for x in csv_rows:
        tl, rkl, sl = float(x["teacher_loglik"]), float(x["reverse_kl"]), float(x["student_loglik"])
        assert all(math.isfinite(v) for v in (tl, rkl, sl))
        assert abs(rkl - (sl - tl)) < 1e-4  # reverse KL = mean(log q - log p) over the same tokens
        assert int(x["tokens"]) == 4 * NEW
        # A random student is near uniform over 49,152 ids.
        assert abs(sl + math.log(49152)) < 0.5
        assert float(x["train_vs_sampler_max_abs"]) < 1e-4
    assert (tmp_path / "metrics.json").is_file()
