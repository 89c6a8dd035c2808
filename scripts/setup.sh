#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with everything the demo and tests need.
# torch==2.13.0 (CPU) goes in FIRST: an unpinned torch requirement would otherwise pull a CUDA
# build; optimum-intel then drags in torchvision, which does not import against CPU torch, so it
# is removed afterwards (see docs/install.md). Idempotent: a finished setup is reused.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVCRUSH_OV_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.kvcrush-ov-setup"
# The C++ core (cpp/) is compiled by the editable install: a change to it re-runs the install.
WANT="$( { cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt"
           find "$ROOT/cpp" -type f \( -name '*.[ch]pp' -o -name '*.txt' -o -name '*.cmake' \) \
             -not -path '*/build/*' -print0 | LC_ALL=C sort -z | xargs -0 cat; } \
         | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import kvcrush_ov._core" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $VENV (a few minutes on first run; log: $VENV/setup.log)" >&2
"$PYTHON" -m venv "$VENV"
LOG="$VENV/setup.log"
: > "$LOG"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
step() {  # run a step quietly; on failure show the end of its log
  echo "[setup] $1" >&2
  shift
  if ! "$@" >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    echo "[setup] failed: $*  (full log: $LOG)" >&2
    exit 1
  fi
}
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  # the C++ core (cpp/) is compiled by the install; CMake comes from PyPI when missing
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step "installing a C++ compiler (apt-get install g++)" \
      sh -c "apt-get update -q && apt-get install -y -q g++"
  else
    echo "[setup] no C++ compiler found: install g++ (Debian / Ubuntu: sudo apt-get install g++)" >&2
    exit 1
  fi
fi
step "upgrading pip" "${PIP[@]}" install --upgrade pip
step "installing torch==2.13.0 (CPU) first" "${PIP[@]}" install "torch==2.13.0"
# the runtime first: the C++ build links kvcrush_ov._core (the graph passes and the LESSMix op)
# against this very wheel
step "installing the OpenVINO runtime" \
  "${PIP[@]}" install -c "$ROOT/constraints.txt" openvino
OV_CMAKE=$("$VENV/bin/python" -c "import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), 'cmake'))")
step "installing kvcrush-ov with its export, serve, ray and test extras" \
  "${PIP[@]}" install -c "$ROOT/constraints.txt" \
  --config-settings=cmake.define.OpenVINO_DIR="$OV_CMAKE" -e "$ROOT[export,serve,ray,test]"
step "removing torchvision (breaks optimum-intel with CPU torch)" \
  "${PIP[@]}" uninstall -y torchvision
step "checking the export stack imports" \
  "$VENV/bin/python" -c "from optimum.intel import OVModelForCausalLM; import openvino_genai, kvcrush_ov"
echo "$WANT" > "$STAMP"
echo "[setup] ready: $VENV" >&2
