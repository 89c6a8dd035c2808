"""KVzap's surrogate training steps (texts, train, position) as a script: runs
kvcrush_ov/kvzap/gpu.py by its path, so a GPU machine with torch and transformers but no
OpenVINO can run the train and position steps without importing the package. The steps and
the recipe are documented there; ``kvcrush-ov kvzap-train --recipe`` runs all of them.

    python scripts/kvzap_gpu.py texts --model SmolLM2-135M-Instruct --texts 1210 --out T.npz
    python scripts/kvzap_gpu.py train --hf HF_DIR --texts-file T.npz --out kvzap.npz --device cuda
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "kvcrush_ov" / "kvzap" / "gpu.py"
_SPEC = importlib.util.spec_from_file_location("kvzap_gpu_steps", _PATH)
_STEPS = importlib.util.module_from_spec(_SPEC)
sys.modules["kvzap_gpu_steps"] = _STEPS  # dataclasses look their module up
_SPEC.loader.exec_module(_STEPS)

_train_module, collect, main = _STEPS._train_module, _STEPS.collect, _STEPS.main

if __name__ == "__main__":
    sys.exit(main())
