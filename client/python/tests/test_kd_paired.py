"""The paired t of client/python/experiments/kd_paired.py against values worked out by
hand (float64 literals, not taken from the code): its sign, the zero-spread cases
(+inf, -inf, undefined) and the table kd_paired.py writes. No server.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "client" / "python" / "experiments" / "kd_paired.py"


def load():
    spec = importlib.util.spec_from_file_location("kd_paired", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kd_paired"] = mod
    spec.loader.exec_module(mod)
    return mod


# d = (1, 2, 6): mean 3, deviations (-2, -1, 3), sum of squares 14, sample variance
# 14 / 2 = 7, std sqrt(7) = 2.6457513110645907; t = 3 / (sqrt(7) / sqrt(3)) =
# sqrt(27 / 7) = sqrt(3.857142857142857) = 1.9639610121239315.
@pytest.mark.parametrize(
    "d, mean, std, t",
    [
        ((1.0, 2.0, 6.0), 3.0, 2.6457513110645907, 1.9639610121239315),
        ((-1.0, -2.0, -6.0), -3.0, 2.6457513110645907, -1.9639610121239315),
        # (0.5, 1.5): mean 1, std sqrt(0.5) = 0.7071067811865476, t = 1 / (0.5) = 2
        ((0.5, 1.5), 1.0, 0.7071067811865476, 2.0),
        # (-1, 0, 1): mean 0, std 1, t = 0
        ((-1.0, 0.0, 1.0), 0.0, 1.0, 0.0),
        # (-0.25, -0.5, -0.75, -1.5): mean -0.75, deviations (0.5, 0.25, 0, -0.75),
        # sum of squares 0.875, variance 0.875 / 3 = 0.2916666666666667,
        # std 0.5400617248673217, t = -0.75 / (0.5400617248673217 / 2) = -2.7774602993176543
        ((-0.25, -0.5, -0.75, -1.5), -0.75, 0.5400617248673217, -2.7774602993176543),
    ],
)
def test_t_against_hand_computed_values(d, mean, std, t):
    mu, sd, got = load().paired_t(list(d))
    assert mu == pytest.approx(mean, rel=1e-15, abs=1e-15)
    assert sd == pytest.approx(std, rel=1e-15)
    assert got == pytest.approx(t, rel=1e-14, abs=1e-15)
    assert math.copysign(1.0, got) == math.copysign(1.0, t) or t == 0.0


@pytest.mark.parametrize(
    "d, t",
    [
        ((-0.5, -0.5, -0.5), -math.inf),  # every seed lower by the same amount
        ((0.25, 0.25, 0.25), math.inf),
        ((-2.0, -2.0), -math.inf),
    ],
)
def test_zero_spread_keeps_the_sign(d, t):
    mu, sd, got = load().paired_t(list(d))
    assert sd == 0.0 and mu == d[0]
    assert got == t


def test_no_difference_at_all_is_undefined_not_significant():
    kd = load()
    mu, sd, t = kd.paired_t([0.0, 0.0, 0.0])
    assert (mu, sd) == (0.0, 0.0) and math.isnan(t)
    assert kd.t_text(t) == "t undefined: 0 in every seed"
    with pytest.raises(ValueError, match="at least 2 seeds"):
        kd.paired_t([0.1])


def test_table_shows_the_sign_of_a_zero_spread_difference(tmp_path):
    """kd_curves.csv with A lower than B by exactly 0.5 in every seed on held-out CE,
    equal KL, and an ECE difference that varies: the table gives -inf, undefined and
    the finite t (d = (1, 2, 6) / 100: t = 1.9639610121239315, printed 2.0)."""
    kd = load()
    fields = ["arm", "seed", "step", "heldout_ce", "heldout_kl", "ece"]
    rows = []
    for s, ece_diff in enumerate((0.01, 0.02, 0.06)):
        for step in (0, 10):
            rows.append(dict(arm="top256", seed=s, step=step, heldout_ce=4.0 + s, heldout_kl=1.0, ece=0.1))
            rows.append(dict(arm="sample256_counts", seed=s, step=step, heldout_ce=3.5 + s, heldout_kl=1.0,
                             ece=0.1 + ece_diff))
    with open(tmp_path / "kd_curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    kd.main(tmp_path)
    table = (tmp_path / "kd_paired.md").read_text()
    line = next(l for l in table.splitlines() if l.startswith("| sample256_counts − top256 "))
    ce, kl, ece = [c.strip() for c in line.split("|")[2:5]]
    assert ce.startswith("-0.500 ± 0.000 (t = -inf: the same difference in every seed)"), ce
    assert kl.startswith("+0.000 ± 0.000 (t undefined: 0 in every seed)"), kl
    assert "(t = 2.0)" in ece, ece
    assert "Paired differences at step 10 (3 seeds)" in table
