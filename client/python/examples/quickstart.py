"""logitd in five minutes: a teacher's sparse targets, and a student step on them.

With a server running (`target/release/logitd serve`, the demo teacher on
127.0.0.1:50051) and the package installed (`pip install './client/python[examples]'`):

    python client/python/examples/quickstart.py

It tokenises two sentences with the teacher's own tokenizer (read offline from the
demo teacher's GGUF), asks the teacher for k = 64 sampled ids per position, shows
what came back for one position, and takes three AdamW steps of a toy student on
the distillation loss (RS-KD's counts, over the student's whole vocabulary).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

import logitd
from logitd.torch import distill_loss

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "To be, or not to be, that is the question.",
]


def demo_teacher() -> Path:
    # Where tests/fetch-teachers.sh puts it: $LOGITD_CACHE, else $XDG_CACHE_HOME/logitd.
    cache = os.environ.get("LOGITD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logitd"
    return Path(cache) / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default="http://127.0.0.1:50051", help="the logitd server")
    p.add_argument("--teacher", type=Path, default=demo_teacher(),
                   help="the teacher's GGUF, for its tokenizer (default: the demo teacher, "
                        "fetched by tests/fetch-teachers.sh)")
    args = p.parse_args(argv)

    teacher = logitd.TeacherClient(args.endpoint)
    info = teacher.model_info()
    print(f"teacher {info.model_id} ({info.architecture}), vocabulary {info.vocab_size}")

    if not args.teacher.is_file():
        raise SystemExit(f"{args.teacher} is missing: run tests/fetch-teachers.sh")
    tok = AutoTokenizer.from_pretrained(str(args.teacher.parent), gguf_file=args.teacher.name,
                                        local_files_only=True)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]

    targets = teacher.sample(ids, num_samples=64, seed=0)
    padded = targets.padded().to_torch()  # [B, T, K]: token_ids, logprobs, counts, mask
    b, t = 0, len(ids[0]) - 2  # the position after "wife": which token comes next?
    n = int(padded.mask[b, t].sum())
    order = padded.counts[b, t, :n].argsort(descending=True)[:3]
    drawn = ", ".join(
        f"{tok.decode([int(padded.token_ids[b, t, i])])!r} x{int(padded.counts[b, t, i])}" for i in order
    )
    print(f"{len(ids)} sequences, {int(padded.position_mask.sum())} positions; "
          f"after {tok.decode(ids[b][t])!r}: {n} distinct ids of 64 draws, most drawn {drawn}")

    torch.manual_seed(0)
    vocab = info.vocab_size
    student = torch.nn.Sequential(torch.nn.Embedding(vocab, 32), torch.nn.Linear(32, vocab))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    inputs = torch.zeros(padded.token_ids.shape[:2], dtype=torch.long)
    for row, seq in enumerate(ids):
        inputs[row, : len(seq)] = torch.tensor(seq)
    for step in range(1, 4):
        loss = distill_loss(student(inputs), padded, target="counts")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: distillation loss {loss.item():.2f}")


if __name__ == "__main__":
    main()
