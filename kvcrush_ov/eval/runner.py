"""``kvcrush-ov eval``: RULER at 4K, every method side by side at equal memory.

Native methods: each sample is prefilled ONCE per score mode (a parent that keeps the whole cache
and accumulates the scores the children need), then forked once per (method, budget): every fork
evicts with its own policy at once (copy-on-write keeps the parent intact) and decodes greedily.
The parent's own continuation is the full-cache column. Methods on backend genai run on GenAI's
pipeline, one configuration at a time. Each finished (task, index, method, budget) is appended to
``results.jsonl`` at once; a rerun skips what is there (resumable).

The model sees its chat template around RULER's input, then RULER's answer prefix after the
assistant header (``wrap(input) + answer_prefix``), as ids without extra special tokens.

Fidelity (native methods): the same forks again, teacher-forced over the reference answer; KL of
each fork's next-token distributions against the parent's (the full cache) and top-1 agreement,
in ``fidelity.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvcrush_ov.config import (
    CacheEvictionConfig,
    FastKVConfig,
    GenerationConfig,
    KVCacheConfig,
    SchedulerConfig,
)
from kvcrush_ov.device import check_device, check_kv_precision, inference_settings
from kvcrush_ov.engine.replay import ReplayState, recompute_len, replay_ids
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eval.methods import DEFAULT_BUDGETS, METHODS, REPORT_METHODS, Method
from kvcrush_ov.eval.plot import write_svg
from kvcrush_ov.eval.ruler import (
    TASKS,
    TURN_TASKS,
    TURNS,
    Sample,
    build_task,
    question_start,
    question_turns,
    score,
)
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.eviction.kvzip import (
    REPEAT_PROMPT,
    REPLAY_CHUNK,
    question_window,
    replay_chunk,
    replay_group,
)
from kvcrush_ov.eviction.scores import SequenceScores
from kvcrush_ov.pipeline import Pipeline

FULL = "full"
_PARENT_BUDGET = 10**9  # a parent never evicts
PROTOCOLS = ("query-aware", "query-agnostic")


@dataclass
class Record:
    task: str
    index: int
    seed: int
    method: str
    budget: float | None
    prediction: str
    score: float
    outputs: list[str]
    input_tokens: int
    kv_bytes: int

    @property
    def key(self) -> tuple:
        return (self.task, self.index, self.method, self.budget)


def chat_wrap(tokenizer) -> Callable[[str], str]:
    def wrap(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)
    return wrap if tokenizer.chat_template else (lambda text: text)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without extra special tokens (prompts are already templated)."""
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]]


class Results:
    """results.jsonl: one JSON object per (task, index, method, budget)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[tuple, Record] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = Record(**json.loads(line))
                    self.done[r.key] = r

    def add(self, r: Record) -> None:
        self.done[r.key] = r
        with self.path.open("a") as fh:
            fh.write(json.dumps(asdict(r)) + "\n")


def method_spec(m: Method, budget: float, model_dir: str | Path | None = None):
    """The engine's spec of a method at a budget (a candidate's own policy in place;
    ``model_dir``: where a LESS column finds the model's default weights)."""
    spec = make_spec(m.make(budget), model_dir)
    if m.model_policy is not None:
        if model_dir is None:
            raise ConfigError("model_dir", None, f"the model's folder (method {m.name} is "
                              "built from it)")
        return dataclasses.replace(spec, policy=m.model_policy(Path(model_dir)))
    return spec if m.policy is None else dataclasses.replace(spec, policy=m.policy())


def _record(s: Sample, method: str, budget: float | None, text: str, n: int,
            kv_bytes: int) -> Record:
    return Record(s.task, s.index, s.seed, method, budget, text, score(s.task, text, s.outputs),
                  list(s.outputs), n, int(kv_bytes))


def _parent_config(score_mode: str, fastkv: FastKVConfig | None = None) -> CacheEvictionConfig:
    """The parent of a group: ``all`` (h2o scores), ``window`` (snapkv scores) or a FastKV
    group (snapkv scores and FastKV's split prefill with ``fastkv``: its children share the
    propagated tokens)."""
    importance = "h2o" if score_mode == "all" else "snapkv"
    return CacheEvictionConfig(max_cache_size=_PARENT_BUDGET, importance=importance,
                               kvcrush=None, mode="continuous", fastkv=fastkv)


