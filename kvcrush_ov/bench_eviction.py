"""``kvcrush-ov bench-eviction``: what eviction on the native engine costs and buys.

Prints figures (not pass / fail):

- ``selection``: a 4K prompt + 64 new tokens with the default eviction (25%, SnapKV + KVCrush,
  continuous): eviction events, policy time and compaction time per event, and their share of
  the request's end-to-end latency.
- ``capacity``: a fixed KV cache (blocks for ``capacity_full`` 4K requests with the full cache)
  and ``num_requests`` 4K-prompt requests submitted at once, each generating ``new_tokens``:
  how many decode side by side at most, and preemptions, full cache vs 25% budget.
- ``ttft``: the demo's prompt (``kvcrush-ov demo``), warm, time to first token with the full
  cache and with the default eviction, requests alternating: the ratio eviction / full.
- ``flat``: TPOT at a long context with a fixed token budget (continuous mode, the default;
  continuous scoring every decode step; prefill mode) vs TPOT at a short context with the full
  cache, plus the eviction engine's per-head graph at the short context without eviction,
  without and with score outputs; all native, decoded in lockstep.
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


def _inside_s(pipe: Pipeline) -> float:
    """Seconds the native engine has spent inside OpenVINO and in eviction events so far."""
    engine = pipe.backend.engine
    ev = getattr(engine, "evictor", None)
    return engine.runner.infer_s + (ev.stats.select_s + ev.stats.compact_s if ev else 0.0)


def ttft(model: str, precision: str = "u8", warmups: int = 1, repeats: int = 5,
         prompt: str | None = None) -> list[Figure]:
    """Median TTFT of ``prompt`` (default: the demo's; no chat template, two new tokens, so
    that the prompt's eviction runs: after the first token, GenAI's order) with the full
    cache, with the per-head graph but nothing evicted (``max_cache_size=1.0``: what the graph
    costs) and with ``CacheEvictionConfig()``, after ``warmups`` requests each, the pipelines
    alternating request by request (load beside the run hits them alike); and each one's time
    per request spent neither inside OpenVINO nor in an eviction event (Python bookkeeping)."""
    from kvcrush_ov.demo import build_prompt

    prompt = build_prompt() if prompt is None else prompt
    g = GenerationConfig(max_new_tokens=2, ignore_eos=True, apply_chat_template=False)
    kv = KVCacheConfig(precision=precision)
    pipes = {"full": Pipeline(model, kv_cache=kv, eviction=None),
             "graph": Pipeline(model, kv_cache=kv,
                               eviction=CacheEvictionConfig(max_cache_size=1.0)),
             "eviction": Pipeline(model, kv_cache=kv, eviction=CacheEvictionConfig()),
             "eviction, plain prefill": Pipeline(
                 model, kv_cache=kv, eviction=CacheEvictionConfig(plain_prefill=True))}
    times: dict[str, list[float]] = {k: [] for k in pipes}
    outside: dict[str, list[float]] = {k: [] for k in pipes}
    tokens = 0
    for i in range(warmups + repeats):
        for key, pipe in pipes.items():
            before = _inside_s(pipe)
            out = pipe.generate(prompt, g)
            m = out.metrics[0]
            after = _inside_s(pipe)
            tokens = m.num_input_tokens
            if i >= warmups:
                times[key].append(m.ttft_s)
                outside[key].append(out.generate_s - (after - before))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    spread = {k: f"{min(v):.3f}-{max(v):.3f} s" for k, v in times.items()}
    py = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in outside.items()}
    return [
        Figure("TTFT, full cache", med["full"], "s",
               f"{tokens}-token prompt, {precision}; median of {repeats} "
               f"({spread['full']})"),
        Figure("TTFT, per-head graph, nothing evicted", med["graph"], "s",
               f"max_cache_size=1.0 ({spread['graph']})"),
        Figure("TTFT, default eviction", med["eviction"], "s",
               f"25%, SnapKV + KVCrush ({spread['eviction']})"),
        Figure("TTFT ratio per-head graph / full", med["graph"] / med["full"], "x", ""),
        Figure("TTFT ratio eviction / full", med["eviction"] / med["full"], "x",
               "target <= 1.03x"),
        Figure("TTFT, default eviction, plain prefill", med["eviction, plain prefill"], "s",
               f"CacheEvictionConfig(plain_prefill=True) "
               f"({spread['eviction, plain prefill']})"),
        Figure("TTFT ratio eviction with plain prefill / full",
               med["eviction, plain prefill"] / med["full"], "x", ""),
    ] + [Figure(f"outside OpenVINO and eviction, {key}", py[key], "ms",
                "per request (prefill + one decode step), median") for key in pipes]


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


@dataclass
class _Row:
    """One request of the flat run: its pipeline, prompt, and what its decode steps took."""

    pipe: Pipeline
    prompt: str
    step_s: list[float]
    events: int = 0
    event_s: float = 0.0


def _lockstep(rows: list[_Row], new_tokens: int) -> None:
    """Prefill every row's request, then decode them one step each in turn (the first row of
    each turn rotating), timing each ``LLMEngine.step``. Drift of the machine between requests
    then hits every row alike; TPOT is the mean of a row's decode steps (as in RequestMetrics,
    the first token is not counted)."""
    g = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, apply_chat_template=False)
    seqs = []
    for r in rows:
        be = r.pipe.backend
        seq = be.add_request(be.encode(r.prompt, False)[0].tolist(), g)
        while seq.sampler.num_generated < 1:  # prefill (chunked), up to the first token
            be.engine.step()
        evictor = be.engine.evictor
        if evictor is not None:
            evictor.flush(seq)  # the prompt's eviction (deferred past the first token)
            evictor.stats.reset()
        seqs.append(seq)
    for turn in range(new_tokens - 1):
        k = turn % len(rows)
        for r, seq in zip(rows[k:] + rows[:k], seqs[k:] + seqs[:k], strict=True):
            t0 = time.perf_counter()
            r.pipe.backend.engine.step()
            r.step_s.append(time.perf_counter() - t0)
            if turn == new_tokens - 2 and not seq.is_finished:
                raise RuntimeError("flat benchmark: a request outlived its max_new_tokens")
    for r, seq in zip(rows, seqs, strict=True):
        engine = r.pipe.backend.engine
        engine.sequences.pop(seq.seq_id, None)
        if engine.evictor is not None:
            r.events += engine.evictor.stats.events
            r.event_s += engine.evictor.stats.select_s + engine.evictor.stats.compact_s


def flat(model: str, long_tokens: int = 16384, short_tokens: int = 1024,
         new_tokens: int = 64, repeats: int = 3) -> list[Figure]:
    """TPOT of a full cache at ``short_tokens`` vs a ``long_tokens`` prompt kept at a
    ``short_tokens`` budget (continuous mode, the default; continuous with score outputs on
    every decode step, ``decode_window_size=evict_interval``; prefill mode), plus two rows that
    split the cost: the per-head graph at ``short_tokens`` without eviction, without and with
    score outputs every step.

    The requests decode in lockstep (:func:`_lockstep`), one round after a warm-up round,
    ``repeats`` rounds in all: this machine's step time drifts by up to 30% between requests,
    and a step-by-step interleave lets the drift hit every row alike. Each row is the mean of
    its decode steps over all measured rounds; the eviction rows add their decode-time
    eviction events (the one right after the prompt is not a decode step) and their time."""
    # each pipeline gets a cache for its one request (blocks of >= 16 tokens), not the
    # engine's default gigabyte: six pipelines sit side by side
    blocks = -(-(long_tokens + new_tokens) // 16) + -(-SchedulerConfig().max_num_batched_tokens
                                                       // 16) + 2
    kv = KVCacheConfig(num_kv_blocks=blocks)
    full = Pipeline(model, kv_cache=kv, eviction=None)
    short, long = exact_prompts(full, [short_tokens, long_tokens])

    def evicting(**kw) -> Pipeline:
        return Pipeline(model, kv_cache=kv, eviction=CacheEvictionConfig(**kw))

    every = CacheEvictionConfig().evict_interval  # decode_window_size: score every step
    ctx = f"{short_tokens} context"
    budget = f"{long_tokens} context, budget {short_tokens}"
    rows = [  # label, pipeline, prompt, note
        (f"TPOT full cache, {ctx}", full, short, ""),
        (f"TPOT per-head graph, {ctx}, no eviction",
         evicting(max_cache_size=short_tokens, mode="prefill"), short,
         "the eviction engine's graph, no score outputs"),
        (f"TPOT per-head graph with score outputs, {ctx}, no eviction",
         evicting(max_cache_size=4 * short_tokens, mode="continuous", decode_window_size=every),
         short, "score outputs every step, budget never reached"),
        (f"TPOT {budget}, continuous", evicting(max_cache_size=short_tokens), long,
         "the default: score outputs in the 8 steps before each eviction"),
        (f"TPOT {budget}, continuous, decode_window_size={every}",
         evicting(max_cache_size=short_tokens, decode_window_size=every), long,
         "score outputs every step, as GenAI does"),
        (f"TPOT {budget}, prefill", evicting(max_cache_size=short_tokens, mode="prefill"), long,
         "no score outputs while decoding"),
    ]
    _lockstep([_Row(p, prompt, []) for _, p, prompt, _ in rows], new_tokens)  # warm-up round
    rounds: list[list[_Row]] = []
    for _ in range(repeats):
        measured = [_Row(p, prompt, []) for _, p, prompt, _ in rows]
        _lockstep(measured, new_tokens)
        rounds.append(measured)
    out = []
    for i, (label, pipe, _, note) in enumerate(rows):
        tpot = sum(sum(r[i].step_s) for r in rounds) / sum(len(r[i].step_s) for r in rounds)
        per_round = " / ".join(f"{1e3 * sum(r[i].step_s) / len(r[i].step_s):.1f}"
                               for r in rounds)
        parts = [f"{tpot / out[0].value * 1e3:.3f}x"] if out else []
        parts += [note] if note else []
        if pipe.backend.engine.evictor is not None:
            events = sum(r[i].events for r in rounds) / repeats
            ev_ms = 1e3 * sum(r[i].event_s for r in rounds) / repeats
            parts.append(f"{events:g} decode-time eviction events, {ev_ms:.0f} ms in them per "
                         "request")
        first = " / ".join(f"{1e3 * r[i].step_s[0]:.0f}" for r in rounds)
        parts.append(f"mean of {repeats} lockstep rounds; per round: {per_round}; first decode "
                     f"step per round: {first} ms")
        out.append(Figure(label, 1e3 * tpot, "ms", "; ".join(parts)))
    return out


def format_figures(title: str, figures: list[Figure]) -> str:
    lines = [f"## {title}", "", "| figure | value | note |", "|---|---|---|"]
    for f in figures:
        value = f"{f.value:.3f}" if isinstance(f.value, float) else str(f.value)
        lines.append(f"| {f.what} | {value} {f.unit} | {f.note} |")
    return "\n".join(lines)
