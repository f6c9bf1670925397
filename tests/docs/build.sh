#!/usr/bin/env bash
# The documentation checks CI runs (no Rust build needed):
#   1. tests/docs/check_docs.py: every metric documented, each fact in one place,
#      the README at most 200 lines;
#   2. mkdocs build --strict (broken links, missing pages and unknown anchors fail);
#   3. the same build on a copy with one broken link added must fail, so a green
#      build means the link check ran.
# MKDOCS: the mkdocs executable (default: mkdocs on PATH; CI installs
# docs/requirements.txt into a virtual environment of its own).
set -euo pipefail
cd "$(dirname "$0")/../.."
MKDOCS=${MKDOCS:-mkdocs}
export NO_MKDOCS_2_WARNING=1

python3 tests/docs/check_docs.py

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Not --quiet: with it, mkdocs 1.6 neither prints warnings nor counts them for --strict.
if ! "$MKDOCS" build --strict --site-dir "$out/site" >"$out/log" 2>&1; then
  grep -v '^INFO' "$out/log" >&2
  echo "FAIL: mkdocs build --strict" >&2
  exit 1
fi
echo "mkdocs build --strict: $(find "$out/site" -name index.html | wc -l) pages"

# The self-test: a copy of the tree with a link to a missing page.
mkdir "$out/copy"
git ls-files -z --cached --others --exclude-standard -- mkdocs.yml docs tests/docs client/python/python \
  | xargs -0 -I{} cp --parents {} "$out/copy/"
# Files outside docs/ that pages link to must exist in the copy too.
git ls-files -z | xargs -0 -I{} cp --parents -n {} "$out/copy/" 2>/dev/null || true
echo "See [a page that does not exist](no-such-page.md)." >> "$out/copy/docs/index.md"
if (cd "$out/copy" && "$MKDOCS" build --strict --site-dir "$out/site2") >"$out/err" 2>&1; then
  echo "FAIL: mkdocs build --strict passed with a broken link; the link check is off" >&2
  exit 1
fi
grep -q "no-such-page.md" "$out/err" || { cat "$out/err" >&2; echo "FAIL: the build failed, but not on the broken link" >&2; exit 1; }
echo "a broken link fails the build, as it must"
