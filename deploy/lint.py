#!/usr/bin/env python3
"""Structural checks of deploy/ that the linters cannot make: the files agree
with each other and with the server (ports, drain timeout, metric names, the
Envoy cluster's HTTP/2, HAProxy's hand-written gRPC health check). Run by
deploy/lint.sh; needs PyYAML. Exits non-zero with a message on the first
class of failure."""

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
D = ROOT / "deploy"
errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def cli_default(env):
    """The clap default of the flag read from `env` in server/src/cli.rs."""
    src = (ROOT / "server/src/cli.rs").read_text()
    m = re.search(r'env = "%s"[^)]*default_value(?:_t)? = "?([^",)]+)"?' % env, src)
    if not m:
        sys.exit(f"lint.py: no default for {env} in server/src/cli.rs")
    return m.group(1).strip()


def port(addr):
    return int(str(addr).rsplit(":", 1)[1])


# --- Kubernetes: every manifest is listed by a kustomization (so lint.sh's
# kubernetes-validate run sees it), and the Deployment agrees with the server.
for kdir in [D / "kubernetes", D / "kubernetes/envoy"]:
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    listed = set(kust.get("resources", []))
    for gen in kust.get("configMapGenerator", []):
        listed |= set(gen.get("files", []))
    for f in listed:
        check((kdir / f).is_file(), f"{kdir}/kustomization.yaml lists missing {f}")
    for f in kdir.glob("*.yaml"):
        check(f.name == "kustomization.yaml" or f.name in listed,
              f"{f.relative_to(ROOT)} is not listed in its kustomization.yaml")

dep = load_all(D / "kubernetes/deployment.yaml")[0]
pod = dep["spec"]["template"]
spec = pod["spec"]
c = spec["containers"][0]
env = {e["name"]: e.get("value") for e in c.get("env", [])}
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
drain = int(env.get("LOGITD_DRAIN_TIMEOUT_S", cli_default("LOGITD_DRAIN_TIMEOUT_S")))
check(str(drain) == cli_default("LOGITD_DRAIN_TIMEOUT_S"),
      f"deployment sets LOGITD_DRAIN_TIMEOUT_S={drain}, the server's default is "
      f"{cli_default('LOGITD_DRAIN_TIMEOUT_S')}: keep them equal or update deploy/README.md")
pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
# logitd waits up to 5 s for open calls after GOAWAY (server/src/server.rs).
need = pre_stop + drain + 5
check(spec["terminationGracePeriodSeconds"] > need,
      f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} must exceed "
      f"preStop {pre_stop} + drain {drain} + 5 s after GOAWAY = {need}")
grpc_port = port(env.get("LOGITD_LISTEN", cli_default("LOGITD_LISTEN")))
metrics_port = port(env.get("LOGITD_METRICS_LISTEN", cli_default("LOGITD_METRICS_LISTEN")))
check(ports.get("grpc") == grpc_port, "containerPort grpc != LOGITD_LISTEN's port")
check(ports.get("metrics") == metrics_port, "containerPort metrics != LOGITD_METRICS_LISTEN's port")
for kind in ["startupProbe", "readinessProbe", "livenessProbe"]:
    probe = c.get(kind, {})
    check("grpc" in probe, f"{kind} must be a native gRPC probe")
    check(probe.get("grpc", {}).get("port") == grpc_port, f"{kind} probes port != {grpc_port}")
    check(probe.get("grpc", {}).get("service") in ("", "logitd.v1.Teacher"),
          f"{kind} probes a service logitd's health does not report")
live = c["livenessProbe"]
check(live["periodSeconds"] * live["failureThreshold"] >= spec["terminationGracePeriodSeconds"],
      "the liveness probe could kill a draining pod (period × threshold < grace period)")
