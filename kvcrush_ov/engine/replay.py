"""KVzip's context replay inside the engine (``importance="kvzip"``, score mode ``replay``).

A request whose policy ranks by replay goes through three phases (``seq.extra["replay"]``):

1. its prompt runs unscored; the step that would sample its first token samples nothing;
2. the replay: the repeat prompt and the prompt again (cut to fit the model's context) become
   the sequence's next tokens and run in steps of ``REPLAY_CHUNK`` queries, every query scored,
   a row's score the largest one step gave it (``SequenceScores(reduce="max")``);
3. the replay is forgotten (the cache truncated to the prompt minus its last token) and the
   prompt restored; the last prompt token runs again, the eviction at the prompt's end keeps the
   budget by the replay's scores, and the first token is sampled as usual.

The request holds up to twice its prompt (plus the repeat prompt) during the replay, and its
TTFT includes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvcrush_ov.engine.sequence import Sequence
from kvcrush_ov.eviction.kvzip import REPLAY_CHUNK
from kvcrush_ov.eviction.scores import SequenceScores
from kvcrush_ov.eviction.spec import EvictionSpec


@dataclass
class ReplayState:
    prompt_ids: list[int]
    done: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def replays(spec: EvictionSpec | None) -> bool:
    return spec is not None and spec.policy.score_mode == "replay"


def replay_ids(prompt: list[int], repeat: list[int], context_length: int) -> list[int]:
    """The replay's tokens after ``prompt``: ``repeat`` then as much of the prompt as fits."""
    room = max(0, context_length - len(prompt) - len(repeat) - 1)
    return list(repeat) + list(prompt[:room])


class ContextReplay:
    """repeat: the repeat prompt's token ids. context_length: the model's."""

    def __init__(self, repeat: list[int], context_length: int, num_layers: int,
                 num_kv_heads: int) -> None:
        if not repeat:
            raise ValueError("ContextReplay: the repeat prompt has no tokens")
        self.repeat = list(repeat)
        self.context_length = context_length
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads

    def max_held(self, prompt_len: int) -> int:
        """Tokens a replaying request holds at most (its prompt, the repeat, the replay)."""
        return prompt_len + len(replay_ids([0] * prompt_len, self.repeat, self.context_length))

    def intercept(self, seq: Sequence, spec: EvictionSpec,
                  truncate: Callable[[Sequence, int], None]) -> bool:
        """Called when ``seq`` is about to sample: True when the sample belongs to a replay
        phase (the caller drops it), after moving the sequence to its next phase."""
        if not replays(spec):
            return False
        ex = seq.extra
        state: ReplayState | None = ex.get("replay")
        if state is None:  # 1 -> 2: the prompt is in the cache, replay it
            state = ReplayState(list(seq.prompt_ids))
            ex["replay"] = state
            seq.prompt_ids = state.prompt_ids + replay_ids(state.prompt_ids, self.repeat,
                                                           self.context_length)
            ex["scores"] = SequenceScores(self.num_layers, self.num_kv_heads, reduce="max")
            ex["max_chunk"] = REPLAY_CHUNK
            return True
        if not state.done:  # 2 -> 3: forget the replay, recompute the prompt's last token
            state.done = True
            seq.prompt_ids = state.prompt_ids
            ex.pop("max_chunk", None)
            truncate(seq, state.prompt_len - 1)
            ex["prefill_end"] = state.prompt_len
            return True
        return False