def score_groups(specs: dict) -> dict[str, list[tuple[str, float]]]:
    """(method, budget) keys by the parent they fork from: ``"all"``, ``"window"``, or
    ``"fastkv:<config>"`` for each FastKV configuration (see :func:`_parent_config`); ``"own"``
    for methods that evict during the prefill (each runs its own, see :func:`_run_alone`)."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for key, spec in specs.items():
        score_mode = spec.policy.score_mode
        mode = ("own" if spec.prefill_eviction  # evicts while reading: no shared prefill
                else f"fastkv:{spec.fastkv!r}" if spec.fastkv is not None
                else f"replay:{replay_chunk(spec.policy)}"
                + (f":g{replay_group(spec.policy)}" if replay_group(spec.policy) else "")
                + (f":lanes{REPLAY_LANES[key[0]]}" if key[0] in REPLAY_LANES else "")
                if score_mode == "replay"
                else score_mode + (_partial_mode(key[0]) if key[0] in PARTIAL_REPLAY
                                   else ":layers" if key[0] in LAYER_REPLAY else "")
                + (f":qw{question_window(spec.policy)}" if question_window(spec.policy) > 1
                   else "")
                if score_mode == "surrogate"
                else score_mode if score_mode == "all" else "window")
        groups.setdefault(mode, []).append(key)
    return groups


def _parent_spec(mode: str, keys: list, specs: dict):
    if mode.startswith("surrogate"):  # KVzap's scores: the parent predicts them as its columns do
        return dataclasses.replace(specs[keys[0]], max_cache_size=_PARENT_BUDGET,
                                   mode="continuous", log=False)
    if mode.startswith("fastkv:"):
        return make_spec(_parent_config("window", specs[keys[0]].fastkv))
    return make_spec(_parent_config("all" if _replays(mode) else mode))


def _replays(mode: str) -> bool:
    """Whether a score group's mode is KVzip's ``replay:<replay_chunk>``."""
    return mode.startswith("replay:")


def _chunk(mode: str) -> int:
    """The replay step (queries) of a ``replay:<n>[:g<q>][:lanes<m>]`` group."""
    return int(mode.split(":")[1])


def _group(mode: str) -> int | None:
    """The query group a ``replay:<n>[:g<q>][:lanes<m>]`` group scores by beside the step
    (KVzip's ``replay_group``; None: the step's own sums)."""
    groups = [p for p in mode.split(":")[2:] if p.startswith("g")]
    return int(groups[0][1:]) if groups else None


def _lanes(mode: str) -> int | None:
    """The lane length of a ``replay:<n>[:g<q>]:lanes<m>`` group (None: one replay of the
    whole context)."""
    lanes = [p for p in mode.split(":")[2:] if p.startswith("lanes")]
    return int(lanes[0][len("lanes"):]) if lanes else None


#: tuning candidates whose replay runs in lanes of this many context tokens (_replay_lanes)
REPLAY_LANES = {"kvzip-lanes256": 256, "kvzip-lanes128": 128}


#: tuning candidates (KVzap's predictions, part of the context replayed as KVzip's lanes):
#: (share of the context replayed, span length, warm-up tokens replayed before each span[,
#: "quantile": the predictions outside the spans mapped onto the replay's scale, see
#: _replay_partial])
PARTIAL_REPLAY = {"kvzap-replay25": (0.25, 128, 32), "kvzap-replay12": (0.125, 128, 32),
                  "kvzap-replay50": (0.5, 128, 32), "kvzap-replay50+kvcrush": (0.5, 128, 32),
                  "kvzap-replay50q": (0.5, 128, 32, "quantile"),
                  "kvzap-replay50w128": (0.5, 128, 128)}


#: tuning candidates (KVzap's predictions, KVzip's replay in some layers): the layers ranked by
#: KVzip's whole replay as shares of the model's layers (first, last), the others by KVzap's
#: predictions; they tell where the predictions lose most. Here the whole replay runs once for
#: all these columns (a layer's replay scores do not depend on the later layers, so an ``early``
#: column ranks as a replay through those layers alone would; its cost is not measured).
LAYER_REPLAY = {"kvzap-early25": (0.0, 0.25), "kvzap-early33": (0.0, 1 / 3),
                "kvzap-early50": (0.0, 0.5), "kvzap-late25": (0.75, 1.0),
                "kvzap-late50": (0.5, 1.0)}


def replay_layers(shares: tuple[float, float], num_layers: int) -> range:
    """The layers a :data:`LAYER_REPLAY` entry ranks by the replay: its shares of
    ``num_layers`` rounded outwards (at least one layer)."""
    first = min(num_layers - 1, int(np.floor(shares[0] * num_layers + 1e-9)))
    last = int(np.ceil(shares[1] * num_layers - 1e-9))
    return range(first, min(num_layers, max(last, first + 1)))


def _score_array(eng, seq, rows: int) -> np.ndarray:
    """``seq``'s accumulated scores of its first ``rows`` rows, f32 [L, H, rows]."""
    layers, heads = eng.runner.num_layers, eng.runner.num_kv_heads
    return np.stack([np.stack([seq.extra["scores"].aligned(layer, h, rows)[:rows]
                               for h in range(heads)])
                     for layer in range(layers)]).astype(np.float32)


def _scores_of(scores: np.ndarray) -> SequenceScores:
    """A sequence's largest-attention scores from an array f32 [L, H, N] (copied)."""
    num_layers, heads, _ = scores.shape
    out = SequenceScores(num_layers, heads, reduce="max")
    out.acc = [[scores[layer, h].copy() for h in range(heads)] for layer in range(num_layers)]
    return out


def _mixed_scores(replay: np.ndarray, pred: np.ndarray, layers: range) -> SequenceScores:
    """Scores [L, H, N] taken from ``replay`` in ``layers``, from ``pred`` in the others."""
    return _scores_of(np.stack([(replay if layer in layers else pred)[layer]
                                for layer in range(len(replay))]))


def _partial_mode(name: str) -> str:
    """The score-group suffix of a partial-replay column: columns with the same replay share
    one parent."""
    return ":partial:" + ",".join(str(x) for x in PARTIAL_REPLAY[name])


