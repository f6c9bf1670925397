"""The README's quick start and "Python in five minutes", run as written.

The README shows commands after `$ ` in ```console blocks, each followed by what it
printed. Here they run against the session's server, with two differences, both
forced by the test setting: the server listens on 127.0.0.1 at a free port (the README
uses the default 0.0.0.0:50051), so `localhost:50051` becomes that address and the
Python examples get `--endpoint`; and the build step is CI's debug build, not
`--release`. Shown and actual output are compared field by field: ids, counts,
names and texts exactly, log-probabilities and losses within the last digits that
differ between CPUs and batch packings.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import REPO

README = REPO / "README.md"


def console_blocks() -> list[list[tuple[str, list[str]]]]:
    """Each ```console block as [(command, output lines), ...]."""
    blocks, current, inside = [], None, False
    for line in README.read_text().splitlines():
        if line.startswith("```console"):
            inside, current = True, []
            continue
        if inside and line.startswith("```"):
            blocks.append(current)
            inside = False
            continue
        if inside:
            if line.startswith("$ "):
                current.append((line[2:], []))
            else:
                assert current, f"README: output before any command in a console block: {line!r}"
                current[-1][1].append(line)
    return blocks


def shown(prefix: str) -> tuple[str, list[str]]:
    found = [(c, o) for b in console_blocks() for c, o in b if c.startswith(prefix)]
    assert len(found) == 1, f"README: expected one `$ {prefix}...` command, found {len(found)}"
    return found[0]


def close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def same_json(want, got, path="$"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and want.keys() == got.keys(), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            same_json(want[k], got[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (w, g) in enumerate(zip(want, got)):
            same_json(w, g, f"{path}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert close(float(want), float(got), rel=1e-4), f"{path}: {got!r} != {want!r}"
    else:
        assert want == got, f"{path}: {got!r} != {want!r}"


def test_the_serve_line_is_what_the_server_prints(server):
    cmd, out = shown("target/release/logitd serve")
    assert cmd == "target/release/logitd serve"
    line = server.first_line.strip()
    assert re.sub(r"127\.0\.0\.1:\d+", "ADDR", line) == re.sub(r"0\.0\.0\.0:\d+", "ADDR", out[0]), (line, out)


def test_the_grpcurl_call_gives_the_shown_reply(server):
    grpcurl = shutil.which("grpcurl")
    assert grpcurl, "grpcurl is not on PATH (CI installs it: .ci/requirements.txt)"
    cmd, out = shown("grpcurl ")
    assert "localhost:50051" in cmd
    argv = shlex.split(cmd.replace("localhost:50051", f"127.0.0.1:{server.port}"))
    run = subprocess.run([grpcurl, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    same_json(json.loads("\n".join(out)), json.loads(run.stdout))


def compare_text(want: list[str], got: list[str]) -> None:
    """Line by line; a number may differ in its last shown digit (losses printed
    with 2 decimals: within 0.02), anything else must be equal."""
    assert len(got) == len(want), f"{len(got)} lines, README shows {len(want)}:\n" + "\n".join(got)
    number = re.compile(r"-?\d+\.\d+")
    for w, g in zip(want, got):
        assert number.sub("#", w) == number.sub("#", g), f"\nREADME: {w}\ngot:    {g}"
        for a, b in zip(number.findall(w), number.findall(g)):
            assert close(float(a), float(b), rel=0, abs_=0.02), f"\nREADME: {w}\ngot:    {g}"


def example_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_python_quickstart_prints_what_the_readme_shows(server):
    cmd, out = shown("python client/python/examples/quickstart.py")
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    run = subprocess.run(
        [sys.executable, *argv[1:], "--endpoint", server.uri],
        cwd=REPO, env=example_env(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    compare_text(out, run.stdout.rstrip("\n").splitlines())


def test_the_readme_install_line_names_the_examples_extra():
    cmd, _ = shown("pip install")
    assert cmd == "pip install './client/python[examples]'", cmd
    pyproject = (REPO / "client" / "python" / "pyproject.toml").read_text()
    extra = re.search(r"^examples = \[(.*)\]$", pyproject, flags=re.M)
    assert extra, "client/python/pyproject.toml has no `examples` extra"
    names = {re.split(r"[<>=!~\[ ]", s.strip().strip('"'))[0] for s in extra.group(1).split(",")}
    # What the examples import (transformers' GGUF tokenizer needs gguf, its Trainer accelerate).
    assert {"torch", "transformers", "accelerate", "gguf"} <= names, names


def test_the_pytorch_guides_tokenizer_digest_is_the_demo_teachers(client):
    guide = (REPO / "docs" / "guides" / "pytorch.md").read_text()
    m = re.search(r'^TOKENIZER_SHA256 = "([0-9a-f]{64})"', guide, flags=re.M)
    assert m, "docs/guides/pytorch.md: no TOKENIZER_SHA256 line"
    assert m.group(1) == client.model_info().tokenizer_sha256
