"""The peer a user would write instead of logitd: Hugging Face transformers on
torch (CPU), the same forward, then torch.softmax, torch.multinomial(..., k,
replacement=True) and unique/counts per position. Used by tests/bench/compare.sh.

    torch_peer.py corpus   GGUF PLAY.md OUT.jsonl N LENGTH
    torch_peer.py forward  GGUF CORPUS.jsonl SEQUENCES LENGTH K DURATION_S|stdin THREADS
    torch_peer.py dump     GGUF CORPUS.jsonl ROWS OUT.f32 THREADS
    torch_peer.py sampling LOGITS.f32 VOCAB K MIN_TIME_S THREADS

corpus:   the play's text (Markdown marks removed) tokenised with the GGUF's
          tokenizer (transformers), cut into N sequences of LENGTH tokens.
forward:  request r is corpus lines r*S .. r*S+S-1 (cycling), as logitd-bench
          and engine_bench send them; per request one batched forward [S, L],
          logits [S*L, V] in f32, then sample_sparse (below); for DURATION_S
          seconds after one warm-up request. Prints one JSON line, with the time
          of each step. With "stdin": the model stays loaded, and each line
          read from stdin (a duration) runs one such measurement.
dump:     writes the f32 logits of the first ROWS positions of the corpus.
sampling: sample_sparse alone on those logits, for at least MIN_TIME_S seconds.

sample_sparse is what a user needs per position to build the same target as
logitd's: the distinct drawn ids, their counts and log p of each (and, as
logitd also returns, the log-sum-exp of the row). It is written the fast way
(one vectorised unique over (row, id) keys), not with a Python loop per row.
"""

import json
import re
import sys
import time

import torch


def load_model(gguf, threads):
    import os

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf),
        gguf_file=os.path.basename(gguf),
        dtype=torch.float32,
        attn_implementation="sdpa",
    ).eval()
    return model


def read_pool(path, length):
    pool = []
    with open(path) as f:
        for line in f:
            if line.strip():
                v = json.loads(line)
                ids = v["token_ids"] if isinstance(v, dict) else v
                if len(ids) >= length:
                    pool.append(ids[:length])
    if not pool:
        raise SystemExit(f"{path} holds no sequence of {length} tokens")
    return pool


def request(pool, r, sequences):
    return torch.tensor([pool[(r * sequences + i) % len(pool)] for i in range(sequences)])


def run_measurements(duration, measure):
    """One measurement of DURATION seconds, or with "stdin" one per line read
    (each a duration), the model staying loaded between them."""
    if duration == "stdin":
        for line in sys.stdin:
            if line.strip():
                measure(float(line))
    else:
        measure(float(duration))


def sample_sparse(logits, k, timings=None):
    """logits [N, V] f32 -> CSR (offsets, ids, counts, logprobs) and lse [N]."""
    t0 = time.perf_counter()
    probs = torch.softmax(logits, dim=-1)
    t1 = time.perf_counter()
    draws = torch.multinomial(probs, k, replacement=True)  # [N, k]
    t2 = time.perf_counter()
    n, v = logits.shape
    keys = (torch.arange(n).unsqueeze(1) * v + draws).flatten()
    unique, counts = torch.unique(keys, sorted=True, return_counts=True)
    rows, ids = unique // v, unique % v
    logprobs = torch.log(probs.flatten()[unique])
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    lse = torch.logsumexp(logits, dim=-1)
    t3 = time.perf_counter()
    if timings is not None:
        timings["softmax"] += t1 - t0
        timings["multinomial"] += t2 - t1
        timings["unique_counts_logprobs"] += t3 - t2
    return offsets, ids, counts, logprobs, lse


