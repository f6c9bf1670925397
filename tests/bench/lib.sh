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

# llama_cmake_args: the CMake flags that pip builds llama-cpp-python's llama.cpp
# with on this machine (CMAKE_ARGS; empty: its defaults, a native -march=native
# build). On a CPU with AMX (amx_* in the flags of $CPUINFO, default
# /proc/cpuinfo) a native build runs llama.cpp's AMX tile kernels, and
# llama_peer.py segfaults; there the build is not native: AVX2, and AVX-512 with
# the extensions the CPU has, AMX off. CMAKE_ARGS already in the environment is
# used as it is.
llama_cmake_args() {
  if [[ -n ${CMAKE_ARGS+set} ]]; then
    echo "$CMAKE_ARGS"
    return
  fi
  local flags; flags=" $(grep -m1 '^flags' "${CPUINFO:-/proc/cpuinfo}" | cut -d: -f2-) "
  [[ $flags == *" amx_"* ]] || return 0
  local a="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  if [[ $flags == *" avx512f "* ]]; then
    a+=" -DGGML_AVX512=ON"
    if [[ $flags == *" avx512vbmi "* ]]; then a+=" -DGGML_AVX512_VBMI=ON"; fi
    if [[ $flags == *" avx512_vnni "* ]]; then a+=" -DGGML_AVX512_VNNI=ON"; fi
    if [[ $flags == *" avx512_bf16 "* ]]; then a+=" -DGGML_AVX512_BF16=ON"; fi
  fi
  echo "$a -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}

# install_llama_cpp VENV: (re)builds the pinned llama-cpp-python in VENV with
# llama_cmake_args, and records the flags in VENV/llama-cpp-cmake-args ("native"
# for none). --no-cache-dir: pip would otherwise reuse a wheel it built before,
# whatever flags that one had.
install_llama_cpp() {
  local args pin
  args=$(llama_cmake_args)
  pin=$(grep -m1 '^llama-cpp-python==' tests/bench/requirements.txt)
  echo "building $pin in $1 with CMAKE_ARGS='$args' (~10 minutes)" >&2
  CMAKE_ARGS=$args "$1/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-cache-dir --force-reinstall --no-deps "$pin"
  echo "${args:-native}" > "$1/llama-cpp-cmake-args"
}

# bench_python IMPORTS: sets PYTHON to the caller's, or else to the bench venv
# (~/.cache/logitd/bench-venv), created and filled from tests/bench/requirements.txt
# (pinned; llama-cpp-python builds from source, ~10 minutes once, with
# llama_cmake_args) when it cannot import IMPORTS (comma-separated modules), and
# llama-cpp-python rebuilt when IMPORTS has llama_cpp and the venv's was built
# with other flags than this machine needs (a venv without the record was built
# natively); fails unless PYTHON imports them. Sets LLAMA_CPP_BUILD to the flags
# the venv's llama.cpp was built with, for the results.
bench_python() {
  if [[ -z ${PYTHON:-} ]]; then
    local venv=${XDG_CACHE_HOME:-$HOME/.cache}/logitd/bench-venv want built
    if [[ ! -x $venv/bin/python ]]; then
      echo "creating $venv" >&2
      python3 -m venv "$venv"
    fi
    want=$(llama_cmake_args)
    want=${want:-native}
    built=$(cat "$venv/llama-cpp-cmake-args" 2>/dev/null || echo native)
    if ! "$venv/bin/python" -c "import $1" 2>/dev/null; then
      echo "installing tests/bench/requirements.txt into $venv" >&2
      install_llama_cpp "$venv"
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r tests/bench/requirements.txt
    elif [[ ,$1, == *,llama_cpp,* && $built != "$want" ]]; then
      echo "$venv's llama-cpp-python was built with CMAKE_ARGS '$built', this machine needs '$want'" >&2
      install_llama_cpp "$venv"
    fi
    PYTHON=$venv/bin/python
    LLAMA_CPP_BUILD="CMAKE_ARGS: $(cat "$venv/llama-cpp-cmake-args" 2>/dev/null || echo 'native (built before this was recorded)')"
  else
    LLAMA_CPP_BUILD="unknown (PYTHON=$PYTHON given)"
  fi
  "$PYTHON" -c "import $1" || { echo "$PYTHON cannot import $1" >&2; exit 1; }
}
