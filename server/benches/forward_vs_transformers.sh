#!/usr/bin/env bash
# Teacher forward on the CPU, logitd vs Hugging Face transformers (torch), same
# GGUF, same sequences, same number of threads, in one run; prints a table.
#
#   server/benches/forward_vs_transformers.sh [GGUF] [BATCH] [LEN] [REPEAT]
#
# Defaults: the SmolLM2-135M test teacher (tests/fetch-teachers.sh), 8 × 256, 3.
# Needs a Python with torch, transformers, gguf and accelerate: set PYTHON
# (default python3). Threads: THREADS (default nproc), used by both sides.
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=${1:-$(tests/fetch-teachers.sh smollm2)}
BATCH=${2:-8}; LEN=${3:-256}; REPEAT=${4:-3}
THREADS=${THREADS:-$(nproc)}
PYTHON=${PYTHON:-python3}

cargo build --release -q -p logitd --example teacher_forward
ours=$(RAYON_NUM_THREADS=$THREADS ./target/release/examples/teacher_forward "$GGUF" "$BATCH" "$LEN" "$REPEAT" sample)

theirs=$(OMP_NUM_THREADS=$THREADS "$PYTHON" - "$GGUF" "$BATCH" "$LEN" "$REPEAT" "$THREADS" <<'PY'
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM
path, batch, length, repeat, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32, attn_implementation="sdpa").eval()
vocab = model.config.vocab_size
# The same token ids as teacher_forward.
ids = torch.tensor([[(s * 7919 + p * 104729) % min(vocab, 30000) for p in range(length)] for s in range(batch)])
def timed(f):
    f()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        f()
    return (batch * length * repeat) / (time.perf_counter() - t)
with torch.inference_mode():
    hidden = timed(lambda: model.model(input_ids=ids))
    full = timed(lambda: model(input_ids=ids))
print(json.dumps({"forward_tokens_per_s": hidden, "forward_and_logits_tokens_per_s": full,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
PY
)

"$PYTHON" - "$ours" "$theirs" "$BATCH" "$LEN" "$THREADS" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
b, l, t = sys.argv[3:]
print(f"teacher {ours['model']}, batch {b} x {l} tokens, {t} threads, f32 CPU")
print(f"| what | logitd tokens/s | transformers tokens/s | ratio |")
print(f"| --- | ---: | ---: | ---: |")
print(f"| forward to hidden states | {ours['forward_tokens_per_s']:.0f} | {theirs['forward_tokens_per_s']:.0f} | {ours['forward_tokens_per_s'] / theirs['forward_tokens_per_s']:.2f} |")
both = 1 / (1 / ours['forward_tokens_per_s'] + 1 / ours['head_and_sample_tokens_per_s'])
print(f"| forward + LM head (logitd: + sampling k=256) | {both:.0f} | {theirs['forward_and_logits_tokens_per_s']:.0f} | {both / theirs['forward_and_logits_tokens_per_s']:.2f} |")
print(f"peak RSS of logitd: {ours['peak_rss_mib']:.0f} MiB; torch {theirs['torch']}")
PY
