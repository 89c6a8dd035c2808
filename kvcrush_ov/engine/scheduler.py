"""Continuous-batching scheduler: which tokens of which sequences run in the next step.

Every step has a token budget (``max_num_batched_tokens``). Running sequences go first, oldest
first: a decoding sequence takes one token, a sequence still in prefill takes the next chunk of its
prompt. Waiting sequences then join while budget, sequence slots and free blocks last, so prefill
and decode tokens share a step. A waiting sequence joins only if its whole prompt fits next to
what the running prefills still need plus one block of growth per running sequence (an admission
watermark; alone in the engine it joins as soon as its first chunk fits), so that prompts are not
admitted chunk by chunk into room the running sequences need. When a running sequence cannot get
a block anyway, the newest running sequence is preempted: its blocks are freed and it waits to
be recomputed (prompt + what it has generated), which yields exactly the same continuation.

Chat sessions: a sequence finished with ``keep_cache`` is *parked*: its blocks stay so that the
next turn (:meth:`resume`) appends only its new tokens. Parked caches are the first thing given
up when memory runs short (a running sequence cannot grow, or nothing runs and a waiting one
cannot start): the oldest is dropped and its next turn recomputes the conversation.

With ``align_chunks`` (the engine sets it for u4 caches) a prompt chunk that stops short of the
prompt's end ends on a KV block boundary, and a sliver of a step's budget smaller than a block is
left unused: a u4 key block written in two parts is quantized twice, and the 4-bit error made a
prompt's output depend on ``max_num_batched_tokens`` and on the requests batched beside it
(docs/reliability.md measures it). u8 and wider caches keep GenAI's packing, step for step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvcrush_ov.engine.kv_cache_manager import KVCacheManager
from kvcrush_ov.engine.sequence import Sequence, Status
from kvcrush_ov.errors import CacheFullError


@dataclass
class ScheduledChunk:
    """Tokens ``seq.all_ids[start:start + num_tokens]`` run this step; ``sample`` when they
    reach the end of the known tokens, so the step's last logits give the next token."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 dynamic_split_fuse: bool = True, align_chunks: bool = False) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.dynamic_split_fuse = dynamic_split_fuse
        self.align_chunks = align_chunks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: list[Sequence] = []  # finished with keep_cache, oldest first
        self.num_preemptions = 0
        self.num_dropped_sessions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, keep_cache: bool = False) -> None:
        """End ``seq``; with ``keep_cache`` its blocks stay (parked) for a next turn."""
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if keep_cache and seq.seq_id in self.kv.tables:
            if seq not in self.parked:
                self.parked.append(seq)
        else:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Free a finished (or parked) sequence's blocks."""
        if seq in self.parked:
            self.parked.remove(seq)
        self.kv.free(seq.seq_id)

    def resume(self, seq: Sequence) -> None:
        """Queue a parked (or dropped) session again for its next turn's tokens."""
        if seq in self.parked:
            self.parked.remove(seq)
        self.add(seq)

    def _drop_parked(self) -> bool:
        """Give up the oldest parked cache (its next turn recomputes); False if none."""
        if not self.parked:
            return False
        seq = self.parked.pop(0)
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        self.num_dropped_sessions += 1
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _take(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        out.copies.extend(self.kv.append_slots(seq.seq_id, n))
        start = seq.num_computed
        seq.num_computed += n
        out.chunks.append(ScheduledChunk(seq, start, n, seq.num_computed == seq.num_known))

    def _chunk(self, seq: Sequence, budget: int) -> int:
        cap = seq.extra.get("max_chunk")
        if cap:  # steps of ``cap`` positions, aligned whatever else runs (KVzip's replay)
            cap = min(cap, self.max_num_batched_tokens)
            n = min(seq.num_pending, cap - seq.num_computed % cap)
            return n if n <= budget else 0
        n = min(seq.num_pending, budget)
        if n < seq.num_pending and not self.dynamic_split_fuse and not seq.num_preemptions:
            return 0  # without chunked prefill a prompt runs whole or not at all (a preempted
            # sequence's recomputation may be longer than one step: it runs in chunks)
        bs = self.kv.block_size
        if n < seq.num_pending and self.align_chunks and self.max_num_batched_tokens >= bs:
            aligned = (seq.num_computed + n) // bs * bs - seq.num_computed  # a block boundary
            if aligned > 0:
                return aligned
            if budget < self.max_num_batched_tokens:
                return 0  # only a sliver of this step is left: the next step has room
        return n

    def _admissible(self, seq: Sequence, first_chunk: int) -> bool:
        """The admission watermark (module docstring)."""
        if not self.running:
            return self.kv.can_append(seq.seq_id, first_chunk)
        need = self.kv.blocks_needed(seq.seq_id, self._prompt_need(seq))
        growth = self.kv.growth_block()
        for s in self.running:
            need = need + growth
            if s.num_pending > 1:  # still in prefill: the rest of its prompt
                need = need + self.kv.blocks_needed(s.seq_id, self._prompt_need(s))
        return self.kv.fits(need)

    @staticmethod
    def _prompt_need(seq: Sequence) -> int:
        """Tokens the rest of ``seq``'s prompt will add to the cache (with prefill eviction at
        most ``max_prompt_hold``: it evicts as it reads)."""
        cap = seq.max_prompt_hold
        return seq.num_pending if cap is None else min(seq.num_pending, cap)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            while not self.kv.can_append(seq.seq_id, n) and self._drop_parked():
                pass
            while not self.kv.can_append(seq.seq_id, n) and self.running[-1] is not seq:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
            if not self.kv.can_append(seq.seq_id, n):
                if i == 0:  # it holds every used block: a recomputation would end here again
                    raise CacheFullError(
                        f"sequence {seq.seq_id} needs room for {n} more tokens after "
                        f"{seq.num_computed} and no other request holds KV blocks: the cache is "
                        "too small for it (admission should have refused it; see "
                        "cache_plan.check_request_size)")
                self._preempt(seq)
                out.preempted.append(seq)
                continue  # the list shifted: index i now holds the next sequence
            self._take(out, seq, n)
            budget -= n
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._chunk(seq, budget)
            while n and not self.running and not self._admissible(seq, n) \
                    and self._drop_parked():
                pass
            if n == 0 or not self._admissible(seq, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._take(out, seq, n)
            budget -= n
        return out
