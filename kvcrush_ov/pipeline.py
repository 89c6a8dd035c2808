"""``kvcrush_ov.Pipeline``: text generation with KVCrush KV-cache eviction.

>>> pipe = Pipeline("SmolLM2-135M-Instruct", eviction=CacheEvictionConfig(max_cache_size=0.25))
>>> out = pipe.generate("Summarise: ...", max_new_tokens=64)
>>> out.text, out.metrics[0].ttft_s, out.cache.final_kv_bytes
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvcrush_ov.backends.genai import GenAIBackend
from kvcrush_ov.cache_plan import (
    DEFAULT_CACHE_BYTES,
    check_cache_plan,
    check_request_size,
    prefill_eviction_hold,
)
from kvcrush_ov.chat import ChatState, conversation_ids
from kvcrush_ov.config import (
    BACKENDS,
    CacheEvictionConfig,
    GenerationConfig,
    KVCacheConfig,
    SchedulerConfig,
)
from kvcrush_ov.device import check_device, check_kv_precision
from kvcrush_ov.errors import ChatError, ConfigError, ModelError
from kvcrush_ov.model_info import ModelInfo, block_size_for, check_model_dir
from kvcrush_ov.results import DecodedResults

_DEFAULT = object()
_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}


def _as_allocated(kv_cache: KVCacheConfig, backend: str) -> KVCacheConfig:
    """The cache as the backend allocates it: GenAI takes whole GB."""
    if backend == "genai" and not kv_cache.num_kv_blocks and kv_cache.cache_size:
        return dataclasses.replace(kv_cache, cache_size=float(math.ceil(kv_cache.cache_size)))
    return kv_cache


def resolve_model(model: str | Path, fetch_missing: bool = True) -> Path:
    """A model folder for ``model``: an existing folder, or a registry name (fetched if needed)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    from kvcrush_ov.models import store
    from kvcrush_ov.models.registry import get_spec

    if isinstance(model, str) and "/" not in model and "\\" not in model:
        try:
            spec = get_spec(model)
        except ConfigError:
            raise ModelError(f"model={model!r}: no such folder and no registry model of that name "
                             "('kvcrush-ov models list' shows the registry)") from None
        folder = store.ov_dir(spec.name, spec.default_weight_format)
        if store.is_complete(folder):
            return folder
        if not fetch_missing:
            raise ModelError(f"model={model!r} is not fetched yet: run "
                             f"'kvcrush-ov models fetch {spec.name}'")
        from kvcrush_ov.models.fetch import fetch

        return fetch(spec.name)
    return path  # a path that does not exist: check_model_dir names it


