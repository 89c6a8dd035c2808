"""``kvcrush-ov bench-prefill``: time to first token of the ordinary prefill vs FastKV's
token-selective propagation, at several prompt lengths, in one run.

Both columns use the same eviction (the default SnapKV + KVCrush at ``budget``) on the native
engine; the FastKV column adds ``FastKVConfig(tsp_rate, split_layer)``. Prompts are distinct
essay slices of exactly ``length`` tokens (the model's tokenizer); each row is the median TTFT of
``repeats`` prompts after a warm-up, one token generated.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from kvcrush_ov.config import CacheEvictionConfig, FastKVConfig, GenerationConfig


@dataclass
class PrefillRow:
    tokens: int
    full_s: float
    fastkv_s: float
    back_tokens: int
    split_layer: int

    @property
    def ratio(self) -> float:
        return self.full_s / self.fastkv_s if self.fastkv_s > 0 else 0.0


def bench_prefill(model: str, lengths: list[int], repeats: int = 2, budget: float | int = 0.25,
                  tsp_rate: float = 0.2, split_layer: int | None = None,
                  log=print) -> list[PrefillRow]:
    from kvcrush_ov.bench_serve import prompts_of
    from kvcrush_ov.pipeline import Pipeline, resolve_model

    folder = str(resolve_model(model))
    prompts = {n: prompts_of(folder, repeats, n) for n in lengths}
    fast = FastKVConfig(split_layer=split_layer, tsp_rate=tsp_rate)
    one = GenerationConfig(max_new_tokens=1)
    times: dict[str, dict[int, float]] = {}
    info: dict[int, dict] = {}
    for mode, cfg in (("full", CacheEvictionConfig(max_cache_size=budget)),
                      ("fastkv", CacheEvictionConfig(max_cache_size=budget, fastkv=fast))):
        pipe = Pipeline(folder, eviction=cfg)
        pipe.generate(prompts_of(folder, 1, 512)[0], one)  # warm-up (first inferences)
        times[mode] = {}
        for n in lengths:
            runs = [pipe.generate(p, one).metrics[0] for p in prompts[n]]
            times[mode][n] = statistics.median(m.ttft_s for m in runs)
            if mode == "fastkv":
                info[n] = runs[-1].fastkv or {}
            log(f"[bench-prefill] {mode:<6} {n:6d} tokens: TTFT {times[mode][n]:7.2f} s")
        del pipe
    return [PrefillRow(n, times["full"][n], times["fastkv"][n], info[n].get("back_tokens", n),
                       info[n].get("split_layer", -1)) for n in lengths]


def table(rows: list[PrefillRow]) -> str:
    out = ["| prompt tokens | TTFT full prefill (s) | TTFT FastKV (s) | full / FastKV | "
           "tokens past the split layer |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.tokens} | {r.full_s:.2f} | {r.fastkv_s:.2f} | {r.ratio:.2f}x | "
                   f"{r.back_tokens} (after layer {r.split_layer}) |")
    return "\n".join(out)
