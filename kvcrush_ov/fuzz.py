"""``kvcrush-ov fuzz``: random valid configurations and prompts, with invariants checked on every
run, each group of runs in its own process so that a crash or a hang is caught, not inherited.

A *group* is one Pipeline configuration (backend, cache precision and size, scheduler,
eviction) and the runs made on it; a *run* is one ``generate`` call on a batch of prompts. The
invariants checked on every run:

- ``error``: only ConfigError may come out, and only where a request cannot fit (the
  configuration itself is valid by construction);
- ``pool``: after every engine step the cache manager's invariants hold (every block counted
  once, none leaked or freed twice), and with eviction no sequence holds more than its budget
  plus the slack its mode allows (continuous: ``evict_interval``; prefill: what it generated;
  a prompt-end eviction that waits for the step after the first token: one more chunk);
- ``leftover``: after the call no sequence is left in the engine and every block is free
  (genai: no unfinished request and no cache in use);
- ``stream``: with a streamer, what was streamed equals the returned text;
- ``batched``: the batch's greedy (or seeded sampling) output equals each prompt run alone,
  where the precision allows it (native, f32 cache: docs/reliability.md);
- ``crash`` / ``hang``: the group's process died or ran past its timeout.

Every failing run is written as a JSON reproducer (``kvcrush-ov fuzz --replay FILE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "seven", "quick", "foxes", "jumped",
         "over", "lazy", "dogs", "near", "the", "river", "bank", "and", "every", "number", "like",
         "42", "or", "1987", "was", "written", "down", "in", "a", "small", "blue", "notebook",
         "because", "memory", "fades", "fast", "when", "the", "night", "is", "long")


@dataclass
class Run:
    """One ``generate`` call: prompt lengths (in words), generation settings, streamer or not."""

    prompts: list[int]
    prompt_seed: int
    generation: dict
    stream: bool


@dataclass
class Group:
    """One Pipeline configuration (kwargs of the config dataclasses) and its runs."""

    seed: int
    backend: str
    kv_cache: dict
    scheduler: dict
    eviction: dict | None
    runs: list[Run] = field(default_factory=list)

    @staticmethod
    def from_json(d: dict) -> Group:
        runs = [Run(**r) for r in d.pop("runs")]
        return Group(**d, runs=runs)


# ------------------------------------------------------------------ random valid configurations

def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def random_eviction(rng: np.random.Generator, backend: str) -> dict | None:
    """Kwargs of a valid CacheEvictionConfig for ``backend`` (None: full cache)."""
    if rng.random() < 0.2:
        return None
    upstream = backend == "native" and rng.random() < 0.1  # GenAI's algorithm on native
    if backend == "genai" or upstream:
        start, recent = 32, _pick(rng, [32, 64])
        floor = start + recent + 32
        size = (_pick(rng, [0.25, 0.5, 0.8]) if rng.random() < 0.5
                else int(floor + 32 * rng.integers(0, 8)))
        ev = dict(max_cache_size=size, start_size=start, recent_size=recent,
                  importance="upstream" if upstream else _pick(rng, ["snapkv", "h2o"]),
                  aggregation_mode=_pick(rng, ["norm_sum", "sum"]),
                  snapkv_window_size=_pick(rng, [8, 32]))
        if rng.random() < 0.6:
            ev["kvcrush"] = dict(budget=_pick(rng, [0.1, 0.25, 0.5]),
                                 anchor_point_mode=_pick(
                                     rng, ["random", "zeros", "ones", "mean", "alternating"]),
                                 granularity=_pick(rng, [None, "block"]), taper=False)
        else:
            ev["kvcrush"] = None
        return ev
    start, recent = _pick(rng, [0, 4, 8, 32]), _pick(rng, [0, 8, 16, 64])
    size = (_pick(rng, [0.125, 0.25, 0.5, 0.9, 1.0]) if rng.random() < 0.5
            else int(start + recent + rng.integers(1, 200)))
    interval = _pick(rng, [1, 4, 8, 32])
    ev = dict(max_cache_size=size, start_size=start, recent_size=recent,
              importance=_pick(rng, ["snapkv", "h2o", "streaming", "pyramidkv", "adakv",
                                     "kvzip"]),
              aggregation_mode=_pick(rng, ["norm_sum", "sum"]),
              snapkv_window_size=_pick(rng, [1, 8, 32]),
              mode=_pick(rng, ["continuous", "continuous", "prefill"]), evict_interval=interval,
              pooling=_pick(rng, [None, "max", "avg", "none"]),
              kernel_size=_pick(rng, [None, 3, 7, 31]),
              decode_window_size=_pick(rng, [None, None, 1, interval]))
    # eviction while the prompt is read (not with KVzip, whose replay needs the whole prompt)
    ev["prefill_eviction"] = bool(ev["importance"] != "kvzip" and rng.random() < 0.2)
    if rng.random() < 0.6:
        anchors = ["random", "zeros", "ones", "mean", "alternating"]
        anchor = (_pick(rng, anchors) if rng.random() < 0.7
                  else tuple(rng.choice(anchors, size=2, replace=False).tolist()))
        ev["kvcrush"] = dict(budget=_pick(rng, [0.0, 0.1, 0.25, 0.5]), anchor_point_mode=anchor,
                             granularity=_pick(rng, [None, "token", "block"]),
                             dynamic_split=bool(rng.random() < 0.3),
                             taper=_pick(rng, [None, False, True]))
    else:
        ev["kvcrush"] = None
    ev["plain_prefill"] = bool(rng.random() < 0.2)  # unscored prompt chunks on the plain graph
    return ev


def random_group(seed: int, runs: int, backends: tuple[str, ...], precisions: tuple[str, ...],
                 context: int = 2048) -> Group:
    """A valid configuration and ``runs`` random runs on it (all drawn from ``seed``)."""
    rng = np.random.default_rng(seed)
    backend = _pick(rng, list(backends))
    batched = int(_pick(rng, [32, 64, 100, 256, 512]))
    seqs = int(_pick(rng, [1, 2, 4, 8, 256]))
    split = bool(rng.random() < 0.9)
    if backend == "genai" and not split:
        seqs = min(seqs, batched)
    scheduler = dict(max_num_batched_tokens=batched, max_num_seqs=seqs, dynamic_split_fuse=split)
    max_words, max_new = 600, 40
    kv = dict(precision=_pick(rng, list(precisions)))
    if rng.random() < 0.5:  # a small cache: pressure, preemption
        need = -(-batched // 32) + 1
        fits = -(-(int(max_words * 1.6) + 64 + max_new) // 32)
        kv["num_kv_blocks"] = int(max(need, fits) + rng.integers(0, 24))
    group = Group(seed=seed, backend=backend, kv_cache=kv, scheduler=scheduler,
                  eviction=random_eviction(rng, backend))
    if backend == "genai" and kv["precision"] == "u4":
        kv["precision"] = "u8"  # refused by name (a GenAI defect: backends/genai.py)
    for _ in range(runs):
        n = int(rng.integers(1, 6))
        lengths = [int(rng.integers(1, max_words)) for _ in range(n)]
        if not scheduler["dynamic_split_fuse"]:  # whole prompts must fit one step
            lengths = [min(x, batched // 3) or 1 for x in lengths]
        gen = dict(max_new_tokens=int(rng.integers(1, max_new)),
                   ignore_eos=bool(rng.random() < 0.7),
                   apply_chat_template=bool(rng.random() < 0.5))
        if rng.random() < 0.3:
            gen.update(do_sample=True, temperature=float(_pick(rng, [0.5, 1.0, 1.5])),
                       top_p=float(_pick(rng, [0.8, 1.0])), top_k=int(_pick(rng, [0, 20])),
                       rng_seed=int(rng.integers(0, 1000)))
        if rng.random() < 0.2:
            gen["repetition_penalty"] = 1.1
        if rng.random() < 0.3:
            gen["stop_strings"] = [_pick(rng, WORDS)]
            gen["include_stop_str_in_output"] = bool(rng.random() < 0.3)
        group.runs.append(Run(prompts=lengths, prompt_seed=int(rng.integers(0, 2**31)),
                              generation=gen, stream=bool(n == 1 and rng.random() < 0.6)))
    return group


def prompt_text(words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=words).tolist())


# ------------------------------------------------------------------ one group, in this process

def _configs(g: Group):
    from kvcrush_ov.config import (
        CacheEvictionConfig,
        KVCacheConfig,
        KVCrushConfig,
        SchedulerConfig,
    )

    ev = None
    if g.eviction is not None:
        e = dict(g.eviction)
        crush = e.pop("kvcrush", None)
        if crush is not None and isinstance(crush.get("anchor_point_mode"), list):
            crush["anchor_point_mode"] = tuple(crush["anchor_point_mode"])
        ev = CacheEvictionConfig(**e, kvcrush=None if crush is None else KVCrushConfig(**crush))
    return KVCacheConfig(**g.kv_cache), SchedulerConfig(**g.scheduler), ev


def _batch_exact(g: Group) -> bool:
    """Whether batched output must equal one-by-one output here: on the native backend with an
    f32 cache. With u8 / u4 / bf16 caches the plugin's attention and bf16 inference depend on
    what else runs in a step, so outputs may differ now and then, on GenAI too
    (docs/reliability.md). Not with importance="upstream" or prefill_eviction: both evict
    between prefill chunks, so what they keep depends on how a batch cuts a prompt."""
    ev = g.eviction or {}
    chunked = ev.get("importance") == "upstream" or bool(ev.get("prefill_eviction"))
    return g.backend == "native" and g.kv_cache["precision"] == "f32" and not chunked


class _Checked:
    """Wraps the native engine's step: invariants after every step."""

    def __init__(self, engine, violations: list[str]) -> None:
        self.engine, self.violations = engine, violations
        self.step = engine.step
        engine.step = self  # the backend calls engine.step()

    def __call__(self):
        out = self.step()
        eng = self.engine
        try:
            eng.check_invariants()
        except AssertionError as e:
            self.violations.append(f"pool: {e}")
        if eng.evictor is not None:
            layers, heads = eng.runner.num_layers, eng.runner.num_kv_heads
            for s in eng.scheduler.running:
                t = eng.kv.tables.get(s.seq_id)
                budget = s.extra.get("budget")
                if t is None or budget is None or s.num_computed < len(s.prompt_ids):
                    continue
                spec = eng.evictor.spec_of(s)
                slack = (spec.evict_interval if spec.mode == "continuous"
                         else s.sampler.num_generated + 1)
                slack = max(slack, eng.block_size) if spec.genai is not None else slack
                if s.seq_id in eng.evictor.pending:  # its prompt-end eviction waits a step:
                    slack = max(slack, eng.scheduler_config.max_num_batched_tokens)  # + last chunk
                total = int(t.lens.sum())
                if total > (max(budget, 1) + slack) * layers * heads and s.extra.get("evictions"):
                    self.violations.append(
                        f"pool: seq {s.seq_id} holds {total} tokens over {layers}x{heads} heads, "
                        f"budget {budget} + slack {slack}")
        return out


