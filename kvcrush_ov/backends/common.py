"""What every backend shares: the model's OpenVINO tokenizer, prompt encoding, streaming."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import openvino_genai as ov_genai

from kvcrush_ov.errors import ModelError
from kvcrush_ov.model_info import ModelInfo

Streamer = Callable[[str], "bool | None"]


def first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def load_tokenizer(info: ModelInfo) -> ov_genai.Tokenizer:
    try:
        return ov_genai.Tokenizer(str(info.path))
    except RuntimeError as e:
        raise ModelError(f"model={str(info.path)!r}: its OpenVINO tokenizer does not load: "
                         f"{first_line(e)}") from None


def encode(tokenizer: ov_genai.Tokenizer, prompt: str, apply_chat_template: bool) -> np.ndarray:
    """Token ids [1, T] (int64) of ``prompt``, through the chat template when asked."""
    if apply_chat_template and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        enc = tokenizer.encode(text, add_special_tokens=False)
    else:
        enc = tokenizer.encode(prompt)
    return np.array(enc.input_ids.data, dtype=np.int64).reshape(1, -1)


class TextStream:
    """Incremental detokenisation: emit only text that can no longer change."""

    def __init__(self, tokenizer: ov_genai.Tokenizer, callback: Streamer) -> None:
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: list[int] = []
        self.sent = 0

    def push(self, new_ids: Sequence[int], final: bool = False) -> bool:
        """Feed new ids; return True if the callback asked to stop."""
        self.ids.extend(int(i) for i in new_ids)
        text = self.tokenizer.decode(self.ids) if self.ids else ""
        if not final and text.endswith("\ufffd"):
            return False
        chunk, self.sent = text[self.sent:], max(self.sent, len(text))
        return bool(chunk) and bool(self.callback(chunk))