ann = pod["metadata"]["annotations"]
check(ann.get("prometheus.io/scrape") == "true", "pods not annotated prometheus.io/scrape")
check(int(ann.get("prometheus.io/port", 0)) == metrics_port, "prometheus.io/port != metrics port")
check(c["resources"]["limits"].get("nvidia.com/gpu") is not None, "no GPU limit")
check(c["securityContext"].get("readOnlyRootFilesystem") and spec["securityContext"].get("runAsNonRoot"),
      "the pod must run as non-root with a read-only root")
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
check(env.get("LOGITD_MODEL", "").startswith(mounts.get("models", "/nonexistent") + "/"),
      "LOGITD_MODEL is not on the models volume")
labels = pod["metadata"]["labels"]
for f in ["service.yaml", "service-headless.yaml", "pdb.yaml"]:
    doc = load_all(D / "kubernetes" / f)[0]
    sel = doc["spec"]["selector"]
    sel = sel.get("matchLabels", sel)
    check(all(labels.get(k) == v for k, v in sel.items()), f"{f} does not select the logitd pods")
headless = load_all(D / "kubernetes/service-headless.yaml")[0]
check(headless["spec"].get("clusterIP") == "None", "service-headless.yaml is not headless")
hpa = load_all(D / "kubernetes/examples/hpa-queue-depth.yaml")[0]
check(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "the HPA targets another Deployment")
sm = load_all(D / "kubernetes/examples/servicemonitor.yaml")[0]
check(sm["kind"] == "ServiceMonitor" and sm["spec"]["endpoints"][0]["port"] == "metrics",
      "servicemonitor.yaml must scrape the Service's `metrics` port")
svc = load_all(D / "kubernetes/service.yaml")[0]
check(any(p["name"] == "metrics" for p in svc["spec"]["ports"]), "service.yaml has no metrics port")
check(svc["metadata"]["labels"].get(sm["spec"]["jobLabel"]) == "logitd",
      "the ServiceMonitor's job label would not be `logitd`, which the rules expect")

