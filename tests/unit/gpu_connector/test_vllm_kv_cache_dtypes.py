"""Issue 7.4: every ``--kv-cache-dtype`` vLLM 0.32 offers maps (through vLLM's own table) to a
torch dtype that test_kv_dtypes.py moves bit-exactly through every connector."""

from typing import get_args

import torch

from test_kv_dtypes import DTYPES


def test_every_vllm_cache_dtype_maps_to_a_tested_dtype():
    from vllm.config.cache import CacheDType  # imported here: vLLM slows every later gc
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    offered = [c for c in get_args(CacheDType) if c != "auto"]
    for name in ("float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8_per_token_head"):
        assert name in offered
    auto = [torch.bfloat16, torch.float16, torch.float32]  # "auto": the model's dtype
    for dtype in auto:
        assert dtype in DTYPES
    for name in offered + ["int8", "float32"]:
        assert STR_DTYPE_TO_TORCH_DTYPE[name] in DTYPES, name