def _replay_partial(eng, parent, ids: list[int], repeat: list[int], eos: set[int], detok,
                    key: str | tuple, chunk: int = REPLAY_CHUNK) -> None:
    """A partial replay guided by KVzap (a tuning candidate): the parked ``parent`` holds the
    surrogate's predicted scores of ``ids``; the context is cut into spans, the spans whose
    predicted scores are highest (z-scored log per (layer, head), averaged) are replayed as
    KVzip's lanes (the repeat prompt, ``warm`` tokens before the span, then the span), and a
    replayed span's rows take the replay's score, the others keep the prediction (``calib``
    "quantile": mapped per (layer, head) onto the replay's scale, a prediction's quantile
    among the replayed rows' predictions giving the replay score at that quantile, the
    first 4 rows left out). ``key``: a :data:`PARTIAL_REPLAY` name, or its tuple."""
    share, span, warm, *rest = PARTIAL_REPLAY[key] if isinstance(key, str) else key
    calib = rest[0] if rest else "none"
    layers, heads = eng.runner.num_layers, eng.runner.num_kv_heads
    rows = len(ids)
    pred = _score_array(eng, parent, rows)  # [L, H, N]
    logp = np.log(np.maximum(pred, 1e-30))
    z = (logp - logp.mean(-1, keepdims=True)) / (logp.std(-1, keepdims=True) + 1e-6)
    dens = z.mean((0, 1))  # [N]
    starts = list(range(0, rows, span))
    score = [float(dens[a:a + span].mean()) for a in starts]
    n = max(1, int(round(share * rows / span)))
    chosen = sorted(starts[i] for i in np.argsort(score)[::-1][:n])
    lanes = _run_lanes(eng, parent, ids, repeat, [ids[max(0, a - warm):a + span] for a in chosen],
                       eos, detok, chunk)
    merged = SequenceScores(layers, heads, reduce="max")
    mask = np.zeros(rows, bool)
    for a in chosen:
        mask[a:a + span] = True
    fit = mask.copy()  # the rows the quantile map is fitted on: replayed, not the sinks
    fit[:4] = False
    for layer in range(layers):
        for h in range(heads):
            rep = lanes[layer, h]
            other = pred[layer, h]
            if calib == "quantile":
                ref = np.sort(pred[layer, h][fit])
                q = np.searchsorted(ref, other, side="right") / max(1, len(ref))
                other = np.quantile(rep[fit], np.clip(q, 0.0, 1.0))
            merged.acc[layer][h] = np.where(mask, rep, other).astype(np.float32)
    parent.extra["scores"] = merged
    parent.extra["partial_spans"] = chosen


def _replay_mode(eng, parent, ids: list[int], repeat: list[int], eos: set[int], detok,
                 mode: str) -> None:
    """The replay a ``replay:...`` score group runs on its parked ``parent``."""
    lane = _lanes(mode)
    if lane is None:
        _replay(eng, parent, ids, repeat, eos, detok, _chunk(mode), _group(mode))
    else:
        _replay_lanes(eng, parent, ids, repeat, eos, detok, _chunk(mode), lane)


def _replay(eng, parent, ids: list[int], repeat: list[int], eos: set[int], detok,
            chunk: int = REPLAY_CHUNK, group: int | None = None) -> None:
    """KVzip's replay on a parked ``parent`` that holds ``ids``: the repeat prompt and ``ids``
    again are read with every query scored (the parent's spec accumulates all queries); its
    scores then hold, per cached row, the attention of the replay. The branches that continue
    with ``ids`` forget the replay's positions (continue_request truncates) and evict by those
    scores. A replay that would pass the model's context is cut to its start; it runs in
    steps of ``chunk`` queries (the policy's ``replay_chunk``); ``group``: a row's score is the
    largest sum over an aligned group of that many queries, computed beside the step (KVzip's
    ``replay_group``; None: the step's own sums)."""
    eng.set_spec(parent, make_spec(_parent_config("all")))  # every replay query scored
    # only the replay's queries count, each step's at most (KVzip: the max over the queries)
    parent.extra["scores"] = SequenceScores(eng.runner.num_layers, eng.runner.num_kv_heads,
                                            reduce="max")
    parent.extra["max_chunk"] = chunk
    if group is not None:
        parent.extra["query_group"] = group
    eng.continue_request(parent, ids + replay_ids(ids, repeat, eng.context_length),
                         GenerationConfig(max_new_tokens=1), eos, detok)
    _drain(eng)
    parent.extra.pop("max_chunk")
    parent.extra.pop("query_group", None)


def _replay_lanes(eng, parent, ids: list[int], repeat: list[int], eos: set[int], detok,
                  chunk: int, lane: int) -> None:
    """KVzip's replay in lanes (a tuning candidate): the context is cut into pieces of
    ``lane`` tokens, and each piece is replayed on its own branch of the parked ``parent``
    (the repeat prompt, then the piece), all branches in the same engine steps, each in steps
    of ``chunk`` queries; a row's score is the largest any lane's step gave it. As KVzip's
    chunked scoring for long contexts: a lane sees the whole context but not the other lanes'
    replays. One step then holds ``lanes x chunk`` queries (the cost of a large replay step)
    while each query's attention is summed over ``chunk`` queries only."""
    pieces = [ids[start:start + lane] for start in range(0, len(ids), lane)]
    scores = _run_lanes(eng, parent, ids, repeat, pieces, eos, detok, chunk)
    parent.extra["scores"] = _scores_of(scores)


def _run_lanes(eng, parent, ids: list[int], repeat: list[int], pieces: list[list[int]],
               eos: set[int], detok, chunk: int) -> np.ndarray:
    """KVzip's lanes: each of ``pieces`` is replayed on its own branch of the parked
    ``parent`` (which holds ``ids``): the repeat prompt, then the piece (cut to the model's
    context), every query scored in steps of ``chunk``, all branches in the same engine
    steps. Returns f32 [L, H, len(ids)]: per row the largest score any lane gave it (the
    branches are gone afterwards; the parent is left with the all-queries spec)."""
    heads, layers = eng.runner.num_kv_heads, eng.runner.num_layers
    eng.set_spec(parent, make_spec(_parent_config("all")))
    room = max(0, eng.context_length - len(ids) - len(repeat) - 1)
    branches = []
    for piece in pieces:
        b = eng.continue_request(parent, ids + list(repeat) + piece[:room],
                                 GenerationConfig(max_new_tokens=1), eos, detok, branch=True,
                                 keep_cache=False)
        b.extra["scores"] = SequenceScores(layers, heads, reduce="max")
        b.extra["max_chunk"] = chunk
        branches.append(b)
    _drain(eng)
    rows = len(ids)
    out = np.stack([np.stack([np.max([b.extra["scores"].aligned(layer, h, rows)[:rows]
                                      for b in branches], axis=0) for h in range(heads)])
                    for layer in range(layers)]).astype(np.float32)
    for b in branches:
        eng.sequences.pop(b.seq_id, None)
    return out


def _drain(eng) -> None:
    """Step the engine until nothing runs or waits (parked sessions stay)."""
    while eng.has_unfinished():
        eng.step()


