"""lmcache's MultiProcess (MP) server: lmcache in its own process behind vLLM's
``LMCacheMPConnector`` (``python -m lmcache.mp_server``, console script ``lmcache-mp-server``).

Modules: ``server`` (MPServer: the ZMQ loop and transfers), ``session_manager``,
``gpu_cache_context`` (registered KV caches), ``engine_pool`` (the engines, one storage manager),
``offload_server`` (KV sent by value from any process), ``__main__`` (command line).
"""
