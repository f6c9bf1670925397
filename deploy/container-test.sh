#!/usr/bin/env bash
# Builds the CPU image from deploy/docker/Dockerfile.cpu and runs it, on a
# machine with no Docker engine and no registry (CI: .ci/run):
#   1. base: `debootstrap --variant=minbase bookworm` into a tmpfs, imported with
#      `podman import` as debian:bookworm-slim (the Dockerfile's FROM);
#   2. `podman build --isolation chroot --format docker --target prebuilt` of the
#      Dockerfile, around a logitd built on the host (the build stage's rust image
#      cannot be pulled here);
#   3. inspected: user, entrypoint, command, ports, HEALTHCHECK, and every file
#      the build added to the base;
#   4. run as `docker run` would (`podman run` does not work in this sandbox):
#      the container's root file system (podman create + podman mount), the
#      cached demo teacher bind-mounted read-only where deploy/README.md's `docker run`
#      line puts it, the image's env, user 10001, workdir, entrypoint and command,
#      through chroot; the image's HEALTHCHECK command run inside the root fails
#      while the model loads and passes once it is loaded; SampleLogits answers
#      equal those of the same binary run on the host; SIGTERM drains (a queued
#      call is answered) and exits 0.
# Everything (mounts, the podman storage, the images) lives under one temporary
# tmpfs and is removed on exit. Prints a PASS/FAIL line per check and a summary;
# exits non-zero if any check failed.
#
#   deploy/container-test.sh [BINARY]
#
# BINARY: the logitd to put in the image (default target/debug/logitd, which
# `cargo test --workspace` builds; pass target/release/logitd after a release
# build). Needs root, podman and debootstrap (Debian packages), grpcurl, curl,
# python3, and the demo teacher (fetched with tests/fetch-teachers.sh if it is
# not cached). Environment:
#   DEBIAN_MIRROR          the mirror for debootstrap (default: the first Debian
#                          URI in apt's sources, else http://deb.debian.org/debian)
#   DEBOOTSTRAP_CACHE_DIR  keep the downloaded .debs there (faster reruns)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
t0=$(date +%s.%N)
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)"; }
phase() { echo; echo "== [$(elapsed) s] $*"; }

