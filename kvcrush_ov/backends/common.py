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


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    hits = [text.find(s) for s in stop_strings if s in text]
    return text[:min(hits)] if hits else text


class TextStream:
    """Incremental detokenisation: emit only text that can no longer change.

    With ``stop_strings`` (and ``include_stop_str_in_output`` False), text is held back while it
    could still turn into a stop string, and nothing from a stop string on is sent, so the
    concatenated chunks equal the returned text (which is cut there too); :meth:`finish` sends
    what is left of that text.
    """

    def __init__(self, tokenizer: ov_genai.Tokenizer, callback: Streamer,
                 stop_strings: Sequence[str] = (), include_stop_str_in_output: bool = False
                 ) -> None:
        self.tokenizer, self.callback = tokenizer, callback
        # returned text with include_stop_str_in_output: every generated token's text
        self.stop_strings = () if include_stop_str_in_output else tuple(stop_strings)
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.text_sent = ""
        self.stopped = False  # a stop string was seen: nothing more is sent

    def _visible(self, text: str, final: bool) -> str:
        """The part of ``text`` that may be sent now."""
        if not self.stop_strings:
            return text
        cut = cut_at_stop(text, self.stop_strings)
        if len(cut) < len(text):
            self.stopped = True
            return cut
        return text if final else text[:max(self.sent, len(text) - self.holdback)]

    def _send(self, text: str) -> bool:
        if len(text) <= self.sent or not text.startswith(self.text_sent):
            return False
        chunk = text[self.sent:]
        self.sent, self.text_sent = len(text), text
        return bool(self.callback(chunk))

    def push(self, new_ids: Sequence[int], final: bool = False) -> bool:
        """Feed new ids; return True if the callback asked to stop."""
        if self.stopped:
            return False
        self.ids.extend(int(i) for i in new_ids)
        text = self.tokenizer.decode(self.ids) if self.ids else ""
        if not final and text.endswith("\ufffd"):
            return False
        return self._send(self._visible(text, final))

    def finish(self, text: str) -> None:
        """The request ended with ``text`` as its returned text: send the rest of it."""
        self._send(text)