def _run_alone(eng, ids: list[int], g: GenerationConfig, keys: list, specs: dict,
               eos: set[int], detok, forced: list[int] | None = None) -> dict:
    """One request per key with its own spec from the first token (batched together)."""
    seqs = {}
    for k in keys:
        seq = eng.add_request(ids, g, eos, detok)
        if forced is not None:
            seq.extra["forced"] = forced
        eng.set_spec(seq, specs[k])
        seqs[k] = seq
    _drain(eng)
    for seq in seqs.values():
        eng.sequences.pop(seq.seq_id, None)
    return seqs


def _replay_then_branch(eng, ids: list[int], g: GenerationConfig, keys: list, specs: dict,
                        eos: set[int], detok, forced: list[int] | None,
                        repeat: list[int] | None, mode: str) -> dict:
    """KVzip's group: one parent reads and replays the whole prompt; each key's branch runs
    the prompt's last token again and evicts by the replay's scores, as a request replaying
    itself does (engine/replay.py, phase 3)."""
    parent = eng.add_request(ids, GenerationConfig(max_new_tokens=1), eos, detok,
                             keep_cache=True)
    eng.set_spec(parent, _parent_spec(mode, keys, specs))
    _drain(eng)
    _replay_mode(eng, parent, ids, repeat, eos, detok, mode)
    children = {}
    for k in keys:
        child = eng.continue_request(parent, ids, g, eos, detok, branch=True, keep_cache=False,
                                     recompute=recompute_len(specs[k], len(ids)))
        eng.set_spec(child, specs[k])
        child.extra["replay"] = ReplayState(list(ids), done=True)
        if forced is not None:
            child.extra["forced"] = forced
        children[k] = child
    eng.release(parent)
    _drain(eng)
    for seq in children.values():
        eng.sequences.pop(seq.seq_id, None)
    return children


def _prefill_and_fork(eng, ids: list[int], g: GenerationConfig, mode: str, keys: list,
                      specs: dict, eos: set[int], detok, forced: list[int] | None = None,
                      repeat: list[int] | None = None):
    """One parent per score mode, prefilled once and forked per key; runs all to the end
    (mode ``own``: no parent, :func:`_run_alone`)."""
    if mode == "own":
        return None, _run_alone(eng, ids, g, keys, specs, eos, detok, forced)
    if _replays(mode):
        return None, _replay_then_branch(eng, ids, g, keys, specs, eos, detok, forced, repeat,
                                         mode)
    parent = eng.add_request(ids, g, eos, detok)
    if forced is not None:
        parent.extra["forced"] = forced
    eng.set_spec(parent, _parent_spec(mode, keys, specs))
    while parent.num_computed < len(ids) and not parent.is_finished:
        eng.step()
    children = {}
    for k in keys:  # a finished parent's only token came from the full cache, like theirs
        children[k] = parent if parent.is_finished else eng.fork(parent, eviction=specs[k])
    _drain(eng)
    for seq in (parent, *children.values()):
        eng.sequences.pop(seq.seq_id, None)
    return parent, children


def context_and_question(tok, s: Sample, wrap: Callable[[str], str]) -> tuple[list[int],
                                                                               list[int]]:
    """The query-agnostic protocol's two parts of a sample's prompt as ids: the templated
    prompt up to the question (ruler.question_start), then the question, the template's end
    and the answer prefix."""
    text = s.prompt(wrap)
    cut = text.index(s.input) + question_start(s.task, s.input)
    return encode_text(tok, text[:cut]), encode_text(tok, text[cut:])


def compress_then_ask(eng, ctx: list[int], asks: list[list[int]], g: GenerationConfig,
                       mode: str, keys: list, specs: dict, eos: set[int], detok,
                       need_full: bool, repeat: list[int]):
    """Query-agnostic: the context alone is prefilled, once per score mode (a parent kept as
    a parked session); every key's branch evicts the context with its own policy at once, then
    reads its question and answers with nothing more evicted; each question of ``asks`` (the
    ids after the context: question, template end, answer prefix) gets its own branches, all on
    the same compressed context. Mode ``own``: each key reads the context with its own spec
    (prefill eviction) first, its questions branch from there; mode ``replay``: the parent
    replays the context (KVzip, ``repeat`` the repeat prompt's ids) before the branches
    evict. Returns (the full cache's branches or None, {key: branches}), one per question."""
    first = GenerationConfig(max_new_tokens=1)
    out: dict = {}
    full = None
    parents = []
    if mode == "own":
        for k in keys:
            seq = eng.add_request(ctx, first, eos, detok, keep_cache=True)
            eng.set_spec(seq, specs[k])
            parents.append(seq)
        _drain(eng)
        for k, seq in zip(keys, parents, strict=True):
            out[k] = [eng.continue_request(seq, ctx + q, g, eos, detok, branch=True,
                                           keep_cache=False, evict_turn=False) for q in asks]
    else:
        parent = eng.add_request(ctx, first, eos, detok, keep_cache=True)
        eng.set_spec(parent, _parent_spec(mode, keys, specs))
        _drain(eng)
        parents.append(parent)
        if _replays(mode):
            _replay_mode(eng, parent, ctx, repeat, eos, detok, mode)
        mixed = None  # (replay, predictions) [L, H, N] of a LAYER_REPLAY group
        if mode.startswith("surrogate:layers"):
            pred = _score_array(eng, parent, len(ctx))
            _replay(eng, parent, ctx, repeat, eos, detok)
            mixed = (_score_array(eng, parent, len(ctx)), pred)
        if mode.startswith("surrogate:partial:"):
            cfg = mode.split(":")[2].split(",")
            _replay_partial(eng, parent, ctx, repeat, eos, detok,
                            (float(cfg[0]), int(cfg[1]), int(cfg[2]), *cfg[3:]))
        if need_full:
            full = [eng.continue_request(parent, ctx + q, g, eos, detok, branch=True,
                                         keep_cache=False) for q in asks]
        for k in keys:
            if mixed is not None:  # each branch copies its parent's scores
                parent.extra["scores"] = _mixed_scores(
                    *mixed, replay_layers(LAYER_REPLAY[k[0]], eng.runner.num_layers))
            out[k] = [eng.continue_request(parent, ctx + q, g, eos, detok, branch=True,
                                           keep_cache=False, eviction=specs[k],
                                           evict_turn=False) for q in asks]
    for p in parents:
        eng.release(p)
    _drain(eng)
    for seq in [*(full or []), *(x for branches in out.values() for x in branches)]:
        eng.sequences.pop(seq.seq_id, None)
    return full, out


