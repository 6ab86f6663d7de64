"""kvbus: a Redis-backed control plane for the KV caches of LLM inference engines."""

__version__ = "0.1.0"
