"""The cache controller (LMCache's CacheController) and each instance's LMCacheWorker.

* :mod:`lmcache.controller.cache_controller` — the controller process's core: workers register,
  heartbeat and stream admit/evict events over ZMQ; the global chunk index (``index/``) maps
  chunk hash → (instance, worker, tier); an instance whose heartbeats stop is dropped.
* :mod:`lmcache.controller.http_api` — LMCache's controller operations over HTTP (FastAPI).
* :mod:`lmcache.controller.lmcache_worker` — the instance side (config option
  ``controller=lmcache_worker``; LMCache's ``enable_controller``).
* ``python -m lmcache.controller`` / ``lmcache-controller`` — the controller process.

Nothing heavy is imported here.
"""
