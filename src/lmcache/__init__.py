"""lmcache: a KV-cache layer for LLM serving engines."""

__version__ = "0.1.0"
