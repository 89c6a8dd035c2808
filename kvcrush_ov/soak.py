"""``kvcrush-ov soak``: mixed requests with eviction, cancellations and preemptions on one native
engine for a while, printing RSS, KV blocks in use and sequences held over time; at the end
the engine must be back to zero blocks and zero sequences, and RSS must not drift.

Requests arrive to keep ``concurrency`` in flight: prompts of 20..``max_words`` words,
4..``max_new`` new tokens, greedy or sampled, each keeping ``budget`` of its prompt
(``mode="prefill"`` by default: evicted once after the prompt, so decoding grows the cache and
can preempt others). Each step a running request is cancelled with probability
``cancel_rate``. The cache holds about two of the longest prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kvcrush_ov.config import CacheEvictionConfig, GenerationConfig, KVCacheConfig
from kvcrush_ov.device import proc_kib
from kvcrush_ov.fuzz import prompt_text


def rss_bytes() -> int:
    """This process's resident set size (Linux), 0 where it cannot tell."""
    return (proc_kib("/proc/self/status", "VmRSS") or 0) * 1024


@dataclass
class SoakSample:
    t_s: float
    rss_mb: float
    blocks_used: float
    sequences: int
    done: int
    cancelled: int
    preemptions: int


@dataclass
class SoakReport:
    samples: list[SoakSample] = field(default_factory=list)
    done: int = 0
    cancelled: int = 0
    preemptions: int = 0
    steps: int = 0
    idle_blocks: float = -1.0
    idle_sequences: int = -1
    invariant_errors: list[str] = field(default_factory=list)

    def drift(self, warmup_fraction: float = 0.2) -> float:
        """RSS at the end against RSS once warm (the median of the samples right after the
        first ``warmup_fraction`` of the run), as a fraction."""
        s = self.samples
        if len(s) < 4:
            return 0.0
        k = max(1, int(len(s) * warmup_fraction))
        warm = float(np.median([x.rss_mb for x in s[k:k + 3]]))
        end = float(np.median([x.rss_mb for x in s[-3:]]))
        return (end - warm) / warm


def soak(model: str, minutes: float, seed: int = 0, concurrency: int = 8,
         cancel_rate: float = 0.002, max_words: int = 900, num_kv_blocks: int = 0,
         budget: float = 0.25, mode: str = "prefill", max_new: int = 256,
         sample_every_s: float = 30.0, log=print) -> SoakReport:
    from kvcrush_ov.pipeline import Pipeline

    if num_kv_blocks == 0:  # room for about two of the longest prompts: preemptions happen
        num_kv_blocks = max(64, int(2 * max_words * 1.4 / 32))
    pipe = Pipeline(model, kv_cache=KVCacheConfig(num_kv_blocks=num_kv_blocks),
                    eviction=CacheEvictionConfig(max_cache_size=budget, mode=mode))
    backend, eng = pipe.backend, pipe.backend.engine
    rng = np.random.default_rng(seed)
    rep = SoakReport()
    live: list = []
    t0 = time.perf_counter()
    end = t0 + 60.0 * minutes
    next_sample = t0

    def sample(now: float) -> None:
        s = SoakSample(t_s=now - t0, rss_mb=rss_bytes() / 2**20, blocks_used=eng.blocks_held,
                       sequences=len(eng.sequences), done=rep.done, cancelled=rep.cancelled,
                       preemptions=eng.scheduler.num_preemptions)
        rep.samples.append(s)
        log(f"[soak] {s.t_s:7.0f} s  RSS {s.rss_mb:7.1f} MB  blocks {s.blocks_used:8.1f}  "
            f"sequences {s.sequences:3d}  done {s.done}  cancelled {s.cancelled}  "
            f"preemptions {s.preemptions}")

    while True:
        now = time.perf_counter()
        if now >= next_sample:
            sample(now)
            next_sample = now + sample_every_s
        if now < end:
            while len(live) < concurrency:
                words = int(rng.integers(20, max_words))
                g = GenerationConfig(max_new_tokens=int(rng.integers(4, max_new)), ignore_eos=True,
                                     do_sample=bool(rng.random() < 0.3),
                                     rng_seed=int(rng.integers(0, 1000)))
                ids = backend.encode(prompt_text(words, int(rng.integers(0, 2**31))), True)
                room = pipe.info.context_length - g.max_new_tokens  # truncate to what fits
                live.append(backend.add_request(ids[0, :room].tolist(), g))
            if live and rng.random() < cancel_rate:
                victim = live.pop(int(rng.integers(len(live))))
                eng.abort(victim)
                eng.sequences.pop(victim.seq_id, None)
                rep.cancelled += 1
        elif not eng.has_unfinished():
            break
        if eng.has_unfinished():
            eng.step()
            rep.steps += 1
            if rep.steps % 50 == 0:
                try:
                    eng.check_invariants()
                except AssertionError as e:
                    rep.invariant_errors.append(str(e))
        for s in [s for s in live if s.is_finished]:
            live.remove(s)
            eng.sequences.pop(s.seq_id, None)
            rep.done += 1
    rep.preemptions = eng.scheduler.num_preemptions
    rep.idle_blocks = eng.blocks_held
    rep.idle_sequences = len(eng.sequences)
    sample(time.perf_counter())
    return rep
