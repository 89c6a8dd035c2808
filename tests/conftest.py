"""Shared fixtures. Real models are fetched once into the cache (``KVCRUSH_OV_HOME``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcrush_ov.models.fetch import fetch


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
