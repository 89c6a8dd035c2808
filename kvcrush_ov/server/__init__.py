"""kvcrush-ov serve: an OpenAI-compatible HTTP server on the native engine."""
