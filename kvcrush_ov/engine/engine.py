"""kvcrush-ov's own continuous-batching engine on OpenVINO's PagedAttention graph.

Layers, each importing only the ones below it:
``LLMEngine`` -> ``Scheduler`` -> ``KVCacheManager`` -> ``BlockPool``; the ``ModelRunner`` only
turns a scheduled batch into tensors; ``SequenceSampler`` picks tokens and detects stops.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcrush_ov.cache_plan import check_cache_plan, check_request_size, prefill_eviction_hold
from kvcrush_ov.config import GenerationConfig, KVCacheConfig, SchedulerConfig
from kvcrush_ov.device import check_kv_precision
from kvcrush_ov.engine.block_pool import BlockPool
from kvcrush_ov.engine.evictor import Evictor
from kvcrush_ov.engine.fastkv import TokenPropagation
from kvcrush_ov.engine.head_cache_manager import HeadKVCacheManager
from kvcrush_ov.engine.head_model_runner import HeadModelRunner
from kvcrush_ov.engine.kv_cache_manager import KVCacheManager
from kvcrush_ov.engine.layer_model_runner import LayerModelRunner
from kvcrush_ov.engine.model_runner import ModelRunner
from kvcrush_ov.engine.sampler import SequenceSampler, sample_batch
from kvcrush_ov.engine.scheduler import Scheduler
from kvcrush_ov.engine.sequence import Sequence, Status
from kvcrush_ov.eviction.spec import EvictionSpec


@dataclass
class EngineStats:
    """Where decode time goes: whole steps vs time inside OpenVINO's infer()."""

    decode_steps: int = 0
    decode_step_s: float = 0.0
    decode_infer_s: float = 0.0

    @property
    def python_ms_per_decode_step(self) -> float:
        if not self.decode_steps:
            return 0.0
        return 1e3 * (self.decode_step_s - self.decode_infer_s) / self.decode_steps


@dataclass
class StepOutput:
    """What one step produced: new tokens per sequence, and the sequences that finished."""

    new_tokens: dict[int, int]
    finished: list[Sequence]
    num_tokens: int
    num_preempted: int
    blocks_held: float  # blocks in use after the step's writes and evictions, before
    # finished sequences freed theirs (with eviction: head blocks / (layers * heads))
    blocks_before_eviction: float = 0.0  # the same before this step's evictions


