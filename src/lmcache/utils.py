"""Small helpers that LMCache exposes as ``lmcache.utils`` and vLLM's LMCache adapters import.

vLLM 0.32's ``LMCacheMPConnector`` and its ``multi_process_adapter.py`` import
``init_logger`` and ``_lmcache_nvtx_annotate`` from here (LMCache 0.5.6 names).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def init_logger(name: str) -> logging.Logger:
    """The ``logging.Logger`` of ``name`` (LMCache's helper name); lmcache leaves handlers and
    levels to the application (vLLM configures its own)."""
    return logging.getLogger(name)


def _lmcache_nvtx_annotate(func: F) -> F:
    """Decorator: run ``func`` inside an NVTX range named after it when CUDA is available
    (visible in Nsight Systems), plainly otherwise. Returns the wrapped function."""
    name = getattr(func, "__qualname__", getattr(func, "__name__", "lmcache"))

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import torch

        if not torch.cuda.is_available():
            return func(*args, **kwargs)
        torch.cuda.nvtx.range_push(name)
        try:
            return func(*args, **kwargs)
        finally:
            torch.cuda.nvtx.range_pop()

    return wrapper  # type: ignore[return-value]
