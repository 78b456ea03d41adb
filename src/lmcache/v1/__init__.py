"""LMCache-compatible module paths (``lmcache.v1.*``) that vLLM's built-in adapters import."""
