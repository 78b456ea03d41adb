"""Observability: Prometheus metrics of an lmcache engine (``stats.LMCStatsMonitor``)."""
