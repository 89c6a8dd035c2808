"""The bad-input catalogue: every invalid configuration, Pipeline argument, generate argument and
model folder is refused with an error naming its field, before any heavy work (model compile,
cache allocation, generation), and the Pipeline that refused it still serves a valid request
with unchanged output.

Four tables: CONFIG (the config dataclasses), PIPELINE (``Pipeline(...)`` arguments, checked with
the backends' constructors replaced by a tripwire), GENERATE (``Pipeline.generate`` arguments on
both backends, with the backend's ``run`` replaced by a tripwire while the bad call is made) and
MODEL_FOLDERS (ModelError naming ``model=``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import kvcrush_ov.backends.native as native_mod
import kvcrush_ov.pipeline as pipeline_mod
from conftest import prompt_of_length
from kvcrush_ov import (
    CacheEvictionConfig,
    ConfigError,
    FastKVConfig,
    GenerationConfig,
    KVCacheConfig,
    KVCrushConfig,
    LESSConfig,
    ModelError,
    Pipeline,
    SchedulerConfig,
)

NAN, INF = math.nan, math.inf

# -- the config dataclasses: (class, field name, bad values, name in the error) -----------------
_FIELDS: list[tuple[type, str, list, str]] = [
    (KVCacheConfig, "precision", ["fp8", 8, None, ""], "kv_cache.precision"),
    (KVCacheConfig, "cache_size", [-1, NAN, INF, "1", True], "kv_cache.cache_size"),
    (KVCacheConfig, "num_kv_blocks", [-1, 2.5, NAN, "3", True], "kv_cache.num_kv_blocks"),
    (SchedulerConfig, "max_num_batched_tokens", [0, -5, 1.5, "256", True, NAN],
     "scheduler.max_num_batched_tokens"),
    (SchedulerConfig, "max_num_seqs", [0, 2.0, None], "scheduler.max_num_seqs"),
    (SchedulerConfig, "dynamic_split_fuse", ["yes", 1, None], "scheduler.dynamic_split_fuse"),
    (SchedulerConfig, "enable_prefix_caching", [1, "no"], "scheduler.enable_prefix_caching"),
    (KVCrushConfig, "budget", [1.5, -0.1, NAN, INF, "0.25", True, 2], "kvcrush.budget"),
    (KVCrushConfig, "anchor_point_mode", ["median", (), ("ones", "x"), 3],
     "kvcrush.anchor_point_mode"),
    (KVCrushConfig, "rng_seed", [-3, 1.0, "0"], "kvcrush.rng_seed"),
    (KVCrushConfig, "granularity", ["page", 1], "kvcrush.granularity"),
    (KVCrushConfig, "dynamic_split", ["yes", 1], "kvcrush.dynamic_split"),
    (KVCrushConfig, "taper", ["on", 1], "kvcrush.taper"),
    (CacheEvictionConfig, "max_cache_size", [0, -1, 1.5, 0.0, NAN, INF, "half", None, True, 100],
     "eviction.max_cache_size"),
    (CacheEvictionConfig, "start_size", [-32, 1.5, "32", NAN], "eviction.start_size"),
    (CacheEvictionConfig, "recent_size", [-1, 2.5, "32"], "eviction.recent_size"),
    (CacheEvictionConfig, "snapkv_window_size", [-1, 1.5], "eviction.snapkv_window_size"),
    (CacheEvictionConfig, "importance", ["magic", None, 3], "eviction.importance"),
    (CacheEvictionConfig, "aggregation_mode", ["max", None], "eviction.aggregation_mode"),
    (CacheEvictionConfig, "apply_rotation", ["yes", 1], "eviction.apply_rotation"),
    (CacheEvictionConfig, "kvcrush", [0.25, "kvcrush", {}], "eviction.kvcrush"),
    (CacheEvictionConfig, "mode", ["eager", None], "eviction.mode"),
    (CacheEvictionConfig, "evict_interval", [0, -1, 1.5, NAN], "eviction.evict_interval"),
    (CacheEvictionConfig, "pooling", ["median", 1], "eviction.pooling"),
    (CacheEvictionConfig, "kernel_size", [0, 4, 2.5, NAN], "eviction.kernel_size"),
    (CacheEvictionConfig, "pooling_offset", [-1, 100, 1.5], "eviction.pooling_offset"),
    (CacheEvictionConfig, "decode_window_size", [0, 33, 1.5], "eviction.decode_window_size"),
    (CacheEvictionConfig, "log", ["yes", 1], "eviction.log"),
    (CacheEvictionConfig, "plain_prefill", ["yes", 1, None], "eviction.plain_prefill"),
    (GenerationConfig, "max_new_tokens", [0, -1, 1.5, NAN, "8", True], "max_new_tokens"),
    (GenerationConfig, "do_sample", ["yes", 1], "do_sample"),
    (GenerationConfig, "temperature", [0, -1, NAN, INF, "1"], "temperature"),
    (GenerationConfig, "top_p", [0, 1.5, NAN, -INF], "top_p"),
    (GenerationConfig, "top_k", [-1, 1.5, NAN], "top_k"),
    (GenerationConfig, "rng_seed", [-1, 0.5], "rng_seed"),
    (GenerationConfig, "repetition_penalty", [0, -1, NAN, INF, "1"], "repetition_penalty"),
    (GenerationConfig, "stop_strings", [5, ("",), (3,), None, b"stop"], "stop_strings"),
    (GenerationConfig, "include_stop_str_in_output", ["no"], "include_stop_str_in_output"),
    (GenerationConfig, "ignore_eos", [1], "ignore_eos"),
    (GenerationConfig, "apply_chat_template", ["yes"], "apply_chat_template"),
]
CONFIG = [(cls, {name: v}, field) for cls, name, values, field in _FIELDS for v in values]
CONFIG += [
    (CacheEvictionConfig, {"importance": "upstream", "kvcrush": KVCrushConfig(taper=True)},
     "kvcrush.taper"),
    (CacheEvictionConfig, {"kernel_size": 7, "pooling_offset": 4}, "eviction.pooling_offset"),
    (CacheEvictionConfig, {"evict_interval": 4, "decode_window_size": 8},
     "eviction.decode_window_size"),
    (CacheEvictionConfig, {"importance": "upstream", "plain_prefill": True},
     "eviction.plain_prefill"),
    (CacheEvictionConfig, {"fastkv": FastKVConfig(), "plain_prefill": True},
     "eviction.plain_prefill"),
    (CacheEvictionConfig, {"less": LESSConfig(), "plain_prefill": True},
     "eviction.plain_prefill"),
]


@pytest.mark.parametrize("cls,kwargs,field", CONFIG,
                         ids=[f"{c.__name__}-{k}" for c, k, _ in CONFIG])
def test_config_catalogue(cls, kwargs, field):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}=") and "allowed is" in str(info.value)


# -- Pipeline arguments: refused before a backend is built --------------------------------------
def _ev(**kw) -> CacheEvictionConfig:
    return CacheEvictionConfig(**kw)


def _up(**kw) -> CacheEvictionConfig:  # GenAI's algorithm on the native engine
    base = dict(max_cache_size=384, start_size=32, recent_size=64, importance="upstream",
                kvcrush=KVCrushConfig(granularity="block"))
    return CacheEvictionConfig(**{**base, **kw})


_crush = KVCrushConfig
PIPELINE: list[tuple[str, dict, str]] = [
    ("backend", {"backend": "cuda"}, "backend"),
    ("kv_cache-type", {"kv_cache": "u8"}, "kv_cache"),
    ("eviction-type", {"eviction": 0.25}, "eviction"),
    ("scheduler-type", {"scheduler": {}}, "scheduler"),
    ("device-name", {"device": "TPU"}, "device"),
    ("device-type", {"device": 3}, "device"),
    ("model-type", {"model": 5}, "model"),
    ("model-empty", {"model": ""}, "model"),
]
for _b in ("native", "genai"):
    PIPELINE += [
        (f"{_b}-cache-tiny", {"backend": _b, "kv_cache": KVCacheConfig(cache_size=1e-6)},
         "kv_cache.cache_size" if _b == "native" else None),  # genai: whole GB, 1e-6 -> 1 GB
        (f"{_b}-one-block", {"backend": _b, "kv_cache": KVCacheConfig(num_kv_blocks=1)},
         "kv_cache.num_kv_blocks"),
        (f"{_b}-blocks-beyond-memory",
         {"backend": _b, "kv_cache": KVCacheConfig(num_kv_blocks=10**9)},
         "kv_cache.num_kv_blocks"),
        (f"{_b}-cache-beyond-memory", {"backend": _b, "kv_cache": KVCacheConfig(cache_size=1000)},
         "kv_cache.cache_size"),
        (f"{_b}-step-too-big-for-cache",
         {"backend": _b, "kv_cache": KVCacheConfig(num_kv_blocks=64),
          "scheduler": SchedulerConfig(max_num_batched_tokens=4096)}, "kv_cache.num_kv_blocks"),
    ]
PIPELINE = [c for c in PIPELINE if c[2] is not None]
PIPELINE += [
    ("native-step-beyond-default-cache",
     {"scheduler": SchedulerConfig(max_num_batched_tokens=10**9)},
     "scheduler.max_num_batched_tokens"),
    ("native-rotation", {"eviction": _ev(apply_rotation=True)}, "eviction.apply_rotation"),
    ("upstream-recent-1", {"eviction": _up(recent_size=1, max_cache_size=384)},
     "eviction.recent_size"),
    ("upstream-start-0", {"eviction": _up(start_size=0)}, "eviction.start_size"),
    ("upstream-start-16", {"eviction": _up(start_size=16)}, "eviction.start_size"),
    ("upstream-multi-anchor",
     {"eviction": _up(kvcrush=_crush(anchor_point_mode=("ones", "mean")))},
     "kvcrush.anchor_point_mode"),
    ("upstream-token-granularity", {"eviction": _up(kvcrush=_crush(granularity="token"))},
     "kvcrush.granularity"),
    ("upstream-dynamic-split", {"eviction": _up(kvcrush=_crush(dynamic_split=True))},
     "kvcrush.dynamic_split"),
    ("upstream-prefill-mode", {"eviction": _up(mode="prefill")}, "eviction.mode"),
    ("upstream-interval", {"eviction": _up(evict_interval=8)}, "eviction.evict_interval"),
    ("upstream-avg-pooling", {"eviction": _up(pooling="avg")}, "eviction.pooling"),
    ("upstream-decode-window", {"eviction": _up(decode_window_size=8)},
     "eviction.decode_window_size"),
    ("upstream-small-budget", {"eviction": _up(max_cache_size=96)}, "eviction.max_cache_size"),
]
_G = {"backend": "genai"}
PIPELINE += [(f"genai-{name}", {**_G, **kw}, field) for name, kw, field in [
    ("batched-below-seqs", {"scheduler": SchedulerConfig(max_num_batched_tokens=8,
                                                          max_num_seqs=16,
                                                          dynamic_split_fuse=False)},
     "scheduler.max_num_batched_tokens"),
    ("u4", {"kv_cache": KVCacheConfig(precision="u4"), "eviction": None},
     "kv_cache.precision"),
    ("u4-eviction", {"kv_cache": KVCacheConfig(precision="u4"), "eviction": _ev()},
     "kv_cache.precision"),
    ("start-0", {"eviction": _ev(start_size=0)}, "eviction.start_size"),
    ("start-16", {"eviction": _ev(start_size=16)}, "eviction.start_size"),
    ("recent-0", {"eviction": _ev(recent_size=0)}, "eviction.recent_size"),
    ("small-budget", {"eviction": _ev(max_cache_size=160)}, "eviction.max_cache_size"),
    ("interval", {"eviction": _ev(evict_interval=8)}, "eviction.evict_interval"),
    ("log", {"eviction": _ev(log=True)}, "eviction.log"),
    ("plain-prefill", {"eviction": _ev(plain_prefill=True)}, "eviction.plain_prefill"),
    ("rotation", {"eviction": _ev(apply_rotation=True)}, "eviction.apply_rotation"),
    ("adakv", {"eviction": _ev(importance="adakv")}, "eviction.importance"),
    ("streaming", {"eviction": _ev(importance="streaming")}, "eviction.importance"),
    ("pyramidkv", {"eviction": _ev(importance="pyramidkv")}, "eviction.importance"),
    ("upstream", {"eviction": _ev(importance="upstream")}, "eviction.importance"),
    ("prefill-mode", {"eviction": _ev(mode="prefill")}, "eviction.mode"),
    ("avg-pooling", {"eviction": _ev(pooling="avg")}, "eviction.pooling"),
    ("kernel-31", {"eviction": _ev(kernel_size=31)}, "eviction.pooling"),
    ("offset", {"eviction": _ev(pooling_offset=3)}, "eviction.pooling_offset"),
    ("decode-window", {"eviction": _ev(decode_window_size=8)}, "eviction.decode_window_size"),
    ("token-granularity", {"eviction": _ev(kvcrush=_crush(granularity="token"))},
     "kvcrush.granularity"),
    ("multi-anchor", {"eviction": _ev(kvcrush=_crush(anchor_point_mode=("ones", "mean")))},
     "kvcrush.anchor_point_mode"),
    ("dynamic-split", {"eviction": _ev(kvcrush=_crush(dynamic_split=True))},
     "kvcrush.dynamic_split"),
    ("taper", {"eviction": _ev(kvcrush=_crush(taper=True))}, "kvcrush.taper"),
]]


class _Tripwire:
    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("heavy work started: a backend was built before the error")


@pytest.fixture
def no_backends(monkeypatch):
    monkeypatch.setattr(pipeline_mod, "GenAIBackend", _Tripwire)
    monkeypatch.setattr(native_mod, "NativeBackend", _Tripwire)


@pytest.mark.parametrize("kwargs,field", [c[1:] for c in PIPELINE], ids=[c[0] for c in PIPELINE])
def test_pipeline_catalogue(tiny_model, no_backends, kwargs, field):
    kwargs = {"model": tiny_model, **kwargs}
    with pytest.raises(ConfigError) as info:
        Pipeline(**kwargs)
    assert info.value.field == field, str(info.value)


# -- generate arguments, on both backends --------------------------------------------------------
REF_PROMPT = "The capital of France is"


@pytest.fixture(scope="module", params=["native", "genai"])
def served(tiny_model, request):
    """(pipe, reference output of a valid request, a pipe without chunked prefill)."""
    pipe = Pipeline(tiny_model, eviction=None, backend=request.param)
    ref = pipe.generate(REF_PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
    whole = Pipeline(tiny_model, eviction=None, backend=request.param,
                     scheduler=SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=8,
                                               dynamic_split_fuse=False))
    return pipe, ref, whole


def _long(pipe: Pipeline, n: int) -> str:
    return prompt_of_length(pipe.tokenizer, n)


GENERATE: list[tuple[str, Callable[[Pipeline], object], str]] = [
    ("empty-prompt", lambda p: p.generate(""), "prompt"),
    ("blank-prompt", lambda p: p.generate("   "), "prompt"),
    ("empty-list", lambda p: p.generate([]), "prompts"),
    ("blank-in-list", lambda p: p.generate(["ok", ""]), "prompts[1]"),
    ("int-in-list", lambda p: p.generate([3]), "prompts[0]"),
    ("none-prompt", lambda p: p.generate(None), "prompts"),
    ("int-prompt", lambda p: p.generate(5), "prompts"),
    ("tuple-prompts", lambda p: p.generate(("a", "b")), "prompts"),
    ("unknown-kwarg", lambda p: p.generate("hi", max_tokens=5), "max_tokens"),
    ("config-type", lambda p: p.generate("hi", "greedy"), "generation_config"),
    ("temperature-nan", lambda p: p.generate("hi", do_sample=True, temperature=NAN),
     "temperature"),
    ("temperature-0", lambda p: p.generate("hi", do_sample=True, temperature=0.0), "temperature"),
    ("top-p-2", lambda p: p.generate("hi", top_p=2.0), "top_p"),
    ("repetition-nan", lambda p: p.generate("hi", repetition_penalty=NAN), "repetition_penalty"),
    ("max-new-huge", lambda p: p.generate("hi", max_new_tokens=10**9), "max_new_tokens"),
    ("max-new-context", lambda p: p.generate("hi", max_new_tokens=2048), "max_new_tokens"),
    ("max-new-0", lambda p: p.generate("hi", max_new_tokens=0), "max_new_tokens"),
    ("stop-int", lambda p: p.generate("hi", stop_strings=5), "stop_strings"),
    ("stop-empty", lambda p: p.generate("hi", stop_strings=[""]), "stop_strings"),
    ("streamer-type", lambda p: p.generate("hi", streamer=5), "streamer"),
    ("streamer-batch", lambda p: p.generate(["a", "b"], streamer=print), "streamer"),
    ("seed-negative", lambda p: p.generate("hi", rng_seed=-1), "rng_seed"),
    ("do-sample-str", lambda p: p.generate("hi", do_sample="yes"), "do_sample"),
    ("prompt-too-long", lambda p: p.generate(_long(p, 2100), apply_chat_template=False),
     "prompt"),
    ("second-prompt-too-long",
     lambda p: p.generate(["short", _long(p, 2100)], apply_chat_template=False), "prompts[1]"),
    ("prompt-plus-new-too-long",
     lambda p: p.generate(_long(p, 2000), max_new_tokens=64, apply_chat_template=False),
     "prompt"),
]


@pytest.mark.parametrize("call,field", [c[1:] for c in GENERATE], ids=[c[0] for c in GENERATE])
def test_generate_catalogue(served, monkeypatch, call, field):
    pipe, ref, _ = served
    with monkeypatch.context() as m:
        m.setattr(pipe.backend, "run", _Tripwire)
        with pytest.raises(ConfigError) as info:
            call(pipe)
    assert info.value.field == field, str(info.value)
    assert pipe.generate(REF_PROMPT, max_new_tokens=6, ignore_eos=True).token_ids == ref


def test_whole_prompts_longer_than_one_step_are_named(served, monkeypatch):
    """dynamic_split_fuse=False: a prompt runs in one step, so one longer than
    max_num_batched_tokens is refused (it used to stall the native engine, leaking the request,
    and raise a raw RuntimeError on genai); the pipeline then serves a short prompt."""
    _, _, whole = served
    long = _long(whole, 300)
    with monkeypatch.context() as m:
        m.setattr(whole.backend, "run", _Tripwire)
        with pytest.raises(ConfigError, match=r"max_num_batched_tokens = 128.*dynamic_split_fuse"
                           ) as info:
            whole.generate(long, max_new_tokens=4, apply_chat_template=False)
    assert info.value.field == "prompt"
    out = whole.generate(_long(whole, 100), max_new_tokens=4, ignore_eos=True,
                         apply_chat_template=False)
    assert out.metrics[0].num_generated_tokens == 4
    if whole.backend_name == "native":
        assert whole.backend.engine.sequences == {}


# -- model folders ---------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _without(name: str):
    def make(tmp: Path, tiny: Path) -> Path:
        d = _copy(tiny, tmp / "m")
        (d / name).unlink()
        return d
    return make


def _config(text: str):
    def make(tmp: Path, tiny: Path) -> Path:
        d = _copy(tiny, tmp / "m")
        (d / "config.json").write_text(text)
        return d
    return make


def _empty_bin(tmp: Path, tiny: Path) -> Path:
    d = _copy(tiny, tmp / "m")
    (d / "openvino_model.bin").write_bytes(b"")
    return d


def _a_file(tmp: Path, tiny: Path) -> Path:
    f = tmp / "model.xml"
    f.write_text("<net/>")
    return f


_cfg = json.dumps({"num_attention_heads": 8, "hidden_size": 256})
MODEL_FOLDERS = [
    ("missing", lambda tmp, tiny: tmp / "nowhere", "no such folder"),
    ("a-file", _a_file, "is a file"),
    ("unknown-registry-name", lambda tmp, tiny: "NoSuchModel-7B", "no registry model"),
    ("empty-bin", _empty_bin, "openvino_model.bin is empty"),
    ("config-not-json", _config("{not json"), "config.json is not valid JSON"),
    ("config-lacks-layers", _config(_cfg), "config.json lacks"),
] + [(f"without-{f}", _without(f), f"missing {f}") for f in (
    "openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
    "openvino_detokenizer.xml", "config.json")]


@pytest.mark.parametrize("make,message", [c[1:] for c in MODEL_FOLDERS],
                         ids=[c[0] for c in MODEL_FOLDERS])
def test_model_folder_catalogue(tiny_model, tmp_path, no_backends, make, message):
    with pytest.raises(ModelError) as info:
        Pipeline(make(tmp_path, tiny_model))
    assert str(info.value).startswith("model=") and message in str(info.value)


def test_the_catalogue_has_at_least_150_cases():
    n = len(CONFIG) + len(PIPELINE) + 2 * len(GENERATE) + 2 + len(MODEL_FOLDERS)
    assert n >= 150, n