def _turn_asks(tok, s: Sample, wrap: Callable[[str], str]) -> tuple[list[list[int]], list[str]]:
    """The multi-question mode's asks for a niah_multiquery sample (ruler.question_turns): the
    ids after the context of each one-key question, and each one's value."""
    text = s.prompt(wrap)
    end = text.index(s.input) + len(s.input)
    template_end = text[end:len(text) - len(s.answer_prefix)]
    turns = question_turns(s)
    return ([encode_text(tok, q + template_end + prefix) for q, prefix, _ in turns],
            [v for _, _, v in turns])


def _turns_record(s: Sample, key: tuple, branches: list, values: list[str],
                  n: int) -> Record:
    """The multi-question mode's record: one question per key of the sample, each answered on
    the same compressed context; the score is the share of values found."""
    texts = [b.sampler.output_text() for b in branches]
    got = [score(s.task, t, [v]) for t, v in zip(texts, values, strict=True)]
    return Record(s.task + TURNS, s.index, s.seed, key[0], key[1], " | ".join(texts),
                  sum(got) / len(got), list(values), n,
                  int(max(b.extra.get("kv_bytes", 0) for b in branches)))


def run_native(pipe: Pipeline, samples: list[Sample], methods: list[Method],
               budgets: Iterable[float], results: Results, wrap: Callable[[str], str],
               say: Callable[[str], None] = print, protocol: str = "query-aware",
               multi_question: bool = False) -> None:
    """Prefill once per sample and score mode, fork per (method, budget). ``protocol``
    "query-agnostic": the context is prefilled and compressed before the question is appended
    (:func:`compress_then_ask`); with ``multi_question`` a niah_multiquery sample's keys are
    also asked one per question on the same compressed context (records of task
    ``niah_multiquery-turns``)."""
    eng = pipe.backend.engine
    tok = pipe.tokenizer

    def detok(ids: list[int]) -> str:
        return tok.decode(ids) if ids else ""

    eos = pipe.backend.eos_token_ids
    repeat = encode_text(tok, REPEAT_PROMPT)
    specs = {(m.name, b): method_spec(m, b, pipe.model_path) for m in methods for b in budgets}
    groups = score_groups(specs)
    groups.setdefault("window", [])  # its parent is the full cache (also with no method)
    for i, s in enumerate(samples):
        todo = {k for k in specs if (s.task, s.index, *k) not in results.done}
        need_full = (s.task, s.index, FULL, None) not in results.done
        if not todo and not need_full:
            continue
        t0 = time.perf_counter()
        g = GenerationConfig(max_new_tokens=s.max_new_tokens)
        turns = multi_question and s.task in TURN_TASKS
        if protocol == "query-agnostic":
            ctx, question = context_and_question(tok, s, wrap)
            ids = ctx + question
            asks, values = _turn_asks(tok, s, wrap) if turns else ([], [])
        else:
            ids = encode_text(tok, s.prompt(wrap))
        for mode, keys in groups.items():
            keys = [k for k in keys if k in todo]
            if not keys and not (mode == "window" and need_full):
                continue
            if protocol == "query-agnostic":
                full, branches = compress_then_ask(eng, ctx, [question, *asks], g, mode, keys,
                                                    specs, eos, detok,
                                                    mode == "window" and need_full, repeat)
                parent = None if full is None else full[0]
                children = {k: b[0] for k, b in branches.items()}
                for k, b in [*branches.items(), *([((FULL, None), full)] if full else [])]:
                    if asks and (s.task + TURNS, s.index, *k) not in results.done:
                        results.add(_turns_record(s, k, b[1:], values, len(ids)))
            else:
                parent, children = _prefill_and_fork(eng, ids, g, mode, keys, specs, eos,
                                                     detok, repeat=repeat)
            for k, child in children.items():
                results.add(_record(s, k[0], k[1], child.sampler.output_text(), len(ids),
                                    child.extra.get("kv_bytes", 0)))
            if mode == "window" and need_full:
                results.add(_record(s, FULL, None, parent.sampler.output_text(), len(ids),
                                    parent.extra.get("kv_bytes", 0)))
        say(f"[native {i + 1}/{len(samples)}] {s.task} #{s.index}: "
            f"{time.perf_counter() - t0:.1f} s")


@dataclass
class Fidelity:
    """Teacher-forced over the reference answer: mean KL(full || method) of the next-token
    distributions and the share of positions whose argmax agrees with the full cache's."""

    task: str
    index: int
    method: str
    budget: float
    kl: float
    top1: float
    positions: int

    @property
    def key(self) -> tuple:
        return (self.task, self.index, self.method, self.budget)


