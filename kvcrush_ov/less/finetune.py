"""End-to-end tuning of a model's LESS kernels (``kvcrush-ov less-train --finetune STEPS``).

The per-layer stage (:mod:`kvcrush_ov.less.train`) fits each layer's kernels to that layer's own
attention output, with the full model's inputs. At inference every layer's input already carries
the earlier layers' LESS error, and what the user sees is the next-token distribution: on the
tuning runs the per-layer weights recovered 39% of the per-layer MSE gap yet made the KL to the
full cache worse (docs/less.md). This stage tunes every layer's kernels at once on that target:

* the data and the eviction are the per-layer stage's (:func:`~kvcrush_ov.less.train.build_data`,
  :func:`~kvcrush_ov.less.train.snapkv_evicted`): a prefix of ``p`` tokens is the prompt, evicted
  per layer and KV head at one of ``budgets`` (sequence ``i`` gets ``budgets[i % len]``);
* the prefix runs once through the frozen model with full attention (the engine's prefill is
  exact), which gives each layer's kept and evicted keys / values and the teacher: the full
  model's next-token log-probabilities at the :data:`QUERIES` positions after the prefix;
* a training step runs those positions through the model again, each layer attending to its
  kept prefix, the positions up to itself and the LESS state of its evicted prefix
  (:func:`~kvcrush_ov.less.train.less_attention`, the engine's mixing), and minimises
  ``KL(full || LESS)`` averaged over the positions, with gradients into every layer's kernels;
* the parameters with the lowest validation KL (the starting ones included) are saved, with
  ``meta["finetune"]`` (budgets, steps, KL without LESS, before and after).

A layer the per-layer stage switched off (``k_s1 = 0``) stays off: ``|s1|`` has no gradient at 0.
torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcrush_ov.errors import ConfigError
from kvcrush_ov.less.kernels import ARRAYS, LESSWeights, default_weights_path
from kvcrush_ov.less.train import (
    QUERIES,
    _say,
    attention_modules,
    build_data,
    engine_spec,
    less_attention,
    phi,
    psi,
    resolve_model,
    snapkv_evicted,
)

ATTN = "kvcrush_less_finetune"  # the attention implementation registered with transformers
FORMAT_VERSION = 1  # meta["finetune"]["version"]


@dataclass
class FinetuneConfig:
    """What the end-to-end stage tunes; :meth:`check` names the flag of a bad value.

    budgets: the engine's total budgets simulated (fractions of the prefix, as
    ``CacheEvictionConfig.max_cache_size``); sequences: training sequences (validation gets
    ``max(4, sequences // 4)`` more, from validation documents); steps: Adam steps of ``batch``
    sequences; weights: the file read and rewritten (default: the model's default file, which
    the per-layer stage must have finished).
    """

    model: str
    budgets: tuple[float, ...] = (0.125, 0.0625)
    seq_len: int = 4096
    sequences: int = 32
    steps: int = 100
    lr: float = 1e-4
    batch: int = 4
    seed: int = 0
    weights: str | Path | None = None
    eval_every: int = 10
    retrieval: float = 0.5  # share of query-aware retrieval examples (retrieval_examples)
    max_layers: int | None = None  # keep LESS in at most this many layers (the most useful)

    @property
    def val_sequences(self) -> int:
        return max(4, self.sequences // 4)

    def check(self) -> None:
        for name, value, low in (("--finetune", self.steps, 1),
                                 ("--finetune-sequences", self.sequences, 1),
                                 ("batch", self.batch, 1), ("--seed", self.seed, 0),
                                 ("eval_every", self.eval_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(name, value, f"an integer >= {low}")
        if (not isinstance(self.budgets, tuple) or not self.budgets
                or any(isinstance(b, bool) or not isinstance(b, float) or not 0.0 < b < 1.0
                       for b in self.budgets)):
            raise ConfigError("--budget", self.budgets, "fractions of the prefix in (0, 1)")
        if self.max_layers is not None and (isinstance(self.max_layers, bool) or not isinstance(
                self.max_layers, int) or self.max_layers < 1):
            raise ConfigError("--finetune-layers", self.max_layers, "None or an integer >= 1")
        r = self.retrieval
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ConfigError("--finetune-retrieval", r, "a share in [0, 1]")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ConfigError("lr", self.lr, "a learning rate in (0, 1)")


@dataclass
class Example:
    """One sequence: the ``QUERIES`` token ids after the prefix of ``p`` tokens, per layer the
    kept / evicted prefix keys and values ``[Hkv, K | E, D]`` (bfloat16), and the teacher's
    log-probabilities ``[QUERIES, vocab]`` (float32)."""

    ids: object
    p: int
    kept: list[tuple]
    evicted: list[tuple]
    teacher: object


class _Attention:
    """The attention function registered as :data:`ATTN` (HF calls it with ``query``
    [1, Hq, n, D], ``key`` / ``value`` [1, Hkv, n, D], post-RoPE): ``capture`` runs full causal
    attention over the whole sequence and records the layer's kept / evicted prefix; ``less``
    (and ``kept``, the same without the state) attends the positions after the prefix to the
    recorded kept prefix, to each other (causal) and to the state."""

    def __init__(self) -> None:
        self.mode = "capture"
        self.spec = None
        self.p = 0
        self.kept: list[tuple] = []
        self.evicted: list[tuple] = []
        self.params: list[dict] | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0,
                 **kwargs):
        import torch

        i = int(module.layer_idx)
        if self.mode == "capture":
            q, k, v = query[0].float(), key[0].float(), value[0].float()
            gone = snapkv_evicted(q, k, self.p, self.spec, float(scaling))  # [Hkv, E]
            keep = torch.ones(k.shape[0], self.p, dtype=torch.bool)
            keep.scatter_(1, gone, False)
            kept_idx = torch.stack([row.nonzero()[:, 0] for row in keep])  # same K per head
            bf = torch.bfloat16

            def take(x, idx):
                return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1])).to(bf)

            self.kept.append((take(k, kept_idx), take(v, kept_idx)))
            self.evicted.append((take(k, gone), take(v, gone)))
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2), None
        kk, kv = (x.float() for x in self.kept[i])
        q = query[0]  # [Hq, m, D]
        hq, m, d = q.shape
        hkv = kk.shape[0]
        g = hq // hkv
        keys = torch.cat([kk, key[0]], 1)
        vals = torch.cat([kv, value[0]], 1)
        s = (q.reshape(hkv, g * m, d) @ keys.transpose(1, 2)) * scaling
        s = s.view(hkv, g, m, -1)
        tri = torch.ones(m, m, dtype=torch.bool).triu_(1)
        s = torch.cat([s[..., :kk.shape[1]], s[..., kk.shape[1]:].masked_fill(tri, -math.inf)],
                      -1)
        lse = torch.logsumexp(s, -1)  # [Hkv, G, m]
        o = (torch.softmax(s, -1).view(hkv, g * m, -1) @ vals).view(hq, m, -1)
        lse = lse.reshape(hq, m)
        if self.mode == "less" and self.params is not None and self.evicted[i][0].shape[1]:
            ek, ev = (x.float() for x in self.evicted[i])
            ps = psi(self.params[i], ek)  # [Hkv, E, F]
            o = less_attention(o, lse, phi(self.params[i], q), ps.transpose(1, 2) @ ev,
                               ps.sum(1))
        return o.transpose(0, 1)[None], None


def _register(attn: _Attention) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN, attn)


def capture(model, attn: _Attention, ids: np.ndarray, p: int, budget: float) -> Example:
    """Run ``ids`` (a prompt of ``p`` tokens, then at most :data:`QUERIES` more) once with full
    attention; record what training needs."""
    import torch

    n = len(ids)
    if not 0 < n - p <= QUERIES:
        raise ValueError(f"capture: {n - p} tokens after the prompt, not 1..{QUERIES}")
    attn.mode, attn.spec, attn.p, attn.kept, attn.evicted = "capture", engine_spec(budget), p, \
        [], []
    x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))[None]
    with torch.no_grad():
        logits = model(input_ids=x, logits_to_keep=n - p).logits[0].float()
    teacher = torch.log_softmax(logits, -1)
    return Example(x[0, p:n].clone(), p, attn.kept, attn.evicted, teacher)


def kl(model, attn: _Attention, ex: Example, mode: str = "less"):
    """Mean over the positions of ``KL(full || model)`` of one example, the positions attending
    to the kept prefix (and, with ``mode='less'``, the state)."""
    import torch

    attn.mode, attn.kept, attn.evicted = mode, ex.kept, ex.evicted
    pos = torch.arange(ex.p, ex.p + len(ex.ids))[None]
    logits = model(input_ids=ex.ids[None], position_ids=pos).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    t = ex.teacher.float()
    return (t.exp() * (t - logp)).sum(-1).mean()


def _mean_kl(model, attn: _Attention, exs: list[Example], mode: str = "less") -> float:
    import torch

    with torch.no_grad():
        return float(np.mean([float(kl(model, attn, ex, mode)) for ex in exs]))


RETRIEVE = ("{context}\n\nOne sentence of the text above begins with \"{cue}\". Repeat that "
            "whole sentence.")
CUE_WORDS = 6


def retrieval_examples(tokenizer, count: int, seq_len: int, seed: int, val: bool
                       ) -> list[tuple[np.ndarray, int]]:
    """``count`` query-aware examples ``(ids, p)`` of about ``seq_len`` tokens: a context of the
    training text (validation documents when ``val``; never a RULER sample) in the model's chat
    template, a request to repeat the sentence of the context that begins with a cue (its first
    :data:`CUE_WORDS` words), the assistant's answer starting with the cue; ``p`` ends the
    prompt there and the rest of the sentence (at most :data:`QUERIES` tokens) is what the
    model is trained on. The question is in the prompt before anything is evicted, as in
    RULER's prompts (SnapKV's window sees it), and the answer has to be copied from the
    context: the queries LESS must not blur."""

    from kvcrush_ov.less.train import SOURCES, _is_val, documents

    docs = documents()
    pool = [d for src in SOURCES for d in docs[src] if _is_val(d) == val]
    rng = np.random.default_rng([seed, 5 if val else 4])
    room = seq_len - QUERIES - 96  # the template, the question and the cue
    out: list[tuple[np.ndarray, int]] = []
    for _ in range(50 * count):  # a context without a usable sentence is drawn again
        if len(out) == count:
            break
        parts, chars = [], 0
        for j in rng.permutation(len(pool)):
            parts.append(pool[j])
            chars += len(pool[j])
            if chars > 6 * room:
                break
        toks = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"][:room]
        context = tokenizer.decode(toks)
        cut = len(context) // 10
        cands = [m for m in re.finditer(r"(?<=[.!?]\s)[A-Z][^.!?\n]{60,240}[.!?]", context)
                 if cut <= m.start() <= len(context) - cut]
        if not cands:
            continue
        words = cands[int(rng.integers(len(cands)))].group(0).split()
        cue, rest = " ".join(words[:CUE_WORDS]), " " + " ".join(words[CUE_WORDS:])
        ask = RETRIEVE.format(context=context, cue=cue)
        prompt = (tokenizer.apply_chat_template([{"role": "user", "content": ask}],
                                                add_generation_prompt=True, tokenize=False)
                  if tokenizer.chat_template else ask + "\n") + cue
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(rest, add_special_tokens=False)["input_ids"][:QUERIES]
        if len(head) + len(tail) > seq_len or len(tail) < 4:
            continue
        out.append((np.asarray(head + tail, np.int64), len(head)))
    if len(out) < count:
        raise ConfigError("--finetune-retrieval", count, f"a share the training text can fill: "
                          f"{len(out)} of {count} retrieval examples found in {50 * count} "
                          f"contexts of {seq_len} tokens")
    return out


def _rank_layers(score, params: list[dict], active: list[int]) -> list[int]:
    """``active`` layers by how much ``score()`` (validation KL) grows when that layer alone is
    switched off (``k_s1 = 0``), most useful first."""
    import torch

    cost = {}
    for i in active:
        s1 = params[i]["k_s1"].detach().clone()
        with torch.no_grad():
            params[i]["k_s1"].zero_()
        cost[i] = score()
        with torch.no_grad():
            params[i]["k_s1"].copy_(s1)
    return sorted(active, key=lambda i: -cost[i])


@dataclass
class FinetuneResult:
    """Validation KL(full || ...) per kind of example without LESS and with the saved weights,
    and the relative score (mean over kinds of KL / KL without LESS) before and after."""

    path: Path
    kl_noless: dict[str, float]
    kl_after: dict[str, float]
    relative_before: float
    relative_after: float
    best_step: int
    seconds: float


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Tune every layer's kernels of ``cfg.model`` end to end; see the module docstring."""
    cfg.check()
    name, hf = resolve_model(cfg.model)
    path = Path(cfg.weights).expanduser() if cfg.weights is not None else default_weights_path(
        hf if hf.name == "hf" else hf / "hf")
    if not path.is_file():
        raise ConfigError("--out", str(path), "an existing LESS weights file: run the "
                          "per-layer stage first (kvcrush-ov less-train)")
    weights = LESSWeights.load(path)
    if int(weights.meta.get("layers_trained", 0)) < weights.num_layers:
        raise ConfigError("--finetune", cfg.steps, f"a weights file whose every layer is "
                          f"trained ({path}: {weights.meta.get('layers_trained')} of "
                          f"{weights.num_layers}); finish the per-layer stage first")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(str(hf))
    sets: dict[str, list[tuple[np.ndarray, int, str]]] = {}
    for split, total in (("train", cfg.sequences), ("val", cfg.val_sequences)):
        n_ret = round(total * cfg.retrieval)
        rows = [(ids, p, "retrieve") for ids, p in retrieval_examples(
            tok, n_ret, cfg.seq_len, cfg.seed, split == "val")]
        sets[split] = rows
    n_cont = cfg.sequences - len(sets["train"])
    v_cont = cfg.val_sequences - len(sets["val"])
    if n_cont or v_cont:
        data = build_data(tok, cfg.seq_len, max(1, n_cont), max(1, v_cont), cfg.seed + 1)
        for split, arr, pre, want in (("train", data.train, data.train_prefix, n_cont),
                                      ("val", data.val, data.val_prefix, v_cont)):
            sets[split] += [(ids[:int(p) + QUERIES], int(p), "continue")
                            for ids, p in list(zip(arr, pre, strict=True))[:want]]
    h = hashlib.sha256()
    for split in ("train", "val"):
        for ids, p, _ in sets[split]:
            h.update(np.ascontiguousarray(ids, "<i8").tobytes() + p.to_bytes(4, "little"))
    data_hash = h.hexdigest()
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    weights.check_model(num_layers=len(attention_modules(model)),
                        num_heads=int(model.config.num_attention_heads),
                        num_kv_heads=int(model.config.num_key_value_heads),
                        head_dim=int(attention_modules(model)[0].head_dim), where=str(path))
    attn = _Attention()
    _register(attn)
    model.set_attn_implementation(ATTN)
    nb = len(cfg.budgets)
    train = [capture(model, attn, ids, p, cfg.budgets[i % nb])
             for i, (ids, p, _) in enumerate(sets["train"])]
    val = [capture(model, attn, ids, p, cfg.budgets[i % nb])
           for i, (ids, p, _) in enumerate(sets["val"])]
    kinds = {k: [ex for ex, (_, _, kk) in zip(val, sets["val"], strict=True) if kk == k]
             for k in ("continue", "retrieve")}
    kinds = {k: v for k, v in kinds.items() if v}
    _say(f"{name}: captured {len(train)} + {len(val)} sequences "
         f"({time.perf_counter() - t0:.0f} s)")

    params = [{n: torch.nn.Parameter(torch.from_numpy(weights.arrays[n][i].copy()))
               for n in ARRAYS} for i in range(weights.num_layers)]
    attn.params = params
    noless = {k: _mean_kl(model, attn, v, "kept") for k, v in kinds.items()}

    def by_kind() -> dict[str, float]:
        return {k: _mean_kl(model, attn, v) for k, v in kinds.items()}

    def score() -> float:
        """Validation KL relative to no LESS, averaged over the kinds of example (1.0: no gain;
        each kind counts the same however large its KL)."""
        return float(np.mean([kl_ / noless[k] for k, kl_ in by_kind().items()]))

    def fmt(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in d.items())

    before = score()
    _say(f"validation KL without LESS: {fmt(noless)}; with the starting weights: "
         f"{fmt(by_kind())} (relative {before:.4f})")
    active = [i for i in range(weights.num_layers) if bool(params[i]["k_s1"].any())]
    if cfg.max_layers is not None and len(active) > cfg.max_layers:
        keep = _rank_layers(score, params, active)[:cfg.max_layers]
        for i in set(active) - set(keep):
            with torch.no_grad():
                params[i]["k_s1"].zero_()
        active = sorted(keep)
        before = score()
        _say(f"kept LESS in layers {active}: {fmt(by_kind())} (relative {before:.4f})")
    best = before
    best_params = [{k: v.detach().clone() for k, v in d.items()} for d in params]
    best_step = 0
    opt = torch.optim.Adam([p for d in params for p in d.values()], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(len(train), generator=gen), 0
    for step in range(1, cfg.steps + 1):
        if pos + min(cfg.batch, len(train)) > len(train):
            order, pos = torch.randperm(len(train), generator=gen), 0
        idx = order[pos:pos + cfg.batch].tolist()
        pos += len(idx)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in idx:
            loss = kl(model, attn, train[j]) / len(idx)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_([p for d in params for p in d.values()], 1.0)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = score()
            if math.isfinite(v) and v < best:
                best, best_step = v, step
                best_params = [{k: x.detach().clone() for k, x in d.items()} for d in params]
            _say(f"step {step}/{cfg.steps}: train KL {total:.4f}, validation relative {v:.4f} "
                 f"(best {best:.4f} at step {best_step}) ({time.perf_counter() - t0:.0f} s)")
    for i, d in enumerate(best_params):
        for k, v in d.items():
            weights.arrays[k][i] = v.numpy()
    with torch.no_grad():
        for d, b in zip(params, best_params, strict=True):
            for k in d:
                d[k].copy_(b[k])
    after = by_kind()
    _say(f"best: relative {best:.4f} at step {best_step} ({fmt(after)})")
    seconds = time.perf_counter() - t0
    weights.meta["finetune"] = {
        "version": FORMAT_VERSION, "budgets": list(cfg.budgets), "seq_len": cfg.seq_len,
        "sequences": cfg.sequences, "val_sequences": cfg.val_sequences, "steps": cfg.steps,
        "lr": cfg.lr, "batch": cfg.batch, "seed": cfg.seed, "retrieval": cfg.retrieval,
        "max_layers": cfg.max_layers, "active_layers": active, "data_hash": data_hash,
        "kl_noless": noless, "kl_after": after, "relative_before": before,
        "relative_after": best, "best_step": best_step, "seconds": round(seconds, 1)}
    weights.save(path)
    return FinetuneResult(path, noless, after, before, best, best_step, seconds)
