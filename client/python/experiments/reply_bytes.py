#!/usr/bin/env python3
"""Reply bytes per returned position of the distillation table's wire arms, per server.

For each ``--server LABEL=BINARY`` this starts ``BINARY serve`` on the teacher
(127.0.0.1, ephemeral ports, with its metrics endpoint), waits for its
``serving`` log line, and sends the first ``--chunks`` training chunks of
kd_table.py's training set (its own ``parse_args``, ``load_tokenizer`` and
``sequences``: chunks of ``--seq-len`` + 1 tokens, of which the first
``--seq-len`` are sent, so every chunk returns ``--seq-len`` positions) with each
arm and value encoding, in requests of 64 sequences with kd_table.fetch's seeds
(``seed * 1_000_003 + c`` for the request starting at chunk c, seed 0). Bytes
per position = the increase of the server's ``logitd_response_bytes_total``
(encoded SampleLogitsResponse bytes, before gRPC framing and compression) over
a run / the positions returned in it.

Arms (kd_table's wire targets): top20 (method top_k, k 20), top256 (top_k, 256),
sample256 (method sample, k 256), sample50 (sample, 50); encodings f32 and f16.

Cross-check: for every top-k arm and every server after the first, the bytes
difference to the first server is compared with what a ``counts`` field of all
1s would cost on the wire: per sequence, 1 byte per id (varint 1) plus the
field's tag (1 byte) and its length varint, plus any growth of the sequence
message's own length varint (estimated from the measured bytes per sequence).
Sampled arms are compared for equality.

Prints no token ids or text. Example (from the repository root):

    python client/python/experiments/reply_bytes.py --server current=target/debug/logitd \\
        --server "before=$BEFORE_BIN" --train-sequences 800 --seq-len 64 --chunks 100 \\
        --json bytes.json

($BEFORE_BIN: an older logitd binary, e.g. a build of commit 25297a9, whose top-k
replies still carried counts.) Results of 2026-12-07: results/bytes-2026-12-07/.

Arguments other than the ones below go to kd_table.parse_args (--teacher,
--corpus, --dense-bin, --train-sequences, --seq-len, --heldout-sequences, --out
for its scratch tokenizer; default a temporary folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kd_table  # noqa: E402  (its data preparation: parse_args, load_tokenizer, sequences)

import numpy as np  # noqa: E402

import logitd  # noqa: E402

ARMS = {
    "top20": ("top_k", 20),
    "top256": ("top_k", 256),
    "sample256": ("sample", 256),
    "sample50": ("sample", 50),
}
ENCODINGS = ("f32", "f16")
COUNTER = "logitd_response_bytes_total"
REQUEST_SEQUENCES = 64  # kd_table.fetch's chunk


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", action="append", metavar="LABEL=BINARY", dest="servers",
                   help="a logitd binary to start and measure (repeatable; the first is the reference of the "
                        "cross-check; default current=target/debug/logitd)")
    p.add_argument("--chunks", type=int, default=200, help="training chunks sent per run (the first N)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--encodings", default=",".join(ENCODINGS))
    p.add_argument("--sampled-on", choices=("all", "first"), default="all",
                   help="run the sampled arms on every server (all) or on the first only")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    own, rest = p.parse_known_args(argv)
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest += ["--out", tempfile.mkdtemp(prefix="reply-bytes-")]
    kd = kd_table.parse_args(rest)
    servers = []
    for s in own.servers or [f"current={kd_table.REPO / 'target/debug/logitd'}"]:
        label, sep, path = s.partition("=")
        if not sep or not label or not path:
            p.error(f"--server wants LABEL=BINARY, got {s!r}")
        if not Path(path).is_file():
            p.error(f"--server {label}: {path} is not a file")
        servers.append((label, Path(path)))
    if len({l for l, _ in servers}) != len(servers):
        p.error("--server labels must differ")
    own.servers = servers
    own.arms = [a.strip() for a in own.arms.split(",") if a.strip()]
    own.encodings = [e.strip() for e in own.encodings.split(",") if e.strip()]
    for a in own.arms:
        if a not in ARMS:
            p.error(f"unknown arm {a!r}; arms: {', '.join(ARMS)}")
    return own, kd


def shown(path) -> str:
    """A binary's path as the outputs name it: relative to the repository when inside
    it, else only that it lies outside (the README says what it is)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(kd_table.REPO))
    except ValueError:
        return "(outside the repository)"


