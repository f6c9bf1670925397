"""TRL's ServerDistillationTrainer with logitd as its teacher server.

Start the teacher with its HTTP front, then point TRL at it:

    logitd serve --http-listen 127.0.0.1:8000        # the cached SmolLM2 teacher
    python client/python/examples/trl_distill.py --teacher-url http://127.0.0.1:8000

The only logitd-specific line is `teacher_model_server_url`: TRL's own
VLLMClient calls logitd's vLLM endpoints (`/health`, `/v1/models`,
`/v1/completions` with `prompt_logprobs`). The student is a tiny Llama (2
layers, width 64) with the teacher's tokenizer, trained on the CPU on
completions it generates itself (on-policy), against the teacher's top-k at
each completion token (forward KL, `beta=0`). The loss falls over a few dozen
steps; the script prints it and exits non-zero if it did not fall.

TRL's VLLMClient refuses to start unless `vllm` imports; vllm is only needed
for weight sync (NCCL), which a static teacher never does, so on a machine
without it (a CPU, or CI) the guard is patched below. With vllm installed the
patch is a no-op.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The quick brown fox",
    "Once upon a time, there was a",
    "In mathematics, a prime number is",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "The history of the Roman Empire",
]


def teacher_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_student(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train(teacher_url: str, gguf: Path, steps: int, out: Path, top_k: int = 8) -> list[float]:
    """Runs the trainer; returns the logged training losses, step by step."""
    from datasets import Dataset
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer
    from trl.generation import vllm_client

    if not vllm_client.is_vllm_available():
        vllm_client.is_vllm_available = lambda *a, **k: True  # weight sync only; see the module doc

    tok = teacher_tokenizer(gguf)
    student = tiny_student(len(tok))
    args = ServerDistillationConfig(
        output_dir=str(out),
        teacher_model_server_url=teacher_url,  # the logitd-specific line
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_completion_length=16,
        temperature=1.0,
        beta=0.0,
        loss_top_k=top_k,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"prompt": PROMPTS * 16})
    trainer = ServerDistillationTrainer(model=student, args=args, train_dataset=dataset, processing_class=tok)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def fell(losses: list[float], n: int = 5) -> tuple[float, float]:
    """Mean of the first and last `n` logged losses."""
    n = max(1, min(n, len(losses) // 2))
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def cache_dir() -> Path:
    """Where tests/fetch-teachers.sh puts the teachers: $LOGITD_CACHE, else
    $XDG_CACHE_HOME/logitd (~/.cache/logitd)."""
    if os.environ.get("LOGITD_CACHE"):
        return Path(os.environ["LOGITD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logitd"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--gguf",
        type=Path,
        default=cache_dir() / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        help="the teacher's GGUF, for its tokenizer (the student must share it)",
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("trl-distill-out"))
    a = p.parse_args()
    losses = train(a.teacher_url, a.gguf, a.steps, a.out)
    first, last = fell(losses)
    print(f"loss: first {first:.4f}, last {last:.4f} over {len(losses)} steps")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
