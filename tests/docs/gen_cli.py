#!/usr/bin/env python3
"""Writes the generated half of docs/reference/cli.md from the binaries' own --help.

    python3 tests/docs/gen_cli.py           # rewrite docs/reference/cli.md below the marker
    python3 tests/docs/gen_cli.py --check   # exit 1, with a diff, if the page is stale

The binaries are taken from target/debug (LOGITD_BIN_DIR overrides), so build them
first (`cargo build -p logitd -p logitd-client-tools`). Everything above the marker line is
written by hand; everything below it comes from --help, run with every LOGITD_*
variable removed from the environment (clap shows a set variable's value).
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "reference" / "cli.md"
MARKER = "<!-- Generated below by tests/docs/gen_cli.py from each command's --help: do not edit. -->"
COMMANDS = [
    ("logitd", []),
    ("logitd", ["serve"]),
    ("logitd", ["info"]),
    ("logitd", ["sample"]),
    ("logitd-client", []),
    ("logitd-client", ["dump"]),
    ("logitd-bench", []),
]


def help_text(binary: Path, args: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITD_") and k != "RUST_LOG"}
    if not binary.is_file():
        sys.exit(f"{binary} is missing: build it with `cargo build -p logitd -p logitd-client-tools`")
    out = subprocess.run(
        [str(binary), *args, "--help"], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return "\n".join(line.rstrip() for line in out.rstrip().splitlines())


def generated() -> str:
    bins = Path(os.environ.get("LOGITD_BIN_DIR", REPO / "target" / "debug"))
    parts = [MARKER, ""]
    for name, args in COMMANDS:
        title = " ".join([name, *args])
        parts += [f"## `{title}`", "", "```text", help_text(bins / name, args), "```", ""]
    return "\n".join(parts)


def main() -> int:
    text = PAGE.read_text()
    if MARKER not in text:
        sys.exit(f"{PAGE}: the marker line is missing:\n{MARKER}")
    head = text[: text.index(MARKER)]
    want = head + generated()
    if "--check" in sys.argv[1:]:
        if text != want:
            diff = difflib.unified_diff(
                text.splitlines(), want.splitlines(), "docs/reference/cli.md", "from --help", lineterm=""
            )
            print("\n".join(diff))
            print("docs/reference/cli.md is stale: run python3 tests/docs/gen_cli.py", file=sys.stderr)
            return 1
        print("docs/reference/cli.md matches every --help")
        return 0
    PAGE.write_text(want)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
