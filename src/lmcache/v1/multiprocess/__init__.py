"""The client side of lmcache's MultiProcess (MP) mode, under LMCache's module names.

vLLM 0.32's ``LMCacheMPConnector`` imports ``custom_types``, ``mq`` and ``protocol`` from here;
the server is :mod:`lmcache.mp_server`. Both ends are this package.
"""
