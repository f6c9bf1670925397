"""The HTTP front against gRPC on the same server and work, interleaved.

    client/python/bench/http_front.py [--rounds 10] [--batch 8] [--length 256] [--k 20]

Starts `logitd serve --http-listen` on the cached SmolLM2 teacher (target/debug/logitd
or LOGITD_BIN; build it with --release for figures) and times, round by round in turn,
the same work (BATCH sequences of LENGTH tokens, top-K of every position and the
realised tokens' logprobs, from position 0) through:

- gRPC: the logitd package's TeacherClient.sample(method="top_k", token_logprobs=True),
  decoded into numpy;
- binary: TRL 1.1's `/get_sequence_logprobs/` with response_format "binary", the body
  decoded as TRL's client does (json, base64, np.frombuffer);
- json: vLLM's `/v1/completions` with prompt_logprobs K, parsed with json.loads and read
  into arrays as TRL 1.16's client reads it (sorted by rank).

Prints the median and quartiles of each, and binary and json relative to gRPC
(throughput: gRPC time / other time).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[3]


def start(binary: str, model: Path):
    proc = subprocess.Popen(
        [binary, "serve", "--model", str(model), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    line = proc.stdout.readline().decode()
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    grpc = re.search(r"gRPC on (\S+),", line).group(1)
    http = re.search(r"HTTP on (\S+),", line).group(1)
    return proc, grpc, http


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    a = p.parse_args()
    import logitd

    binary = os.environ.get("LOGITD_BIN", str(REPO / "target" / "debug" / "logitd"))
    model = Path.home() / ".cache" / "logitd" / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    proc, grpc_addr, http_addr = start(binary, model)
    try:
        rng = np.random.default_rng(0)
        seqs = rng.integers(0, 49152, size=(a.batch, a.length)).tolist()
        base = f"http://{http_addr}"
        client = logitd.TeacherClient(f"http://{grpc_addr}", timeout_s=600.0)
        session = requests.Session()
        for _ in range(120):
            try:
                if session.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)

        def grpc():
            t = client.sample(seqs, num_samples=a.k, temperature=1.0, method="top_k", token_logprobs=True)
            return t.logprobs.shape[0]

        def binary_path():
            r = session.post(f"{base}/get_sequence_logprobs/", json={
                "sequences": seqs, "prompt_lengths": [0] * a.batch, "top_logprobs": a.k,
                "temperature": 1.0, "response_format": "binary"})
            d = r.json()
            lp = np.frombuffer(base64.b64decode(d["logprobs_b64"]), dtype=np.float32).reshape(d["shape"])
            ids = np.frombuffer(base64.b64decode(d["token_ids_b64"]), dtype=np.int32).reshape(d["shape"])
            act = np.frombuffer(base64.b64decode(d["actual_logprobs_b64"]), dtype=np.float32)
            return lp.size + ids.size + act.size

        def json_path():
            r = session.post(f"{base}/v1/completions", json={
                "prompt": seqs, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": a.k})
            n = 0
            for choice in json.loads(r.content)["choices"]:
                for entry in choice["prompt_logprobs"][1:]:
                    items = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[: a.k]
                    n += len(np.array([v["logprob"] for _, v in items], dtype=np.float32))
            return n

        modes = {"grpc": grpc, "binary": binary_path, "json": json_path}
        for f in modes.values():  # warm-up
            f()
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(a.rounds):
            for m, f in modes.items():
                t0 = time.perf_counter()
                f()
                times[m].append(time.perf_counter() - t0)
        g = statistics.median(times["grpc"])
        print(f"{a.batch} x {a.length} tokens, top-{a.k}, {a.rounds} interleaved rounds ({binary})")
        for m, ts in times.items():
            q = statistics.quantiles(ts, n=4)
            print(f"{m:7s} median {statistics.median(ts) * 1000:8.1f} ms  (quartiles {q[0] * 1000:.1f}, {q[2] * 1000:.1f})"
                  f"  throughput vs gRPC {g / statistics.median(ts):.3f}x")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
