#!/usr/bin/env bash
# The test suite: lint, then pytest (fetches the real models it needs on first use).
# Extra args go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${KVCRUSH_OV_VENV:-$ROOT/.venv}"
cd "$ROOT"
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "$@"
