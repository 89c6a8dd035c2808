"""LESS cost on the native engine: decode tokens/s and TTFT with LESS against the same eviction
without it, measured in one process (interleaved repeats), and the state's memory.

    python samples/less_bench.py [--model SmolLM2-135M-Instruct] [--tokens 2048] [--budget 0.125]
                                 [--new 64] [--repeats 2] [--weights PATH ...]

Without ``--weights`` it uses the model's default LESS file (``kvcrush-ov less-train``), or, if
there is none, untrained kernels of the default size (the cost depends on the values only through
which layers are on: a switched-off layer has no LESS op). ``--weights`` may be repeated: each
file is one more column.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kvcrush_ov.config import (
    CacheEvictionConfig,
    GenerationConfig,
    KVCacheConfig,
    LESSConfig,
    SchedulerConfig,
)
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.less.kernels import LESSWeights, default_weights_path
from kvcrush_ov.model_info import check_model_dir
from kvcrush_ov.pipeline import resolve_model


def _engine(model: Path, budget: float, precision: str, less: Path | None) -> LLMEngine:
    ev = CacheEvictionConfig(max_cache_size=budget,
                             less=None if less is None else LESSConfig(less))
    return LLMEngine(model, "CPU", KVCacheConfig(precision=precision),
                     SchedulerConfig(), context_length=32768, eviction=make_spec(ev, model))


def _once(eng: LLMEngine, ids: list[int], new: int) -> tuple[float, float]:
    """(TTFT s, decode s per token) of one request."""
    t0 = time.perf_counter()
    seq = eng.add_request(ids, GenerationConfig(max_new_tokens=new, ignore_eos=True), set(),
                          lambda x: "")
    first = None
    while eng.has_unfinished():
        eng.step()
        if first is None and seq.output_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (end - first) / max(1, len(seq.output_ids) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--budget", type=float, default=0.125)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", default="u8")
    p.add_argument("--weights", type=Path, action="append", default=None)
    a = p.parse_args()
    model = Path(resolve_model(a.model))
    files = a.weights or [default_weights_path(model)]
    if not Path(files[0]).is_file() and a.weights is None:
        import json
        c = json.loads((model / "config.json").read_text())
        hq = c["num_attention_heads"]
        w = LESSWeights.initial(c["num_hidden_layers"], hq, c["num_key_value_heads"],
                                c.get("head_dim") or c["hidden_size"] // hq)
        files = [w.save(Path(tempfile.mkdtemp()) / "untrained.npz")]
        print(f"no trained weights: untrained kernels of the default size ({files[0]})")
    info = check_model_dir(model)
    ids = np.random.default_rng(0).integers(100, 20000, a.tokens).tolist()
    engines = {"eviction": _engine(model, a.budget, a.precision, None)}
    for f in files:
        n = len(LESSWeights.load(f).active_layers)
        engines[f"+less {Path(f).stem} ({n} layers)"] = _engine(model, a.budget, a.precision,
                                                               Path(f))
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in engines}
    for _ in range(a.repeats + 1):  # the first round warms both up and is dropped
        for name, eng in engines.items():
            res[name].append(_once(eng, ids, a.new))
    w = LESSWeights.load(files[0])
    state_bytes = w.num_layers * w.num_kv_heads * w.feature_dim * (w.head_dim + 1) * 4
    token_bytes = info.num_layers * info.num_kv_heads * 2 * info.head_dim * 2  # bf16 K + V
    print(f"model {a.model}, prompt {a.tokens} tokens, budget {a.budget}, cache {a.precision}, "
          f"{a.new} new tokens, {a.repeats} repeats (medians)")
    base = None
    for name, runs in res.items():
        ttft = float(np.median([r[0] for r in runs[1:]]))
        tps = 1.0 / float(np.median([r[1] for r in runs[1:]]))
        base = base or (ttft, tps)
        print(f"  {name:32s} TTFT {ttft:6.3f} s ({ttft / base[0]:.3f}x)   decode {tps:7.1f} "
              f"tok/s ({tps / base[1]:.3f}x)")
    print(f"  LESS state: {state_bytes} bytes per sequence = "
          f"{state_bytes / token_bytes:.1f} tokens' worth of a bf16 cache "
          f"({w.feature_dim * (w.head_dim + 1) / (2 * w.head_dim):.1f} per layer and KV head)")


if __name__ == "__main__":
    main()
