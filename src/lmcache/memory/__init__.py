"""Memory: MemoryFormat, MemoryObj and the pinned-CPU allocator."""

from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj

__all__ = ["CPUMemoryAllocator", "MemoryFormat", "MemoryObj"]
