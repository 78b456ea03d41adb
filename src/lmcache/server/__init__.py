"""lmcache's own TCP cache server (``lm://`` remote URLs).

Run it with ``python -m lmcache.server [HOST] [PORT]`` or the ``lmcache-server`` console script;
the wire protocol is documented in :mod:`lmcache.server.protocol`.
"""
