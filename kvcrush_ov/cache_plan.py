"""How many KV blocks a cache configuration means, checked before any model is compiled.

One place for the arithmetic the Pipeline checks up front (from the model's config.json) and the
native engine applies (from the compiled model's cache shapes): the block count a
:class:`~kvcrush_ov.config.KVCacheConfig` asks for, that it holds one scheduler step, and that it
fits the memory this machine has available.
"""

from __future__ import annotations

import math
import os

from kvcrush_ov.config import KVCacheConfig, SchedulerConfig
from kvcrush_ov.device import proc_kib
from kvcrush_ov.errors import ConfigError

DEFAULT_CACHE_BYTES = 1 << 30  # native engine, cache_size=0 and num_kv_blocks=0: 1 GiB


def available_memory_bytes() -> int | None:
    """Memory this machine can still give (Linux MemAvailable); None where it cannot tell."""
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    if kib is not None:
        return kib * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def requested_blocks(kv_cache: KVCacheConfig, block_bytes: int,
                     default_bytes: int | None = DEFAULT_CACHE_BYTES) -> tuple[int | None, str]:
    """(blocks, the field that set them): ``num_kv_blocks`` when > 0, else ``cache_size`` GB,
    else ``default_bytes`` (None: the backend grows the cache on demand, blocks is None)."""
    if kv_cache.num_kv_blocks:
        return kv_cache.num_kv_blocks, "kv_cache.num_kv_blocks"
    if kv_cache.cache_size:
        return int(kv_cache.cache_size * 2**30 // block_bytes), "kv_cache.cache_size"
    if default_bytes is None:
        return None, "kv_cache.cache_size"
    return int(default_bytes // block_bytes), "kv_cache.cache_size"


def check_cache_plan(kv_cache: KVCacheConfig, scheduler: SchedulerConfig, block_bytes: int,
                     block_size: int, device: str,
                     default_bytes: int | None = DEFAULT_CACHE_BYTES) -> int | None:
    """The number of KV blocks to allocate (None: grown on demand), or a ConfigError naming the
    field at fault: a cache smaller than one step of ``max_num_batched_tokens`` tokens, or one
    larger than the memory available on a CPU device.

    block_bytes: bytes of one block across all layers and KV heads; block_size: its tokens.
    """
    blocks, field = requested_blocks(kv_cache, block_bytes, default_bytes)
    if blocks is None:
        return None
    value = getattr(kv_cache, field.split(".")[1])
    need = -(-scheduler.max_num_batched_tokens // block_size) + 1
    if blocks < need:
        room = (f"room for at least {need} KV blocks ({need * block_bytes:,} bytes; one block "
                f"holds {block_size} tokens in {block_bytes:,} bytes), enough for one step of "
                f"scheduler.max_num_batched_tokens={scheduler.max_num_batched_tokens}")
        if not kv_cache.num_kv_blocks and not kv_cache.cache_size:  # the step is too big
            most = max(1, (blocks - 1) * block_size)
            raise ConfigError("scheduler.max_num_batched_tokens",
                              scheduler.max_num_batched_tokens,
                              f"at most {most} with the default cache of "
                              f"{blocks} blocks (or set kv_cache.cache_size for {room})")
        raise ConfigError(field, value, room)
    if device.upper().startswith("CPU"):
        free = available_memory_bytes()
        if free is not None and blocks * block_bytes > free:
            raise ConfigError(field, value,
                              f"a cache that fits this machine's available memory: "
                              f"{blocks * block_bytes / 2**30:.2f} GB asked, "
                              f"{free / 2**30:.2f} GB available "
                              f"(at most {free // block_bytes:,} blocks of {block_bytes:,} bytes)")
    return blocks


#: importance methods whose layers keep unequal shares of the budget: the most a layer keeps, as
#: a multiple of the average (PyramidKV's first layer keeps up to twice it)
LAYER_SHARE = {"pyramidkv": 2.0}


def prefill_eviction_hold(budget_tokens: int, scheduler: SchedulerConfig, block_size: int,
                          mode: str, evict_interval: int, max_new_tokens: int,
                          importance: str = "snapkv") -> int:
    """The most tokens a request with prefill eviction holds per (layer, head) in its fullest
    layer (each layer has its own KV pool): its budget (times :data:`LAYER_SHARE` of
    ``importance``), one prompt chunk and a block of rounding, then what decode adds before it
    evicts again (``evict_interval`` in continuous mode; every new token in prefill mode)."""
    growth = evict_interval if mode == "continuous" else max_new_tokens
    layer_budget = math.ceil(budget_tokens * LAYER_SHARE.get(importance, 1.0))
    return layer_budget + max(scheduler.max_num_batched_tokens, growth) + block_size


def check_request_size(name: str, prompt_tokens: int, max_new_tokens: int, context_length: int,
                       cache_tokens: int | None, scheduler: SchedulerConfig,
                       max_held: int | None = None) -> None:
    """A request that can never run is refused here, naming its field: ``max_new_tokens`` when
    it alone fills the model's context (or the whole cache, ``cache_tokens``; None: the cache
    grows on demand), else the prompt (``name``) when it is too long for what is left, or, with
    ``dynamic_split_fuse=False``, longer than one step of ``max_num_batched_tokens``.

    max_held: with prefill eviction, the most tokens the request ever holds
    (:func:`prefill_eviction_hold`): the cache must hold that, not the whole prompt."""
    if max_held is not None and cache_tokens is not None:
        if prompt_tokens + max_new_tokens > context_length:
            raise ConfigError(name, f"<{prompt_tokens} tokens>",
                              f"at most {context_length - max_new_tokens} tokens: the model's "
                              f"context is {context_length} tokens, and max_new_tokens="
                              f"{max_new_tokens}")
        if max_held > cache_tokens:
            raise ConfigError(name, f"<{prompt_tokens} tokens>",
                              f"a request that holds at most {cache_tokens} tokens: with "
                              f"prefill eviction it holds up to {max_held} (its budget, one "
                              "scheduler step, decode growth and any probe or replay) and the KV "
                              f"cache holds {cache_tokens}")
        cache_tokens = None  # the cache holds what the request holds: only the context counts
    total = context_length if cache_tokens is None else min(context_length, cache_tokens)
    where = f"the model's context is {context_length} tokens" + (
        "" if cache_tokens is None else f" and the KV cache holds {cache_tokens}")
    if max_new_tokens >= total:
        raise ConfigError("max_new_tokens", max_new_tokens,
                          f"at most {total - 1}: {where}, prompt included")
    if prompt_tokens < 1:
        raise ConfigError(name, "<0 tokens>", "at least one token")
    if prompt_tokens > total - max_new_tokens:
        raise ConfigError(name, f"<{prompt_tokens} tokens>",
                          f"at most {total - max_new_tokens} tokens: {where}, and "
                          f"max_new_tokens={max_new_tokens}")
    if not scheduler.dynamic_split_fuse and prompt_tokens > scheduler.max_num_batched_tokens:
        raise ConfigError(name, f"<{prompt_tokens} tokens>",
                          f"at most scheduler.max_num_batched_tokens = "
                          f"{scheduler.max_num_batched_tokens} tokens with "
                          "scheduler.dynamic_split_fuse=False (a prompt runs in one step): "
                          "raise max_num_batched_tokens or set dynamic_split_fuse=True")
