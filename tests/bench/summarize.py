"""Reads the raw results of tests/bench/compare.sh, prints the table of ratios
and writes tests/bench/results/compare-<date>.md.

    summarize.py WORK_DIR RESULTS_DIR "SETTINGS" GGUF PYTHON
"""

import datetime
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys


def load(path):
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def rounds(work, prefix):
    files = sorted(glob.glob(os.path.join(work, f"{prefix}-[0-9].json")) + glob.glob(os.path.join(work, f"{prefix}-[0-9][0-9].json")),
                   key=lambda p: int(re.search(r"-(\d+)\.json$", p).group(1)))
    return [load(p) for p in files]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def span(xs, fmt="{:.2f}"):
    return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}" if xs else "n/a"


def prom(path):
    """Prometheus text → {name{labels}: value}."""
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        if line.startswith("# scraped_at "):
            out["scraped_at"] = float(line.split()[-1])
            continue
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def delta(before, after, key):
    return after.get(key, 0.0) - before.get(key, 0.0)


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""


PERF_CLASSES = [
    ("sampler (logitd::sampler, exp)", r"logitd::sampler|exp_f32"),
    ("matmul (gemm: forward and LM head)", r"gemm|matmul|MatMul|sgemm"),
    ("thread pool hand-offs (candle barrier, rayon)", r"rayon|crossbeam|Barrier|call_trampoline"),
    ("other tensor ops (candle)", r"candle"),
    ("protobuf encode/decode", r"prost|logitd_proto|logitd::response|encode_values"),
    ("gRPC, HTTP/2, tokio", r"tonic|\bh2::|hyper|tokio|tower|mio::|bytes::"),
    ("memcpy/malloc (libc)", r"memmove|memcpy|memset|malloc|free|_int_|realloc|cfree"),
    ("libm", r"libm\.so|__ieee754|__exp|__log"),
]