def cmd_corpus(gguf, play, out, n, length):
    import os

    from transformers import AutoTokenizer

    n, length = int(n), int(length)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    text = open(play).read()
    text = re.sub(r"^#+ *", "", text, flags=re.M)
    text = re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", text)
    text = re.sub(r" +\n", "\n", text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"{play}: {len(ids)} tokens, fewer than {n} x {length}")
    with open(out, "w") as f:
        for s in range(n):
            f.write(json.dumps(ids[s * length : (s + 1) * length]) + "\n")


def cmd_forward(gguf, corpus, sequences, length, k, duration, threads):
    sequences, length, k, threads = int(sequences), int(length), int(k), int(threads)
    model = load_model(gguf, threads)
    pool = read_pool(corpus, length)
    steps = ["forward", "lm_head", "softmax", "multinomial", "unique_counts_logprobs"]

    def one(r, timings):
        ids = request(pool, r, sequences)
        t0 = time.perf_counter()
        hidden = model.model(input_ids=ids).last_hidden_state
        t1 = time.perf_counter()
        logits = model.lm_head(hidden).float().reshape(sequences * length, -1)
        t2 = time.perf_counter()
        timings["forward"] += t1 - t0
        timings["lm_head"] += t2 - t1
        offsets, out_ids, counts, logprobs, lse = sample_sparse(logits, k, timings)
        assert int(counts.sum()) == k * sequences * length
        return len(out_ids)

    state = {"r": 1}

    def measure(seconds):
        with torch.inference_mode():
            timings = dict.fromkeys(steps, 0.0)
            first, positions, entries = state["r"], 0, 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or state["r"] == first:
                entries += one(state["r"], timings)
                positions += sequences * length
                state["r"] += 1
            secs = time.perf_counter() - start
        print(json.dumps({
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "requests": state["r"] - first, "positions": positions, "elapsed_s": secs,
            "positions_per_s": positions / secs,
            "distinct_ids_per_position": entries / positions,
            "breakdown_us_per_position": {s: t / positions * 1e6 for s, t in timings.items()},
        }), flush=True)

    with torch.inference_mode():
        one(0, dict.fromkeys(steps, 0.0))  # warm-up
    run_measurements(duration, measure)


def cmd_dump(gguf, corpus, rows, out, threads):
    rows, threads = int(rows), int(threads)
    model = load_model(gguf, threads)
    with open(corpus) as f:
        pool = [json.loads(line) for line in f if line.strip()]
    got = []
    with torch.inference_mode():
        for ids in pool:
            got.append(model(input_ids=torch.tensor([ids])).logits[0].float())
            if sum(len(g) for g in got) >= rows:
                break
    logits = torch.cat(got)[:rows].contiguous()
    logits.numpy().astype("<f4").tofile(out)
    print(json.dumps({"rows": logits.shape[0], "vocab_size": logits.shape[1]}))


def cmd_sampling(path, vocab, k, min_time, threads):
    vocab, k, min_time, threads = int(vocab), int(k), float(min_time), int(threads)
    torch.set_num_threads(threads)
    import numpy as np

    logits = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(-1, vocab))
    rows = logits.shape[0]
    steps = ["softmax", "multinomial", "unique_counts_logprobs"]
    with torch.inference_mode():
        _, ids, _, _, _ = sample_sparse(logits, k)  # warm-up
        timings = dict.fromkeys(steps, 0.0)
        passes, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time or passes == 0:
            sample_sparse(logits, k, timings)
            passes += 1
        secs = time.perf_counter() - start
    print(json.dumps({
        "rows": rows, "vocab_size": vocab, "num_samples": k, "threads": torch.get_num_threads(),
        "passes": passes, "us_per_row": secs / (passes * rows) * 1e6,
        "distinct_ids_per_row": len(ids) / rows,
        "breakdown_us_per_row": {s: t / (passes * rows) * 1e6 for s, t in timings.items()},
    }))


if __name__ == "__main__":
    commands = {"corpus": cmd_corpus, "forward": cmd_forward, "dump": cmd_dump,
                "sampling": cmd_sampling}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
