#!/usr/bin/env python3
"""Checks on the documentation that mkdocs does not make (CI runs this script):

1. every metric that server/src/metrics.rs defines is documented in
   docs/reference/metrics.md, and that page documents no metric the server lacks;
2. each fact lives once: no other Markdown file in the repository repeats a row of
   the metric table or a line of the sampling contract (docs/concepts/sampling.md),
   nor states the contract's defining formulas;
3. README.md is a landing page of at most 200 lines.

Exit status 1 with every finding named (file and line), 0 when all hold.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METRICS_RS = REPO / "server" / "src" / "metrics.rs"
METRICS_MD = REPO / "docs" / "reference" / "metrics.md"
SAMPLING_MD = REPO / "docs" / "concepts" / "sampling.md"
README = REPO / "README.md"
README_MAX_LINES = 200
# The contract's defining statements, however a copy might be laid out.
CONTRACT_FORMULAS = [
    r"p\s*=\s*softmax\(\s*z\s*/\s*T\s*\)",
    r"counter\s*\(\s*draw block,\s*position,\s*sequence index",
    r"z_i\s*=\s*T\s*·\s*\(\s*logprob_i\s*\+\s*lse\s*\)",
]


def markdown_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [REPO / p for p in out if (REPO / p).is_file()]


def norm(line: str) -> str:
    return " ".join(line.split())


def main() -> int:
    errors: list[str] = []

    # 1. metrics.rs <-> metrics.md
    defined = set(re.findall(r'pub const \w+: &str = "(logitd_\w+)"', METRICS_RS.read_text()))
    if not defined:
        errors.append(f"{METRICS_RS}: found no metric names (has the constant style changed?)")
    page = METRICS_MD.read_text()
    documented = set(re.findall(r"^\|[^|]*?`(logitd_\w+)", page, flags=re.M))
    documented |= set(re.findall(r"^\|[^|]*?`logitd_\w+[^|]*?`(logitd_\w+)", page, flags=re.M))
    for name in sorted(defined - documented):
        errors.append(f"docs/reference/metrics.md: metric {name} (server/src/metrics.rs) has no row")
    for name in sorted(documented - defined):
        errors.append(f"docs/reference/metrics.md: documents {name}, which server/src/metrics.rs does not define")

    # 2. each fact once
    metric_rows = {norm(l) for l in page.splitlines() if re.match(r"^\|\s*`logitd_", l)}
    contract_lines = {
        norm(l)
        for l in SAMPLING_MD.read_text().splitlines()
        if len(norm(l)) >= 50 and not l.lstrip().startswith(("#", "|", "```"))
    }
    for md in markdown_files():
        rel = md.relative_to(REPO)
        text = md.read_text(errors="replace")
        lines = text.splitlines()
        if md != METRICS_MD:
            for n, l in enumerate(lines, 1):
                if norm(l) in metric_rows or re.match(r"^\|\s*`logitd_\w+", l):
                    errors.append(f"{rel}:{n}: a row of the metric table (it lives in docs/reference/metrics.md)")
        if md != SAMPLING_MD:
            for n, l in enumerate(lines, 1):
                if norm(l) in contract_lines:
                    errors.append(f"{rel}:{n}: a line of the sampling contract (it lives in docs/concepts/sampling.md)")
            flat = norm(text)
            for f in CONTRACT_FORMULAS:
                if re.search(f, flat):
                    errors.append(f"{rel}: states the sampling contract's formula /{f}/ (link docs/concepts/sampling.md)")

    # 3. the README stays a landing page
    n = len(README.read_text().splitlines())
    if n > README_MAX_LINES:
        errors.append(f"README.md: {n} lines, more than {README_MAX_LINES}: move detail into docs/")

    for e in errors:
        print(e)
    if errors:
        print(f"{len(errors)} finding(s)", file=sys.stderr)
        return 1
    print(f"docs: {len(defined)} metrics documented; the metric table and the sampling contract live once; README {n} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
