"""KVzip's context replay inside the engine (``importance="kvzip"``, score mode ``replay``).

A request whose policy ranks by replay goes through three phases (``seq.extra["replay"]``):

1. its prompt runs unscored; the step that would sample its first token samples nothing;
2. the replay: the repeat prompt and the prompt again (cut to fit the model's context) become
   the sequence's next tokens and run in steps of the policy's ``replay_chunk`` queries, every
   query scored, a row's score the largest one step gave it (``SequenceScores(reduce="max")``);
3. the replay is forgotten (the cache truncated to the prompt minus its last token) and the
   prompt restored; the last prompt token runs again, the eviction at the prompt's end keeps the
   budget by the replay's scores, and the first token is sampled as usual. With KVzip's
   ``question_window`` N > 1 the prompt's last N tokens run again, their queries scored in one
   step and max-combined with the replay's (SnapKV's window on a question ending the prompt).

The request holds up to twice its prompt (plus the repeat prompt) during the replay, and its
TTFT includes it.

With ``prefill_eviction`` the prompt is read a *part* at a time (``segment`` tokens, the
scheduler's step): phases 1 and 2 run for each part (the replay repeats only that part; its
queries score every cached row, the survivors of earlier parts included, by the same max), then
the replay is forgotten, the cache is evicted down to the budget and the next part is read; the
last part ends with phase 3. A request then holds at most its budget, a part and the part's
replay, so a prompt longer than the whole cache runs, ranked without its question in view. A
request preempted before its last replay reads its prompt again from the first part.

A *probe* (``prefill_probe`` with prefill eviction, window-scored policies: snapkv, pyramidkv,
adakv) reads the prompt a part at a time too, but what runs after a part is the prompt's last
``prefill_probe`` tokens (where the question usually is), scored by their last ``window``
queries into fresh scores: the cached rows are ranked as SnapKV's window ranks them once the
whole prompt is read. The probe is forgotten, the cache evicted to the budget, and the next
part read; a part that leaves the request within its budget is not probed. The last part is
read as without parts: its own last queries (the prompt's end) score, and the prompt's end
evicts as usual. A request holds at most its budget, a part and the probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvcrush_ov.engine.sequence import Sequence
from kvcrush_ov.eviction.kvzip import question_window, replay_chunk, replay_group
from kvcrush_ov.eviction.scores import SequenceScores
from kvcrush_ov.eviction.spec import EvictionSpec


@dataclass
class ReplayState:
    """prompt_ids: the whole prompt. segment: tokens read between replays (None: the whole
    prompt, then one replay). The current part of the prompt is ``[start, end)``: being read,
    or (``replaying``) being replayed; ``done``: the last replay is over."""

    prompt_ids: list[int]
    done: bool = False
    segment: int | None = None
    start: int = 0
    end: int = -1  # -1: the first part's end (the whole prompt without a segment)
    replaying: bool = False

    def __post_init__(self) -> None:
        if self.segment is not None and self.segment < 1:
            raise ValueError(f"ReplayState.segment={self.segment}: None or >= 1")
        if self.end < 0:
            self.end = self._part_end(0)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def _part_end(self, start: int) -> int:
        if self.segment is None:
            return self.prompt_len
        return min(start + self.segment, self.prompt_len)

    def next_part(self) -> None:
        self.start, self.end = self.end, self._part_end(self.end)


def replays(spec: EvictionSpec | None) -> bool:
    """KVzip: the policy ranks by a replay of the context."""
    return spec is not None and spec.policy.score_mode == "replay"


def probes(spec: EvictionSpec | None) -> bool:
    """The prompt is read part by part, each part ranked by a probe of the prompt's end."""
    return (spec is not None and spec.prefill_eviction and spec.prefill_probe > 0
            and spec.policy.score_mode == "window")


def recompute_len(spec: EvictionSpec, prompt_len: int) -> int:
    """Prompt tokens a replaying request computes again after its replay (phase 3): the
    policy's ``question_window`` (at least the last token; at most the prompt and the spec's
    scored ``window``)."""
    return max(1, min(question_window(spec.policy), spec.window, prompt_len))


def replay_ids(prompt: list[int], repeat: list[int], context_length: int,
               start: int = 0) -> list[int]:
    """The replay's tokens after ``prompt``: ``repeat`` then as much of ``prompt[start:]`` (the
    part replayed) as fits the model's context."""
    room = max(0, context_length - len(prompt) - len(repeat) - 1)
    return list(repeat) + list(prompt[start:start + room])


