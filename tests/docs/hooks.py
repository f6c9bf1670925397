"""mkdocs hook: links from a page to files outside docs/.

The pages are plain Markdown that also reads well on a code host, so they link to
the repository's files (results, scripts, deploy/README.md) by relative path.
mkdocs only knows docs/, so this hook checks each such link itself (a missing file
is a warning, and `mkdocs build --strict` fails on warnings) and, for the site,
turns it into the repository path in code type: the site has no copy of those files.
Links inside docs/ are left to mkdocs' own validation.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("mkdocs.hooks.logitd")
LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _outside(page_src: str, target: str, docs_dir: str, repo: str) -> tuple[str, str] | None:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = target.split("#", 1)[0]
    full = os.path.normpath(os.path.join(os.path.dirname(page_src), path))
    if full == docs_dir or full.startswith(docs_dir + os.sep):
        return None
    return full, os.path.relpath(full, repo)


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - mkdocs' signature
    docs_dir = os.path.normpath(config["docs_dir"])
    repo = os.path.dirname(os.path.normpath(config.config_file_path))
    page_src = os.path.join(docs_dir, page.file.src_path)
    out, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        if fenced:
            out.append(line)
            continue

        def fix(m: re.Match) -> str:
            bang, text, target = m.groups()
            found = _outside(page_src, target, docs_dir, repo)
            if found is None:
                return m.group(0)
            full, rel = found
            if not os.path.exists(full):
                log.warning("%s: the link to %s points at no file (%s)", page.file.src_path, target, rel)
                return m.group(0)
            if rel.startswith(".."):
                log.warning("%s: the link to %s leaves the repository", page.file.src_path, target)
                return m.group(0)
            if bang:
                return f"*({text}: `{rel}` in the repository)*"
            return f"{text} (`{rel}`)" if text.strip("`") != rel else f"`{rel}`"

        out.append(LINK.sub(fix, line))
    return "\n".join(out)
