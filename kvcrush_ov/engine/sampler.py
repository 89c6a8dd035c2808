"""Token sampling and stop criteria for the continuous-batching engine (numpy only).

One :class:`SequenceSampler` per sequence holds everything sampling needs across steps: the
seeded random generator (created once, so a sequence's draws depend only on its ``rng_seed``),
the ids seen so far (for the repetition penalty), and the incremental detokenization used to
detect stop strings. :func:`sample_batch` samples one token for every row of a ``[N, V]`` logits
matrix, handling plain greedy rows with a single vectorised argmax.

Per step the order is the one of Hugging Face / OpenVINO GenAI: repetition penalty, then greedy
argmax, or temperature -> top-k -> top-p -> renormalise -> draw.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np

from kvcrush_ov.config import GenerationConfig

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

# First candidate-set size tried when looking for the top-p nucleus; grown 8x until the kept
# candidates hold at least top_p of the probability mass (so the full vocabulary is rarely sorted).
_NUCLEUS_FIRST_GUESS = 256
_NUCLEUS_GROWTH = 8

_REPLACEMENT_CHAR = "\ufffd"


class SequenceSampler:
    """Per-sequence sampling state: the seeded RNG, tokens so far, and stop detection.

    config: the (already validated) generation settings.
    prompt_ids: the prompt's token ids; they count for the repetition penalty.
    eos_token_ids: ids that end the sequence with ``"stop"`` unless ``config.ignore_eos``.
    detokenize: ids -> text; called on short windows of the generated ids while generating (only
        when ``config.stop_strings`` is set) and on all of them by :meth:`output_text`.
    """

    def __init__(
        self,
        config: GenerationConfig,
        prompt_ids: Sequence[int],
        eos_token_ids: Collection[int],
        detokenize: Callable[[list[int]], str],
    ) -> None:
        self._config = config
        self._eos = frozenset(int(t) for t in eos_token_ids)
        self._detokenize = detokenize
        self._rng = np.random.Generator(np.random.PCG64(config.rng_seed))

        self._generated: list[int] = []  # every appended id, EOS included
        self._output: list[int] = []  # appended ids without the terminating EOS
        self._finish_reason: str | None = None

        # Repetition penalty: the distinct ids of prompt + generated, as a lazily rebuilt array.
        self._penalty = float(config.repetition_penalty)
        self._seen: set[int] = {int(t) for t in prompt_ids}
        self._seen_arr: np.ndarray | None = None

        # Stop strings: incrementally detokenized text of the output ids. ``_prefix_offset`` and
        # ``_read_offset`` delimit the ids already turned into ``_text``: each step decodes
        # output[_prefix_offset:_read_offset] and output[_prefix_offset:] and appends the
        # difference, so context-dependent decoders (leading spaces, multi-byte characters split
        # across tokens) give the same text as decoding everything at once.
        self._stop_strings = tuple(config.stop_strings)
        self._max_stop_len = max((len(s) for s in self._stop_strings), default=0)
        self._text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop_pos: int | None = None  # where the first stop string starts in ``_text``

    # ------------------------------------------------------------------ properties

    @property
    def output_ids(self) -> list[int]:
        """The generated ids (a copy), without the EOS token that finished the sequence."""
        return list(self._output)

    def output_slice(self, start: int, end: int) -> list[int]:
        """``output_ids[start:end]`` without copying the whole list (the engine's hot path)."""
        return self._output[start:end]

    @property
    def num_output(self) -> int:
        return len(self._output)

    @property
    def finish_reason(self) -> str | None:
        """``"stop"`` (EOS or stop string), ``"length"`` (max_new_tokens), or None if running."""
        return self._finish_reason

    @property
    def num_generated(self) -> int:
        """How many tokens were appended, the terminating EOS included."""
        return len(self._generated)

    # ------------------------------------------------------------------ sampling

    def _penalty_ids(self, vocab_size: int) -> np.ndarray:
        """The distinct seen ids that index a ``[vocab_size]`` logits row, shape ``[M]``."""
        if self._seen_arr is None:
            self._seen_arr = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
        ids = self._seen_arr
        return ids[(ids >= 0) & (ids < vocab_size)]

    def _is_plain_greedy(self) -> bool:
        """True when :meth:`sample` is a bare argmax (no sampling, no active penalty)."""
        return not self._config.do_sample and (self._penalty == 1.0 or not self._seen)

    def _apply_penalty(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` ``[V]`` with the repetition penalty applied (a copy when anything changes).

        Seen ids' positive logits are divided by the penalty, negative ones multiplied.
        """
        if self._penalty == 1.0 or not self._seen:
            return logits
        ids = self._penalty_ids(logits.shape[0])
        if ids.size == 0:
            return logits
        out = logits.copy()
        vals = out[ids]
        out[ids] = np.where(vals > 0, vals / self._penalty, vals * self._penalty)
        return out

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from ``logits`` ``[V]`` (the last position's row); not appended.

        Greedy (lowest id on ties) unless ``do_sample``; otherwise draws once from this
        sequence's generator after temperature, top-k and top-p.
        """
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ValueError(f"logits must have shape [V] with V > 0, got {logits.shape}")
        logits = self._apply_penalty(logits)
        if not self._config.do_sample:
            return int(np.argmax(logits))
        return self._draw(logits)

    def _draw(self, logits: np.ndarray) -> int:
        """Temperature, top-k, top-p and one draw from the renormalised ``[V]`` distribution."""
        cfg = self._config
        vocab = logits.shape[0]

        # Candidate set: all ids, or the top_k highest logits (unordered).
        if 0 < cfg.top_k < vocab:
            cand = np.argpartition(logits, vocab - cfg.top_k)[vocab - cfg.top_k:]
            scaled = logits[cand].astype(np.float64)
        else:
            cand = None
            scaled = logits.astype(np.float64)
        scaled /= float(cfg.temperature)

        top = scaled.max()
        if not np.isfinite(top):  # all -inf, +inf or NaN: sampling is undefined, stay greedy
            local = int(np.argmax(scaled))
            return int(cand[local]) if cand is not None else local
        probs = np.exp(scaled - top)
        probs /= probs.sum()

        # Nucleus: sorted (descending) local indices of the kept candidates.
        if cfg.top_p < 1.0:
            keep = _nucleus(probs, float(cfg.top_p))
            probs = probs[keep]
            cand = keep if cand is None else cand[keep]

        cdf = np.cumsum(probs)
        u = self._rng.random() * cdf[-1]  # renormalises implicitly
        local = min(int(np.searchsorted(cdf, u, side="right")), cdf.shape[0] - 1)
        return int(cand[local]) if cand is not None else local

    # ------------------------------------------------------------------ stop criteria

    def append(self, token_id: int) -> str | None:
        """Record the generated ``token_id``; return the finish reason, or None to go on.

        ``"stop"`` for an EOS id (recorded, but left out of :attr:`output_ids`) unless
        ``ignore_eos``, or when the generated text now contains a stop string; ``"length"`` once
        ``max_new_tokens`` tokens were generated.
        """
        if self._finish_reason is not None:
            raise RuntimeError(
                f"append({token_id}) on a sequence already finished ({self._finish_reason!r})"
            )
        token_id = int(token_id)
        self._generated.append(token_id)
        if token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_arr = None

        if token_id in self._eos and not self._config.ignore_eos:
            self._finish_reason = FINISH_STOP
            return self._finish_reason

        self._output.append(token_id)
        if self._stop_strings and self._check_stop_strings():
            self._finish_reason = FINISH_STOP
        elif len(self._generated) >= self._config.max_new_tokens:
            self._finish_reason = FINISH_LENGTH
        return self._finish_reason

    def _decode_new_text(self) -> str:
        """The text the last output ids added ('' while a multi-byte character is incomplete)."""
        window = self._output[self._prefix_offset:]
        n_prefix = self._read_offset - self._prefix_offset
        prefix_text = self._detokenize(window[:n_prefix]) if n_prefix else ""
        new_text = self._detokenize(window)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._output)
        return new_text[len(prefix_text):]

    def _check_stop_strings(self) -> bool:
        """Decode the newest text and look for a stop string in the part that can hold a new one.

        A new match must end inside the new text, so only the last ``len(longest stop string) +
        len(new text)`` characters are searched.
        """
        chunk = self._decode_new_text()
        if not chunk:
            return False
        self._text += chunk
        start = max(0, len(self._text) - len(chunk) - self._max_stop_len)
        pos = _first_occurrence(self._text, self._stop_strings, start)
        if pos is None:
            return False
        self._stop_pos = pos
        return True

    def output_text(self) -> str:
        """The detokenized output ids; cut just before the first stop string occurrence when the
        sequence was finished by a stop string and ``include_stop_str_in_output`` is False."""
        text = self._detokenize(list(self._output))
        if self._stop_pos is None or self._config.include_stop_str_in_output:
            return text
        pos = _first_occurrence(text, self._stop_strings, 0)
        if pos is None:  # the full decode differs from the incremental one: trust the latter
            pos = self._stop_pos
        return text[:pos]


def _first_occurrence(text: str, needles: Sequence[str], start: int) -> int | None:
    """The smallest index >= ``start`` where any of ``needles`` occurs in ``text``, or None."""
    best: int | None = None
    for s in needles:
        pos = text.find(s, start)
        if pos >= 0 and (best is None or pos < best):
            best = pos
    return best


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices into ``probs`` ``[C]`` (summing to 1) of the top-p nucleus, most probable first.

    The nucleus is the smallest set of highest-probability entries whose cumulative probability
    reaches ``top_p`` (at least one entry). Only a candidate subset known to contain it is
    sorted: the top ``m`` entries (by argpartition), ``m`` growing until they hold ``top_p``.
    """
    n = probs.shape[0]
    m = min(n, _NUCLEUS_FIRST_GUESS)
    while True:
        if m < n:
            idx = np.argpartition(probs, n - m)[n - m:]
            if probs[idx].sum() < top_p:
                m = min(n, m * _NUCLEUS_GROWTH)
                continue
        else:
            idx = np.arange(n)
        break
    order = idx[np.argsort(-probs[idx], kind="stable")]
    cum = np.cumsum(probs[order])
    count = min(int(np.searchsorted(cum, top_p, side="left")) + 1, order.shape[0])
    return order[:count]


def sample_batch(samplers: Sequence[SequenceSampler], logits: np.ndarray) -> list[int]:
    """One token per sequence from ``logits`` ``[N, V]`` (row ``i`` for ``samplers[i]``).

    Rows whose sampler is plain greedy (no sampling, no active repetition penalty) share one
    vectorised argmax; the others go through :meth:`SequenceSampler.sample`. Tokens are not
    appended.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(
            f"logits must have shape [N={len(samplers)}, V], got {logits.shape}"
        )
    out = [0] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s._is_plain_greedy()]
    if greedy:
        rows = logits if len(greedy) == len(samplers) else logits[greedy]
        for i, tok in zip(greedy, np.argmax(rows, axis=1).tolist(), strict=True):
            out[i] = int(tok)
    if len(greedy) < len(samplers):
        greedy_set = set(greedy)
        for i, s in enumerate(samplers):
            if i not in greedy_set:
                out[i] = s.sample(logits[i])
    return out
