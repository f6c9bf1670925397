"""Turns the JSON lines of tests/gpu/run.sh into its markdown table.

    python tests/gpu/report.py RESULTS.jsonl --device NAME --date YYYY-MM-DD
    python tests/gpu/report.py --from-test < gpu_sampler-output   # AGREEMENT/TEACHER lines -> JSON
    python tests/gpu/report.py --check-preflight RESULTS.jsonl    # judge the preflight's launches
"""

import argparse
import json
import re
import sys


def from_test():
    # Line by line, flushed: run.sh streams the test's output through here.
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("AGREEMENT "):
            body = line[len("AGREEMENT "):]
            if " skipped" in body:
                print(json.dumps({"bench": "agreement", "what": body, "skipped": True}), flush=True)
                continue
            fields = dict(re.findall(r"(\w+)=(\S+)", body))
            what = re.sub(r"\s*rows=.*$", "", body)
            print(json.dumps({"bench": "agreement", "what": what, **fields}), flush=True)
        elif line.startswith("TEACHER "):
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            name = line.split()[1]
            print(json.dumps({"bench": "teacher_vs_cpu", "model": name, **fields}), flush=True)


def check_preflight(path):
    """The preflight's launches (gpu_bench preflight records how many of each
    launch's rows are the CPU's, and fails only on load or launch errors),
    judged for the kernel stage: top-k rows must all be the CPU's; sample rows
    may differ at a CDF boundary on max(1, rows / 1000) rows, as in the tests.
    Returns the exit status."""
    try:
        recs = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
    except FileNotFoundError:
        recs = []
    launches = [r for r in recs if r.get("bench") == "preflight_launch"]
    if not launches:
        print("kernel: preflight launches: none recorded in this run (preflight not run, or a dry run): not judged")
        return 0
    failed = 0
    for r in launches:
        rows, same = int(r["rows"]), int(r["identical"])
        allowed = 0 if r["method"] == "TopK" else max(1, rows // 1000)
        ok = rows - same <= allowed
        failed += not ok
        print(f'kernel: preflight launch {r["dtype"]} {r["method"]}: {same}/{rows} rows identical to the CPU '
              f'(at most {allowed} may differ): {"ok" if ok else "FAIL"}')
    return 1 if failed else 0


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" ---: " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def report(path, device, date):
    recs = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
    by = lambda b: [r for r in recs if r.get("bench") == b]
    # Later runs of a measurement replace earlier ones.
    def last(items, key):
        d = {}
        for r in items:
            d[key(r)] = r
        return list(d.values())

    print(f"# logitd on {device}, {date}\n")
    print("Measured by tests/gpu/run.sh in one session; ratios compare numbers from that same run.\n")

    stages = by("stage")
    if stages:
        print("## Stages\n")
        print(table(["stage", "status", "seconds", "limit"],
                    [(r["stage"], r["status"], r.get("seconds", "—"), r.get("limit", "—")) for r in stages]))
        print()
    gpu = by("gpu")
    dev = by("device")
    if gpu or dev:
        g = gpu[-1] if gpu else {}
        d = dev[-1] if dev else {}
        print(f'GPU: {g.get("name") or d.get("device", "?")}, compute capability '
              f'{g.get("compute_cap") or d.get("compute_capability", "?")}, driver {g.get("driver", "?")}, '
              f'{d.get("sms", "?")} SMs.\n')
    res = last(by("kernel_resources"), lambda r: (r["kernel"], r["method"], r["k"]))
    if res:
        print("## Sampling kernel resources (from the driver)\n")
        print(table(["entry point", "method", "k", "V", "registers", "local bytes (spills)", "static shared",
                     "blocks/SM"],
                    [(r["kernel"], r["method"], r["k"], r["vocab"], r["registers"], r["local_bytes"],
                      r["static_shared_bytes"], r["blocks_per_sm"]) for r in res]))
        print()
    pre = by("preflight_launch")
    if pre:
        print("Preflight launches (8 rows, V = 32,000, k = 64) identical to the CPU: "
              + "; ".join(f'{r["dtype"]} {r["method"]} {r["identical"]}/{r["rows"]}' for r in pre) + "\n")

    agree = last(by("agreement"), lambda r: r["what"])
    if agree:
        print("## Kernel vs CPU reference (identical ids and counts)\n")
        rows = []
        for r in agree:
            if r.get("skipped"):
                rows.append((r["what"], "—", "—", "—", "—", "—"))
            else:
                rows.append((r["what"], r["rows"], r["identical"], r["boundary"], r["other"],
                             f'{float(r["fraction"]) * 100:.3f}%'))
        print(table(["case", "rows", "identical", "differ at a CDF boundary", "differ otherwise", "identical"], rows))
        print()
    san = last(by("sanitizer"), lambda r: r["tool"])
    if san:
        def outcome(r):
            if "result" in r:
                return r["result"]
            return ("clean" if r.get("exit") == 0 else f'exit {r.get("exit")}') + (
                f' ({r["summary"]})' if r.get("summary") else "")
        print("compute-sanitizer: " + "; ".join(f'{r["tool"]} {outcome(r)}' for r in san) + "\n")
    tv = last(by("teacher_vs_cpu"), lambda r: (r["model"], r["dtype"]))
    if tv:
        print("## Teacher on CUDA vs CPU f32 (tiny fixtures)\n")
        print(table(["model", "dtype", "max abs diff", "mean abs diff", "max abs logit"],
                    [(r["model"], r["dtype"], r["max_abs_diff"], r["mean_abs_diff"], r["max_abs_logit"]) for r in tv]))
        print()

    copy = last(by("copy"), lambda r: 0)
    samp = last(by("sampler"), lambda r: (r["method"], r["dtype"], r["vocab"], r["rows"]))
    torch = {(r["dtype"], r["vocab"], r["rows"]): r for r in by("torch_sampler")}
    tmap = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    if copy:
        c = copy[0]
        print(f'## Sampling kernel (k = 256)\n\nDevice-to-device copy: {c["copy_gb_s"]} GB/s copied '
              f'({c["read_write_gb_s"]} GB/s of reads + writes). Floor = one read of the row at that '
              'read + write rate.\n')
        rows = []
        for r in sorted(samp, key=lambda r: (r["method"], r["vocab"], r["dtype"], r["rows"])):
            t = torch.get((tmap.get(r["dtype"], r["dtype"]), r["vocab"], r["rows"])) if r["method"] == "Sample" else None
            speedup = t["us_per_row"] / r["call_us_per_row"] if t else None
            rows.append((r["method"], r["vocab"], r["dtype"], r["rows"], fmt(r["kernel_us_per_row"], ".3f"),
                         fmt(r["call_us_per_row"], ".3f"), fmt(r["floor_us_per_row"], ".3f"),
                         f'{r["efficiency"] * 100:.0f}%', fmt(t["us_per_row"] if t else None, ".2f"),
                         fmt(speedup, ".1f") + ("×" if speedup else "")))
        print(table(["method", "V", "dtype", "rows", "kernel µs/row", "call µs/row", "floor µs/row",
                     "floor/kernel", "PyTorch µs/row", "PyTorch / call"], rows))
        print()
        cpu = by("cpu_sampler")
        if cpu:
            c = cpu[-1]
            print(f'CPU reference on the same machine: {c["us_per_row"]} µs/row at V = {c["vocab"]} '
                  f'({c["threads"]} threads).\n')

    fw = last(by("forward"), lambda r: r["model"])
    hf = {r["model"]: r for r in by("hf_forward")}
    eng = {r["model"]: r for r in by("engine")}
    e2e = {r.get("label"): r for r in by("e2e")}
    if fw:
        print("## Teacher forward, bf16 (random weights)\n")
        rows = []
        for r in fw:
            h = hf.get(r["model"])
            ratio = lambda a, b: fmt(a / b, ".2f") + "×" if a and b else "—"
            e = eng.get(r["model"])
            s = e2e.get(r["model"])
            rows.append((r["model"], f'{r["sequences"]}×{r["length"]}',
                         fmt(r["tokens_per_s_forward"], ".0f"), fmt(h and h["tokens_per_s_forward"], ".0f"),
                         ratio(r["tokens_per_s_forward"], h and h["tokens_per_s_forward"]),
                         fmt(r["tokens_per_s_forward_head_sample"], ".0f"),
                         fmt(h and h["tokens_per_s_forward_head_sample"], ".0f"),
                         ratio(r["tokens_per_s_forward_head_sample"], h and h["tokens_per_s_forward_head_sample"]),
                         r["mfu_forward"] if r["mfu_forward"] is None else f'{r["mfu_forward"] * 100:.1f}%',
                         fmt(e and e["tokens_per_s"], ".0f"), fmt(s and s["tokens_per_s"], ".0f"),
                         ratio(s and s["tokens_per_s"], e and e["tokens_per_s"])))
        print(table(["teacher", "batch", "logitd fwd tok/s", "HF fwd tok/s", "ratio",
                     "logitd fwd+head+sample tok/s", "HF fwd+head+sample tok/s", "ratio", "MFU fwd",
                     "engine tok/s", "server tok/s", "server/engine"], rows))
        print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", nargs="?")
    ap.add_argument("--from-test", action="store_true")
    ap.add_argument("--check-preflight", action="store_true")
    ap.add_argument("--device", default="")
    ap.add_argument("--date", default="")
    a = ap.parse_args()
    if a.from_test:
        from_test()
    elif a.check_preflight:
        sys.exit(check_preflight(a.jsonl))
    else:
        report(a.jsonl, a.device, a.date)


if __name__ == "__main__":
    main()