def kl_top1(full: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """Mean KL(full || other) and top-1 agreement over positions (log-prob rows [V])."""
    kls, agree = [], []
    for lf, lo in zip(full, other, strict=True):
        pf = np.exp(lf.astype(np.float64))
        kls.append(float(np.sum(pf * (lf - lo))))
        agree.append(int(np.argmax(lf)) == int(np.argmax(lo)))
    return float(np.mean(kls)), float(np.mean(agree))


def run_fidelity(pipe: Pipeline, samples: list[Sample], methods: list[Method],
                 budgets: Iterable[float], fid: dict[tuple, Fidelity], path: Path,
                 wrap: Callable[[str], str], max_forced: int = 32,
                 say: Callable[[str], None] = print) -> None:
    """Like :func:`run_native`, but every sequence is teacher-forced over the reference answer
    (``" " + ", ".join(outputs)``, at most ``max_forced`` tokens) and its next-token
    distributions are compared with the parent's (the full cache)."""
    eng = pipe.backend.engine
    tok = pipe.tokenizer
    eos = pipe.backend.eos_token_ids
    specs = {(m.name, b): method_spec(m, b, pipe.model_path) for m in methods for b in budgets}
    for i, s in enumerate(samples):
        todo = {k for k in specs if (s.task, s.index, *k) not in fid}
        if not todo:
            continue
        ids = encode_text(tok, s.prompt(wrap))
        reference = " " + ", ".join(s.outputs)
        forced = encode_text(tok, reference)[:max_forced] or [int(next(iter(eos)))]
        g = GenerationConfig(max_new_tokens=len(forced), ignore_eos=True)
        full = None
        groups = score_groups(specs)
        # "own" and "replay" last: they have no parent that continues with the full cache
        for mode in sorted(groups, key=lambda m: m == "own" or _replays(m)):
            keys = [k for k in groups[mode] if k in todo]
            if not keys:
                continue
            if (mode == "own" or _replays(mode)) and full is None:  # the full cache's logprobs
                full = _prefill_and_fork(eng, ids, g, "window", [], specs, eos, lambda x: "",
                                         forced)[0].extra["logprobs"]
            parent, children = _prefill_and_fork(eng, ids, g, mode, keys, specs, eos,
                                                 lambda x: "", forced,
                                                 encode_text(tok, REPEAT_PROMPT))
            if parent is not None:
                full = parent.extra["logprobs"]
            for k, child in children.items():
                kl, top1 = kl_top1(full, child.extra["logprobs"])
                rec = Fidelity(s.task, s.index, k[0], k[1], kl, top1, len(full))
                fid[rec.key] = rec
                with path.open("a") as fh:
                    fh.write(json.dumps(asdict(rec)) + "\n")
        say(f"[fidelity {i + 1}/{len(samples)}] {s.task} #{s.index}")


def load_fidelity(path: Path) -> dict[tuple, Fidelity]:
    out: dict[tuple, Fidelity] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = Fidelity(**json.loads(line))
                out[r.key] = r
    return out


def summarize_fidelity(fid: dict[tuple, Fidelity], budgets: Iterable[float]) -> str:
    lines = ["| method | budget | KL(full || method) | top-1 agreement | samples |",
             "|---|---|---|---|---|"]
    for b in budgets:
        for m in METHODS:
            rs = [r for r in fid.values() if r.method == m and r.budget == b]
            if rs:
                lines.append(f"| {m} | {b} | {statistics.fmean(r.kl for r in rs):.4f} | "
                             f"{100 * statistics.fmean(r.top1 for r in rs):.1f}% | {len(rs)} |")
    return "\n".join(lines)


def run_genai(model: str, samples: list[Sample], method: Method, budget: float,
              results: Results, wrap: Callable[[str], str], kv_cache: KVCacheConfig,
              say: Callable[[str], None] = print,
              scheduler: SchedulerConfig | None = None) -> None:
    """The samples of each task in one batch on GenAI's pipeline (its eviction is per
    sequence; batching only shares the decode steps). ``kv_bytes`` of these records is GenAI's
    configured budget (``kv_budget_tokens`` in whole blocks): its cache metrics are pool-wide,
    so a batch has no per-request figure."""
    todo = [s for s in samples if (s.task, s.index, method.name, budget) not in results.done]
    if not todo:
        return
    pipe = Pipeline(model, kv_cache=kv_cache, eviction=method.make(budget), backend="genai",
                    scheduler=scheduler or SchedulerConfig())
    backend = pipe.backend
    per_token = backend.block_bytes / backend.block_size
    by_task: dict[str, list[Sample]] = {}
    for s in todo:
        by_task.setdefault(s.task, []).append(s)
    done = 0
    for task, group in by_task.items():
        t0 = time.perf_counter()
        ids = [np.asarray([encode_text(pipe.tokenizer, s.prompt(wrap))], dtype=np.int64)
               for s in group]
        out = backend.run(ids, GenerationConfig(max_new_tokens=group[0].max_new_tokens), None)
        for s, x, text, m in zip(group, ids, out.texts, out.metrics, strict=True):
            budget_bytes = (m.kv_budget_tokens or 0) * per_token
            results.add(_record(s, method.name, budget, text, x.shape[1], int(budget_bytes)))
        done += len(group)
        say(f"[genai {done}/{len(todo)}] {method.name} @ {budget}: {task} ({len(group)} "
            f"samples in one batch) {time.perf_counter() - t0:.1f} s")


def build_samples(pipe: Pipeline, tasks: Iterable[str], num_samples: int, seed: int,
                  max_seq_length: int) -> list[Sample]:
    tok = pipe.tokenizer
    wrap = chat_wrap(tok)
    return [s for t in tasks for s in build_task(
        t, num_samples, lambda text: len(encode_text(tok, text)),
        max_seq_length=max_seq_length,
        seed=seed, wrap=wrap)]


def task_means(results: Results) -> dict[tuple[str, str, float | None], float]:
    """Mean score x 100 per (task, method, budget), in one pass over the records."""
    groups: dict[tuple[str, str, float | None], list[float]] = {}
    for r in results.done.values():
        groups.setdefault((r.task, r.method, r.budget), []).append(r.score)
    return {k: 100 * statistics.fmean(v) for k, v in groups.items()}


def scored_tasks(means: dict, min_full: float) -> tuple[list[str], list[str]]:
    """(tasks present, in RULER's order; those where the full cache scores >= min_full)."""
    order = [x for t in TASKS for x in ((t, t + TURNS) if t in TURN_TASKS else (t,))]
    tasks = [t for t in order if any(k[0] == t for k in means)]
    return tasks, [t for t in tasks if means.get((t, FULL, None), 0.0) >= min_full]


def _average(means: dict, tasks: list[str], m: str, b: float | None) -> float | None:
    vals = [means.get((t, m, b)) for t in tasks]
    return statistics.fmean(vals) if tasks and None not in vals else None


def summarize(results: Results, budgets: Iterable[float], min_full: float = 10.0) -> str:
    """Markdown: mean score x 100 per task and method / budget, and the average over the tasks
    where the full cache scores at least ``min_full``."""
    means = task_means(results)
    tasks, good = scored_tasks(means, min_full)
    cols = [(FULL, None)] + [(m, b) for b in budgets for m in METHODS
                             if any(k[1:] == (m, b) for k in means)]
    head = " | ".join(tasks)
    lines = [f"| method | budget | {head} | avg ({len(good)} tasks) | % of full |",
             "|---|---|" + "---|" * (len(tasks) + 2)]
    full_avg = _average(means, good, FULL, None)
    for m, b in cols:
        cells = [means.get((t, m, b)) for t in tasks]
        avg = _average(means, good, m, b)
        rel = f"{100 * avg / full_avg:.1f}" if avg is not None and full_avg else "-"
        lines.append(f"| {m} | {'-' if b is None else b} | "
                     + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                     + f" | {'-' if avg is None else f'{avg:.1f}'} | {rel} |")
    return "\n".join(lines)


def check_eval_args(tasks: tuple, methods: tuple, budgets: tuple, num_samples: object,
                    max_seq_length: object, seed: object,
                    protocol: object = "query-aware") -> None:
    """Raise ConfigError naming the first invalid argument of :func:`run_eval`."""
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", protocol, f"one of {', '.join(PROTOCOLS)}")
    for field, values, allowed in (("tasks", tasks, TASKS),
                                   ("methods", methods, (FULL, *METHODS))):
        if not values:
            raise ConfigError(field, values, f"at least one of {', '.join(allowed)}")
        for v in values:
            if v not in allowed:
                raise ConfigError(field, v, f"one of {', '.join(allowed)}")
    if not budgets:
        raise ConfigError("budgets", budgets, "at least one fraction of the prompt in (0, 1)")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
            raise ConfigError("budgets", b, "fractions of the prompt in (0, 1)")
    for field, v, low in (("num_samples", num_samples, 1), ("max_seq_length", max_seq_length,
                                                            512), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(field, v, f"an integer >= {low}")
    if protocol == "query-agnostic":
        for m in methods:
            if m != FULL and METHODS[m].backend != "native":
                raise ConfigError("methods", m, "native methods with protocol "
                                  "'query-agnostic' (GenAI's pipeline cannot compress a context "
                                  "before its question)")


def run_eval(model: str, out_dir: str | Path, tasks: Iterable[str] = TASKS,
             num_samples: int = 20, methods: Iterable[str] | None = None,
             budgets: Iterable[float] = DEFAULT_BUDGETS, seed: int = 42,
             max_seq_length: int = 4096, precision: str = "u8", cache_size: float = 4.0,
             fidelity: bool = True, fidelity_samples: int | None = None,
             command: str | None = None, max_num_batched_tokens: int = 256,
             say: Callable[[str], None] = print, protocol: str = "query-aware",
             multi_question: bool = False) -> str:
    """Run (or resume) the evaluation; returns the markdown summary (also in summary.md).
    ``methods=("full",)`` runs the full cache alone (e.g. to screen tasks cheaply);
    ``fidelity_samples``: the fidelity pass covers the first N samples of each task (None: all).
    ``max_num_batched_tokens``: both backends' prefill chunk (GenAI's default 256; larger chunks
    prefill faster on CPU, and every column of a sample still shares one prefill).
    ``protocol``: "query-aware" (the question ends the prompt before anything is evicted) or
    "query-agnostic" (the context is compressed first, then the question is asked; no fidelity
    pass, native methods only). ``multi_question`` (query-agnostic only): niah_multiquery's
    keys are also asked one per question on the same compressed context.

    Every argument is checked before a model is loaded (ConfigError naming it)."""
    tasks, budgets = tuple(tasks), tuple(budgets)
    names = tuple(methods) if methods is not None else REPORT_METHODS
    check_eval_args(tasks, names, budgets, num_samples, max_seq_length, seed, protocol)
    if multi_question and protocol != "query-agnostic":
        raise ConfigError("multi_question", True, "False unless protocol='query-agnostic' "
                          "(the questions are asked of one compressed context)")
    if fidelity_samples is not None and (isinstance(fidelity_samples, bool) or not isinstance(
            fidelity_samples, int) or fidelity_samples < 1):
        raise ConfigError("fidelity_samples", fidelity_samples, "None or an integer >= 1")
    chosen = [METHODS[m] for m in names if m != FULL]  # the full cache always runs
    # FastKV columns need the engine's split graphs (their parents prefill with FastKV)
    splits = {m.make(0.5).fastkv.split_layer for m in chosen
              if m.backend == "native" and m.make(0.5).fastkv is not None}
    if len(splits) > 1:
        raise ConfigError("methods", names, "FastKV columns with one split layer per run (the "
                          "engine's graphs are cut at one layer)")
    split = bool(splits)
    partial = [m.name for m in chosen if m.name in PARTIAL_REPLAY or m.name in LAYER_REPLAY]
    if partial and protocol != "query-agnostic":
        raise ConfigError("methods", partial, "with protocol='query-agnostic' (the partial "
                          "replay runs on the parked context)")
    # LESS columns need the engine's LESS graph (the other columns run it with no state)
    less = next((m.make(0.5).less for m in chosen
                 if m.backend == "native" and m.make(0.5).less is not None), None)
    if split and less is not None:
        raise ConfigError("methods", names, "LESS columns and FastKV columns in separate runs "
                          "(the engine cannot build both graphs at once)")
    kv = KVCacheConfig(precision=precision, cache_size=cache_size)
    sched = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens)
    check_kv_precision(check_device("CPU"), precision)
    hw = inference_settings("CPU", precision)
    out = Path(out_dir)
    check_same_inference(out / "run.json", hw)
    check_same_protocol(out / "run.json", protocol)
    out.mkdir(parents=True, exist_ok=True)
    # KVzap columns need the engine's graphs to predict their scores
    kvzap = any(m.backend == "native" and m.make(0.5).importance == "kvzap" for m in chosen)
    if split and kvzap:
        raise ConfigError("methods", names, "KVzap columns and FastKV columns in separate runs "
                          "(the engine cannot build both graphs at once)")
    pipe = Pipeline(model, kv_cache=kv, eviction=CacheEvictionConfig(
        fastkv=FastKVConfig(split_layer=next(iter(splits))) if split else None, less=less,
        importance="kvzap" if kvzap else "snapkv"), backend="native", scheduler=sched)
    samples = build_samples(pipe, tasks, num_samples, seed, max_seq_length)
    wrap = chat_wrap(pipe.tokenizer)
    results = Results(out / "results.jsonl")
    write_run_json(out / "run.json", {
        "model": model, "tasks": list(tasks), "num_samples": num_samples, "seed": seed,
        "budgets": list(budgets), "methods": [m.name for m in chosen],
        "max_seq_length": max_seq_length, "precision": precision,
        "max_num_batched_tokens": max_num_batched_tokens, "protocol": protocol,
        "multi_question": multi_question,
        "prompt": "chat template around RULER's input, answer prefix after the assistant header"
                  + ("; the context compressed before the question is read"
                     if protocol == "query-agnostic" else ""),
        "command": command, **hw,
    })
    native = [m for m in chosen if m.backend == "native"]
    run_native(pipe, samples, native, budgets, results, wrap, say, protocol, multi_question)
    fid: dict[tuple, Fidelity] = {}
    if fidelity and protocol == "query-aware":
        fid = load_fidelity(out / "fidelity.jsonl")
        limit = num_samples if fidelity_samples is None else fidelity_samples
        run_fidelity(pipe, [s for s in samples if s.index < limit], native, budgets, fid,
                     out / "fidelity.jsonl", wrap, say=say)
    del pipe
    for m in chosen:
        if m.backend == "genai":
            for b in budgets:
                run_genai(model, samples, m, b, results, wrap, kv, say, sched)
    summary = summarize(results, budgets)
    if fid:
        summary += ("\n\nFidelity (native methods, teacher-forced over the reference answer, "
                    "all tasks):\n\n" + summarize_fidelity(fid, budgets))
    (out / "summary.md").write_text(summary + "\n")
    curves, full = method_curves(results, budgets)
    write_svg(out / "plot.svg", {Path(str(model)).name: (curves, full)})
    return summary


def check_same_inference(path: Path, hw: dict[str, str]) -> None:
    """Refuse to add results to a folder whose earlier run used another inference precision
    (e.g. bf16 on an AVX512-BF16 CPU, now f32 on one without BF16): its columns would not be
    comparable. Folders from before this was recorded are accepted."""
    if not path.exists():
        return
    old = json.loads(path.read_text()).get("inference_precision")
    if old is not None and old != hw["inference_precision"]:
        raise ConfigError("out", str(path.parent),
                          f"a new folder: this one holds results of {old} inference, this "
                          f"machine runs {hw['inference_precision']} ({hw['device_name']}); "
                          "mixed columns would not be comparable")


def check_same_protocol(path: Path, protocol: str) -> None:
    """Refuse to mix protocols in one folder (runs from before it was recorded were
    query-aware)."""
    if not path.exists():
        return
    old = json.loads(path.read_text()).get("protocol", "query-aware")
    if old != protocol:
        raise ConfigError("out", str(path.parent), f"a new folder: this one holds {old} "
                          f"results and this run is {protocol}")


def write_run_json(path: Path, run: dict) -> None:
    """Write ``run`` to ``path``; a run already there (a resume, or more methods added to the
    same folder) keeps its methods, budgets and commands: methods become the union (in METHODS
    order), budgets the union (largest first; e.g. one column run budget by budget with
    ``--budget``), ``num_samples`` the largest, ``commands`` lists every distinct command line,
    ``command`` stays the first."""
    if path.exists():
        old = json.loads(path.read_text())
        names = set(old.get("methods", [])) | set(run["methods"])
        run["methods"] = [m for m in METHODS if m in names]
        if "budgets" in old or "budgets" in run:
            run["budgets"] = sorted(set(old.get("budgets", [])) | set(run.get("budgets", [])),
                                    reverse=True)
        if "num_samples" in old or "num_samples" in run:
            run["num_samples"] = max(old.get("num_samples", 0), run.get("num_samples", 0))
        commands = old.get("commands") or [old.get("command")]
        if run.get("command") not in commands:
            commands.append(run.get("command"))
        run["commands"] = [c for c in commands if c]
        run["command"] = run["commands"][0] if run["commands"] else None
    path.write_text(json.dumps(run, indent=1))


def method_curves(results: Results, budgets: Iterable[float],
                  min_full: float = 10.0) -> tuple[dict[str, dict[float, float]], float | None]:
    """Per method, budget -> average score x 100 over the tasks where the full cache scores at
    least ``min_full`` (the summary's avg column); and the full cache's own average."""
    means = task_means(results)
    _, good = scored_tasks(means, min_full)
    curves: dict[str, dict[float, float]] = {}
    for m in METHODS:
        for b in budgets:
            avg = _average(means, good, m, b)
            if avg is not None:
                curves.setdefault(m, {})[b] = avg
    return curves, _average(means, good, FULL, None)
