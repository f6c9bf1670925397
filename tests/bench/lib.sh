# Shared by the bench scripts (sourced; expects $WORK where `ask` is used).

# The machine, as the first lines of every results file: numbers from machines
# with other SIMD flags are not comparable.
machine_header() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs online"
  echo "simd: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
    | grep -E '^(sse4_2|avx|avx2|fma|f16c|avx512.*|amx.*|avx_vnni)$' | sort | paste -sd' ')"
}

# ask NAME FD PID SECONDS OUT: one measurement from a peer kept loaded, reading
# durations on fd FD and printing a JSON line per measurement to $WORK/NAME.out.
# A peer that exits before answering stops the script (status 1), naming it,
# its exit status and its stderr.
ask() {
  local before; before=$(wc -l < "$WORK/$1.out")
  echo "$4" >&"$2"
  while (( $(wc -l < "$WORK/$1.out") <= before )); do
    if ! kill -0 "$3" 2>/dev/null; then
      local status=0
      wait "$3" || status=$?
      echo "the $1 peer (pid $3) exited with status $status before answering; its stderr:" >&2
      cat "$WORK/$1.err" >&2
      exit 1
    fi
    sleep 0.2
  done
  tail -n 1 "$WORK/$1.out" > "$5"
}

# bench_python IMPORTS: sets PYTHON to the caller's, or else to the bench venv
# (~/.cache/logitd/bench-venv), created and filled from tests/bench/requirements.txt
# (pinned; llama-cpp-python builds from source, ~10 minutes once) when it cannot
# import IMPORTS (comma-separated modules); fails unless PYTHON imports them.
bench_python() {
  if [[ -z ${PYTHON:-} ]]; then
    local venv=${XDG_CACHE_HOME:-$HOME/.cache}/logitd/bench-venv
    if [[ ! -x $venv/bin/python ]]; then
      echo "creating $venv" >&2
      python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c "import $1" 2>/dev/null; then
      echo "installing tests/bench/requirements.txt into $venv" >&2
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r tests/bench/requirements.txt
    fi
    PYTHON=$venv/bin/python
  fi
  "$PYTHON" -c "import $1" || { echo "$PYTHON cannot import $1" >&2; exit 1; }
}
