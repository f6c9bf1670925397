"""Overhead of the Python Prefetcher's loop per batch (a benchmark, not a test).

`logitd.Prefetcher` (batches pulled from a Python iterator, targets handed to a
Python loop as `logitd.Targets`) against the Rust `Prefetcher` drained in Rust
(`logitd._native.rust_prefetch`), on the same batches (batch i with seed i) and
the same server, against a FAST teacher: the tiny random Llama fixture
(server/tests/fixtures/tiny/llama), so that the client's work per batch is not
hidden behind the teacher's. The variants run one after another in each round,
their order rotated from round to round; the overhead of a round is (wall time of
the Python run - wall time of the Rust run) / batches. The same rounds record the
client process's CPU time (all its threads) and the server's (from /proc).

The scale to judge it by: the time per batch of a real teacher, SmolLM2-135M-Instruct
Q4_1 served by the same binary, through the Rust Prefetcher, same batch shape and
k, measured in the same run (a few rounds spread over the tiny rounds).

    python client/python/bench/prefetch_overhead.py [--rounds 7] [--batches 64] \
        [--sequences 8] [--length 128] [-k 64 256] [--json out.json]

The tiny fixture's context is 64 positions; its server is started with
--max-sequence-length LENGTH so that both teachers get the same batch shape (the
numbers it returns past position 64 do not matter here). Token ids are drawn below
the tiny fixture's vocab_size (96) and sent to both teachers.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import logitd
from logitd import _native

REPO = Path(__file__).resolve().parents[3]
TICK = os.sysconf("SC_CLK_TCK")


class Server:
    """`BINARY serve --model MODEL` on 127.0.0.1 (ports chosen by the OS)."""

    def __init__(self, binary: Path, model: Path, extra: tuple[str, ...] = (), startup_s: float = 300):
        self.log_path = Path(tempfile.mkstemp(prefix="logitd-bench-", suffix=".log")[1])
        argv = [str(binary), "serve", "--model", str(model), "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0", *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        try:
            line: list[bytes] = []
            t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
            t.start()
            t.join(startup_s)
            m = re.search(rb"gRPC on (127\.0\.0\.1:\d+)", line[0] if line else b"")
            if not m:
                raise RuntimeError(f"{model}: no address on stdout; log:\n{self.log()}")
            threading.Thread(target=lambda: shutil.copyfileobj(self.proc.stdout, open(os.devnull, "wb")),
                             daemon=True).start()
            self.uri = f"http://{m.group(1).decode()}"
            deadline = time.monotonic() + startup_s
            while not re.search(rb"\bserving grpc_addr=", self.log_path.read_bytes()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{model}: not serving (exit {self.proc.returncode}); log:\n{self.log()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_python(client, batch, n: int, depth: int, k: int) -> tuple[int, int]:
    positions = entries = 0
    for _, t in logitd.Prefetcher(client, (batch for _ in range(n)), depth=depth, num_samples=k):
        positions += t.num_positions
        entries += len(t.token_ids)
    return positions, entries


def run_rust(client, flat, lens, n: int, depth: int, k: int) -> tuple[int, int]:
    positions, _secs = _native.rust_prefetch(client._native, flat, lens, n, depth, k)
    return positions, -1


def measure(fn, server: Server) -> dict:
    c0, s0, t0 = time.process_time(), server.cpu_s(), time.perf_counter()
    positions, entries = fn()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "client_cpu_s": time.process_time() - c0, "server_cpu_s": server.cpu_s() - s0,
            "positions": positions, "entries": entries}


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    flags: set[str] = set()
    for ln in open("/proc/cpuinfo"):
        if ln.startswith("flags"):
            flags = set(ln.split(":", 1)[1].split())
            break
    return {"cpu": model, "nproc": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def med_range(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=Path, default=REPO / "target/debug/logitd")
    ap.add_argument("--tiny", type=Path, default=REPO / "server/tests/fixtures/tiny/llama")
    ap.add_argument("--teacher", type=Path,
                    default=Path.home() / ".cache/logitd/teachers/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("-k", "--num-samples", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batches", type=int, default=64, help="batches per run on the tiny teacher")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--teacher-batches", type=int, default=4, help="batches per SmolLM2 run")
    ap.add_argument("--teacher-rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every number to this file")
    args = ap.parse_args()

    # A private copy of the binary: a cargo build may relink target/debug/logitd meanwhile.
    tmp = Path(tempfile.mkdtemp(prefix="logitd-bench-bin-"))
    binary = tmp / "logitd"
    shutil.copy2(args.binary, binary)
    meta = {
        "argv": sys.argv[1:], "date_utc": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}",
        "machine": machine(), "loadavg_before": os.getloadavg(),
        "binary": {"path": str(args.binary), "sha256": sha256(binary),
                   "mtime_utc": f"{datetime.datetime.fromtimestamp(args.binary.stat().st_mtime, datetime.timezone.utc):%Y-%m-%d %H:%M:%S}"},
        "git_head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                   capture_output=True, text=True).stdout.strip(),
        "python": platform.python_version(), "numpy": np.__version__, "logitd": logitd.__version__,
        "shape": {"sequences": args.sequences, "length": args.length, "depth": args.depth},
    }
    tiny = teacher = None
    try:
        tiny = Server(binary, args.tiny, ("--max-sequence-length", str(args.length)))
        teacher = Server(binary, args.teacher)
        tc = logitd.TeacherClient(tiny.uri, timeout_s=600)
        sc = logitd.TeacherClient(teacher.uri, timeout_s=600)
        vocab = tc.model_info().vocab_size
        meta["tiny_vocab_size"] = vocab
        meta["teacher_vocab_size"] = sc.model_info().vocab_size
        rng = np.random.default_rng(0)
        arr = rng.integers(0, vocab, (args.sequences, args.length), dtype=np.int64)
        lst = arr.tolist()
        flat = arr.astype(np.uint32).reshape(-1)
        lens = np.full(args.sequences, args.length, np.int64)

        variants = {
            "rust": lambda c, n, k: run_rust(c, flat, lens, n, args.depth, k),
            "python_ndarray": lambda c, n, k: run_python(c, arr, n, args.depth, k),
            "python_list": lambda c, n, k: run_python(c, lst, n, args.depth, k),
        }
        order = list(variants)
        teacher_at = sorted({round(i * (args.rounds - 1) / max(1, args.teacher_rounds - 1))
                             for i in range(args.teacher_rounds)}) if args.teacher_rounds else []
        raw: dict = {str(k): {"tiny": [], "teacher": []} for k in args.num_samples}
        for k in args.num_samples:  # warm-up: connections, first requests
            for name, f in variants.items():
                f(tc, 2, k)
            run_rust(sc, flat, lens, 1, args.depth, k)
        for r in range(args.rounds):
            for k in args.num_samples:
                rot = order[r % len(order):] + order[:r % len(order)]
                rec = {"round": r, "order": rot, "loadavg_1m": os.getloadavg()[0]}
                for name in rot:
                    rec[name] = measure(lambda: variants[name](tc, args.batches, k), tiny)
                raw[str(k)]["tiny"].append(rec)
                print(f"round {r} k={k}: " + ", ".join(
                    f"{n} {rec[n]['wall_s'] / args.batches * 1e3:.2f} ms" for n in order), flush=True)
                if r in teacher_at:
                    m = measure(lambda: run_rust(sc, flat, lens, args.teacher_batches, args.depth, k), teacher)
                    m.update(round=r, loadavg_1m=os.getloadavg()[0])
                    # entries per position of the real teacher: one plain sample() of the batch
                    if not raw[str(k)]["teacher"]:
                        t = sc.sample(lst, num_samples=k, seed=0)
                        m["entries_per_position"] = len(t.token_ids) / t.num_positions
                    raw[str(k)]["teacher"].append(m)
                    print(f"  SmolLM2 k={k}: {m['wall_s'] / args.teacher_batches:.2f} s/batch", flush=True)
    finally:
        for s in (tiny, teacher):
            if s is not None:
                s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    meta["loadavg_after"] = os.getloadavg()

    # Summary: per-round differences against the Rust run of the same round.
    summary: dict = {}
    B = args.batches
    lines = [
        f"| k | tiny: Rust ms/batch | Python (ndarray) - Rust, µs/batch: median [min, max] | "
        f"Python (list) - Rust, µs/batch | client CPU, Python (ndarray) - Rust, µs/batch | "
        f"tiny server CPU ms/batch | SmolLM2 (Rust) ms/batch: median [min, max] | "
        f"overhead / SmolLM2 batch | entries/position tiny, SmolLM2 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in args.num_samples:
        tiny_r, teach_r = raw[str(k)]["tiny"], raw[str(k)]["teacher"]
        rust = [x["rust"]["wall_s"] / B * 1e6 for x in tiny_r]
        d_arr = [(x["python_ndarray"]["wall_s"] - x["rust"]["wall_s"]) / B * 1e6 for x in tiny_r]
        d_lst = [(x["python_list"]["wall_s"] - x["rust"]["wall_s"]) / B * 1e6 for x in tiny_r]
        c_arr = [(x["python_ndarray"]["client_cpu_s"] - x["rust"]["client_cpu_s"]) / B * 1e6 for x in tiny_r]
        srv = [x[n]["server_cpu_s"] / B * 1e6 for x in tiny_r for n in order]
        teach = [x["wall_s"] / args.teacher_batches * 1e6 for x in teach_r]
        ent_tiny = tiny_r[0]["python_ndarray"]["entries"] / tiny_r[0]["python_ndarray"]["positions"]
        ent_teach = teach_r[0].get("entries_per_position", float("nan")) if teach_r else float("nan")
        s = summary[str(k)] = {
            "rust_us": med_range(rust), "python_ndarray_minus_rust_us": med_range(d_arr),
            "python_list_minus_rust_us": med_range(d_lst), "client_cpu_ndarray_minus_rust_us": med_range(c_arr),
            "tiny_server_cpu_us": med_range(srv), "smollm2_rust_us": med_range(teach),
            "entries_per_position_tiny": ent_tiny, "entries_per_position_smollm2": ent_teach,
        }
        share = s["python_ndarray_minus_rust_us"][0] / s["smollm2_rust_us"][0]

        def f(t, scale=1.0, fmt="{:,.0f}"):
            return f"{fmt.format(t[0] / scale)} [{fmt.format(t[1] / scale)}, {fmt.format(t[2] / scale)}]"

        lines.append(
            f"| {k} | {f(s['rust_us'], 1e3, '{:.1f}')} | {f(s['python_ndarray_minus_rust_us'])} | "
            f"{f(s['python_list_minus_rust_us'])} | {f(s['client_cpu_ndarray_minus_rust_us'])} | "
            f"{f(s['tiny_server_cpu_us'], 1e3, '{:.1f}')} | {f(s['smollm2_rust_us'], 1e3, '{:,.0f}')} | "
            f"{share:.2%} | {ent_tiny:.1f}, {ent_teach:.1f} |")
        s["share_of_smollm2_batch"] = share
    table = "\n".join(lines)
    print(json.dumps(meta, indent=1))
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "rounds": raw, "table": table},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
