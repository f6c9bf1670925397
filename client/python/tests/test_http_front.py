"""The HTTP front (`logitd serve --http-listen`) with the real clients, pinned
in requirements-test.txt: TRL's VLLMClient (1.16, `/v1/completions`; 1.1,
`/get_sequence_logprobs/` json and binary), the `openai` package, and the
exact bodies Axolotl's online-teacher collator and slime's on-policy
distillation send. Values equal the gRPC reply (the logitd package) at the
same positions bit for bit (f32), and transformers' within the real-teacher
bounds of server/tests/real_teachers.rs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import REPO, Server

K = 20
FIXTURE = REPO / "server" / "tests" / "fixtures" / "real" / "smollm2_135m.json"


@pytest.fixture(scope="module")
def front():
    s = Server(extra=("--http-listen", "127.0.0.1:0"))
    assert s.http_port, f"no HTTP address; log:\n{s.log()}"
    # Health answers 200 once the teacher is loaded and warmed up.
    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{s.http_port}/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"the HTTP front never turned healthy; log:\n{s.log()}"
        time.sleep(0.2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def base(front) -> str:
    return f"http://127.0.0.1:{front.http_port}"


@pytest.fixture(scope="module")
def grpc(front):
    import logitd

    return logitd.TeacherClient(front.uri, timeout_s=120.0)


def seqs() -> list[list[int]]:
    # Token ids of real English (the README's sentence), split in two.
    s = [1589, 314, 253, 4569, 21902, 14494, 28, 338, 253, 2244, 555, 281, 13932, 282, 253, 1123, 18598, 28, 1251, 325, 281, 1277, 282, 253, 6221, 30]
    return [s, s[:11]]


def grpc_rows(grpc, sequences, k=K, temperature=1.0):
    """Per sequence: {position: (ids, logprobs, realised logprob)} from gRPC."""
    t = grpc.sample(sequences, num_samples=k, temperature=temperature, method="top_k", token_logprobs=True)
    out = []
    for b in range(len(sequences)):
        rows = {}
        first = int(t.first_positions[b])
        for i in range(int(t.seq_offsets[b + 1] - t.seq_offsets[b])):
            p = int(t.seq_offsets[b]) + i
            a, z = int(t.offsets[p]), int(t.offsets[p + 1])
            rows[first + i] = (t.token_ids[a:z].tolist(), t.logprobs[a:z].copy(), np.float32(t.token_logprobs[p]))
        out.append(rows)
    return out


def bits(x) -> int:
    return int(np.float32(x).view(np.uint32))


def patch_vllm_guard(module):
    # TRL's VLLMClient refuses to start unless `vllm` imports; vllm is needed only
    # for weight sync (NCCL) and does not install here (CUDA wheels), so the
    # guard is patched for the test. Everything the client sends is TRL's own.
    module.is_vllm_available = lambda *a, **k: True


def trl_client(base):
    from trl.generation import vllm_client

    patch_vllm_guard(vllm_client)
    return vllm_client.VLLMClient(base_url=base, connection_timeout=60.0)


@pytest.mark.parametrize("chunk_size", [0, 1])
def test_trl_1_16_get_sequence_logprobs_equals_grpc(base, grpc, chunk_size):
    client = trl_client(base)
    sequences = seqs()
    prompt_lengths = [5, 3]
    out = client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=K, temperature=1.0, chunk_size=chunk_size)
    expected = grpc_rows(grpc, sequences)
    for b, (seq, pl) in enumerate(zip(sequences, prompt_lengths)):
        assert len(out["logprobs"][b]) == len(seq) - pl
        for t, j in enumerate(range(pl, len(seq))):
            ids, lps, realised = expected[b][j - 1]  # token j is scored by position j - 1
            assert out["logprob_token_ids"][b][t] == ids
            assert [bits(x) for x in out["logprobs"][b][t]] == [bits(x) for x in lps]
            assert bits(out["actual_logprobs"][b][t][0]) == bits(realised)
            assert out["actual_token_ids"][b][t] == [seq[j]]
            assert math.isfinite(out["actual_logprobs"][b][t][0]), "the realised token is always there"


def test_trl_1_16_distillation_server_trainer_client_runs_at_temperature(base, grpc):
    client = trl_client(base)
    out = client.get_sequence_logprobs(seqs()[:1], [4], top_logprobs=5, temperature=0.5)
    expected = grpc_rows(grpc, seqs()[:1], k=5, temperature=0.5)
    ids, lps, realised = expected[0][4]
    assert out["logprob_token_ids"][0][1] == ids
    assert bits(out["actual_logprobs"][0][1][0]) == bits(realised)


TRL_1_1 = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from trl.generation import vllm_client
    vllm_client.is_vllm_available = lambda *a, **k: True  # weight sync only; see the test
    c = vllm_client.VLLMClient(base_url=sys.argv[2], connection_timeout=60.0)
    seqs, plens, binary, chunk = json.loads(sys.argv[3])
    out = c.get_sequence_logprobs(seqs, plens, top_logprobs=5, temperature=1.0, use_binary=binary, chunk_size=chunk)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("binary,chunk", [(True, 0), (False, 0), (True, 1)])
def test_trl_1_1_get_sequence_logprobs_bodies(base, grpc, binary, chunk):
    """TRL 1.1's client (`/get_sequence_logprobs/`), installed apart by run.sh
    (pip --target, pinned), run in a subprocess."""
    target = Path(os.environ.get("LOGITD_TRL11", Path(sys.prefix) / "trl-1.1"))
    if not (target / "trl").is_dir():
        pytest.fail(f"TRL 1.1 is not installed at {target}: run client/python/tests/run.sh", pytrace=False)
    sequences, plens = seqs(), [6, 2]
    r = subprocess.run(
        [sys.executable, "-c", TRL_1_1, str(target), base, json.dumps([sequences, plens, binary, chunk])],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = grpc_rows(grpc, sequences, k=5)
    for b, (seq, pl) in enumerate(zip(sequences, plens)):
        assert len(out["logprobs"][b]) == len(seq) - pl
        for t, j in enumerate(range(pl, len(seq))):
            ids, lps, realised = expected[b][j - 1]
            assert out["logprob_token_ids"][b][t][:5] == ids
            assert [bits(x) for x in out["logprobs"][b][t][:5]] == [bits(x) for x in lps]
            if binary:
                assert bits(out["actual_logprobs"][b][t][0]) == bits(realised)
                assert out["actual_token_ids"][b][t] == [seq[j]]
            elif seq[j] not in ids:
                # json rows hold the whole dict: the realised token last, by rank.
                assert out["logprob_token_ids"][b][t][5] == seq[j]
                assert bits(out["logprobs"][b][t][5]) == bits(realised)


def test_openai_package_completions_with_prompt_logprobs(base, grpc):
    import openai

    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    model = c.models.list().data[0].id
    seq = seqs()[0]
    r = c.completions.create(model=model, prompt=seq, max_tokens=1, temperature=1.0, seed=3, extra_body={"prompt_logprobs": K})
    choice = r.choices[0]
    pl = choice.model_extra["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(seq)
    expected = grpc_rows(grpc, [seq])[0]
    for j in range(1, len(seq)):
        ids, lps, realised = expected[j - 1]
        entry = pl[j]
        keys = [int(k) for k in entry]
        assert keys[0] == seq[j], "the realised token comes first"
        assert bits(entry[str(seq[j])]["logprob"]) == bits(realised)
        top = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:K]
        assert [int(k) for k, _ in top] == ids
        assert [bits(v["logprob"]) for _, v in top] == [bits(x) for x in lps]
        # The teacher's tokenizer is at hand: decoded tokens are filled.
        assert isinstance(entry[str(seq[j])]["decoded_token"], str)
    assert choice.finish_reason == "length" and isinstance(choice.text, str) and choice.text
    assert r.usage.completion_tokens == 1
    # A text prompt is tokenized with the teacher's tokenizer.
    t = c.completions.create(model=model, prompt="It is a truth", max_tokens=1, extra_body={"prompt_logprobs": 1})
    assert len(t.choices[0].model_extra["prompt_logprobs"]) >= 3
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=model, prompt=seq, max_tokens=5)
    assert "does not generate" in str(e.value)


def test_axolotl_vllm_collator_body(base, grpc):
    # The body of Axolotl's fetch_online_logprobs_vllm
    # (src/axolotl/integrations/kd/collator_online_teacher.py,
    # axolotl-ai-cloud/axolotl 067b021c8b87a9e5e380b9173c704cf7340e30f5).
    batch = seqs()
    payload = {
        "prompt": batch,
        "echo": True,
        "logprobs": True,
        "prompt_logprobs": 8,
        "top_logprobs": 8,
        "max_new_tokens": 0,
        "skip_special_tokens": False,
        "temperature": 1.0,
        "sampling_params": {"max_tokens": 0},
    }
    r = requests.post(f"{base}/v1/completions", json=payload, headers={"Accept-Encoding": "deflate, gzip, br, zstd"}, timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == len(batch)
    expected = grpc_rows(grpc, batch, k=8)
    for b, (choice, seq) in enumerate(zip(choices, batch)):
        pl = choice["prompt_logprobs"]
        assert len(pl) == len(seq) and pl[0] is None  # the collator asserts both
        for j in range(1, len(seq)):
            ids, lps, _ = expected[b][j - 1]
            entry = pl[j]
            assert set(ids) <= {int(k) for k in entry}
            assert all(isinstance(v, dict) and "logprob" in v for v in entry.values())


def test_axolotl_sglang_collator_body(base, grpc):
    # fetch_online_logprobs_sglang, same file and commit as above.
    batch = seqs()
    payload = {
        "input_ids": batch,
        "return_logprob": True,
        "top_logprobs_num": 8,
        "logprob_start_len": 0,
        "return_text_in_logprobs": True,
        "echo": True,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False},
    }
    r = requests.post(f"{base}/generate", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert isinstance(data, list) and len(data) == len(batch)
    expected = grpc_rows(grpc, batch, k=8)
    for b, (item, seq) in enumerate(zip(data, batch)):
        top = item["meta_info"]["input_top_logprobs"]
        assert len(top) == len(seq) and top[0] is None
        for j in range(1, len(seq)):
            ids, lps, _ = expected[b][j - 1]
            assert [row[1] for row in top[j]] == ids
            assert [bits(row[0]) for row in top[j]] == [bits(x) for x in lps]
            assert all(len(row) == 3 and isinstance(row[2], str) for row in top[j])


def test_slime_on_policy_distillation_body(base, grpc):
    # slime's reward_func and post_process_rewards
    # (slime/rollout/on_policy_distillation.py, THUDM/slime 624b824a898ab0ec1fcb4d373004c7f3852bf515).
    seq = seqs()[0]
    payload = {
        "input_ids": seq,
        "sampling_params": {"temperature": 1.0, "max_new_tokens": 0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    reward = requests.post(f"{base}/generate", json=payload, timeout=120).json()
    teacher = np.array([item[0] for item in reward["meta_info"]["input_token_logprobs"][1:]], dtype=np.float32)
    expected = grpc_rows(grpc, [seq])[0]
    want = np.array([expected[j - 1][2] for j in range(1, len(seq))], dtype=np.float32)
    assert teacher.view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_values_within_the_real_teacher_bounds_of_transformers(base):
    """transformers' top-20 and realised-token logprobs per position (the
    fixture server/tests/fixtures/real/smollm2_135m.json: positions[p] is the
    distribution of token p + 1) against /v1/completions' prompt_logprobs[p + 1],
    within SmolLM2's bound in server/tests/real_teachers.rs (1.5e-4)."""
    bound = 1.5e-4
    fx = json.loads(FIXTURE.read_text())
    worst, checked = 0.0, 0
    for sentence in fx["sentences"]:
        tokens = sentence["token_ids"]
        r = requests.post(f"{base}/v1/completions", json={"prompt": tokens, "max_tokens": 1, "prompt_logprobs": 20}, timeout=300)
        assert r.status_code == 200, r.text
        pl = r.json()["choices"][0]["prompt_logprobs"]
        for p, want in enumerate(sentence["positions"][: len(tokens) - 1]):
            entry = pl[p + 1]
            ours = {int(k): v for k, v in entry.items()}
            got = [i for i, v in sorted(ours.items(), key=lambda kv: kv[1]["rank"]) if v["rank"] <= 20]
            for i, lp in zip(want["top_ids"], want["top_logprobs"]):
                if i in ours:
                    worst = max(worst, abs(ours[i]["logprob"] - lp))
                    checked += 1
            assert len(set(got) & set(want["top_ids"])) >= 18, (p, got, want["top_ids"])
            if want.get("token_logprob") is not None:
                worst = max(worst, abs(ours[tokens[p + 1]]["logprob"] - want["token_logprob"]))
                checked += 1
    assert checked > 0 and worst < bound, (checked, worst)


def test_trl_distillation_example_smoke(front, tmp_path):
    """client/python/examples/trl_distill.py for a few steps against logitd: TRL's
    ServerDistillationTrainer with teacher_model_server_url at the HTTP front
    trains the tiny student and its loss falls (the full example runs 40 steps)."""
    sys.path.insert(0, str(REPO / "client" / "python" / "examples"))
    import trl_distill
    from conftest import teacher_path

    losses = trl_distill.train(f"http://127.0.0.1:{front.http_port}", teacher_path(), steps=12, out=tmp_path)
    assert len(losses) == 12, losses
    first, last = trl_distill.fell(losses, 3)
    assert last < first, losses
