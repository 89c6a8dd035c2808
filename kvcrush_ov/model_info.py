"""What a model folder holds: validation of an exported model, and its KV-cache geometry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvcrush_ov.errors import ModelError

REQUIRED_FILES = (
    "openvino_model.xml",
    "openvino_model.bin",
    "openvino_tokenizer.xml",
    "openvino_detokenizer.xml",
    "config.json",
)

# Paged KV block size (tokens) of each device plugin. CPU's is fixed by the plugin; GPU's is 16.
BLOCK_SIZE = {"CPU": 32, "GPU": 16}


def block_size_for(device: str) -> int:
    return BLOCK_SIZE["GPU" if device.upper().startswith("GPU") else "CPU"]


@dataclass(frozen=True)
class ModelInfo:
    """Geometry of a decoder-only model, read from its config.json."""

    path: Path
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int

    def kv_block_bytes(self, precision: str, block_size: int = 32) -> int:
        """Bytes one KV block takes across all layers and KV heads, as the CPU plugin lays it out.

        u8 keys: [block + 8, head_dim] (per-channel scale / zero-point rows); u8 values:
        [block, head_dim + 8] (per-token); u4 keys: [block + 16, head_dim] bytes (measured);
        bf16 / f32: [block, head_dim] at 2 / 4 bytes. Checked against GenAI in the tests.
        """
        d, b = self.head_dim, block_size
        value_u8 = b * (d + 8)
        per_head = {
            "u8": (b + 8) * d + value_u8,
            "u4": (b + 16) * d + value_u8,
            "bf16": 2 * 2 * b * d,
            "f32": 2 * 4 * b * d,
        }[precision]
        return per_head * self.num_layers * self.num_kv_heads


def check_model_dir(path: str | Path) -> ModelInfo:
    """Validate an exported model folder; raise ModelError naming what is missing or corrupt."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"model={str(path)!r}: no such folder. Pass a folder written by "
                         "'optimum-cli export openvino' or a registry name ('kvcrush-ov models "
                         "list').")
    if not folder.is_dir():
        raise ModelError(f"model={str(path)!r} is a file, not a model folder")
    if (folder.parent / (folder.name + ".partial")).exists() and not any(folder.iterdir()):
        raise ModelError(f"model={str(path)!r} is an interrupted fetch; run the fetch again")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelError(
            f"model={str(path)!r} is incomplete: missing {', '.join(missing)}. Re-export it with "
            "'optimum-cli export openvino --task text-generation-with-past' (which also writes "
            "the OpenVINO tokenizer), or fetch a registry model."
        )
    for f in ("openvino_model.bin",):
        if (folder / f).stat().st_size == 0:
            raise ModelError(f"model={str(path)!r} is corrupt: {f} is empty")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"model={str(path)!r} is corrupt: config.json is not valid JSON ({e})"
                         ) from None
    cfg = cfg.get("text_config", cfg)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        info = ModelInfo(
            path=folder,
            model_type=str(cfg.get("model_type", "")),
            num_layers=int(cfg["num_hidden_layers"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            context_length=int(cfg.get("max_position_embeddings", 2048)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"model={str(path)!r} is corrupt: config.json lacks {e}") from None
    return info
