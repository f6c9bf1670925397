"""Paired differences between arms of a kd_table.py run, at its last step.

    python client/python/experiments/kd_paired.py RESULTS_DIR

Reads RESULTS_DIR/kd_curves.csv and writes RESULTS_DIR/kd_paired.md. Arms of one
seed share the initial weights and the data order, so arm A minus arm B is taken
per seed; the table gives the mean and sample std of those differences, each
seed's value, and t = mean / (std / sqrt(seeds)). With 3 seeds (2 degrees of
freedom) |t| > 4.30 is a two-sided 95% difference; a smaller |t| is not one,
whatever the signs.
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
    ("sample50_counts", "top20", "sampled k=50 vs top-20: about equal bytes"),
    ("sample50_counts", "top256", "sampled k=50 vs top-256"),
    ("sample256_counts", "sample256_renorm", "the same draws: Counts vs Renormalized"),
    ("top256_tail", "top256", "tail bucket vs plain renormalised top-256"),
    ("sample256_counts", "full", "sampled k=256 vs the full distribution"),
    ("top20", "hard", "top-20 vs hard labels"),
]
MEASURES = [("heldout_ce", "held-out CE"), ("heldout_kl", "KL(teacher‖student)"), ("ece", "top-1 ECE")]


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
            mu, sd = statistics.mean(d), statistics.stdev(d)
            t = mu / (sd / math.sqrt(len(d))) if sd > 0 else math.inf
            cells.append(f"{mu:+.3f} ± {sd:.3f} (t = {t:.1f}) [{', '.join(f'{x:+.3f}' for x in d)}]")
        lines.append(f"| {a} − {b} ({what}) | " + " | ".join(cells) + " |")
    (results / "kd_paired.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
