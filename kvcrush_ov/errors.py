"""Errors kvcrush-ov raises. Every message names the field at fault and what is allowed."""

from __future__ import annotations


class KVCrushError(Exception):
    """Base class of every error kvcrush-ov raises on purpose."""


class ConfigError(KVCrushError, ValueError):
    """An invalid value for a named field, raised before any work starts.

    >>> str(ConfigError("budget", 1.5, "a fraction in (0, 1] or a token count >= 1"))
    "budget=1.5 is invalid: allowed is a fraction in (0, 1] or a token count >= 1"
    """

    def __init__(self, field: str, value: object, allowed: str, hint: str = "") -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        msg = f"{field}={value!r} is invalid: allowed is {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ModelError(KVCrushError):
    """A model folder is missing, incomplete or corrupt, or a model could not be loaded."""


class FetchError(KVCrushError):
    """Fetching or exporting a registry model failed (registry, checksum, disk, export)."""


class CacheFullError(KVCrushError, RuntimeError):
    """A request needs more KV cache than the whole cache holds, with nothing else left to free
    (preempting it would only start it over, forever)."""


class ChatError(KVCrushError, RuntimeError):
    """A chat call out of order, e.g. ``finish_chat()`` with no chat open."""
