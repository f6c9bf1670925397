#!/usr/bin/env bash
# The size of what a GPU run takes to the GPU machine, against its limit: the
# machine gets a copy of this repository's working tree (tracked files and the
# untracked ones git does not ignore, and shared/ where the checkout has one)
# together with the carried, git-ignored paths, 64 MiB in all. Fails at 60 MiB,
# which leaves room for what the tree grows by before the run. From anywhere:
#
#   tests/gpu/pack-size.sh [CARRIED...]   default: tests/gpu/bin tests/gpu/data
#
# PACK_LIMIT_MIB (60) moves the limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
limit_mib=${PACK_LIMIT_MIB:-60}
(($# > 0)) || set -- tests/gpu/bin tests/gpu/data

# du's apparent sizes (-b); xargs may run du more than once, so every "total"
# line is added. A tracked file deleted in the tree counts nothing.
sum_totals() { awk -F'\t' '$2 == "total" {s += $1} END {print s + 0}'; }
tree=$({ git ls-files -z --cached --others --exclude-standard |
  xargs -0 -r du -cb -- 2>/dev/null || true; } | sum_totals)
files=$(git ls-files --cached --others --exclude-standard | wc -l)
if [[ -d shared ]]; then
  tree=$((tree + $(du -sb shared | cut -f1)))
fi
carried=0
for p in "$@"; do
  [[ -e $p ]] && carried=$((carried + $({ du -cb -- "$p" 2>/dev/null || true; } | sum_totals)))
done
total=$((tree + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "pack: working tree $tree bytes ($(mib "$tree") MiB, $files files) + carried $carried bytes" \
  "($(mib "$carried") MiB: $*) = $total bytes ($(mib "$total") MiB) of the 64 MiB a GPU run takes"
if ((total >= limit_mib * 1048576)); then
  echo "pack: FAIL: $(mib "$total") MiB is over the ${limit_mib} MiB allowed (the tree and the carried paths count together)" >&2
  exit 1
fi
