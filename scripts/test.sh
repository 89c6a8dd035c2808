#!/usr/bin/env bash
# The test suite: lint, then pytest (fetches the real models it needs on first use).
# Extra args go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
echo "[test] $(date -u +%T) setup" >&2
bash "$ROOT/scripts/setup.sh"
echo "[test] $(date -u +%T) ruff, then pytest" >&2
VENV="${KVCRUSH_OV_VENV:-$ROOT/.venv}"
cd "$ROOT"
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "$@"
