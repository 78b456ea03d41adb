"""The engine: ``lmcache_engine.LMCacheEngine`` joins store / retrieve / lookup for one worker."""