def _leftovers(pipe) -> list[str]:
    out = []
    if pipe.backend_name == "native":
        eng = pipe.backend.engine
        if eng.sequences or eng.scheduler.has_unfinished():
            out.append(f"leftover: {len(eng.sequences)} sequences held after the call")
        pools = getattr(eng.kv, "pools", [eng.pool])
        used = sum(p.num_used for p in pools)
        if used:
            out.append(f"leftover: {used} blocks still in use after the call")
    else:
        for p in pipe.backend._pipelines.values():
            if p.has_non_finished_requests():
                out.append("leftover: a GenAI request is unfinished after the call")
    return out


def run_group(g: Group, model: str, emit) -> None:
    """Run every run of ``g`` in this process; ``emit(dict)`` gets one result per run."""
    from kvcrush_ov.errors import ConfigError
    from kvcrush_ov.pipeline import Pipeline

    kv, sched, ev = _configs(g)
    try:
        pipe = Pipeline(model, kv_cache=kv, eviction=ev, scheduler=sched, backend=g.backend)
    except ConfigError as e:
        for i in range(len(g.runs)):
            emit({"run": i, "status": "refused", "detail": str(e)})
        return
    step_violations: list[str] = []
    if g.backend == "native":
        _Checked(pipe.backend.engine, step_violations)
    for i, r in enumerate(g.runs):
        bad: list[str] = []
        step_violations.clear()
        prompts = [prompt_text(n, r.prompt_seed + j) for j, n in enumerate(r.prompts)]
        chunks: list[str] = []
        try:
            out = pipe.generate(prompts if len(prompts) > 1 else prompts[0],
                                streamer=chunks.append if r.stream else None, **r.generation)
        except ConfigError as e:
            emit({"run": i, "status": "refused", "detail": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 - any other error class is a finding
            emit({"run": i, "status": "violation",
                  "violations": [f"error: {type(e).__name__}: {e}", *_leftovers(pipe)],
                  "detail": traceback.format_exc(limit=8)})
            continue
        bad += step_violations + _leftovers(pipe)
        if r.stream and "".join(chunks) != out.texts[0]:
            bad.append(f"stream: streamed {''.join(chunks)!r} != returned {out.texts[0]!r}")
        if len(prompts) > 1 and _batch_exact(g):
            for j, p in enumerate(prompts):
                alone = pipe.generate(p, **r.generation).token_ids[0]
                if alone != out.token_ids[j]:
                    first = next((k for k, (a, b) in enumerate(
                        zip(alone, out.token_ids[j], strict=False)) if a != b),
                        min(len(alone), len(out.token_ids[j])))
                    bad.append(f"batched: prompt {j} differs from its run alone at token "
                               f"{first}")
            bad += step_violations + _leftovers(pipe)
        emit({"run": i, "status": "violation" if bad else "ok", "violations": bad})


# ------------------------------------------------------------------ groups in child processes

def child_main() -> int:
    """``python -m kvcrush_ov.fuzz --child MODEL``: a group as JSON on stdin, results out."""
    model = sys.argv[sys.argv.index("--child") + 1]
    g = Group.from_json(json.loads(sys.stdin.read()))

    def emit(d: dict) -> None:
        print("RESULT " + json.dumps(d), flush=True)

    run_group(g, model, emit)
    return 0


def run_in_child(g: Group, model: str, timeout_s: float,
                 cmd: list[str] | None = None) -> list[dict]:
    """One result per run of ``g``; runs the child process ``cmd`` (default: this module)."""
    cmd = cmd or [sys.executable, "-m", "kvcrush_ov.fuzz", "--child", model]
    try:
        p = subprocess.run(cmd, input=json.dumps(asdict(g)), capture_output=True, text=True,
                           timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stdout, rc, hung = p.stdout, p.returncode, False
        stderr = p.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc, hung = None, True
    results = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    done = {r["run"] for r in results}
    for i in range(len(g.runs)):
        if i in done:
            continue
        if hung:
            kind = f"hang: no result within {timeout_s:.0f} s"
        elif rc != 0:
            kind = f"crash: the process exited with {rc}"
        else:
            kind = "crash: the process ended without a result"
        results.append({"run": i, "status": "violation", "violations": [kind],
                        "detail": stderr[-2000:]})
        break  # the runs after the one that died were never tried
    return sorted(results, key=lambda r: r["run"])


@dataclass
class Summary:
    runs: int = 0
    ok: int = 0
    refused: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    reproducers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.violations.values())


def write_reproducer(out_dir: Path, g: Group, result: dict) -> Path:
    one = Group(seed=g.seed, backend=g.backend, kv_cache=g.kv_cache, scheduler=g.scheduler,
                eviction=g.eviction, runs=[g.runs[result["run"]]])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"group{g.seed}-run{result['run']}.json"
    path.write_text(json.dumps({"group": asdict(one), "result": result,
                                "replay": f"kvcrush-ov fuzz --replay {path}"}, indent=1))
    return path


def fuzz(runs: int, seed: int, model: str, out_dir: Path, group_size: int = 8,
         backends: tuple[str, ...] = ("native", "genai"), precisions: tuple[str, ...] | None = None,
         timeout_s: float = 300.0, log=print) -> Summary:
    """``runs`` random runs in groups of ``group_size``, each group in a child process."""
    from kvcrush_ov.device import device_capabilities

    if precisions is None:
        precisions = ("u8", "u4", "f32") + (("bf16",) if "BF16" in device_capabilities("CPU")
                                             else ())
    s = Summary()
    t0 = time.perf_counter()
    k = 0
    while s.runs < runs:
        g = random_group(seed * 100_003 + k, min(group_size, runs - s.runs), backends,
                         precisions)
        k += 1
        for r in run_in_child(g, model, timeout_s):
            s.runs += 1
            if r["status"] == "ok":
                s.ok += 1
            elif r["status"] == "refused":
                s.refused += 1
            else:
                for v in r["violations"]:
                    kind = v.split(":", 1)[0]
                    s.violations[kind] = s.violations.get(kind, 0) + 1
                s.reproducers.append(str(write_reproducer(out_dir, g, r)))
                log(f"  group {g.seed} run {r['run']}: {'; '.join(r['violations'])[:300]}")
        log(f"[fuzz] {s.runs}/{runs} runs: {s.ok} ok, {s.refused} refused, {s.failed} "
            f"violations ({time.perf_counter() - t0:.0f} s)")
    s.seconds = time.perf_counter() - t0
    return s


def replay(path: Path, model: str, timeout_s: float = 300.0) -> list[dict]:
    data = json.loads(Path(path).read_text())
    return run_in_child(Group.from_json(data["group"]), model, timeout_s)


if __name__ == "__main__" and "--child" in sys.argv:
    sys.exit(child_main())
