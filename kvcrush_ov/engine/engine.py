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
from kvcrush_ov.engine.query_scores import ReplayScorer, rescore_step
from kvcrush_ov.engine.replay import ContextReplay, probes, replays
from kvcrush_ov.engine.sampler import SequenceSampler, sample_batch
from kvcrush_ov.engine.scheduler import Scheduler
from kvcrush_ov.engine.sequence import Sequence, Status
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eviction.base import importance_of
from kvcrush_ov.eviction.kvzip import replay_group
from kvcrush_ov.eviction.spec import EvictionSpec


@dataclass
class EngineStats:
    """Where decode time goes: whole steps vs time inside OpenVINO's infer()."""

    decode_steps: int = 0
    decode_step_s: float = 0.0
    decode_infer_s: float = 0.0
    tokens: int = 0  # tokens run through the model (prompt chunks and decode), all steps
    rewrites_recomputed: int = 0  # chat turns recomputed: they rewrote tokens LESS had folded

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
    replay_prompt: token ids of KVzip's repeat prompt (kvcrush_ov.eviction.kvzip), needed by
        requests whose policy ranks by a replay of the context (engine/replay.py).
    """

    def __init__(self, model_dir: str | Path, device: str, kv_cache: KVCacheConfig,
                 scheduler: SchedulerConfig, context_length: int,
                 properties: dict | None = None, eviction: EvictionSpec | None = None,
                 replay_prompt: list[int] | None = None) -> None:
        check_kv_precision(device, kv_cache.precision)
        runner_cls = (ModelRunner if eviction is None
                      else LayerModelRunner if eviction.genai is not None else HeadModelRunner)
        less = eviction.less if eviction is not None else None
        plain = eviction is not None and eviction.plain_prefill
        if runner_cls is not HeadModelRunner and less is not None:
            raise ConfigError("eviction.less", "LESS", "None with importance='upstream'")
        if plain and (runner_cls is not HeadModelRunner or eviction.fastkv is not None):
            raise ConfigError("eviction.plain_prefill", True,
                              "False with importance='upstream' or fastkv")
        if runner_cls is HeadModelRunner:  # (LESS and the plain graph together: refused there)
            self.runner = HeadModelRunner(model_dir, device, kv_cache.precision, properties,
                                          less=less, plain_prefill=plain,
                                          kvzap=eviction.kvzap)
        else:
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
            pools = BlockPool.stacked(self.runner.num_layers, num_blocks * heads, group=heads)
            self.kv = HeadKVCacheManager(pools, heads, self.block_size)
            self.evictor = Evictor(eviction, self.kv, self.runner)
            self.head_units = heads * self.runner.num_layers  # head blocks per full block
        self.replay: ContextReplay | None = None  # KVzip and probes (engine/replay.py)
        if eviction is not None:
            self.replay = ContextReplay(replay_prompt or [], context_length,
                                        self.runner.num_layers,
                                        self.runner.num_kv_heads,
                                        scheduler.max_num_batched_tokens)
        self.fastkv: TokenPropagation | None = None
        if eviction is not None and eviction.fastkv is not None:
            self.fastkv = TokenPropagation(self.runner, self.kv,
                                           eviction.fastkv.layer_for(self.runner.num_layers))
        if replays(eviction) and replay_group(eviction.policy) is not None:
            self._query_scores()  # compiled now, not in the first request's TTFT
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
                    detokenize: Callable[[list[int]], str], keep_cache: bool = False) -> Sequence:
        """Queue a request; a prompt that cannot fit fails here, alone, naming the limit.

        keep_cache: when it finishes, its cache stays (parked) for :meth:`continue_request`
        until :meth:`release` (a chat session's first turn)."""
        spec = self.evictor.spec if self.evictor else None
        hold = self._prefill_hold(spec, len(prompt_ids), config.max_new_tokens)
        if replays(spec):
            hold = self._replay_hold(spec, len(prompt_ids), config.max_new_tokens)
        check_request_size("prompt", len(prompt_ids), config.max_new_tokens,
                           self.context_length, self.num_blocks * self.block_size,
                           self.scheduler_config, hold)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=list(prompt_ids),
                       arrival=time.perf_counter(), max_prompt_hold=hold)
        seq.sampler = SequenceSampler(config, seq.prompt_ids, eos_token_ids, detokenize)
        seq.extra["keep_cache"] = keep_cache
        if self.fastkv is not None:
            self.fastkv.plan(seq, self.evictor.spec_of(seq))
        if replays(spec) or probes(spec):  # its budget from the whole prompt, then maybe
            self.evictor.set_spec(seq, spec)  # read in parts
            self.replay.begin(seq, spec)
        self.sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq

    def continue_request(self, session: Sequence, prompt_ids: list[int],
                         config: GenerationConfig, eos_token_ids: Collection[int],
                         detokenize: Callable[[list[int]], str], branch: bool = False,
                         keep_cache: bool = True, eviction: EvictionSpec | None = None,
                         evict_turn: bool = True, recompute: int = 1) -> Sequence:
        """The next turn of a parked ``session`` (finished with ``keep_cache``): ``prompt_ids``
        is the whole conversation so far (earlier turns, answers included, then the new
        message). The cache keeps what it holds (compressed, as evicted); only the tokens after
        the longest common prefix of ``prompt_ids`` and the cached tokens are computed (cached
        positions from there on are forgotten first). Its budget follows the new prompt length.

        branch: continue a fork of the session (sharing its blocks; the session stays parked,
        so several questions can be asked of one compressed context in parallel); else the
        session itself continues (and is returned).
        eviction: the continuation's own policy and budget (engines built with eviction only),
        applied at once to the cached tokens, before the new ones (copy-on-write keeps a
        session's blocks intact), its budget taken from the cached tokens.
        evict_turn: False keeps every token of this turn and evicts nothing more (the
        query-agnostic protocol: the context was compressed before the question was seen).
        recompute: at least this many of the prompt's last tokens run even when cached (1: the
        last, whose logits give the first token; more: a KVzip branch's ``question_window``).
        """
        if self.evictor is not None:
            self.evictor.flush(session)
        dropped = (session.is_finished and session.extra.get("keep_cache")
                   and session.seq_id not in self.kv.tables)  # memory ran short: recompute
        if session not in self.scheduler.parked and not dropped:
            raise ValueError("continue_request: the session must be finished with keep_cache "
                             "and not released")
        if not prompt_ids:
            raise ValueError("continue_request: prompt_ids is empty")
        if isinstance(recompute, bool) or not isinstance(recompute, int) or recompute < 1:
            raise ValueError(f"continue_request: recompute={recompute!r}: allowed an integer "
                             ">= 1")
        computed = session.all_ids[:session.num_computed]
        hold = self._prefill_hold(self.evictor.spec_of(session) if self.evictor else None,
                                  len(prompt_ids), config.max_new_tokens)
        check_request_size("prompt", len(prompt_ids), config.max_new_tokens,
                           self.context_length, self.num_blocks * self.block_size,
                           self.scheduler_config, hold)
        if branch:
            seq = Sequence(seq_id=next(self._ids), prompt_ids=computed,
                           num_computed=session.num_computed)
            if session.seq_id in self.kv.tables:
                self.kv.fork(session.seq_id, seq.seq_id)
            seq.extra = copy.deepcopy(session.extra)
        else:
            seq = session
        same = 0
        for a, b in zip(computed, prompt_ids, strict=False):
            if a != b:
                break
            same += 1
        # the last prompt token runs (it gives logits), or the last ``recompute`` ones
        same = min(same, len(prompt_ids) - max(1, min(recompute, len(prompt_ids))))
        if same < seq.num_computed:
            self._truncate(seq, same)
        if eviction is not None or not evict_turn:
            if self.evictor is None:
                raise ValueError("continue_request(eviction=..., evict_turn=False) needs an "
                                 "engine built with eviction")
            seq.extra["evictions"] = 0
        if eviction is not None:
            if seq.seq_id in self.kv.tables:
                seq.prompt_ids = seq.all_ids[:seq.num_computed]  # budget: the cached context
                self.evictor.set_spec(seq, eviction)
                self.evictor.evict(seq)
            else:  # recomputed from the start (dropped, or a rewrite under LESS)
                seq.prompt_ids = list(prompt_ids)
                self.evictor.set_spec(seq, eviction)
        seq.prompt_ids = list(prompt_ids)
        seq.sampler = SequenceSampler(config, seq.prompt_ids, eos_token_ids, detokenize)
        seq.arrival = time.perf_counter()
        seq.first_token_time = seq.last_token_time = 0.0
        seq.max_prompt_hold = hold
        seq.extra["keep_cache"] = keep_cache
        seq.extra["cached_tokens"] = seq.num_computed
        for key in ("kv_bytes", "peak_kv_bytes", "fastkv"):
            seq.extra.pop(key, None)
        if self.evictor is not None:
            self.evictor.new_turn(seq, evict=evict_turn)
        self.sequences[seq.seq_id] = seq
        self.scheduler.resume(seq)
        return seq

    def _truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Forget ``seq``'s cached positions from ``num_tokens`` on. Where its LESS state
        holds evicted tokens from there on (sums that cannot give them back), the whole cache
        goes and the conversation is recomputed (``stats.rewrites_recomputed``)."""
        less = seq.extra.get("less")
        if less is not None and less.max_position >= num_tokens:
            if seq.seq_id in self.kv.tables:
                self.kv.free(seq.seq_id)
            seq.extra["less"] = None
            seq.num_computed = 0
            self.stats.rewrites_recomputed += 1
            return
        if seq.seq_id in self.kv.tables:
            if self.evictor is None:
                self.kv.truncate(seq.seq_id, num_tokens)
            else:
                rows, moves = self.kv.truncate(seq.seq_id, num_tokens)
                self.runner.apply_moves(moves)
                if seq.extra.get("scores") is not None:
                    seq.extra["scores"].compact(rows)
        seq.num_computed = min(seq.num_computed, num_tokens)

    def release(self, seq: Sequence) -> None:
        """Free a parked session's cache (its chat is over)."""
        if not seq.is_finished:
            self.abort(seq)
        self.scheduler.release(seq)
        seq.extra["keep_cache"] = False
        self.sequences.pop(seq.seq_id, None)

    def fork(self, parent: Sequence, eviction: EvictionSpec | None = None) -> Sequence:
        """A running copy of ``parent`` sharing its cached blocks (no cache memory copied).

        eviction: the child's own policy and budget (engines built with eviction only), applied
        at once to the child (copy-on-write keeps the parent's blocks intact), then as usual.
        """
        if eviction is not None and self.evictor is None:
            raise ValueError("fork(eviction=...) needs an engine built with eviction")
        if parent.status is not Status.RUNNING or parent.num_computed < len(parent.prompt_ids):
            raise ValueError("only a running sequence whose prompt is computed can be forked")
        if self.evictor is not None:
            self.evictor.flush(parent)  # the child shares the compressed cache
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

    def _replay_hold(self, spec: EvictionSpec, prompt: int, max_new: int) -> int:
        """Tokens a KVzip request holds at most: its replay, then budget + answer; with
        prefill eviction the budget, a part of the prompt and that part's replay, or the
        budget and decode growth (engine/replay.py)."""
        if self.replay is None or not self.replay.repeat:
            raise ValueError("importance 'kvzip' needs an engine built with replay_prompt")
        if replay_group(spec.policy) is not None:
            self._query_scores()
        if spec.prefill_eviction:
            return self._prefill_hold(spec, prompt, max_new) + self.replay.part_replay_len
        return max(self.replay.max_held(prompt), prompt + max_new)

    def _query_scores(self) -> ReplayScorer:
        """The runner's scorer of KVzip's grouped replay scores (engine/query_scores.py; its
        graph compiled on first use). FastKV's split steps give no queries: refused."""
        if self.fastkv is not None:
            raise ConfigError("eviction.policy", "KVzip(replay_group=N)",
                              "replay_group=None with fastkv")
        return self.runner.enable_query_keys()

    def _prefill_hold(self, spec: EvictionSpec | None, prompt: int, max_new: int) -> int | None:
        """Tokens a request holds at most with prefill eviction (None: without it); a probed
        request holds its probe too."""
        if spec is None or not spec.prefill_eviction:
            return None
        policy = importance_of(spec.policy)  # inside KVCrush
        return prefill_eviction_hold(spec.budget(prompt), self.scheduler_config,
                                     self.block_size, spec.mode, spec.evict_interval, max_new,
                                     getattr(policy, "name", "")) + (
            spec.prefill_probe if probes(spec) else 0)

    def set_spec(self, seq: Sequence, spec: EvictionSpec) -> None:
        """Give a queued ``seq`` its own policy and budget (and FastKV split, or none)."""
        if self.evictor is None:
            raise ValueError("set_spec needs an engine built with eviction")
        max_new = seq.sampler._config.max_new_tokens
        if self.replay is not None:
            self.replay.undo_begin(seq)
        if replays(spec):
            self._replay_hold(spec, len(seq.prompt_ids), 0)  # an engine that can replay
        self.evictor.set_spec(seq, spec)
        seq.max_prompt_hold = (self._replay_hold(spec, len(seq.prompt_ids), max_new)
                               if replays(spec) and spec.prefill_eviction
                               else self._prefill_hold(spec, len(seq.prompt_ids), max_new))
        if self.replay is not None:
            self.replay.begin(seq, spec)
        if self.fastkv is not None:
            self.fastkv.plan(seq, spec)

    def abort(self, seq: Sequence, keep_cache: bool = False) -> None:
        """Stop ``seq`` now; with ``keep_cache`` (a session's turn cut short) its cache stays
        parked for the next turn."""
        if self.evictor is not None:
            self.evictor.settle(seq, keep_cache)
        if not seq.is_finished:
            self.scheduler.finish(seq, keep_cache)
        if self.fastkv is not None:
            self.fastkv.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> StepOutput:
        t0 = time.perf_counter()
        infer0 = self.runner.infer_s
        out = self._step()
        self.stats.tokens += out.num_tokens
        if out.num_tokens and out.num_tokens == len(out.new_tokens):  # a pure decode step
            self.stats.decode_steps += 1
            self.stats.decode_step_s += time.perf_counter() - t0
            self.stats.decode_infer_s += self.runner.infer_s - infer0
        return out

    def _step(self) -> StepOutput:
        if self.evictor is not None and self.evictor.pending:
            self.evictor.flush()  # last step's prompt-end evictions, before anything is placed
        out = self.scheduler.schedule()
        if self.replay is not None:
            for seq in out.preempted:  # a part-wise replay reads its prompt again
                self.replay.restart(seq)
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
            if self.replay is not None:  # a replay or probe phase ended: no token, no logits
                rows = [i for i, seq in enumerate(sampling) if not self.replay.intercept(
                    seq, self.evictor.spec_of(seq), self._truncate, self.evictor.evict,
                    self.evictor.over_budget)]
                if len(rows) < len(sampling):
                    sampling, logits = [sampling[i] for i in rows], logits[rows]
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
                    keep = seq.extra.get("keep_cache", False)
                    if self.evictor is not None:
                        self.evictor.settle(seq, keep)
                    self.scheduler.finish(seq, keep)
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
            exact = [i for i, c in enumerate(out.chunks)
                     if windows is not None and windows[i] and c.seq.extra.get("query_group")]
            scorer = self._query_scores() if exact else None
            logits, scores = self.runner.run_heads(out.chunks, tables, windows,
                                                   query_keys=bool(exact))
            if scorer is not None:  # KVzip's grouped scores replace these chunks' step sums
                queries, keys = self.runner.last_query_keys
                rescore_step(scorer, out.chunks, windows, tables, queries, keys, scores, exact,
                             [out.chunks[i].seq.extra["query_group"] for i in exact])
            elif self.runner.query_key_request is not None:
                self.runner.query_scorer.retain(set())  # no replay now: its keys go
        # the first token before the prompt-end eviction (evictor doc), unless FastKV's
        # propagation acts on the prompt's end (a KVzip replay's sequences: evictor.after_step)
        self.evictor.after_step(out.chunks, windows, scores, defer=self.fastkv is None)
        return logits

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        sch = self.scheduler
        live = {s.seq_id for s in [*sch.running, *sch.parked, *sch.waiting]}
        if set(self.kv.tables) - live:
            raise AssertionError(f"blocks held by sequences not running: "
                                 f"{sorted(set(self.kv.tables) - live)}")