def shown_argv(argv) -> list[str]:
    out = []
    for a in argv:
        label, sep, path = a.partition("=")
        out.append(f"{label}={shown(path)}" if sep and Path(path).is_file() else a)
    return out


def varint_len(n: int) -> int:
    return max(1, (int(n).bit_length() + 6) // 7)


def measure(client, metrics, inputs: np.ndarray, method: str, k: int, encoding: str, seed: int = 0) -> dict:
    """One run: kd_table.fetch's requests, with the counter read around each request."""
    per_request, n_ids, positions, sequences = [], [], 0, 0
    t0 = time.perf_counter()
    for c in range(0, len(inputs), REQUEST_SEQUENCES):
        batch = inputs[c : c + REQUEST_SEQUENCES]
        b0 = int(round(kd_table.response_bytes(metrics)))
        t = client.sample(batch, num_samples=k, seed=seed * 1_000_003 + c, method=method, value_encoding=encoding)
        b1 = int(round(kd_table.response_bytes(metrics)))
        if b1 <= b0:
            raise RuntimeError(f"{COUNTER} did not grow over a request ({b0} -> {b1})")
        per_request.append(dict(sequences=len(batch), positions=t.num_positions, bytes=b1 - b0))
        so, off = np.asarray(t.seq_offsets, np.int64), np.asarray(t.offsets, np.int64)
        n_ids += (off[so[1:]] - off[so[:-1]]).tolist()  # ids returned per sequence
        positions += t.num_positions
        sequences += len(batch)
        if method == "top_k" and len(t.token_ids) != k * t.num_positions:
            raise RuntimeError(f"top_k k={k}: {len(t.token_ids)} ids for {t.num_positions} positions")
    total = sum(r["bytes"] for r in per_request)
    return dict(method=method, k=k, encoding=encoding, sequences=sequences, positions=positions,
                ids=int(sum(n_ids)), ids_per_sequence=n_ids, bytes=total, bytes_per_position=total / positions,
                requests=per_request, seconds=time.perf_counter() - t0)


def counts_field_cost(run: dict) -> tuple[int, int]:
    """(bytes, of which length-varint growth) that a `counts` field of all 1s adds to
    the run's replies: per sequence 1 byte per id + tag + length varint, plus the
    growth of the sequence message's own length varint (its length estimated as the
    run's mean bytes per sequence, less ~64 bytes of per-reply fields)."""
    total = growth = 0
    seq_len = []  # estimated encoded length of each sequence message, without counts
    for req in run["requests"]:
        seq_len += [max(1, (req["bytes"] - 64) // req["sequences"] - 4)] * req["sequences"]
    for i, n in enumerate(run["ids_per_sequence"]):
        field = n + 1 + varint_len(n)
        g = varint_len(seq_len[i] + field) - varint_len(seq_len[i])
        total += field + g
        growth += g
    return total, growth


def main(argv=None):
    own, kd = parse_args(argv)
    t_start = time.perf_counter()
    (kd.out / "work").mkdir(parents=True, exist_ok=True)  # kd_table's scratch folder (its tokenizer)
    tok = kd_table.load_tokenizer(kd)
    train, _ = kd_table.sequences(kd, tok)
    if own.chunks > len(train):
        sys.exit(f"--chunks {own.chunks} > the {len(train)} training chunks")
    inputs = np.ascontiguousarray(train[: own.chunks, : kd.seq_len])
    print(f"{len(train)} training chunks of {kd.seq_len} + 1 tokens; sending the first {own.chunks} "
          f"({kd.seq_len} tokens each) per run, {REQUEST_SEQUENCES} sequences per request", flush=True)

    results = []
    for si, (label, binary) in enumerate(own.servers):
        t0 = time.perf_counter()
        server = kd_table.Server(binary, kd.teacher)
        print(f"[{label}] serving after {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            client = logitd.TeacherClient(server.uri, timeout_s=600.0)
            info = client.model_info()
            for arm in own.arms:
                method, k = ARMS[arm]
                if method == "sample" and own.sampled_on == "first" and si > 0:
                    continue
                for enc in own.encodings:
                    r = measure(client, server.metrics, inputs, method, k, enc)
                    r.update(server=label, arm=arm, model_id_bytes=len(str(info.model_id).encode()))
                    results.append(r)
                    print(f"[{label}] {arm:>9} {enc}: {r['bytes']:>10,} B over {r['positions']:,} positions "
                          f"({r['sequences']} sequences, {r['ids']:,} ids): {r['bytes_per_position']:8.2f} B/pos "
                          f"({r['seconds']:.1f} s)", flush=True)
        finally:
            server.stop()

    labels = [l for l, _ in own.servers]
    by = {(r["server"], r["arm"], r["encoding"]): r for r in results}
    print("\nbytes per returned position (logitd_response_bytes_total / positions)")
    print("| arm | encoding | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for arm in own.arms:
        for enc in own.encodings:
            cells = [f"{by[(l, arm, enc)]['bytes_per_position']:.2f}" if (l, arm, enc) in by else "—" for l in labels]
            print(f"| {arm} | {enc} | " + " | ".join(cells) + " |")

    checks = []
    ref = labels[0]
    for other in labels[1:]:
        for arm in own.arms:
            for enc in own.encodings:
                a, b = by.get((ref, arm, enc)), by.get((other, arm, enc))
                if not a or not b:
                    continue
                measured = b["bytes"] - a["bytes"]
                if ARMS[arm][0] == "top_k":
                    # the reference leaves counts off; the other carries them (or vice versa)
                    with_counts, without = (b, a) if measured >= 0 else (a, b)
                    expected, growth = counts_field_cost(without)
                    expected = expected if measured >= 0 else -expected
                    ids_bytes = without["ids"] if measured >= 0 else -without["ids"]
                    overhead = expected - ids_bytes
                else:
                    expected, growth, ids_bytes, overhead = 0, 0, 0, 0
                c = dict(arm=arm, encoding=enc, reference=ref, other=other, measured_diff=measured,
                         expected_diff=expected, ids=a["ids"], sequences=a["sequences"], id_bytes=ids_bytes,
                         field_overhead=overhead, length_varint_growth=growth, residual=measured - expected,
                         per_position=measured / a["positions"], per_id=measured / a["ids"],
                         overhead_per_sequence=(measured - ids_bytes) / a["sequences"],
                         model_id_bytes=(a["model_id_bytes"], b["model_id_bytes"]))
                checks.append(c)
    if checks:
        print(f"\ncross-check: OTHER - {ref} bytes vs a counts field of all 1s (top-k), equality (sampled)")
        for c in checks:
            ok = "OK" if c["residual"] == 0 else "MISMATCH"
            print(f"  {c['other']} - {c['reference']} {c['arm']:>9} {c['encoding']}: measured {c['measured_diff']:,} B, "
                  f"expected {c['expected_diff']:,} B ({c['id_bytes']:,} B of ids + {c['field_overhead']:,} B of "
                  f"field overhead over {c['sequences']} sequences; of which {c['length_varint_growth']} B "
                  f"length-varint growth): residual {c['residual']:+,} B [{ok}]; "
                  f"{c['per_position']:.3f} B/pos, {c['per_id']:.4f} B/id, "
                  f"{c['overhead_per_sequence']:.2f} B/sequence beyond 1 B/id", flush=True)

    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall:.0f} s")
    if own.json:
        slim = [{k: v for k, v in r.items() if k != "ids_per_sequence"} for r in results]
        doc = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(["python", *shown_argv(sys.argv if argv is None else ["reply_bytes.py", *argv])]),
                   chunks=own.chunks, seq_len=kd.seq_len, train_sequences=kd.train_sequences,
                   request_sequences=REQUEST_SEQUENCES, servers=[dict(label=l, binary=shown(b)) for l, b in own.servers],
                   machine=kd_table.machine(), wall_s=wall, runs=slim, cross_check=checks)
        own.json.parent.mkdir(parents=True, exist_ok=True)
        own.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return results, checks


if __name__ == "__main__":
    main()
