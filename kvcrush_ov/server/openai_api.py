"""OpenAI request bodies -> kvcrush-ov configuration, and kvcrush-ov results -> OpenAI bodies.

Every invalid field raises :class:`ConfigError` named as the client wrote it (``max_tokens``,
``messages[1].content``, ``kv_cache_eviction.max_cache_size``), turned into HTTP 400 by the app.
Extensions beside the OpenAI fields: ``top_k``, ``repetition_penalty``, ``ignore_eos`` and
``kv_cache_eviction`` (a :class:`CacheEvictionConfig` as a JSON object, ``kvcrush`` nested).
"""

from __future__ import annotations

import math
import time
import uuid

from kvcrush_ov.config import CacheEvictionConfig, GenerationConfig, KVCrushConfig
from kvcrush_ov.errors import ConfigError

# GenerationConfig field -> the OpenAI field it comes from
_OPENAI_NAME = {"max_new_tokens": "max_tokens", "rng_seed": "seed", "stop_strings": "stop"}
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # OpenAI's completions default is 16
_IGNORED = {"user", "stream_options", "suffix", "logit_bias", "parallel_tool_calls"}
_KNOWN = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "seed", "stop", "n", "stream", "echo", "logprobs", "top_logprobs",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
          "kv_cache_eviction", "best_of"} | _IGNORED


def renamed(e: ConfigError, prefix: str = "") -> ConfigError:
    name = _OPENAI_NAME.get(e.field, e.field)
    if e.field.startswith("eviction."):
        name = "kv_cache_eviction." + e.field.split(".", 1)[1]
    elif e.field.startswith("kvcrush."):
        name = "kv_cache_eviction.kvcrush." + e.field.split(".", 1)[1]
    return ConfigError(prefix + name, e.value, e.allowed)


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(name, v, "a finite number")
    return v


def parse(body: object, kind: str, served_model: str) -> dict:
    """``kind``: "completion" or "chat". Returns ``prompt`` / ``messages``, ``config``
    (GenerationConfig), ``eviction`` (CacheEvictionConfig or None), ``stream``."""
    if not isinstance(body, dict):
        raise ConfigError("body", type(body).__name__, "a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise ConfigError(unknown[0], body[unknown[0]], "a known field of this endpoint")
    out: dict = {}
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError("model", model, f"the served model's name, {served_model!r}")
    if kind == "completion":
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        if not isinstance(p, str) or not p.strip():
            raise ConfigError("prompt", p, "a non-empty string (one prompt per request)")
        out["prompt"] = p
    else:
        out["messages"] = _messages(body.get("messages"))
    for name, allowed in (("n", 1), ("best_of", 1)):
        if body.get(name, 1) not in (1, None):
            raise ConfigError(name, body[name], f"{allowed} (one choice per request)")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise ConfigError(name, body[name], "0 (use repetition_penalty)")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise ConfigError("logprobs", body.get("logprobs"), "null (log-probabilities are not "
                          "returned)")
    if body.get("echo") not in (None, False):
        raise ConfigError("echo", body["echo"], "false")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ConfigError("stream", stream, "true or false")
    out["stream"] = stream
    out["config"] = _generation(body, kind)
    out["eviction"] = _eviction(body.get("kv_cache_eviction"))
    return out


def _messages(msgs: object) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ConfigError("messages", msgs, "a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ConfigError(f"messages[{i}]", m, "an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ConfigError(f"messages[{i}].role", role, f"one of {', '.join(ROLES)}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [c.get("text") for c in content if isinstance(c, dict)]
            if not parts or any(not isinstance(t, str) for t in parts):
                raise ConfigError(f"messages[{i}].content", content, "text parts only")
            content = "".join(parts)
        if not isinstance(content, str):
            raise ConfigError(f"messages[{i}].content", content, "a string")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise ConfigError("messages", msgs, "at least one message with content")
    return out


def _generation(body: dict, kind: str) -> GenerationConfig:
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    temperature = _number(body, "temperature", 1.0)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, list):
        raise ConfigError("stop", stop, "a string or a list of strings")
    seed = body.get("seed")
    kw = dict(max_new_tokens=DEFAULT_MAX_TOKENS[kind] if mt is None else mt,
              do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
              top_p=_number(body, "top_p", 1.0), top_k=body.get("top_k") or 0,
              rng_seed=0 if seed is None else seed,
              repetition_penalty=_number(body, "repetition_penalty", 1.0),
              stop_strings=tuple(stop), ignore_eos=body.get("ignore_eos", False),
              apply_chat_template=False)
    if temperature < 0:
        raise ConfigError("temperature", temperature, "a number >= 0 (0: greedy)")
    try:
        return GenerationConfig(**kw)
    except ConfigError as e:
        if e.field == "max_new_tokens":
            raise ConfigError(name, e.value, e.allowed) from None
        raise renamed(e) from None


def _eviction(ev: object) -> CacheEvictionConfig | None:
    if ev is None:
        return None
    if not isinstance(ev, dict):
        raise ConfigError("kv_cache_eviction", ev, "an object of CacheEvictionConfig fields")
    fields = dict(ev)
    crush = fields.pop("kvcrush", {})  # absent: KVCrush's defaults, as in CacheEvictionConfig
    try:
        if isinstance(crush, dict):
            if isinstance(crush.get("anchor_point_mode"), list):
                crush = {**crush, "anchor_point_mode": tuple(crush["anchor_point_mode"])}
            crush = KVCrushConfig(**crush)
        elif crush is not None:
            raise ConfigError("kvcrush", crush, "an object of KVCrushConfig fields or null")
        return CacheEvictionConfig(**fields, kvcrush=crush)
    except TypeError as e:  # an unknown field name
        raise ConfigError("kv_cache_eviction", ev,
                          f"CacheEvictionConfig fields ({str(e).split(': ')[-1]})") from None
    except ConfigError as e:
        raise renamed(e) from None


# -- responses -----------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def body(kind: str, rid: str, model: str, text: str, reason: str, use: dict) -> dict:
    if kind == "completion":
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": reason, "logprobs": None}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def chunk(kind: str, rid: str, model: str, text: str | None, reason: str | None,
          first: bool = False) -> dict:
    if kind == "completion":
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    else:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice]}


def error(status: int, message: str, param: str | None = None,
          kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