passed=()
failed=()
pass() { passed+=("$1"); echo "PASS: $1"; }
fail() { failed+=("$1"); echo "FAIL: $1" >&2; }
# check DESCRIPTION COMMAND...: runs the command; a PASS or FAIL line.
check() {
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
# die DESCRIPTION: a failure the rest cannot go on from.
die() {
  fail "$1"
  exit 1
}

# --- cleanup: servers, mounts, container, images, the tmpfs ------------------
work=""
pids=()
mounts=()
P=(podman)
cleanup() {
  local rc=$?
  set +e
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
    fi
  done
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount "${mounts[i]}" || umount -l "${mounts[i]}"
  done
  if [[ -n $work ]]; then
    "${P[@]}" umount -a >/dev/null 2>&1
    "${P[@]}" rm -a -f >/dev/null 2>&1
    "${P[@]}" image umount -a -f >/dev/null 2>&1
    "${P[@]}" rmi -a -f >/dev/null 2>&1
    # Anything podman left mounted under the tmpfs, deepest first, then the tmpfs.
    findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
    umount "$work" 2>/dev/null || umount -l "$work"
    if findmnt -rn -o TARGET | grep -qF "$work"; then
      fail "cleanup: mounts left under $work"
    else
      rmdir "$work" && echo "cleanup: mounts, container, images and $work removed"
    fi
  fi
  echo
  echo "== container test: ${#passed[@]} passed, ${#failed[@]} failed, $(elapsed) s"
  local f
  for f in "${failed[@]}"; do echo "   FAILED: $f"; done
  if ((${#failed[@]} > 0 || rc != 0)); then
    echo "container test: FAIL"
    exit 1
  fi
  echo "container test: OK"
  exit 0
}
trap cleanup EXIT
trap 'echo "error: line $LINENO: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT TERM

phase "tools"
[[ $(id -u) == 0 ]] || die "runs as root (debootstrap, mount, chroot)"
export PATH="$PATH:/usr/sbin:/sbin"
for tool in podman debootstrap chroot grpcurl curl python3 findmnt; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (CI installs it: see .ci/run)"
done
podman --version
debootstrap --version
grpcurl --version 2>&1 | head -1

bin=${1:-target/debug/logitd}
[[ -x $bin ]] || die "no logitd binary at $bin: build it (cargo build -p logitd) or pass its path"
client_bin=${2:-$(dirname "$bin")/logitd-client}
[[ -x $client_bin ]] || die "no logitd-client binary at $client_bin: build it (cargo build -p logitd-client-tools) or pass its path"
cache=${LOGITD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/logitd}
gguf=$cache/teachers/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $gguf ]]; then
  echo "the demo teacher is not cached at $gguf: tests/fetch-teachers.sh"
  tests/fetch-teachers.sh >/dev/null || die "tests/fetch-teachers.sh (the demo teacher)"
fi
[[ -f $gguf ]] || die "the demo teacher is not at $gguf after tests/fetch-teachers.sh"
mirror=${DEBIAN_MIRROR:-$(grep -hoE 'https?://[^ ]+/debian/?$|https?://[^ ]+/debian( |$)' \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
  head -1 | tr -d ' ' || true)}
mirror=${mirror:-http://deb.debian.org/debian}

# One tmpfs for everything: dpkg's fsyncs (debootstrap) cost nothing there, and
# one unmount removes it all.
work=$(mktemp -d /tmp/logitd-container-test.XXXXXX)
mount -t tmpfs -o size=6g,mode=0755 logitd-container-test "$work"
P=(podman --root "$work/storage" --runroot "$work/run" --storage-driver overlay)
export TMPDIR=$work/tmp
mkdir -p "$TMPDIR"

# The binary goes into the image stripped of debug info (same code; the debug
# build's DWARF is most of its size). The host reference runs this same file.
ctx=$work/context
mkdir -p "$ctx"
for b in "$bin:logitd" "$client_bin:logitd-client"; do
  if command -v strip >/dev/null 2>&1; then
    strip --strip-debug -o "$ctx/${b#*:}" "${b%%:*}"
  else
    cp "${b%%:*}" "$ctx/${b#*:}"
  fi
done
echo "binary: $bin ($(du -h "$bin" | cut -f1); in the image: $(du -h "$ctx/logitd" | cut -f1))"

# --- 1. the base image ----------------------------------------------------------
phase "debootstrap --variant=minbase bookworm ($mirror)"
dbs_args=(--variant=minbase)
if [[ -n ${DEBOOTSTRAP_CACHE_DIR:-} ]]; then
  mkdir -p "$DEBOOTSTRAP_CACHE_DIR"
  dbs_args+=(--cache-dir="$(realpath "$DEBOOTSTRAP_CACHE_DIR")")
fi
debootstrap "${dbs_args[@]}" bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log"; die "debootstrap"; }
tail -1 "$work/debootstrap.log"
# As the official image: its PATH and command; no apt lists or caches; and
# /etc/hosts, /etc/hostname and /etc/resolv.conf empty, not the host's that
# debootstrap copies in: a container engine mounts its own over them (and
# buildah's RUN would otherwise leave the missing ones in the image).
rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin
for f in hosts hostname resolv.conf; do
  rm -f "$work/rootfs/etc/$f"
  install -m 0644 /dev/null "$work/rootfs/etc/$f"
done
phase "podman import as debian:bookworm-slim"
tar -C "$work/rootfs" -c . | "${P[@]}" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
rm -rf "$work/rootfs"
"${P[@]}" images

# --- 2. the build -----------------------------------------------------------------
# --format docker: the OCI format has no HEALTHCHECK.
phase "podman build -f deploy/docker/Dockerfile.cpu --target prebuilt --format docker"
image=localhost/logitd:cpu-test
if "${P[@]}" build --isolation chroot --format docker --pull=never --target prebuilt \
  -f deploy/docker/Dockerfile.cpu -t "$image" "$ctx" >"$work/build.log" 2>&1; then
  grep -E '^\[|STEP|COMMIT' "$work/build.log"
  pass "the image builds from deploy/docker/Dockerfile.cpu on the debootstrapped base"
else
  cat "$work/build.log"
  die "podman build"
fi

# --- 3. inspection -----------------------------------------------------------------
phase "inspect"
"${P[@]}" image inspect "$image" >"$work/inspect.json"
# The expectations are the deployment's documented contract (deploy/README.md):
# uid 10001, `logitd serve`, gRPC 50051 and metrics 9090, a HEALTHCHECK, SIGTERM.
if python3 - "$work/inspect.json" <<'PY'; then
import json, sys
img = json.load(open(sys.argv[1]))[0]
c = img["Config"]
hc = img.get("Healthcheck") or img.get("HealthCheck") or c.get("Healthcheck")
checks = [
    ("user is 10001:10001", c.get("User") == "10001:10001", c.get("User")),
    ("entrypoint is /usr/local/bin/logitd", c.get("Entrypoint") == ["/usr/local/bin/logitd"], c.get("Entrypoint")),
    ("default command is serve", c.get("Cmd") == ["serve"], c.get("Cmd")),
    ("exposes 50051/tcp and 9090/tcp only", sorted(c.get("ExposedPorts") or {}) == ["50051/tcp", "9090/tcp"], c.get("ExposedPorts")),
    ("listens on 0.0.0.0:50051, metrics on 0.0.0.0:9090",
     {"LOGITD_LISTEN=0.0.0.0:50051", "LOGITD_METRICS_LISTEN=0.0.0.0:9090"} <= set(c.get("Env") or []), c.get("Env")),
    ("workdir is /home/logitd", c.get("WorkingDir") == "/home/logitd", c.get("WorkingDir")),
    ("stop signal is SIGTERM", c.get("StopSignal") == "SIGTERM", c.get("StopSignal")),
    ("HEALTHCHECK present (CMD form)", bool(hc) and (hc.get("Test") or [""])[0] == "CMD" and len(hc["Test"]) > 1, hc),
]
bad = 0
for what, ok, got in checks:
    print(("PASS: image: " if ok else "FAIL: image: ") + what + ("" if ok else f" (got {got!r})"))
    bad += not ok
if hc:
    print(f"   healthcheck: interval {hc.get('Interval', 0) / 1e9:g} s, timeout {hc.get('Timeout', 0) / 1e9:g} s, "
          f"start period {hc.get('StartPeriod', 0) / 1e9:g} s, retries {hc.get('Retries')}")
sys.exit(1 if bad else 0)
PY
  pass "image config (user, entrypoint, command, ports, env, workdir, stop signal, HEALTHCHECK)"
else
  fail "image config (user, entrypoint, command, ports, env, workdir, stop signal, HEALTHCHECK)"
fi

# The default target (what `docker build -f deploy/docker/Dockerfile.cpu .` builds)
# cannot be built for real here: its build stage's rust image cannot be pulled,
# and a release build takes many minutes. Its wiring is checked instead, with a
# stand-in rust image (the base plus a `cargo` that accepts only the Dockerfile's
# command, in the workspace .dockerignore lets through, and puts the same binary
# where cargo would): the repository root as context, every stage but
# `prebuilt`, and the same image as `prebuilt` but for where the binary came from.
phase "the default target's wiring (stand-in rust image; the real one is not pulled)"
rust_image=$(sed -nE 's/^FROM ([^ ]+) AS build$/\1/p' deploy/docker/Dockerfile.cpu)
cargo_cmd=$(grep -oE 'cargo build --release --locked -p logitd -p logitd-client-tools' deploy/docker/Dockerfile.cpu | head -1)
mkdir -p "$work/fake-rust"
cp "$ctx/logitd" "$ctx/logitd-client" "$work/fake-rust/"
cat >"$work/fake-rust/cargo" <<EOF
#!/bin/sh
# A stand-in for cargo: checks the command and the context, then does what the
# real one would leave behind (target/release/logitd and logitd-client).
[ "cargo \$*" = "$cargo_cmd" ] || { echo "stand-in cargo: unexpected command: cargo \$*" >&2; exit 3; }
[ -f Cargo.lock ] && [ -f server/Cargo.toml ] && [ -f proto/logitd/v1/teacher.proto ] && [ ! -e .git ] ||
  { echo "stand-in cargo: the workspace is not in \$(pwd) as .dockerignore should leave it" >&2; exit 4; }
mkdir -p target/release && cp /stand-in/logitd /stand-in/logitd-client target/release/
echo "stand-in cargo: \$(pwd), \$(find . -type f | wc -l) files"
EOF
chmod 0755 "$work/fake-rust/cargo"
printf 'FROM debian:bookworm-slim\nCOPY logitd logitd-client /stand-in/\nCOPY cargo /usr/local/bin/cargo\n' >"$work/fake-rust/Containerfile"
default_image=localhost/logitd:cpu-default-test
if "${P[@]}" build -q --isolation chroot --pull=never -t "$rust_image" "$work/fake-rust" >/dev/null &&
  "${P[@]}" build --isolation chroot --format docker --pull=never \
    -f deploy/docker/Dockerfile.cpu -t "$default_image" . >"$work/build-default.log" 2>&1; then
  grep -E '^\[|STEP|stand-in|COMMIT' "$work/build-default.log"
  "${P[@]}" image inspect "$default_image" >"$work/inspect-default.json"
  if python3 - "$work/inspect.json" "$work/inspect-default.json" <<'PY'; then
import json, sys
a, b = (json.load(open(p))[0] for p in sys.argv[1:])
keys = ("User", "Entrypoint", "Cmd", "ExposedPorts", "Env", "WorkingDir", "StopSignal")
diff = [k for k in keys if a["Config"].get(k) != b["Config"].get(k)]
if a.get("Healthcheck") != b.get("Healthcheck"):
    diff.append("HealthCheck")
print("   default target vs prebuilt: " + (", ".join(diff) + " differ" if diff else "same config and HEALTHCHECK"))
sys.exit(1 if diff else 0)
PY
    pass "the default multi-stage target builds (stand-in cargo) to the same config as prebuilt"
  else
    fail "the default multi-stage target builds (stand-in cargo) to the same config as prebuilt"
  fi
else
  cat "$work/build-default.log"
  fail "the default multi-stage target builds (stand-in cargo) to the same config as prebuilt"
fi
"${P[@]}" rmi -f "$default_image" "$rust_image" >/dev/null 2>&1 || true

phase "the files the build added to the base"
base_root=$("${P[@]}" image mount debian:bookworm-slim)
image_root=$("${P[@]}" image mount "$image")
if python3 - "$base_root" "$image_root" "$ctx/logitd" "$ctx/logitd-client" <<'PY'; then
import hashlib, os, stat, sys
base, new, binary, client_binary = sys.argv[1:]

def walk(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            rel = "/" + os.path.relpath(p, root)
            if stat.S_ISDIR(st.st_mode):
                key = ("dir", st.st_mode, st.st_uid, st.st_gid)
            elif stat.S_ISLNK(st.st_mode):
                key = ("link", os.readlink(p))
            else:
                key = ("file", st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
            out[rel] = key
    return out

a, b = walk(base), walk(new)
added = sorted(set(b) - set(a))
removed = sorted(set(a) - set(b))
changed = sorted(p for p in set(a) & set(b) if a[p] != b[p])
for tag, paths in (("added", added), ("changed", changed), ("removed", removed)):
    for p in paths:
        print(f"   {tag:8} {p}")
print(f"   {len(added)} added, {len(changed)} changed, {len(removed)} removed (of {len(a)} paths in the base)")

# The user: useradd's databases and backups, the home directory and its
# skeleton files; the two binaries. Anything else is a failure.
userdb = {f"/etc/{f}{s}" for f in ("passwd", "group", "shadow", "gshadow") for s in ("", "-")}
def allowed(p):
    return p in userdb or p == "/home/logitd" or p.startswith("/home/logitd/") or p in ("/usr/local/bin/logitd", "/usr/local/bin/logitd-client")
bad = [p for p in added + changed if not allowed(p)] + removed
ok = not bad
if bad:
    print("FAIL: not the base + the user + the binary: " + ", ".join(bad))

def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()
for name, given in (("logitd", binary), ("logitd-client", client_binary)):
    b_bin = os.path.join(new, "usr/local/bin", name)
    st = os.lstat(b_bin)
    if not (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0 and st.st_gid == 0
            and sha(b_bin) == sha(given)):
        print(f"FAIL: /usr/local/bin/{name} is not the given binary, root-owned, 0755 (mode {oct(st.st_mode)}, {st.st_uid}:{st.st_gid})")
        ok = False
home = os.lstat(os.path.join(new, "home/logitd"))
if (home.st_uid, home.st_gid) != (10001, 10001):
    print(f"FAIL: /home/logitd is owned by {home.st_uid}:{home.st_gid}")
    ok = False
users = [l.split(":") for l in open(os.path.join(new, "etc/passwd")).read().splitlines()]
mine = [u for u in users if u[2] == "10001"]
if not (len(mine) == 1 and mine[0][0] == "logitd" and mine[0][3] == "10001" and mine[0][5] == "/home/logitd"):
    print(f"FAIL: /etc/passwd has no single logitd:10001:10001 with home /home/logitd: {mine}")
    ok = False
groups = [l.split(":") for l in open(os.path.join(new, "etc/group")).read().splitlines()]
if [g[0] for g in groups if g[2] == "10001"] != ["logitd"]:
    print(f"FAIL: /etc/group has no single group logitd with gid 10001")
    ok = False
sys.exit(0 if ok else 1)
PY
  pass "the image holds the base, the user and the two binaries, nothing else"
else
  fail "the image holds the base, the user and the two binaries, nothing else"
fi
"${P[@]}" image umount "$image" debian:bookworm-slim >/dev/null

# --- 4. running it -----------------------------------------------------------------
# The container's root: its own writable layer over the image, as `docker run` has.
phase "the container's root file system (podman create + podman mount)"
"${P[@]}" create --no-healthcheck --name logitd-test "$image" >/dev/null
root=$("${P[@]}" mount logitd-test)
# What the image says to run, with what env, as whom, where; and its health check.
python3 - "$work/inspect.json" "$work" <<'PY'
import json, sys
img = json.load(open(sys.argv[1]))[0]
c, out = img["Config"], sys.argv[2]
hc = img.get("Healthcheck") or img.get("HealthCheck") or c.get("Healthcheck")
def put(name, items):
    with open(f"{out}/{name}", "wb") as f:
        f.write(b"".join(s.encode() + b"\0" for s in items))
put("cfg-env", c.get("Env") or [])
put("cfg-cmd", (c.get("Entrypoint") or []) + (c.get("Cmd") or []))
hc = hc or {}
put("cfg-hc", (hc.get("Test") or [""])[1:])
put("cfg-misc", [c.get("User", ""), c.get("WorkingDir") or "/", str(int(hc.get("Timeout") or 30e9) // 10**9)])
PY
mapfile -d '' cfg_env <"$work/cfg-env"
mapfile -d '' cfg_cmd <"$work/cfg-cmd"
mapfile -d '' cfg_hc <"$work/cfg-hc"
mapfile -d '' cfg_misc <"$work/cfg-misc"
user=${cfg_misc[0]}
workdir=${cfg_misc[1]}
hc_timeout=${cfg_misc[2]}
((${#cfg_hc[@]} > 0)) || die "the image has no HEALTHCHECK command to run"
# HOME as Docker sets it: the user's home in the image's /etc/passwd.
home=$(awk -F: -v u="${user%%:*}" '$3 == u { print $6 }' "$root/etc/passwd")
[[ -n $home ]] || die "uid ${user%%:*} has no /etc/passwd entry in the image"
run_env=("${cfg_env[@]}" "HOSTNAME=logitd-test" "HOME=$home")

# `-v ~/.cache/logitd:/home/logitd/.cache/logitd:ro`, as in deploy/README.md's `docker
# run` line (Docker creates the missing mount point, as here), and what a
# container has: /proc, /dev, /sys (read-only).
readme_mount=$(grep -oE -- '-v ~/\.cache/logitd:[^ :]+:ro' "$repo/deploy/docker/Dockerfile.cpu" | head -1 | cut -d: -f2)
[[ $readme_mount == /home/logitd/.cache/logitd ]] ||
  die "the Dockerfile's docker run line mounts the cache at '$readme_mount', not /home/logitd/.cache/logitd"
grep -qF -- "-v ~/.cache/logitd:$readme_mount:ro" "$repo/deploy/README.md" ||
  die "deploy/README.md's docker run line does not mount ~/.cache/logitd at $readme_mount"
mkdir -p "$root$readme_mount" "$root/proc" "$root/dev" "$root/sys"
mount --bind "$cache" "$root$readme_mount" && mounts+=("$root$readme_mount")
mount -o remount,bind,ro "$root$readme_mount"
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
mount --bind /dev "$root/dev" && mounts+=("$root/dev")
mount --bind /sys "$root/sys" && mounts+=("$root/sys")
mount -o remount,bind,ro "$root/sys"
echo "root: $root; $cache mounted read-only at $readme_mount"
if chroot --userspec="$user" "$root" /usr/bin/touch "$readme_mount/teachers/x" 2>/dev/null; then
  fail "the model mount is read-only"
else
  pass "the model mount is read-only (uid ${user%%:*} cannot write to it)"
fi

# logitd-client (the dump Job's command) runs inside the image as its user.
if env -i "${run_env[@]}" chroot --userspec="$user" "$root" /usr/local/bin/logitd-client dump --help 2>&1 |
  grep -q -- '--workers'; then
  pass "logitd-client dump runs in the image as uid ${user%%:*}"
else
  fail "logitd-client dump runs in the image as uid ${user%%:*}"
fi

# healthcheck: the image's HEALTHCHECK command, inside the root, as the image's
# user, with its env and its timeout (as Docker runs it in the container).
healthcheck() { timeout "$hc_timeout" env -i "${run_env[@]}" chroot --userspec="$user" "$root" /usr/bin/env -C "$workdir" "${cfg_hc[@]}" >/dev/null 2>&1; }
# start_container LOG [VAR=VALUE...]: the image's entrypoint + command (as `docker run -e`).
start_container() {
  local log=$1
  shift
  env -i "${run_env[@]}" "$@" chroot --userspec="$user" "$root" /usr/bin/env -C "$workdir" "${cfg_cmd[@]}" >"$log" 2>&1 &
  cpid=$!
  pids+=("$cpid")
}
metrics() { curl -s -m 2 "http://127.0.0.1:9090/metrics"; }
# grpc ADDR METHOD [grpcurl args...]: a call with the repository's .proto (not
# the server's reflection); the answer as JSON on stdout.
grpc() {
  local addr=$1 method=$2
  shift 2
  grpcurl -plaintext -max-msg-sz 268435456 -import-path "$repo/proto" -proto logitd/v1/teacher.proto \
    "$@" "$addr" "logitd.v1.Teacher/$method"
}
serving() { grpcurl -plaintext -d '{"service":"logitd.v1.Teacher"}' "$1" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; }
wait_serving() { # ADDR PID WHAT
  local i
  for ((i = 0; i < 1200; i++)); do
    serving "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# all_10001 UID_LINE GID_LINE: /proc/PID/status's real, effective, saved and fs ids.
all_10001() { [[ $1 =~ ^Uid:([[:space:]]+10001){4}$ && $2 =~ ^Gid:([[:space:]]+10001){4}$ ]]; }
logged_drain() { grep -q "shutting down: draining" "$1" && grep -q "stopped" "$1" && ! grep -q "drain timeout reached" "$1"; }

# same_answer A B: byte-equal JSON; else the first path where they differ (not
# the values: they hold token ids).
same_answer() {
  cmp -s "$1" "$2" && return 0
  python3 - "$1" "$2" <<'PY'
import json, sys
def first_diff(a, b, path="$"):
    if type(a) is not type(b):
        return path + " (types)"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k} (present in one only)"
            d = first_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
    elif isinstance(a, list):
        if len(a) != len(b):
            return f"{path} (lengths {len(a)}, {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_diff(x, y, f"{path}[{i}]")
            if d:
                return d
    elif a != b:
        return path
    return None
print("   answers differ at " + str(first_diff(*(json.load(open(p)) for p in sys.argv[1:]))))
PY
  return 1
}
for port in 50051 9090; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken on this machine: the container listens there (its image's defaults)"
  fi
done

phase "run 1: the image as it is (defaults), and the same binary on the host"
start_container "$work/run1.log"
c1=$cpid
# The host reference: the same file, the same teacher, ports picked by the kernel.
env -i PATH=/usr/bin:/bin HOME="$work" LOGITD_MODEL="$gguf" LOGITD_LISTEN=127.0.0.1:0 \
  LOGITD_METRICS_LISTEN=127.0.0.1:0 "$ctx/logitd" serve >"$work/host.log" 2>&1 &
host=$!
pids+=("$host")

# Health while loading: each sample reads /metrics from the host before and
# after running the image's check inside the root; a failed check with /metrics
# answering, and without logitd_model_info, both before and after, failed
# because the model was still loading.
loading_fails=0 down_fails=0 loaded_fails=0 hc_ok=0
deadline=$((SECONDS + 120))
while ((SECONDS < deadline)) && kill -0 "$c1" 2>/dev/null; do
  before=$(metrics) && b_up=1 || b_up=0
  if healthcheck; then
    hc_ok=1
    break
  fi
  after=$(metrics) && a_up=1 || a_up=0
  if ! ((b_up && a_up)); then
    down_fails=$((down_fails + 1))
  elif grep -q '^logitd_model_info{' <<<"$before$after"; then
    loaded_fails=$((loaded_fails + 1))
  else
    loading_fails=$((loading_fails + 1))
  fi
done
echo "HEALTHCHECK failures: $down_fails with /metrics not (yet) answering, $loading_fails with /metrics up" \
  "and the model loading, $loaded_fails with the model loaded"
if ((loading_fails > 0)); then
  pass "HEALTHCHECK (inside the root) fails while the model loads"
else
  fail "HEALTHCHECK (inside the root) fails while the model loads (never observed)"
fi
if ((hc_ok)) && metrics | grep -q '^logitd_model_info{'; then
  pass "HEALTHCHECK (inside the root) passes once the model is loaded"
else
  sed 's/^/   log: /' "$work/run1.log" | tail -20
  die "HEALTHCHECK (inside the root) passes once the model is loaded"
fi
read -r uid_line < <(grep '^Uid:' "/proc/$c1/status")
read -r gid_line < <(grep '^Gid:' "/proc/$c1/status")
check "the server runs as uid/gid 10001 ($uid_line; $gid_line)" \
  all_10001 "$uid_line" "$gid_line"
check "the server's root is the image's" test "$(readlink "/proc/$c1/root")" == "$root"

wait_serving 127.0.0.1:50051 "$c1" || die "the container serves logitd.v1.Teacher on 127.0.0.1:50051"
haddr=$(grep -oE 'gRPC on [0-9.]+:[0-9]+' "$work/host.log" | head -1 | cut -d' ' -f3)
wait_serving "$haddr" "$host" || { cat "$work/host.log"; die "the host reference serves"; }
pass "the container and the host reference serve (grpc.health.v1 SERVING)"

phase "SampleLogits: container (127.0.0.1:50051) against the host binary ($haddr)"
grpc 127.0.0.1:50051 GetModelInfo -d '{}' >"$work/info-container.json"
grpc "$haddr" GetModelInfo -d '{}' >"$work/info-host.json"
vocab=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocabSize"])' "$work/info-container.json")
python3 - "$work/info-container.json" <<'PY'
import json, sys
i = json.load(open(sys.argv[1]))
print("   container: " + ", ".join(f"{k} {i.get(k)}" for k in ("modelId", "architecture", "vocabSize", "dtype", "device")))
PY
check "GetModelInfo: the container's equals the host's" same_answer "$work/info-container.json" "$work/info-host.json"
# Requests: random ids (seeded), a sampled and a top-k call.
python3 - "$work" "$vocab" <<'PY'
import json, random, sys
out, vocab = sys.argv[1], int(sys.argv[2])
r = random.Random(20261129)
seqs = [{"tokenIds": [r.randrange(vocab) for _ in range(n)], "firstPosition": f} for n, f in ((48, 0), (96, 40), (17, 3))]
json.dump({"sequences": seqs, "numSamples": 64, "temperature": 0.8, "seed": "12345"}, open(f"{out}/req-sample.json", "w"))
# (A seed in the top-k request too: without one the server picks one and echoes it.)
json.dump({"sequences": seqs[:2], "numSamples": 20, "method": "SAMPLING_METHOD_TOP_K", "seed": "1"},
          open(f"{out}/req-topk.json", "w"))
# For the drain: one sequence, alone in the queue.
json.dump({"sequences": [{"tokenIds": [r.randrange(vocab) for _ in range(300)]}], "numSamples": 16, "seed": "99"},
          open(f"{out}/req-drain.json", "w"))
PY
# well_formed REQUEST ANSWER: every sequence answered, positions, counts and order as asked.
well_formed() {
  python3 - "$1" "$2" <<'PY'
import json, sys
req, ans = (json.load(open(p)) for p in sys.argv[1:])
k = req["numSamples"]
topk = req.get("method") == "SAMPLING_METHOD_TOP_K"
assert len(ans["sequences"]) == len(req["sequences"]), "one answer per sequence"
for q, a in zip(req["sequences"], ans["sequences"]):
    n = len(q["tokenIds"]) - q.get("firstPosition", 0)
    off = a["offsets"]
    assert len(off) == n + 1 and len(a["lse"]) == n, "one entry per returned position"
    ids, lps = a["tokenIds"], a["logprobs"]
    # Top-k replies carry no counts (every count is 1) and list ids by descending log p.
    assert not topk or "counts" not in a, "top-k replies leave counts empty"
    for i in range(n):
        p = lps[off[i]:off[i + 1]]
        if topk:
            assert off[i + 1] - off[i] == k, f"k ids at position {i}"
            assert all(x >= y for x, y in zip(p, p[1:])), f"descending log p at position {i}"
        else:
            assert sum(a["counts"][off[i]:off[i + 1]]) == k, f"counts of position {i}"
        assert all(lp <= 0 for lp in p), "log-probabilities"
PY
}
for kind in sample topk; do
  grpc 127.0.0.1:50051 SampleLogits -d @ <"$work/req-$kind.json" >"$work/ans-$kind-container.json" ||
    die "SampleLogits ($kind) on the container"
  grpc "$haddr" SampleLogits -d @ <"$work/req-$kind.json" >"$work/ans-$kind-host.json" ||
    die "SampleLogits ($kind) on the host"
  check "SampleLogits ($kind): a well-formed answer from the container" \
    well_formed "$work/req-$kind.json" "$work/ans-$kind-container.json"
  check "SampleLogits ($kind): the container's answer equals the host binary's ($(wc -c <"$work/ans-$kind-host.json") bytes of JSON)" \
    same_answer "$work/ans-$kind-container.json" "$work/ans-$kind-host.json"
done
grpc "$haddr" SampleLogits -d @ <"$work/req-drain.json" >"$work/ans-drain-host.json" ||
  die "SampleLogits (drain request) on the host"

phase "SIGTERM (run 1, idle)"
kill -TERM "$c1"
t_sig=$SECONDS
rc=0
wait "$c1" || rc=$?
check "SIGTERM: exits 0 (exit status $rc, $((SECONDS - t_sig)) s)" test "$rc" == 0
check "SIGTERM: logged the drain and the stop, no drain timeout" \
  logged_drain "$work/run1.log"
kill -TERM "$host"
wait "$host" || true

phase "run 2: SIGTERM with a call in the queue (-e LOGITD_MAX_WAIT_MS=60000 holds a lone call for a minute)"
start_container "$work/run2.log" LOGITD_MAX_WAIT_MS=60000
c2=$cpid
wait_serving 127.0.0.1:50051 "$c2" || { cat "$work/run2.log"; die "run 2 serves"; }
sent=$SECONDS
grpc 127.0.0.1:50051 SampleLogits -d @ <"$work/req-drain.json" >"$work/ans-drain-container.json" 2>"$work/drain-call.err" &
call=$!
pids+=("$call")
queued=0
for ((i = 0; i < 200; i++)); do
  if metrics | grep -qE '^logitd_queue_tokens 300$'; then
    queued=1
    break
  fi
  sleep 0.1
done
((queued)) || die "the call's 300 tokens reach the queue (logitd_queue_tokens)"
kill -0 "$call" 2>/dev/null || die "the call is still waiting when the signal is sent"
kill -TERM "$c2"
rc=0
wait "$call" || rc=$?
took=$((SECONDS - sent))
check "SIGTERM: the queued call is answered (grpcurl status $rc) after $took s, before its 60 s batching timer" \
  test "$rc" == 0 -a "$took" -lt 50
check "SIGTERM: the drained answer equals the host binary's" \
  same_answer "$work/ans-drain-container.json" "$work/ans-drain-host.json"
rc=0
wait "$c2" || rc=$?
check "SIGTERM: exits 0 after draining (exit status $rc)" test "$rc" == 0
check "SIGTERM: logged the drain and the stop, no drain timeout" \
  logged_drain "$work/run2.log"
if ((${#failed[@]} > 0)); then
  for f in run1 run2 host; do
    echo "--- $f.log (tail)"
    tail -15 "$work/$f.log"
  done
fi
