"""Shared fixtures. Real models are fetched once into the cache (``KVCRUSH_OV_HOME``)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path

import pytest

from kvcrush_ov.device import device_capabilities
from kvcrush_ov.models.fetch import fetch

# A bf16 KV cache runs only where the CPU has BF16 (AVX512-BF16 / AMX); on an AVX2-only CPU the
# Pipeline refuses it with a ConfigError naming kv_cache.precision (tests check that instead).
CPU_HAS_BF16 = "BF16" in device_capabilities("CPU")


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module():
    """Compiled models and KV pools of a module's fixtures are freed once the module is done
    (cycles collected, glibc's free pages returned): the suite's peak RSS stays that of its
    largest module rather than growing towards the machine's 24 GB."""
    yield
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random Llama (plumbing only, never accuracy)."""
    return fetch("tiny-random-llama")


@pytest.fixture(scope="session")
def smollm2_fp16() -> Path:
    return fetch("SmolLM2-135M-Instruct", "fp16")


@pytest.fixture(scope="session")
def qwen05_fp16() -> Path:
    return fetch("Qwen2.5-Coder-0.5B-Instruct", "fp16")


def prompt_of_length(tokenizer, n: int, word: str = " the") -> str:
    """A raw prompt that ``tokenizer`` encodes to exactly ``n`` tokens (no chat template)."""
    text = word.strip() + word * (n - 1)
    got = len(tokenizer.encode(text).input_ids.data[0])
    assert got == n, f"prompt_of_length: {word!r}*{n} encodes to {got} tokens"
    return text


def refuses_bf16_here(make) -> bool:
    """On a CPU without BF16: check that ``make()`` (which builds a bf16-cache Pipeline or
    engine) raises the ConfigError naming kv_cache.precision, and return True (the caller's
    bf16 case is then done). On a CPU with BF16: return False, the caller runs its checks."""
    if CPU_HAS_BF16:
        return False
    from kvcrush_ov.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kv_cache\.precision.*no BF16 support"):
        make()
    return True
