"""vLLM v1 KV-connector integration (import `lmcache_connector_v1` to use it)."""