# --- Prometheus: the Kubernetes job keeps the annotated pods and rewrites the
# address to the annotated port (Prometheus anchors relabel regexes).
kjob = yaml.safe_load((D / "prometheus/prometheus-kubernetes.yml").read_text())["scrape_configs"][0]
check(kjob["job_name"] == "logitd", "prometheus-kubernetes.yml: job_name must be logitd")
meta = {"__address__": "10.1.2.3:50051",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": labels["app.kubernetes.io/name"]}
for k, v in ann.items():
    meta["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
kept = True
for r in kjob["relabel_configs"]:
    value = ";".join(meta.get(s, "") for s in r.get("source_labels", []))
    m = re.fullmatch(r.get("regex", "(.*)"), value)
    if r.get("action") == "keep":
        kept = kept and m is not None
    elif m and "target_label" in r:
        repl = re.sub(r"\$(\d+)", r"\\\1", r.get("replacement", "$1"))
        meta[r["target_label"]] = m.expand(repl)
check(kept, "prometheus-kubernetes.yml drops the logitd pods")
check(meta["__address__"] == f"10.1.2.3:{metrics_port}",
      f"prometheus-kubernetes.yml rewrites the address to {meta['__address__']}")
check(meta.get("__metrics_path__") == "/metrics", "prometheus-kubernetes.yml: metrics path")
static = yaml.safe_load((D / "prometheus/prometheus.yml").read_text())
check([j["job_name"] for j in static["scrape_configs"]] == ["logitd"], "prometheus.yml: one job, logitd")

# --- Metric names used anywhere in deploy/ exist in server/src/metrics.rs.
known = set(re.findall(r'"(logitd_[a-z_]+)"', (ROOT / "server/src/metrics.rs").read_text()))
check(len(known) > 10, "metric names not found in server/src/metrics.rs")
for f in D.rglob("*"):
    if f.suffix not in (".yml", ".yaml", ".json", ".conf", ".cfg") or not f.is_file():
        continue
    # Names inside recording-rule names (job:logitd_x:rate5m) are not metrics.
    for name in set(re.findall(r"(?<![:\w])logitd_[a-z_]+(?![:\w])", f.read_text())):
        if name in ("logitd_grpc",):  # HAProxy's frontend name
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        check(base in known, f"{f.relative_to(ROOT)} uses {name}, which logitd does not export")

# --- Grafana: valid JSON, every panel has a target, unique ids.
dash = json.loads((D / "grafana/logitd-dashboard.json").read_text())
ids = [p["id"] for p in dash["panels"]]
check(len(ids) == len(set(ids)), "dashboard panel ids repeat")
for p in dash["panels"]:
    if p["type"] != "row":
        check(p.get("targets") and all(t.get("expr") for t in p["targets"]), f"panel {p['title']!r} has no query")

# --- Envoy: HTTP/2 to the replicas, no route timeout, gRPC health, DNS on the
# headless Service.
ev = yaml.safe_load((D / "kubernetes/envoy/envoy.yaml").read_text())
cluster = next(cl for cl in ev["static_resources"]["clusters"] if cl["name"] == "logitd")
opts = cluster.get("typed_extension_protocol_options", {}).get(
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
check("http2_protocol_options" in opts.get("explicit_http_config", {}),
      "envoy: cluster logitd must use explicit_http_config.http2_protocol_options (gRPC needs HTTP/2)")
check(cluster["type"] == "STRICT_DNS", "envoy: cluster logitd should follow DNS (STRICT_DNS)")
addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
check(addr["address"].split(".")[0] == headless["metadata"]["name"], "envoy: not the headless Service")
check(addr["port_value"] == grpc_port, "envoy: upstream port")
check(any(h.get("grpc_health_check", {}).get("service_name") == "logitd.v1.Teacher"
          for h in cluster.get("health_checks", [])), "envoy: no grpc.health.v1 check")
hcm = ev["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
for vh in hcm["route_config"]["virtual_hosts"]:
    for r in vh["routes"]:
        check(r["route"].get("cluster") == "logitd", "envoy: a route to another cluster")
        check(r["route"].get("timeout") in ("0s", 0), "envoy: the default 15 s route timeout would cut calls")

# --- HAProxy: the hand-written HTTP/2 health check decodes to
# POST /grpc.health.v1.Health/Check with HealthCheckRequest{service: "logitd.v1.Teacher"}.
cfg = (D / "haproxy/haproxy.cfg").read_text()
raw = b"".join(bytes.fromhex(h) for h in re.findall(r"^\s*tcp-check send-binary ([0-9a-f]+)", cfg, re.M))
preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
if check(raw.startswith(preface), "haproxy: the check does not start with the HTTP/2 preface"):
    frames, rest = [], raw[len(preface):]
    while rest:
        n = int.from_bytes(rest[:3], "big")
        frames.append((rest[3], rest[4], int.from_bytes(rest[5:9], "big") & 0x7FFFFFFF, rest[9:9 + n]))
        check(len(rest) >= 9 + n, "haproxy: a truncated frame")
        rest = rest[9 + n:]
    kinds = [f[0] for f in frames]
    check(kinds == [4, 1, 0], f"haproxy: frames {kinds}, want SETTINGS, HEADERS, DATA")
    if kinds == [4, 1, 0]:
        hb = frames[1][3]
        check(b"/grpc.health.v1.Health/Check" in hb and b"application/grpc" in hb and b"trailers" in hb,
              "haproxy: the HEADERS frame is not a gRPC health call")
        check(frames[1][1] & 0x4 and frames[2][1] & 0x1, "haproxy: END_HEADERS / END_STREAM flags")
        data = frames[2][3]
        msg = data[5:]
        check(data[0] == 0 and int.from_bytes(data[1:5], "big") == len(msg), "haproxy: gRPC length prefix")
        check(msg == b"\x0a" + bytes([len(b"logitd.v1.Teacher")]) + b"logitd.v1.Teacher",
              "haproxy: the body is not HealthCheckRequest{service: logitd.v1.Teacher}")
check(re.search(r"^\s*tcp-check expect binary 00000000020801\s*$", cfg, re.M),
      "haproxy: the check must expect the SERVING reply 00 00000002 0801")

if errors:
    print("deploy lint failed:\n  " + "\n  ".join(errors), file=sys.stderr)
    sys.exit(1)
print("deploy/lint.py: consistent")
