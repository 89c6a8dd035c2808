"""A request's sequence as the engine tracks it (data only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Tokens known for one sequence: ``prompt_ids`` then ``output_ids``.

    num_computed: tokens whose K/V are in the cache. The tokens still to compute are
    ``all_ids[num_computed:]``; after a preemption num_computed drops to 0 and the whole known
    sequence (prompt + generated) is recomputed.
    """

    seq_id: int
    prompt_ids: list[int]
    sampler: Any = None  # kvcrush_ov.engine.sampler.SequenceSampler
    status: Status = Status.WAITING
    num_computed: int = 0
    arrival: float = 0.0
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    num_preemptions: int = 0
    error: str | None = None
    max_prompt_hold: int | None = None  # with prefill eviction: tokens held at most while the
    # prompt is read (budget + a chunk); the scheduler's admission counts this, not the prompt
    extra: dict = field(default_factory=dict)

    @property
    def output_ids(self) -> list[int]:
        return self.sampler.output_ids if self.sampler is not None else []

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building the whole list."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.sampler.output_slice(start - n, end - n)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.sampler.output_slice(0, end - n)

    @property
    def num_known(self) -> int:
        return len(self.prompt_ids) + (self.sampler.num_output if self.sampler else 0)

    @property
    def num_pending(self) -> int:
        return self.num_known - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
