"""CacheBlend building blocks (issue 9): RoPE re-positioning of cached K."""

from lmcache.blend.rotary import FusedRotaryEmb

__all__ = ["FusedRotaryEmb"]
