"""``kvcrush-ov bench``: backend native vs backend genai, side by side in one process.

Same prompts (Paul Graham essays cut to exact token counts, no chat template), full cache, u8 KV
cache, prefix caching off on both, runs alternating between the backends; each figure is the
median of ``repeats`` runs. Prints a table of ratios; figures, not pass / fail.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from kvcrush_ov.config import GenerationConfig
from kvcrush_ov.pipeline import Pipeline
from kvcrush_ov.results import DecodedResults


@dataclass
class Row:
    what: str
    native: float
    genai: float
    unit: str
    better: str  # "higher" or "lower"

    @property
    def ratio(self) -> float:
        """> 1 means native is better."""
        if self.better == "higher":
            return self.native / self.genai if self.genai else float("nan")
        return self.genai / self.native if self.native else float("nan")


def exact_prompts(pipe: Pipeline, lengths: list[int]) -> list[str]:
    """Text prompts of exactly ``lengths`` tokens (no chat template), from the essays."""
    from kvcrush_ov.data import essays

    tok = pipe.tokenizer
    ids = tok.encode("\n\n".join(essays().values())).input_ids.data[0]
    out = []
    for n in lengths:
        text = tok.decode(list(ids[:n]))
        got = pipe.backend.encode(text, False).shape[1]
        out.append(text if got == n else tok.decode(list(ids[:n - (got - n)])))
    return out


def decode_tokens_per_s(res: DecodedResults) -> float:
    """Generated tokens after each request's first, over the decode span of the batch."""
    first = min(m.ttft_s for m in res.metrics)
    last = max(m.ttft_s + m.tpot_s * (m.num_generated_tokens - 1) for m in res.metrics)
    tokens = sum(m.num_generated_tokens - 1 for m in res.metrics)
    return tokens / (last - first) if last > first else 0.0


def _median_pair(fn: Callable[[Pipeline], float], native: Pipeline, genai: Pipeline,
                 repeats: int) -> tuple[float, float]:
    fn(native)  # warm-up both
    fn(genai)
    a, b = [], []
    for _ in range(repeats):
        a.append(fn(native))
        b.append(fn(genai))
    return statistics.median(a), statistics.median(b)


def run_bench(model: str, ttft_lengths: tuple[int, ...] = (1024, 4096),
              batch_sizes: tuple[int, ...] = (1, 8), decode_prompt: int = 512,
              new_tokens: int = 64, repeats: int = 3, device: str = "CPU",
              say: Callable[[str], None] = print) -> list[Row]:
    native = Pipeline(model, device=device, eviction=None, backend="native")
    genai = Pipeline(model, device=device, eviction=None, backend="genai")
    rows: list[Row] = []
    one = GenerationConfig(max_new_tokens=1, apply_chat_template=False)
    for n, prompt in zip(ttft_lengths, exact_prompts(native, list(ttft_lengths)), strict=True):
        a, b = _median_pair(lambda p, q=prompt: p.generate(q, one).metrics[0].ttft_s,
                            native, genai, repeats)
        rows.append(Row(f"TTFT, {n}-token prompt", a, b, "s", "lower"))
        say(f"  {rows[-1].what}: native {a:.3f} s, genai {b:.3f} s")
    gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, apply_chat_template=False)
    base = exact_prompts(native, [decode_prompt + 8 * i for i in range(max(batch_sizes))])
    eng = native.backend.engine
    for bs in batch_sizes:
        prompts = base[:bs]
        steps0, step_s0, infer_s0 = (eng.stats.decode_steps, eng.stats.decode_step_s,
                                     eng.stats.decode_infer_s)
        a, b = _median_pair(lambda p, q=prompts: decode_tokens_per_s(p.generate(q, gen)),
                            native, genai, repeats)
        rows.append(Row(f"decode tokens/s, batch {bs}", a, b, "tok/s", "higher"))
        steps = eng.stats.decode_steps - steps0
        py_ms = 1e3 * ((eng.stats.decode_step_s - step_s0) - (eng.stats.decode_infer_s
                                                             - infer_s0)) / max(steps, 1)
        rows.append(Row(f"native Python ms per decode step, batch {bs}", py_ms, float("nan"),
                        "ms", "lower"))
        say(f"  decode batch {bs}: native {a:.1f} tok/s, genai {b:.1f} tok/s, "
            f"native Python {py_ms:.2f} ms/step")
    return rows


def format_rows(model: str, rows: list[Row]) -> str:
    lines = [f"| {model} | native | genai | native advantage |", "|---|---|---|---|"]
    for r in rows:
        if r.genai != r.genai:  # NaN: a native-only figure
            lines.append(f"| {r.what} | {r.native:.2f} {r.unit} | - | - |")
        else:
            lines.append(f"| {r.what} | {r.native:.3g} {r.unit} | {r.genai:.3g} {r.unit} | "
                         f"{r.ratio:.3f}x |")
    return "\n".join(lines)
