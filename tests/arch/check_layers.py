#!/usr/bin/env python3
"""The server crate's layering, the size of its files and of its functions.

Checks, over server/src (tests and test-only files excepted where said):

1. Layers: every top-level module of the `logitd` crate may refer only to the
   modules of lower layers (LAYERS below), named as `crate::x` (or
   `logitd::x` in the binary), `use crate::{x, ...}` groups included. So `model` and `sampler`
   never refer to each other (both sit on `kernels`), and the graph has no
   cycle. Inside a module, child modules are free.
2. No source file over MAX_FILE_LINES lines, outside tests: files under a
   `tests/` directory or named `tests.rs` are exempt (the crates' integration
   tests, and unit tests moved beside their module).

Functions over 120 lines are clippy's `too_many_lines` (clippy.toml), run by CI's
clippy step with the workspace lints.

    tests/arch/check_layers.py [ROOT]      # exit 1 and one line per violation

`tests/arch/test_check_layers.py` plants violations in a copy and expects failures.
"""

import re
import sys
from pathlib import Path

# Lowest first. A module may use modules of strictly lower rank; modules of the
# same rank may not use each other.
LAYERS = [
    ["kernels", "malloc", "metrics"],
    ["sampler", "model"],
    ["device"],
    ["scoring"],
    ["queue"],
    ["engine"],
    ["response", "error"],
    ["auth", "service"],
    ["http"],
    ["cli"],
    ["server"],
    ["main"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
MAX_FILE_LINES = 700
CRATES = ["server/src", "client/src", "client/python/src", "proto/src", "tests/src"]

REF = re.compile(r"\b(?:crate|logitd)::([a-z_][a-z0-9_]*)")
GROUP_START = re.compile(r"\b(?:crate|logitd)::\{")


def top_module(src: Path, f: Path) -> str:
    rel = f.relative_to(src)
    name = rel.parts[0]
    return name[:-3] if name.endswith(".rs") else name


def code_only(text: str) -> str:
    """Strips // comments (doc comments included) and string literals."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def group_heads(code: str, start: int) -> list[str]:
    """The first path segment of each top-level item of the `{...}` at `start`."""
    heads, depth, item = [], 0, ""
    for ch in code[start:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        if depth == 1 and ch == ",":
            heads.append(item)
            item = ""
        elif depth >= 1:
            item += ch
    heads.append(item)
    out = []
    for h in heads:
        m = re.match(r"\s*([a-z_][a-z0-9_]*)", h)
        if m:
            out.append(m.group(1))
    return out


def refs(text: str) -> set[str]:
    """The top-level modules a file names through `crate::` or `logitd::`."""
    code = code_only(text)
    found = set(REF.findall(code))
    for m in GROUP_START.finditer(code):
        found.update(group_heads(code, m.end() - 1))
    return found


def check(root: Path) -> list[str]:
    errors = []
    src = root / "server/src"
    for f in sorted(src.rglob("*.rs")):
        me = top_module(src, f)
        if me == "lib":
            continue
        if me not in RANK:
            errors.append(f"{f.relative_to(root)}: module `{me}` has no layer in tests/arch/check_layers.py")
            continue
        for other in sorted(refs(f.read_text())):
            if other == me or other not in RANK:
                continue
            if RANK[other] >= RANK[me]:
                errors.append(
                    f"{f.relative_to(root)}: `{me}` (layer {RANK[me]}) refers to `{other}` "
                    f"(layer {RANK[other]}); a module may use only lower layers"
                )
    for crate in CRATES:
        for f in sorted((root / crate).rglob("*.rs")):
            rel = f.relative_to(root)
            if "tests" in rel.parts or f.name == "tests.rs":
                continue
            n = len(f.read_text().splitlines())
            if n > MAX_FILE_LINES:
                errors.append(f"{rel}: {n} lines, more than {MAX_FILE_LINES}; split it")
    return errors


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    errors = check(root)
    for e in errors:
        print(e)
    print(f"check_layers: {len(errors)} violation(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
