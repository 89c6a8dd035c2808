"""``kvcrush-ov bench-eviction``: what eviction on the native engine costs and buys.

Prints figures (not pass / fail):

- ``selection``: a 4K prompt + 64 new tokens with the default eviction (25%, SnapKV + KVCrush,
  continuous): eviction events, policy time and compaction time per event, and their share of
  the request's end-to-end latency.
- ``capacity``: a fixed KV cache (blocks for ``capacity_full`` 4K requests with the full cache)
  and ``num_requests`` 4K-prompt requests submitted at once, each generating ``new_tokens``:
  how many decode side by side at most, and preemptions, full cache vs 25% budget.
- ``flat``: TPOT at a long context with a fixed token budget vs TPOT at a short context with
  the full cache (both native).
- ``scores``: decode TPOT of the per-head graph with score outputs every step (continuous mode)
  vs without (prefill mode, after its one eviction), same request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvcrush_ov.bench import exact_prompts
from kvcrush_ov.config import (
    CacheEvictionConfig,
    GenerationConfig,
    KVCacheConfig,
    SchedulerConfig,
)
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.pipeline import Pipeline


@dataclass
class Figure:
    what: str
    value: float
    unit: str
    note: str = ""


def selection(model: str, prompt_tokens: int = 4096, new_tokens: int = 64,
              precision: str = "u8", warmups: int = 2, repeats: int = 3) -> list[Figure]:
    """Median over ``repeats`` requests after ``warmups`` (a server's steady state: the first
    requests of a process pay page faults on the planner's fresh temporaries, 3-9x the
    steady-state selection time here); the worst measured request is printed too."""
    pipe = Pipeline(model, kv_cache=KVCacheConfig(precision=precision),
                    eviction=CacheEvictionConfig())
    (prompt,) = exact_prompts(pipe, [prompt_tokens])
    g = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, apply_chat_template=False)
    ev = pipe.backend.engine.evictor.stats
    runs = []  # (events, select_s, compact_s, total_s) per request, warm-ups first
    for _ in range(warmups + repeats):
        ev.reset()
        total = pipe.generate(prompt, g).generate_s
        runs.append((ev.events, ev.select_s, ev.compact_s, total))
    cold = [1e3 * r[1] / max(r[0], 1) for r in runs[:warmups]]
    runs = runs[warmups:]
    runs.sort(key=lambda r: r[1] / r[3])
    events, select_s, compact_s, total = runs[len(runs) // 2]
    n = max(events, 1)
    worst = runs[-1]
    return [
        Figure("eviction events", events, "",
               f"{prompt_tokens}-token prompt + {new_tokens}, {precision} cache"),
        Figure("selection per event", 1e3 * select_s / n, "ms", "policy + planning"),
        Figure("compaction per event", 1e3 * compact_s / n, "ms", "moves + re-quantization"),
        Figure("selection share of latency", 100 * select_s / total, "%",
               f"median of {repeats} after {warmups} warm-ups; end to end {total:.2f} s"),
        Figure("selection share, worst request", 100 * worst[1] / worst[3], "%",
               f"end to end {worst[3]:.2f} s"),
        Figure("selection + compaction share", 100 * (select_s + compact_s) / total, "%"),
    ] + [Figure(f"selection per event, warm-up {i + 1}", ms, "ms", "cold process")
         for i, ms in enumerate(cold)]


def _concurrency(pipe: Pipeline, prompts: list[str], new_tokens: int) -> tuple[int, int, float]:
    """Most sequences decoding at once, preemptions, seconds."""
    eng: LLMEngine = pipe.backend.engine
    g = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, apply_chat_template=False)
    seqs = [eng.add_request(pipe.backend.encode(p, False)[0].tolist(), g,
                            pipe.backend.eos_token_ids, lambda x: "") for p in prompts]
    peak = 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, sum(1 for s in seqs if not s.is_finished
                             and s.num_computed >= len(s.prompt_ids)))
    return peak, sum(s.num_preemptions for s in seqs), time.perf_counter() - t0


def capacity(model: str, capacity_full: int = 8, num_requests: int = 32,
             prompt_tokens: int = 4096, new_tokens: int = 320) -> list[Figure]:
    """Most requests decoding at once in a cache of ``capacity_full`` full requests.

    The cache, not the prefill rate, must be the limit: a request decodes for ``new_tokens``
    steps, and a new prompt finishes its prefill every ``prompt_tokens / chunk`` steps, so at
    most ``new_tokens * chunk / prompt_tokens + 1`` requests can ever decode together (21 with
    the default 256-token chunks). Chunks of 2,048 tokens lift that bound to 161."""
    blocks = capacity_full * (-(-(prompt_tokens + new_tokens) // 32))
    kv = KVCacheConfig(num_kv_blocks=blocks)
    sched = SchedulerConfig(max_num_batched_tokens=2048)
    full = Pipeline(model, kv_cache=kv, eviction=None, scheduler=sched)
    prompts = exact_prompts(full, [prompt_tokens] * num_requests)
    f_peak, f_pre, f_s = _concurrency(full, prompts, new_tokens)
    del full
    ev = Pipeline(model, kv_cache=kv, eviction=CacheEvictionConfig(max_cache_size=0.25),
                  scheduler=sched)
    e_peak, e_pre, e_s = _concurrency(ev, prompts, new_tokens)
    return [
        Figure("cache", blocks, "blocks", f"{capacity_full} full {prompt_tokens}-token requests"),
        Figure("full cache: most decoding at once", f_peak, "",
               f"{f_pre} preemptions, {f_s:.0f} s"),
        Figure("25% budget: most decoding at once", e_peak, "",
               f"{e_pre} preemptions, {e_s:.0f} s"),
        Figure("capacity ratio", e_peak / max(f_peak, 1), "x"),
    ]


def _tpot(pipe: Pipeline, prompt: str, new_tokens: int) -> tuple[float, int, float]:
    """TPOT (s) of one request, with its eviction events and the seconds they took (selection +
    compaction)."""
    g = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, apply_chat_template=False)
    evictor = getattr(pipe.backend.engine, "evictor", None)
    if evictor is not None:
        evictor.stats.reset()
    tpot = pipe.generate(prompt, g).metrics[0].tpot_s
    if evictor is None:
        return tpot, 0, 0.0
    return tpot, evictor.stats.events, evictor.stats.select_s + evictor.stats.compact_s


def flat(model: str, long_tokens: int = 16384, short_tokens: int = 1024,
         new_tokens: int = 64, repeats: int = 3) -> list[Figure]:
    """TPOT of a full cache at ``short_tokens`` vs a ``long_tokens`` prompt kept at a
    ``short_tokens`` budget, continuous and prefill mode. The three pipelines live side by side
    and are measured in turn, ``repeats`` rounds after a warm-up round of the same length (the
    step time of one process drifts by up to 30% between requests on this machine; interleaving
    lets the drift hit every row alike). Rows are medians; the eviction rows add the measured
    request's eviction events (one after the prompt, which TPOT does not count, then one per
    ``evict_interval`` tokens) and the time spent in them."""
    full = Pipeline(model, eviction=None)
    short, long = exact_prompts(full, [short_tokens, long_tokens])
    rows = {"full": (full, short)}
    for mode in ("continuous", "prefill"):
        rows[mode] = (Pipeline(model, eviction=CacheEvictionConfig(max_cache_size=short_tokens,
                                                                   mode=mode)), long)
    runs: dict[str, list[tuple[float, int, float]]] = {k: [] for k in rows}
    for i in range(repeats + 1):
        for name, (pipe, prompt) in rows.items():
            r = _tpot(pipe, prompt, new_tokens)
            if i:  # round 0 warms every pipeline up
                runs[name].append(r)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    t_short = med["full"][0]
    out = [Figure(f"TPOT full cache, {short_tokens} context", 1e3 * t_short, "ms",
                  f"median of {repeats}; all: "
                  + " / ".join(f"{1e3 * r[0]:.1f}" for r in runs["full"]))]
    for mode, note in (("continuous", "score outputs every step"),
                       ("prefill", "no score outputs while decoding")):
        t, events, ev_s = med[mode]
        out.append(Figure(f"TPOT {long_tokens} context, budget {short_tokens}, {mode}", 1e3 * t,
                          "ms", f"{t / t_short:.3f}x ({note}; {events} eviction events, "
                          f"{1e3 * ev_s:.0f} ms in them; all: "
                          + " / ".join(f"{1e3 * r[0]:.1f}" for r in runs[mode]) + ")"))
    return out


def format_figures(title: str, figures: list[Figure]) -> str:
    lines = [f"## {title}", "", "| figure | value | note |", "|---|---|---|"]
    for f in figures:
        value = f"{f.value:.3f}" if isinstance(f.value, float) else str(f.value)
        lines.append(f"| {f.what} | {value} {f.unit} | {f.note} |")
    return "\n".join(lines)
