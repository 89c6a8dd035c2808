"""A Pipeline's chat (``start_chat`` / ``finish_chat``, OpenVINO GenAI's vocabulary).

The conversation is kept as messages; every turn's prompt is the whole conversation rendered by
the model's chat template (or the messages' texts joined, without one). The native backend
keeps the sequence's KV cache between turns, compressed as its eviction left it, and computes
only the tokens after the longest prefix the cache already holds; other backends recompute the
conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import openvino_genai as ov_genai


@dataclass
class ChatState:
    """messages: ``{"role", "content"}`` dicts so far. session: the backend's parked request
    whose cache holds the conversation (None before the first turn, or after a failed one)."""

    messages: list[dict[str, str]] = field(default_factory=list)
    session: Any = None


def conversation_ids(tokenizer: ov_genai.Tokenizer, messages: list[dict[str, str]],
                     apply_chat_template: bool) -> list[int]:
    """Token ids of the whole conversation, ready for the assistant's next answer."""
    if apply_chat_template and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        enc = tokenizer.encode(text, add_special_tokens=False)
    else:
        enc = tokenizer.encode("".join(m["content"] for m in messages))
    return [int(i) for i in enc.input_ids.data[0]]