class ContextReplay:
    """repeat: the repeat prompt's token ids (empty: no KVzip replay, probes only).
    context_length: the model's. segment: tokens read between replays or probes with prefill
    eviction (the scheduler's ``max_num_batched_tokens``)."""

    def __init__(self, repeat: list[int], context_length: int, num_layers: int,
                 num_kv_heads: int, segment: int) -> None:
        self.repeat = list(repeat)
        self.context_length = context_length
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.segment = segment

    def max_held(self, prompt_len: int) -> int:
        """Tokens a request replaying its whole prompt holds at most (prompt, repeat, replay)."""
        return prompt_len + len(replay_ids([0] * prompt_len, self.repeat, self.context_length))

    @property
    def part_replay_len(self) -> int:
        """Tokens one part's replay adds with prefill eviction (the repeat prompt and a part)."""
        return len(self.repeat) + self.segment

    def begin(self, seq: Sequence, spec: EvictionSpec) -> None:
        """Before ``seq``'s first step (its budget already set from the whole prompt): with
        prefill eviction the prompt is read a part at a time (the sequence knows only the
        first part until its replay is over); a probed prompt only when it has more than one
        part and exceeds its budget."""
        if probes(spec):
            if len(seq.prompt_ids) <= max(self.segment, seq.extra["budget"]):
                return
        elif not (replays(spec) and spec.prefill_eviction):
            return
        state = ReplayState(list(seq.prompt_ids), segment=self.segment)
        seq.extra["replay"] = state
        seq.prompt_ids = state.prompt_ids[:state.end]

    def undo_begin(self, seq: Sequence) -> None:
        """A queued ``seq`` that :meth:`begin` cut to its first part gets its whole prompt back
        (before it is given another spec)."""
        state: ReplayState | None = seq.extra.get("replay")
        if (state is not None and state.segment is not None and not state.done
                and seq.num_computed == 0):
            seq.prompt_ids = state.prompt_ids
            seq.extra.pop("replay")
            seq.extra.pop("max_chunk", None)
            seq.extra.pop("query_group", None)

    def restart(self, seq: Sequence) -> None:
        """``seq`` was preempted (its cache is gone): a part-wise replay that had not finished
        starts again from the first part. (After the last replay a recomputation reads the
        prompt and the answer so far as prefill eviction does, by each chunk's last queries.)"""
        state: ReplayState | None = seq.extra.get("replay")
        if state is None or state.segment is None or state.done:
            return
        fresh = ReplayState(state.prompt_ids, segment=state.segment)
        seq.extra["replay"] = fresh
        seq.extra.pop("max_chunk", None)
        seq.extra.pop("query_group", None)
        seq.prompt_ids = fresh.prompt_ids[:fresh.end]

    def intercept(self, seq: Sequence, spec: EvictionSpec,
                  truncate: Callable[[Sequence, int], None],
                  evict: Callable[[Sequence], None],
                  over_budget: Callable[[Sequence], bool]) -> bool:
        """Called when ``seq`` is about to sample: True when the sample belongs to a replay
        or probe phase (the caller drops it), after moving the sequence to its next phase."""
        if probes(spec):
            return self._probe(seq, spec, truncate, evict, over_budget)
        if not replays(spec):
            return False
        ex = seq.extra
        state: ReplayState | None = ex.get("replay")
        if state is None:  # the whole prompt is read: replay it
            state = ReplayState(list(seq.prompt_ids))
            ex["replay"] = state
            ex["scores"] = SequenceScores(self.num_layers, self.num_kv_heads, reduce="max")
        if state.done:
            return False
        if not state.replaying:  # 1 -> 2: the part is in the cache, replay it
            state.replaying = True
            read = state.prompt_ids[:state.end]
            seq.prompt_ids = read + replay_ids(read, self.repeat, self.context_length,
                                               state.start)
            ex["max_chunk"] = replay_chunk(spec.policy)
            if replay_group(spec.policy) is not None:  # scored by groups beside the step
                ex["query_group"] = replay_group(spec.policy)
            return True
        state.replaying = False  # the part's replay is scored: forget it
        ex.pop("max_chunk", None)
        ex.pop("query_group", None)
        if state.end < state.prompt_len:  # evict down to the budget, then read the next part
            truncate(seq, state.end)
            evict(seq)
            state.next_part()
            seq.prompt_ids = state.prompt_ids[:state.end]
            return True
        state.done = True  # 2 -> 3: recompute the prompt's last token(s), evict, then sample
        seq.prompt_ids = state.prompt_ids
        truncate(seq, state.prompt_len - recompute_len(spec, state.prompt_len))
        ex["prefill_end"] = state.prompt_len
        return True

    def _probe(self, seq: Sequence, spec: EvictionSpec,
               truncate: Callable[[Sequence, int], None], evict: Callable[[Sequence], None],
               over_budget: Callable[[Sequence], bool]) -> bool:
        ex = seq.extra
        state: ReplayState | None = ex.get("replay")
        if state is None or state.done:
            return False
        if not state.replaying and over_budget(seq):  # the part is read: probe it
            state.replaying = True
            seq.prompt_ids = (state.prompt_ids[:state.end]
                              + state.prompt_ids[-spec.prefill_probe:])
            ex["scores"] = SequenceScores(self.num_layers, self.num_kv_heads)
            return True
        if state.replaying:  # the probe has scored: forget it, evict to the budget
            state.replaying = False
            truncate(seq, state.end)
            evict(seq)
        state.next_part()
        seq.prompt_ids = state.prompt_ids[:state.end]
        if state.end == state.prompt_len:  # the last part: scored by its own last queries
            state.done = True
            ex["prefill_end"] = state.prompt_len
            ex["scores"] = SequenceScores(self.num_layers, self.num_kv_heads)
        return True
