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
ask() {
  local before; before=$(wc -l < "$WORK/$1.out")
  echo "$4" >&"$2"
  while (( $(wc -l < "$WORK/$1.out") <= before )); do
    kill -0 "$3" 2>/dev/null || { cat "$WORK/$1.err" >&2; exit 1; }
    sleep 0.2
  done
  tail -n 1 "$WORK/$1.out" > "$5"
}
