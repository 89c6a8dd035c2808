"""``kvcrush-ov eval-explain``: what one method kept of one RULER sample's answer.

RULER's references (the needle values, the variable names, the answer words) also appear in the
prompt. This runs one sample with one method and its eviction log on, finds the prompt tokens of
each reference, and reports per layer which share of them every KV head kept after each
eviction: the first thing to look at when a method misses an answer the full cache finds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kvcrush_ov.config import GenerationConfig, KVCacheConfig
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eval.methods import METHODS
from kvcrush_ov.eval.ruler import TASKS, score
from kvcrush_ov.eval.runner import (
    PROTOCOLS,
    build_samples,
    chat_wrap,
    compress_then_ask,
    context_and_question,
    encode_text,
    score_groups,
)
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.eviction.kvzip import REPEAT_PROMPT
from kvcrush_ov.pipeline import Pipeline


@dataclass
class Explanation:
    """prediction / score: what the method answered. spans: [start, end) prompt token positions
    of each reference found in the prompt. kept: one array per eviction, float [L, H], the
    share of the spans' tokens each (layer, head) kept. by_token: one array per eviction,
    float [span tokens] (the spans' tokens in order), the share of (layer, head) pairs that kept
    each token: whether a needle lost its start, its end or its middle. evicted_at: the
    positions written when each eviction ran (the context's length for the query-agnostic
    protocol's first)."""

    task: str
    index: int
    method: str
    budget: float
    prediction: str
    score: float
    references: list[str]
    spans: list[tuple[int, int]]
    kept: list[np.ndarray]
    by_token: list[np.ndarray]
    evicted_at: list[int] = dataclasses.field(default_factory=list)


def reference_spans(count_tokens, prompt: str, references: list[str]) -> list[tuple[int, int]]:
    """Token spans [start, end) of the first occurrence of each reference in ``prompt``.

    count_tokens(text) -> number of tokens of ``text``; a span runs from the token count of the
    text before the reference to that of the text through it (BPE merges across the boundary
    can shift it by one token). References not in the prompt are skipped.
    """
    spans = []
    for ref in references:
        at = prompt.find(ref)
        if at >= 0:
            spans.append((count_tokens(prompt[:at]), count_tokens(prompt[:at + len(ref)])))
    return spans


def kept_share(kept: list[list[np.ndarray]], spans: list[tuple[int, int]]) -> np.ndarray:
    """float [L, H]: share of the span positions each (layer, head) holds (kept[l][h])."""
    want = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, int)
    if not len(want):
        return np.ones((len(kept), len(kept[0])))
    return np.array([[np.isin(want, p).mean() for p in row] for row in kept])


def token_share(kept: list[list[np.ndarray]], spans: list[tuple[int, int]]) -> np.ndarray:
    """float [span tokens]: share of the (layer, head) pairs holding each span position."""
    want = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, int)
    held = [np.isin(want, p) for row in kept for p in row]
    return np.mean(held, axis=0) if held else np.zeros(len(want))


def explain(model: str, task: str, index: int, method: str, budget: float, seed: int = 42,
            max_seq_length: int = 4096, precision: str = "u8",
            protocol: str = "query-aware") -> Explanation:
    """Run sample ``index`` of ``task`` (the eval's samples for ``seed``) with one native
    method at ``budget`` and report what it kept of the references. ``protocol``
    "query-agnostic": as ``kvcrush-ov eval --protocol query-agnostic`` runs it, the context is
    compressed before the question is read (the evictions reported are the context's)."""
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", protocol, f"one of {', '.join(PROTOCOLS)}")
    if task not in TASKS:
        raise ConfigError("task", task, f"one of {', '.join(TASKS)}")
    native = [m for m, v in METHODS.items() if v.backend == "native"]
    if method not in native:
        raise ConfigError("method", method, f"one of {', '.join(native)}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError("index", index, "an integer >= 0")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ConfigError("budget", budget, "a fraction of the prompt in (0, 1)")
    cfg = dataclasses.replace(METHODS[method].make(budget), log=True)
    pipe = Pipeline(model, kv_cache=KVCacheConfig(precision=precision), eviction=cfg,
                    backend="native")
    sample = build_samples(pipe, [task], index + 1, seed, max_seq_length)[index]
    tok = pipe.tokenizer
    prompt = sample.prompt(chat_wrap(tok))
    eng = pipe.backend.engine
    g = GenerationConfig(max_new_tokens=sample.max_new_tokens)
    eos = pipe.backend.eos_token_ids

    def detok(x: list[int]) -> str:
        return tok.decode(x) if x else ""

    spec = make_spec(cfg, pipe.model_path)
    if protocol == "query-agnostic":
        ctx, question = context_and_question(tok, sample, chat_wrap(tok))
        ((mode, _),) = score_groups({"m": spec}).items()
        _, branches = compress_then_ask(eng, ctx, [question], g, mode, ["m"], {"m": spec}, eos,
                                        detok, False, encode_text(tok, REPEAT_PROMPT))
        seq = branches["m"][0]
    else:
        seq = eng.add_request(encode_text(tok, prompt), g, eos, detok)
        eng.set_spec(seq, spec)  # as the eval does (a part-wise read keeps its whole prompt)
        while eng.has_unfinished():
            eng.step()
    text = seq.sampler.output_text()
    spans = reference_spans(lambda t: len(encode_text(tok, t)), prompt, list(sample.outputs))
    log = seq.extra.get("eviction_log") or []
    return Explanation(task, index, method, float(budget), text,
                       score(task, text, sample.outputs), list(sample.outputs), spans,
                       [kept_share(r.kept, spans) for r in log],
                       [token_share(r.kept, spans) for r in log],
                       [r.num_written for r in log])


def format_explanation(e: Explanation) -> str:
    lines = [f"{e.task} #{e.index}, {e.method} at {e.budget:g}: score {e.score:.2f}",
             f"prediction: {e.prediction.strip()!r}",
             f"references: {e.references} at prompt tokens {e.spans}"]
    if not e.kept:
        lines.append("no eviction happened")
    for i, share in enumerate(e.kept):
        at = f" (after {e.evicted_at[i]} positions)" if i < len(e.evicted_at) else ""
        lines.append(f"eviction {i + 1}{at}: share of reference tokens kept, per layer "
                     "(mean over KV heads; min..max over heads)")
        for layer, row in enumerate(share):
            lines.append(f"  layer {layer:2d}: {row.mean():.2f}  "
                         f"({row.min():.2f}..{row.max():.2f})")
        lines.append(f"  all layers: {share.mean():.2f}")
        lines.append("  per reference token, in order (share of layer-heads keeping it): "
                     + " ".join(f"{v:.2f}" for v in e.by_token[i]))
    return "\n".join(lines)
