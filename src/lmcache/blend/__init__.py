"""CacheBlend building blocks (issue 9): RoPE re-positioning of cached K, the layerwise model
over vLLM's model objects, token selection and the Blender."""

from lmcache.blend.blender import Blender
from lmcache.blend.layerwise_model import LayerwiseModel
from lmcache.blend.rotary import FusedRotaryEmb

__all__ = ["Blender", "FusedRotaryEmb", "LayerwiseModel"]
