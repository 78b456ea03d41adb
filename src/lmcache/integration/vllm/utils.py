"""vLLM helpers LMCache exposes as ``lmcache.integration.vllm.utils`` (vLLM's
``LMCacheMPConnector`` imports :func:`mla_enabled` from here)."""

from __future__ import annotations

from typing import Any


def mla_enabled(model_config: Any) -> bool:
    """True when vLLM runs the model with MLA (one latent KV per token): vLLM's
    ``ModelConfig.use_mla``; False for a config without it."""
    return bool(getattr(model_config, "use_mla", False))