class Pipeline:
    """Text generation on an OpenVINO model with a paged KV cache and KVCrush eviction.

    model: an exported model folder (``optimum-cli export openvino``) or a registry name
        (``kvcrush-ov models list``), fetched and exported on first use.
    device: an OpenVINO device, "CPU" or "GPU" where present.
    kv_cache: cache precision and size (:class:`KVCacheConfig`).
    eviction: which tokens to keep (:class:`CacheEvictionConfig`); None keeps the full cache.
        The default keeps 25% of the prompt: SnapKV plus KVCrush, whose share of the budget
        tapers from a quarter (cache >= 50% of the sequence) to none (<= 12.5%).
    scheduler: continuous-batching knobs (:class:`SchedulerConfig`); prefix caching is off so
        that timings are fair.
    backend: "native" (kvcrush-ov's own engine on OpenVINO's PagedAttention graph; the
        default, None), or "genai" (OpenVINO GenAI's C++ continuous-batching pipeline, which
        runs the snapkv / h2o importance with block-level KVCrush only).

    Chat: between :meth:`start_chat` and :meth:`finish_chat` every ``generate(str)`` is a turn
    of one conversation. On the native backend the conversation's KV cache stays between
    turns, compressed as the eviction left it, and a turn computes only its new tokens
    (``metrics[0].num_cached_tokens`` says how many it reused); ``generate([q1, q2, ...])``
    asks each question of the conversation so far in parallel (forks sharing its cache) and
    leaves the conversation as it was.
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "CPU",
        kv_cache: KVCacheConfig | None = None,
        eviction: CacheEvictionConfig | None = _DEFAULT,  # type: ignore[assignment]
        scheduler: SchedulerConfig | None = None,
        backend: str | None = None,
    ) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ConfigError("backend", backend, f"one of {', '.join(BACKENDS)} or None")
        if kv_cache is None:
            kv_cache = KVCacheConfig()
        if not isinstance(kv_cache, KVCacheConfig):
            raise ConfigError("kv_cache", kv_cache, "a KVCacheConfig")
        if eviction is _DEFAULT:
            eviction = CacheEvictionConfig()
        if eviction is not None and not isinstance(eviction, CacheEvictionConfig):
            raise ConfigError("eviction", eviction, "a CacheEvictionConfig or None")
        if scheduler is None:
            scheduler = SchedulerConfig()
        if not isinstance(scheduler, SchedulerConfig):
            raise ConfigError("scheduler", scheduler, "a SchedulerConfig")
        if backend is None:
            backend = "native"
        self.backend_name = backend
        if not isinstance(model, (str, Path)) or not str(model):
            raise ConfigError("model", model, "a model folder or a registry model name")
        self.device = check_device(device)
        check_kv_precision(self.device, kv_cache.precision)
        # backend-specific limits, still before any loading
        block = block_size_for(self.device)
        if backend == "native":
            from kvcrush_ov.backends.native import check_eviction as check_native

            check_native(eviction, block)
        else:
            from kvcrush_ov.backends.genai import check_eviction, check_kv_cache, check_scheduler

            check_kv_cache(kv_cache)
            check_scheduler(scheduler)
            if eviction is not None:
                check_eviction(eviction, kv_cache, block)
        self.kv_cache, self.eviction, self.scheduler = kv_cache, eviction, scheduler
        self.model_path = resolve_model(model)
        self.info: ModelInfo = check_model_dir(self.model_path)
        if eviction is not None and eviction.fastkv is not None:
            eviction.fastkv.layer_for(self.info.num_layers)  # in range for this model
        # the cache against one scheduler step and this machine's memory, before compiling
        self.cache_blocks = check_cache_plan(
            _as_allocated(kv_cache, backend), scheduler,
            self.info.kv_block_bytes(kv_cache.precision, block), block, self.device,
            DEFAULT_CACHE_BYTES if backend == "native" else None)
        self.cache_tokens = None if self.cache_blocks is None else self.cache_blocks * block
        if backend == "native":
            from kvcrush_ov.backends.native import NativeBackend

            self.backend = NativeBackend(self.info, self.device, kv_cache, eviction, scheduler)
        else:
            self.backend = GenAIBackend(self.info, self.device, kv_cache, eviction, scheduler)
        self._chat: ChatState | None = None

    # ------------------------------------------------------------------ chat
    def start_chat(self, system_message: str = "") -> None:
        """Begin a conversation (an open one is finished first); ``system_message`` opens it
        when not empty."""
        if not isinstance(system_message, str):
            raise ConfigError("system_message", system_message, "a string")
        ev = self.eviction
        if self.backend_name == "native" and ev is not None and ev.importance == "upstream":
            raise ConfigError("eviction.importance", "upstream",
                              "an importance other than 'upstream' for chat: GenAI's "
                              "algorithm evicts per request (use backend='genai' to chat "
                              "with it)")
        if self._chat is not None:
            self.finish_chat()
        msgs = [{"role": "system", "content": system_message}] if system_message else []
        self._chat = ChatState(messages=msgs)

    def finish_chat(self) -> None:
        """End the conversation and free its KV cache."""
        if self._chat is None:
            raise ChatError("finish_chat(): no chat is open (call start_chat() first)")
        chat, self._chat = self._chat, None
        if chat.session is not None:
            self.backend.release(chat.session)

    @property
    def chat_history(self) -> list[dict[str, str]]:
        """The open conversation's messages (a copy); [] when no chat is open."""
        return [] if self._chat is None else [dict(m) for m in self._chat.messages]

    def _encode(self, prompt: str, g: GenerationConfig) -> np.ndarray:
        """[1, T] ids of a prompt, or in chat of the conversation ending with it."""
        if self._chat is None:
            return self.backend.encode(prompt, g.apply_chat_template)
        msgs = [*self._chat.messages, {"role": "user", "content": prompt}]
        ids = conversation_ids(self.backend.tokenizer, msgs, g.apply_chat_template)
        return np.asarray(ids, dtype=np.int64).reshape(1, -1)

    def _chat_run(self, plist: list[str], single: bool, inputs: list[np.ndarray],
                  g: GenerationConfig, streamer: Callable[[str], bool | None] | None
                  ) -> DecodedResults:
        chat = self._chat
        if self.backend_name != "native":  # GenAI: the conversation is recomputed each turn
            res = self.backend.run(inputs, g, streamer)
        else:
            session, chat.session = chat.session, None  # a failed turn leaves no session
            res, chat.session = self.backend.run_chat(inputs, g, streamer, session,
                                                      branch=not single)
        if single:
            chat.messages += [{"role": "user", "content": plist[0]},
                              {"role": "assistant", "content": res.texts[0]}]
        return res

    @property
    def tokenizer(self):
        """The model's ``openvino_genai.Tokenizer``."""
        return self.backend.tokenizer

    def _prefill_hold(self, prompt_tokens: int, max_new_tokens: int) -> int | None:
        """With prefill eviction: the most tokens the request holds (cache_plan)."""
        ev = self.eviction
        if ev is None or not ev.prefill_eviction:
            return None
        budget = max(ev.total_tokens(prompt_tokens), ev.start_size + ev.recent_tokens())
        return prefill_eviction_hold(budget, self.scheduler, block_size_for(self.device), ev.mode,
                                     ev.evict_interval, max_new_tokens, ev.importance)

    def generate(
        self,
        prompts: str | list[str],
        generation_config: GenerationConfig | None = None,
        streamer: Callable[[str], bool | None] | None = None,
        **kwargs: object,
    ) -> DecodedResults:
        """Generate a continuation for one prompt or a list of prompts.

        Keyword arguments are :class:`GenerationConfig` fields (max_new_tokens, do_sample,
        temperature, top_p, top_k, rng_seed, stop_strings, apply_chat_template, ...).
        ``streamer`` (one prompt only) receives text as it is generated; returning True stops.
        Every input is checked before any token is generated.
        """
        unknown = sorted(set(kwargs) - _GEN_FIELDS)
        if unknown:
            raise ConfigError(unknown[0], kwargs[unknown[0]],
                              f"a GenerationConfig field: {', '.join(sorted(_GEN_FIELDS))}")
        if generation_config is None:
            generation_config = GenerationConfig(**kwargs)  # type: ignore[arg-type]
        elif kwargs:
            generation_config = dataclasses.replace(generation_config, **kwargs)
        if not isinstance(generation_config, GenerationConfig):
            raise ConfigError("generation_config", generation_config, "a GenerationConfig")
        single = isinstance(prompts, str)
        plist = [prompts] if single else prompts
        if not isinstance(plist, list) or not plist:
            raise ConfigError("prompts", prompts, "a non-empty string or a non-empty list of them")
        if streamer is not None and (not callable(streamer) or len(plist) != 1):
            raise ConfigError("streamer", streamer, "a callable, with a single prompt")
        g = generation_config
        inputs = []
        for i, p in enumerate(plist):
            name = "prompt" if single else f"prompts[{i}]"
            if not isinstance(p, str) or not p.strip():
                raise ConfigError(name, p, "a non-empty string")
            ids = self._encode(p, g)
            check_request_size(name, int(ids.shape[1]), g.max_new_tokens,
                               self.info.context_length, self.cache_tokens, self.scheduler,
                               self._prefill_hold(int(ids.shape[1]), g.max_new_tokens))
            inputs.append(ids)
        if self._chat is not None:
            return self._chat_run(plist, single, inputs, g, streamer)
        return self.backend.run(inputs, g, streamer)
