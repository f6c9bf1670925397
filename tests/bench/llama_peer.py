"""llama.cpp as a teacher-logits peer, through llama-cpp-python: the same GGUF
run by llama.cpp's own CPU kernels (its quantised matmuls, as llama.cpp runs
every GGUF), logits at every position (`logits_all`). Used by
tests/bench/shapes.sh.

    llama_peer.py forward GGUF CORPUS.jsonl SEQUENCES LENGTH DURATION_S|stdin THREADS

forward: request r is corpus lines r*S .. r*S+S-1 (cycling, each cut to
         LENGTH tokens), as engine_bench and torch_peer.py send them. The
         high-level API takes one sequence at a time, so each request is S
         evaluations of LENGTH tokens from an empty KV cache (`reset` +
         `eval`), each leaving LENGTH x V f32 logits in `Llama.scores`. Only
         the forward and the logits are timed: no sampling, which would only
         add to llama.cpp's time. Runs for DURATION_S seconds after one
         warm-up request and prints one JSON line; with "stdin" the model
         stays loaded and each line read from stdin (a duration) runs one
         such measurement.
"""

import json
import sys
import time

from torch_peer import read_pool, run_measurements  # the same sequences and driver as the other peers


def cmd_forward(gguf, corpus, sequences, length, duration, threads):
    import llama_cpp
    import numpy as np

    sequences, length, threads = int(sequences), int(length), int(threads)
    llm = llama_cpp.Llama(
        model_path=gguf,
        n_ctx=length,
        n_batch=length,
        n_ubatch=length,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    pool = read_pool(corpus, length)
    state = {"r": 1}

    def one(r):
        checksum = 0.0
        for i in range(sequences):
            llm.reset()
            llm.eval(pool[(r * sequences + i) % len(pool)])
            logits = llm.scores[:length]
            # Touch the last row so the logits are really there (and finite).
            checksum += float(np.max(logits[-1]))
        if not np.isfinite(checksum):
            raise SystemExit("llama.cpp returned non-finite logits")

    def measure(seconds):
        first, positions = state["r"], 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or state["r"] == first:
            one(state["r"])
            positions += sequences * length
            state["r"] += 1
        secs = time.perf_counter() - start
        print(json.dumps({
            "llama_cpp_python": llama_cpp.__version__, "threads": threads,
            "requests": state["r"] - first, "positions": positions, "elapsed_s": secs,
            "positions_per_s": positions / secs,
            "vocab_size": int(llm.n_vocab()),
        }), flush=True)

    one(0)  # warm-up
    run_measurements(duration, measure)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "forward":
        raise SystemExit(__doc__)
    cmd_forward(*sys.argv[2:])
