"""GenAI's eviction settings for one request: kvcrush-ov's config translated to GenAI's terms.

Shared by backend "genai" (which hands them to GenAI) and the native engine's upstream-compatible
mode (which reproduces GenAI's algorithm from them), so both run the same configuration.
GenAI keeps KVCrush's blocks ON TOP of max_cache_size, so ``max_cache_size = total -
kvcrush_blocks * block_size``; budgets are whole blocks; a NORM_SUM prompt whose length lies
strictly between start_size and start_size + snapkv_window_size gets window 0 (GenAI defect).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcrush_ov.config import CacheEvictionConfig
from kvcrush_ov.errors import ConfigError


@dataclass(frozen=True)
class GenAISettings:
    """GenAI's eviction settings for one request, after translation (all sizes in tokens)."""

    total_tokens: int  # what the user asked for, rounded down to whole blocks
    max_cache_size: int  # GenAI's field: total minus KVCrush's blocks
    start_size: int
    recent_size: int
    snapkv_window_size: int
    aggregation_mode: str
    kvcrush_blocks: int
    anchor_point_mode: str
    rng_seed: int
    apply_rotation: bool


def check_genai_algorithm(eviction: CacheEvictionConfig, block: int, where: str) -> None:
    """Reject, naming the field, what GenAI's eviction algorithm cannot run: backend "genai",
    and ``importance="upstream"`` (the same algorithm on the native engine). ``where`` says
    which of the two in the messages (e.g. "with backend 'genai'"). Checked at construction, so
    nothing fails later at generate (GenAI itself asserts these only once a prompt needs
    eviction, and then blames the model)."""
    for name, v in (("start_size", eviction.start_size),
                    ("recent_size", eviction.recent_tokens())):
        if v < block or v % block:
            raise ConfigError(f"eviction.{name}", v,
                              f"a non-zero multiple of the KV block size {block} {where}")
    minimum = eviction.start_size + eviction.recent_tokens() + block
    if isinstance(eviction.max_cache_size, int) and eviction.max_cache_size < minimum:
        raise ConfigError("eviction.max_cache_size", eviction.max_cache_size,
                          f"at least start_size + recent_size + one block = {minimum} tokens "
                          f"{where}")
    if eviction.mode != "continuous":
        raise ConfigError("eviction.mode", eviction.mode,
                          f"'continuous' {where}: GenAI evicts while decoding")
    if eviction.evict_interval != block:
        raise ConfigError("eviction.evict_interval", eviction.evict_interval,
                          f"{block} {where}: GenAI evicts whenever a sequence fills one more "
                          "KV block past its budget")
    if eviction.pooling not in (None, "max") or eviction.kernel_size not in (None, 7):
        raise ConfigError("eviction.pooling", f"{eviction.pooling}/{eviction.kernel_size}",
                          f"None, or max pooling over 7 tokens (GenAI's fixed choice) {where}")
    if eviction.pooling_offset != 0:
        raise ConfigError("eviction.pooling_offset", eviction.pooling_offset,
                          f"0 (GenAI centres its pooling window) {where}")
    if eviction.decode_window_size is not None:
        raise ConfigError("eviction.decode_window_size", eviction.decode_window_size,
                          f"None (GenAI scores every decode step) {where}")
    crush = eviction.kvcrush
    if crush is None:
        return
    if isinstance(crush.anchor_point_mode, tuple):
        raise ConfigError("kvcrush.anchor_point_mode", crush.anchor_point_mode,
                          f"a single mode {where}")
    if crush.granularity == "token":
        raise ConfigError("kvcrush.granularity", crush.granularity,
                          f"None or 'block' {where}")
    if crush.dynamic_split:
        raise ConfigError("kvcrush.dynamic_split", True, f"False {where}")
    if crush.taper:
        raise ConfigError("kvcrush.taper", True,
                          f"None or False (GenAI's share is fixed) {where}")


def translate(eviction: CacheEvictionConfig, prompt_tokens: int, max_new_tokens: int,
              block: int) -> GenAISettings | None:
    """GenAI settings that keep ``eviction``'s total budget for one prompt; None if no eviction
    can happen (the whole sequence fits the budget)."""
    minimum = eviction.start_size + eviction.recent_tokens() + block
    total = max(eviction.total_tokens(prompt_tokens), minimum)
    total = (total // block) * block
    if prompt_tokens + max_new_tokens <= total:
        return None
    crush = eviction.kvcrush
    kvcrush_blocks = 0
    if crush is not None and crush.budget > 0:
        kvcrush_blocks = round(crush.budget * total / block)
        kvcrush_blocks = min(kvcrush_blocks, (total - minimum) // block)
    # GenAI's window 0 scores every query (h2o); "upstream" is GenAI's algorithm on native
    window = eviction.snapkv_window_size if eviction.importance in ("snapkv", "upstream") else 0
    if (eviction.aggregation_mode == "norm_sum" and window > 0
            and eviction.start_size < prompt_tokens < eviction.start_size + window):
        window = 0  # GenAI defect guard (see module docstring)
    return GenAISettings(
        total_tokens=total,
        max_cache_size=total - kvcrush_blocks * block,
        start_size=eviction.start_size,
        recent_size=eviction.recent_tokens(),
        snapkv_window_size=window,
        aggregation_mode=eviction.aggregation_mode,
        kvcrush_blocks=kvcrush_blocks,
        anchor_point_mode=crush.anchor_point_mode if crush else "random",
        rng_seed=crush.rng_seed if crush else 0,
        apply_rotation=eviction.apply_rotation,
    )