class LLMEngine:
    """Continuous batching over a paged KV cache owned by this process.

    context_length: the model's maximum sequence length (prompt + generated).
    eviction: None keeps every token (the plain paged graph, one block table per sequence);
        otherwise the per-KV-head graph runs with per-layer, per-head block tables and the
        spec's policy evicts (kvcrush_ov.engine.evictor).
    """

    def __init__(self, model_dir: str | Path, device: str, kv_cache: KVCacheConfig,
                 scheduler: SchedulerConfig, context_length: int,
                 properties: dict | None = None, eviction: EvictionSpec | None = None) -> None:
        check_kv_precision(device, kv_cache.precision)
        runner_cls = (ModelRunner if eviction is None
                      else LayerModelRunner if eviction.genai is not None else HeadModelRunner)
        self.runner = runner_cls(model_dir, device, kv_cache.precision, properties)
        self.block_size = self.runner.block_size
        self.block_bytes = self.runner.block_bytes
        self.context_length = context_length
        num_blocks = check_cache_plan(kv_cache, scheduler, self.block_bytes, self.block_size,
                                      device)
        self.runner.allocate_cache(num_blocks)
        self.pool = BlockPool(num_blocks)
        self.evictor: Evictor | None = None
        if eviction is None:
            self.kv: KVCacheManager | HeadKVCacheManager = KVCacheManager(self.pool,
                                                                          self.block_size)
        else:
            heads = self.runner.num_kv_heads
            pools = [BlockPool(num_blocks * heads) for _ in range(self.runner.num_layers)]
            self.kv = HeadKVCacheManager(pools, heads, self.block_size)
            self.evictor = Evictor(eviction, self.kv, self.runner)
            self.head_units = heads * self.runner.num_layers  # head blocks per full block
        self.fastkv: TokenPropagation | None = None
        if eviction is not None and eviction.fastkv is not None:
            self.fastkv = TokenPropagation(self.runner, self.kv,
                                           eviction.fastkv.layer_for(self.runner.num_layers))
        self.scheduler_config = scheduler
        self.scheduler = Scheduler(self.kv, scheduler.max_num_batched_tokens,
                                   scheduler.max_num_seqs, scheduler.dynamic_split_fuse,
                                   align_chunks=kv_cache.precision == "u4")
        self._ids = itertools.count()
        self.stats = EngineStats()
        self.sequences: dict[int, Sequence] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def add_request(self, prompt_ids: list[int], config: GenerationConfig,
                    eos_token_ids: Collection[int],
                    detokenize: Callable[[list[int]], str]) -> Sequence:
        """Queue a request; a prompt that cannot fit fails here, alone, naming the limit."""
        hold = self._prefill_hold(self.evictor.spec if self.evictor else None,
                                  len(prompt_ids), config.max_new_tokens)
        check_request_size("prompt", len(prompt_ids), config.max_new_tokens,
                           self.context_length, self.num_blocks * self.block_size,
                           self.scheduler_config, hold)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=list(prompt_ids),
                       arrival=time.perf_counter(), max_prompt_hold=hold)
        seq.sampler = SequenceSampler(config, seq.prompt_ids, eos_token_ids, detokenize)
        if self.fastkv is not None:
            self.fastkv.plan(seq, self.evictor.spec_of(seq))
        self.sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq

    def fork(self, parent: Sequence, eviction: EvictionSpec | None = None) -> Sequence:
        """A running copy of ``parent`` sharing its cached blocks (no cache memory copied).

        eviction: the child's own policy and budget (engines built with eviction only), applied
        at once to the child (copy-on-write keeps the parent's blocks intact), then as usual.
        """
        if eviction is not None and self.evictor is None:
            raise ValueError("fork(eviction=...) needs an engine built with eviction")
        if parent.status is not Status.RUNNING or parent.num_computed < len(parent.prompt_ids):
            raise ValueError("only a running sequence whose prompt is computed can be forked")
        child = Sequence(seq_id=next(self._ids), prompt_ids=list(parent.prompt_ids),
                         sampler=copy.deepcopy(parent.sampler), status=Status.RUNNING,
                         num_computed=parent.num_computed, arrival=parent.arrival,
                         first_token_time=parent.first_token_time,
                         last_token_time=parent.last_token_time)
        self.kv.fork(parent.seq_id, child.seq_id)
        child.extra = copy.deepcopy(parent.extra)
        if eviction is not None:
            self.evictor.set_spec(child, eviction)
            self.evictor.evict(child)
        self.scheduler.running.append(child)
        self.sequences[child.seq_id] = child
        return child

    def _prefill_hold(self, spec: EvictionSpec | None, prompt: int, max_new: int) -> int | None:
        """Tokens a request holds at most with prefill eviction (None: without it)."""
        if spec is None or not spec.prefill_eviction:
            return None
        return prefill_eviction_hold(spec.budget(prompt), self.scheduler_config,
                                     self.block_size, spec.mode, spec.evict_interval, max_new)

    def set_spec(self, seq: Sequence, spec: EvictionSpec) -> None:
        """Give a queued ``seq`` its own policy and budget (and FastKV split, or none)."""
        if self.evictor is None:
            raise ValueError("set_spec needs an engine built with eviction")
        self.evictor.set_spec(seq, spec)
        seq.max_prompt_hold = self._prefill_hold(spec, len(seq.prompt_ids),
                                                 seq.sampler._config.max_new_tokens)
        if self.fastkv is not None:
            self.fastkv.plan(seq, spec)

    def abort(self, seq: Sequence) -> None:
        if not seq.is_finished:
            self.scheduler.finish(seq)
        if self.fastkv is not None:
            self.fastkv.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> StepOutput:
        t0 = time.perf_counter()
        infer0 = self.runner.infer_s
        out = self._step()
        if out.num_tokens and out.num_tokens == len(out.new_tokens):  # a pure decode step
            self.stats.decode_steps += 1
            self.stats.decode_step_s += time.perf_counter() - t0
            self.stats.decode_infer_s += self.runner.infer_s - infer0
        return out

    def _step(self) -> StepOutput:
        out = self.scheduler.schedule()
        if out.copies:
            if self.evictor is None:
                self.runner.copy_blocks(out.copies)
            else:
                self.runner.copy_head_blocks(out.copies)
        new: dict[int, int] = {}
        finished: list[Sequence] = []
        held = before = self.blocks_held
        if out.chunks:
            for c in out.chunks:  # this step's rows are reserved: the request's peak
                ex = c.seq.extra
                ex["peak_kv_bytes"] = max(ex.get("peak_kv_bytes", 0), self._held_bytes(c.seq))
            logits = self._run(out)
            if self.evictor is not None:
                held = self.blocks_held
            for c in out.chunks:  # what each sequence holds now (after its eviction)
                c.seq.extra["kv_bytes"] = self._held_bytes(c.seq)
            sampling = [c.seq for c in out.chunks if c.sample]
            tokens = sample_batch([s.sampler for s in sampling], logits)
            tokens = self._teacher_force(sampling, tokens, logits)
            now = time.perf_counter()
            for seq, tok in zip(sampling, tokens, strict=True):
                reason = seq.sampler.append(int(tok))
                new[seq.seq_id] = int(tok)
                if not seq.first_token_time:
                    seq.first_token_time = now
                seq.last_token_time = now
                if reason is not None:
                    self.scheduler.finish(seq)
                    finished.append(seq)
                    if self.fastkv is not None:
                        self.fastkv.forget(seq)
        return StepOutput(new, finished, out.num_tokens, len(out.preempted), held, before)

    @staticmethod
    def _teacher_force(sampling: list[Sequence], tokens: list[int],
                       logits: np.ndarray) -> list[int]:
        """Sequences with ``extra["forced"]`` (token ids) get those tokens instead of sampled
        ones, and the log-softmax of every step's logits row ([V] float32) is appended to
        ``extra["logprobs"]`` (fidelity metrics: the caller sets max_new_tokens and
        ignore_eos so that generation ends with the forced tokens)."""
        out = list(tokens)
        for i, seq in enumerate(sampling):
            forced = seq.extra.get("forced")
            if forced is None:
                continue
            row = logits[i].astype(np.float32)
            row = row - row.max()
            seq.extra.setdefault("logprobs", []).append(row - np.log(np.exp(row).sum()))
            n = seq.sampler.num_generated
            if n < len(forced):
                out[i] = int(forced[n])
        return out

    @property
    def blocks_held(self) -> float:
        """Blocks in use (with eviction: head blocks / (layers * heads), may be fractional)."""
        if self.evictor is None:
            return self.pool.num_used
        return self.kv.num_used / self.head_units

    def _held_bytes(self, seq: Sequence) -> int:
        if self.evictor is None:
            return len(self.kv.tables[seq.seq_id].blocks) * self.block_bytes
        return self.kv.tables[seq.seq_id].num_blocks() * self.runner.head_block_bytes

    def _run(self, out) -> object:
        if self.evictor is None:
            tables = [self.kv.tables[c.seq.seq_id].blocks for c in out.chunks]
            return self.runner.run(out.chunks, tables)
        windows = self.evictor.windows(out.chunks)
        tables = [self.kv.tables[c.seq.seq_id] for c in out.chunks]
        if self.fastkv is not None and any(self.fastkv.splits(c) for c in out.chunks):
            logits, scores = self.fastkv.run(out.chunks, tables, windows, self.evictor.spec_of)
        else:
            logits, scores = self.runner.run_heads(out.chunks, tables, windows)
        self.evictor.after_step(out.chunks, windows, scores)
        return logits

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        live = {s.seq_id for s in self.scheduler.running}
        if set(self.kv.tables) - live:
            raise AssertionError(f"blocks held by sequences not running: "
                                 f"{sorted(set(self.kv.tables) - live)}")

