"""Paired differences between arms of a kd_table.py run, at its last step.

    python client/python/experiments/kd_paired.py RESULTS_DIR

Reads RESULTS_DIR/kd_curves.csv and writes RESULTS_DIR/kd_paired.md. Arms of one
seed share the initial weights and the data order, so arm A minus arm B is taken
per seed; the table gives the mean and sample std of those differences, each
seed's value, and t = mean / (std / sqrt(seeds)). With 3 seeds (2 degrees of
freedom) |t| > 4.30 is a two-sided 95% difference; a smaller |t| is not one,
whatever the signs. When every seed's difference is the same (std 0), t is
+inf or -inf with the sign of that difference, and undefined (nan) when that
difference is 0: the table says so rather than print a bare number.
"""

import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

PAIRS = [
    ("sample256_counts", "top256", "sampled k=256 vs top-256"),
    ("sample256_counts", "top256_tail", "sampled k=256 vs top-256 + tail"),
    ("sample50_counts", "top20", "sampled k=50 vs top-20; 1.44x its count-free bytes"),
    ("sample50_counts", "top256", "sampled k=50 vs top-256"),
    ("sample256_counts", "sample256_renorm", "the same draws: Counts vs Renormalized"),
    ("top256_tail", "top256", "tail bucket vs plain renormalised top-256"),
    ("sample256_counts", "full", "sampled k=256 vs the full distribution"),
    ("top20", "hard", "top-20 vs hard labels"),
]
MEASURES = [("heldout_ce", "held-out CE"), ("heldout_kl", "KL(teacher‖student)"), ("ece", "top-1 ECE")]


def paired_t(d):
    """(mean, sample std, t) of the per-seed differences d (at least 2).

    t = mean / (std / sqrt(n)); with std 0 (every difference the same) t is
    copysign(inf, mean) when the mean is not 0, and nan when it is (no
    difference at all: t is undefined, not a significant one)."""
    if len(d) < 2:
        raise ValueError(f"a paired t needs at least 2 seeds, got {len(d)}")
    mu, sd = statistics.mean(d), statistics.stdev(d)
    if sd > 0:
        return mu, sd, mu / (sd / math.sqrt(len(d)))
    return mu, sd, math.copysign(math.inf, mu) if mu != 0 else math.nan


def t_text(t):
    """t for the table; the infinite and undefined cases spelled out."""
    if math.isnan(t):
        return "t undefined: 0 in every seed"
    if math.isinf(t):
        return f"t = {'+' if t > 0 else '-'}inf: the same difference in every seed"
    return f"t = {t:.1f}"


def main(results):
    rows = list(csv.DictReader(open(results / "kd_curves.csv")))
    last = max(int(r["step"]) for r in rows)
    final = defaultdict(dict)
    for r in rows:
        if int(r["step"]) == last:
            final[r["arm"]][int(r["seed"])] = r
    seeds = sorted(next(iter(final.values())))
    lines = [
        f"# Paired differences at step {last} ({len(seeds)} seeds)", "",
        f"command: `python client/python/experiments/kd_paired.py {results}`", "",
        "A − B per seed (same initial weights and data order); mean ± sample std of the "
        f"differences, t = mean / (std / √{len(seeds)}); per-seed values in brackets. "
        "Negative = A lower (better) on all three measures.", "",
        "| A − B | " + " | ".join(m for _, m in MEASURES) + " |",
        "|---|" + "---|" * len(MEASURES),
    ]
    for a, b, what in PAIRS:
        if a not in final or b not in final:
            continue
        cells = []
        for key, _ in MEASURES:
            d = [float(final[a][s][key]) - float(final[b][s][key]) for s in seeds]
            mu, sd, t = paired_t(d)
            cells.append(f"{mu:+.3f} ± {sd:.3f} ({t_text(t)}) [{', '.join(f'{x:+.3f}' for x in d)}]")
        lines.append(f"| {a} − {b} ({what}) | " + " | ".join(cells) + " |")
    (results / "kd_paired.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