def perf_classes(path):
    if not os.path.exists(path):
        return None
    totals = {}
    for line in open(path):
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if not m:
            continue
        pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        text = f"{dso} {sym}"
        if kind == "k" or "kernel" in dso:
            cls = "kernel (syscalls, page faults, scheduling)"
        else:
            cls = next((name for name, pat in PERF_CLASSES if re.search(pat, text)), "other")
        totals[cls] = totals.get(cls, 0.0) + pct
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main():
    work, results, settings, gguf, python = sys.argv[1:6]
    a, b, c = rounds(work, "a"), rounds(work, "b"), rounds(work, "c")
    n = min(len(a), len(b), len(c))
    a, b, c = a[:n], b[:n], c[:n]
    ab = [x["positions_per_s"] / y["positions_per_s"] for x, y in zip(a, b)]
    ac = [x["positions_per_s"] / y["positions_per_s"] for x, y in zip(a, c)]
    d_l, d_t = rounds(work, "d-logitd"), rounds(work, "d-torch")
    d_l1, d_t1 = rounds(work, "d-logitd1"), rounds(work, "d-torch1")
    dd = [t["us_per_row"] / l["us_per_row"] for l, t in zip(d_l, d_t)]
    dd1 = [t["us_per_row"] / l["us_per_row"] for l, t in zip(d_l1, d_t1)]
    vocab = a[0]["vocab_size"]
    k = a[0]["num_samples"]
    bpp = med([x["bytes_per_position"] for x in a])
    ids = med([x["distinct_ids_per_position"] for x in a])
    topk_pairs = k * (4 + 4)
    dense_f16 = 2 * vocab
    f16 = load(os.path.join(work, "a-f16.json")) if os.path.exists(os.path.join(work, "a-f16.json")) else None
    stream = load(os.path.join(work, "a-stream.json")) if os.path.exists(os.path.join(work, "a-stream.json")) else None
    threads_l = d_l[0]["threads"] if d_l else "?"
    threads_t = d_t[0]["threads"] if d_t else "?"

    rows = [
        ("(a)/(b) logitd through gRPC vs its engine alone (positions/s)",
         f"{med([x['positions_per_s'] for x in a]):.1f}", f"{med([x['positions_per_s'] for x in b]):.1f}",
         f"{med(ab):.2f} ({span(ab)})", ">= 0.9", med(ab) >= 0.9),
        ("(a)/(c) logitd through gRPC vs transformers + torch in process (positions/s)",
         f"{med([x['positions_per_s'] for x in a]):.1f}", f"{med([x['positions_per_s'] for x in c]):.1f}",
         f"{med(ac):.2f} ({span(ac)})", "> 1", med(ac) > 1),
        (f"(d) sampler alone vs torch softmax+multinomial+unique, {threads_l} vs {threads_t} threads (µs/row)",
         f"{med([x['us_per_row'] for x in d_l]):.0f}", f"{med([x['us_per_row'] for x in d_t]):.0f}",
         f"{med(dd):.2f} ({span(dd)})", ">= 5", med(dd) >= 5),
        ("(d) the same, 1 thread each (µs/row)",
         f"{med([x['us_per_row'] for x in d_l1]):.0f}", f"{med([x['us_per_row'] for x in d_t1]):.0f}",
         f"{med(dd1):.2f} ({span(dd1)})", ">= 5", med(dd1) >= 5),
        (f"(e) bytes/position vs top-{k} (int32 id, f32 logprob) pairs",
         f"{bpp:.0f}", f"{topk_pairs}", f"{topk_pairs / bpp:.2f}", "> 1", topk_pairs / bpp > 1),
        ("(e) bytes/position vs the dense f16 row",
         f"{bpp:.0f}", f"{dense_f16}", f"{dense_f16 / bpp:.0f}", "> 1", dense_f16 / bpp > 1),
    ]
    if f16:
        rows.append((f"(e) bytes/position with f16 values vs top-{k} pairs",
                     f"{f16['bytes_per_position']:.0f}", f"{topk_pairs}",
                     f"{topk_pairs / f16['bytes_per_position']:.2f}", "> 1",
                     topk_pairs / f16["bytes_per_position"] > 1))

    table = ["| comparison | logitd | peer | ratio (median, range over rounds) | goal | met |",
             "| --- | ---: | ---: | ---: | ---: | :---: |"]
    for name, l, p, r, goal, ok in rows:
        table.append(f"| {name} | {l} | {p} | {r} | {goal} | {'yes' if ok else '**no**'} |")
    print("\n".join(table))

    # --- details ---------------------------------------------------------------
    per_round = ["| round | (a) logitd gRPC pos/s | (b) engine pos/s | (c) torch pos/s | (a)/(b) | (a)/(c) | (a) p50 / p90 / p99 latency (s) | (a) errors |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, (x, y, z) in enumerate(zip(a, b, c), 1):
        lat = x["latency_ms"]
        per_round.append(
            f"| {i} | {x['positions_per_s']:.1f} | {y['positions_per_s']:.1f} | {z['positions_per_s']:.1f} | "
            f"{x['positions_per_s'] / y['positions_per_s']:.2f} | {x['positions_per_s'] / z['positions_per_s']:.2f} | "
            f"{lat['p50'] / 1e3:.2f} / {lat['p90'] / 1e3:.2f} / {lat['p99'] / 1e3:.2f} | "
            f"{x['requests_failed']} {json.dumps(x['errors']) if x['errors'] else ''} |")
    sampler_rows = ["| round | logitd µs/row | torch µs/row | ratio | logitd 1 thread | torch 1 thread | ratio |",
                    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, (l, t, l1, t1) in enumerate(zip(d_l, d_t, d_l1, d_t1), 1):
        sampler_rows.append(f"| {i} | {l['us_per_row']:.0f} | {t['us_per_row']:.0f} | {t['us_per_row'] / l['us_per_row']:.2f} | "
                            f"{l1['us_per_row']:.0f} | {t1['us_per_row']:.0f} | {t1['us_per_row'] / l1['us_per_row']:.2f} |")
    torch_sampling = {s: med([t["breakdown_us_per_row"][s] for t in d_t]) for s in d_t[0]["breakdown_us_per_row"]} if d_t else {}

    # Where the time goes.
    eb = {s: med([y["breakdown_us_per_position"][s] for y in b]) for s in b[0]["breakdown_us_per_position"]}
    tb = {s: med([z["breakdown_us_per_position"][s] for z in c]) for s in c[0]["breakdown_us_per_position"]}
    eb_total, tb_total = sum(eb.values()), sum(tb.values())
    def over_a_runs(key):
        """The change of a server metric over the n (a) runs, summed."""
        return sum(delta(prom(os.path.join(work, f"metrics-a-{i}-before.txt")),
                         prom(os.path.join(work, f"metrics-a-{i}-after.txt")), key)
                   for i in range(1, n + 1))

    fwd = over_a_runs("logitd_forward_duration_seconds_sum")
    smp = over_a_runs("logitd_sample_duration_seconds_sum")
    queue = over_a_runs("logitd_queue_duration_seconds_sum")
    qn = over_a_runs("logitd_queue_duration_seconds_count")
    bs = over_a_runs("logitd_batch_sequences_sum")
    bn = over_a_runs("logitd_batch_sequences_count")
    wall = over_a_runs("scraped_at")
    perf = perf_classes(os.path.join(work, "perf.txt"))

    # The time the run ended (the summary may be rendered again later).
    end_file = os.path.join(work, "load-end.txt")
    ended = os.path.getmtime(end_file) if os.path.exists(end_file) else None
    now = datetime.datetime.fromtimestamp(ended, datetime.timezone.utc) if ended else datetime.datetime.now(datetime.timezone.utc)
    cpu = sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor()
    mem = sh("free -g | awk '/^Mem:/ {print $2}'")
    commit_file = os.path.join(work, "commit.txt")
    if os.path.exists(commit_file):
        commit = open(commit_file).read().strip()
    else:
        commit = sh("git rev-parse --short HEAD") + (" (with uncommitted changes)" if sh("git status --porcelain -- server client proto tests/bench") else "")
    rustc = sh("rustc --version")
    versions = sh(f"{python} -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__)'")
    load_start = open(os.path.join(work, "load-start.txt")).read().strip() if os.path.exists(os.path.join(work, "load-start.txt")) else ""
    load_end = open(os.path.join(work, "load-end.txt")).read().strip() if os.path.exists(os.path.join(work, "load-end.txt")) else ""
    x0 = a[0]

    md = []
    md.append(f"# logitd vs what a user would write instead — {now:%Y-%m-%d %H:%M} UTC\n")
    header = os.path.join(work, "machine.txt")
    if os.path.exists(header):
        md.extend(f"- {line}" for line in open(header).read().splitlines())
        md.append("")
    md.append(f"Machine: {cpu}, {os.cpu_count()} cores, {mem} GiB, {platform.system()} {platform.release()}. "
              f"Commit {commit}; {rustc}; {versions}.\n")
    md.append(f"Settings: {settings}. Teacher `{os.path.basename(gguf)}` (f32 on the CPU, vocabulary {vocab}), "
              f"requests of {x0['sequences_per_request']} sequences × {x0['length']} tokens of *Twelfth Night*, "
              f"k = {k}, {x0['concurrency']} concurrent unary callers.\n")
    md.append("**The machine is a shared virtual machine whose speed changes over time** (see the per-round throughputs "
              f"below; load average at start: `{load_start}`; at the end: `{load_end}`). (a), (b) and (c) ran interleaved, "
              "in a rotating order, so that a slow spell falls on every side alike; ratios are per round, then the median. "
              "Absolute numbers mean little; compare the ratios.\n")
    md.append("## Ratios\n")
    md.extend(table)
    md.append("")
    md.append("Ratios are logitd ÷ peer for throughput and peer ÷ logitd for time and bytes, so above 1 means logitd is better "
              "(for (a)/(b): the share of the engine's throughput that survives gRPC, batching and encoding).\n")
    md.append("## Per round\n")
    md.extend(per_round)
    md.append("")
    md.append(f"(a): {med([x['distinct_ids_per_position'] for x in a]):.1f} distinct ids per position, "
              f"{bpp:.0f} response bytes per position (protobuf + gRPC header).")
    if stream:
        md.append(f" Streaming ({stream['concurrency']} streams, depth {stream['depth']}): "
                  f"{stream['positions_per_s']:.1f} positions/s, p50 {stream['latency_ms']['p50'] / 1e3:.2f} s, "
                  f"{stream['requests_failed']} errors.")
    if f16:
        md.append(f" f16 values: {f16['bytes_per_position']:.0f} bytes per position.")
    md.append("\n")
    md.append("Sampler alone on the teacher's logits of the first positions of the text "
              f"({d_l[0]['rows'] if d_l else '?'} rows × {vocab}):\n")
    md.extend(sampler_rows)
    md.append("")
    if torch_sampling:
        md.append("torch's sampling per row (median, µs): " + ", ".join(f"{s} {v:.0f}" for s, v in torch_sampling.items()) + ".\n")
    md.append("## Where the time goes\n")
    md.append("Step by step, per returned position (µs; logitd: two batches of the engine run stage by stage; torch: "
              "the same stages of the peer), medians over rounds:\n")
    md.append("| stage | logitd | share | torch | share |")
    md.append("| --- | ---: | ---: | ---: | ---: |")
    pairs = [("forward (to hidden states)", eb.get("forward"), tb.get("forward")),
             ("LM head (logits)", eb.get("lm_head"), tb.get("lm_head")),
             ("sampling (logitd: sampler; torch: softmax + multinomial + unique/counts/log p)", eb.get("sampler"),
              sum(tb.get(s, 0) for s in ("softmax", "multinomial", "unique_counts_logprobs"))),
             ("response encoding (rows → protobuf bytes)", eb.get("encode"), None)]
    for name, l, t in pairs:
        md.append(f"| {name} | {l:.1f} | {100 * l / eb_total:.1f}% | "
                  + (f"{t:.1f} | {100 * t / tb_total:.1f}% |" if t is not None else "– | – |"))
    md.append("")
    md.append(f"In the server under load (metrics over the {n} (a) runs, {wall:.0f} s of wall time): the teacher forward took "
              f"{fwd:.1f} s ({100 * fwd / wall:.0f}% of the wall time), LM head + sampling {smp:.1f} s "
              f"({100 * smp / wall:.0f}%); the engine computed {100 * (fwd + smp) / wall:.0f}% of the time. "
              f"Batches held {bs / bn if bn else float('nan'):.1f} sequences on average; a sequence waited "
              f"{1e3 * queue / qn if qn else float('nan'):.1f} ms in the queue on average.\n")
    if perf:
        md.append("CPU profile of the server process under the same load (`perf record -e cpu-clock`, flat, by symbol class):\n")
        md.append("| class | share of samples |")
        md.append("| --- | ---: |")
        for cls, pct in perf.items():
            if pct >= 0.05:
                md.append(f"| {cls} | {pct:.1f}% |")
        md.append("")
    else:
        md.append("(perf was not available: no CPU profile.)\n")
    md.append("## How to reproduce\n")
    md.append("```\ntests/bench/compare.sh      # THREADS, DURATION, ROUNDS, SEQUENCES, LENGTH, K, CONCURRENCY: see the script\n```\n")
    md.append(f"The raw measurements (every JSON and table, the server's metrics before and after each (a) run, the perf "
              f"report) are in `compare-{now:%Y-%m-%d}-raw.tar.xz` next to this file.\n")

    os.makedirs(results, exist_ok=True)
    out = os.path.join(results, f"compare-{now:%Y-%m-%d}.md")
    with open(out, "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
