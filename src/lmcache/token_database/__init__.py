"""Token databases: token sequence -> (start, end, CacheEngineKey) chunks."""

from lmcache.token_database.base import TokenDatabase
from lmcache.token_database.chunked import ChunkedTokenDatabase

__all__ = ["ChunkedTokenDatabase", "TokenDatabase"]
