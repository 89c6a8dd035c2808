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
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import kvcrush_ov" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $VENV (a few minutes on first run)" >&2
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip >&2
"${PIP[@]}" install -q "torch==2.13.0" >&2
"${PIP[@]}" install -q -c "$ROOT/constraints.txt" -e "$ROOT[export,test]" >&2
"${PIP[@]}" uninstall -q -y torchvision >&2 2>/dev/null || true
"$VENV/bin/python" -c "from optimum.intel import OVModelForCausalLM; import openvino_genai, kvcrush_ov" \
  || { echo "[setup] the export stack does not import; see docs/install.md" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[setup] ready: $VENV" >&2
