#!/usr/bin/env bash
# Main job: a long document + a question, answered with the full KV cache and with KVCrush at a
# 25% budget, on the default model (fetched and exported on first use). Extra args go to the demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "${KVCRUSH_OV_VENV:-$ROOT/.venv}/bin/kvcrush-ov" demo "$@"
