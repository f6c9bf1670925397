"""What a PyTorch user does instead of logitd's kernel, on the same GPU:
softmax over the vocabulary, torch.multinomial(p, k, replacement=True),
distinct ids with their counts (a scatter-add into dense counts, then
nonzero), log p of those ids, and the results copied to the host, for a batch
of rows of teacher-like logits (a Zipf-shaped head in random id order over
noise, as server/examples/gpu_bench.rs makes them). Prints one JSON line per
(V, dtype, rows).

    python tests/gpu/torch_sampler.py [--reps 20] [--k 256]
"""

import argparse
import json
import math

import torch


def teacher_like(rows, vocab, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.arange(vocab, device="cuda", dtype=torch.int64)
    z = torch.empty(rows, vocab, device="cuda")
    for r in range(rows):
        rank = ((ids * 2_654_435_761) ^ r) % vocab
        scale = 0.8 + 1.2 * torch.rand((), generator=g, device="cuda")
        z[r] = -1.1 * torch.log((rank + 1).float()) * scale + (2 * torch.rand(vocab, generator=g, device="cuda") - 1)
    return z


def sample(z, k):
    logp = torch.log_softmax(z.float(), dim=-1)
    draws = torch.multinomial(logp.exp(), k, replacement=True)
    counts = torch.zeros_like(logp, dtype=torch.int32)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    rows, ids = counts.nonzero(as_tuple=True)
    out = (rows.cpu(), ids.cpu(), counts[rows, ids].cpu(), logp[rows, ids].cpu())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--k", type=int, default=256)
    a = ap.parse_args()
    name = torch.cuda.get_device_name(0)
    for vocab in (32_000, 151_936, 262_144):
        for rows in ((1 << 25) // vocab, (1 << 28) // vocab):
            base = teacher_like(rows, vocab, vocab + rows)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                z = base.to(dtype)
                for _ in range(3):
                    sample(z, a.k)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(a.reps):
                    start.record()
                    sample(z, a.k)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                times.sort()
                t = times[len(times) // 2]
                print(json.dumps({
                    "bench": "torch_sampler", "device": name, "vocab": vocab, "rows": rows,
                    "dtype": str(dtype).replace("torch.", ""), "k": a.k,
                    "us_per_row": t / rows * 1e6, "torch": torch.__version__,
                }), flush=True)
                del z
            del base
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
