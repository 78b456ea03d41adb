"""VLLMPagedMemGPUConnectorV2 on a CPU cache: backend selection and its torch fallback.

The kernel path of the same class is checked bit for bit in test_kernels_gpu.py; here the class
must behave exactly like the torch connector wherever the kernels cannot run.
"""

from __future__ import annotations

import pytest
import torch

from lmcache.gpu_connector.cupy_kernels import csrc_dir, cupy_available, kernel_source
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.paged_torch import TorchPagedMemGPUConnector
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2, resolve_backend
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata


def _setup(**kw):
    meta = LMCacheMetadata("m", 1, 0, torch.float16, (2, 2, 16, 2, 4))
    layout = KVCacheLayout("legacy_5d", 4, 2, 4)
    return meta, layout, VLLMPagedMemGPUConnectorV2(meta, layout, **kw)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_cache_uses_the_torch_path_with_identical_results(backend):
    meta, layout, conn = _setup(backend=backend)
    ref = TorchPagedMemGPUConnector(meta, layout)
    assert isinstance(conn, TorchPagedMemGPUConnector)
    gen = torch.Generator().manual_seed(3)
    kv = [torch.randn(2, 6, 4, 2, 4, generator=gen).half() for _ in range(2)]
    assert not conn.uses_kernels(kv)
    slots = torch.randperm(24, generator=gen)[:10]
    alloc = CPUMemoryAllocator(1 << 16)
    a = alloc.allocate(conn.get_shape(10), torch.float16, conn.fmt)
    b = alloc.allocate(conn.get_shape(10), torch.float16, conn.fmt)
    conn.from_gpu(a, 0, 10, kvcaches=kv, slot_mapping=slots)
    ref.from_gpu(b, 0, 10, kvcaches=kv, slot_mapping=slots)
    assert torch.equal(a.tensor, b.tensor)
    dst1, dst2 = [torch.zeros_like(t) for t in kv], [torch.zeros_like(t) for t in kv]
    conn.to_gpu(a, 0, 10, kvcaches=dst1, slot_mapping=slots)
    ref.to_gpu(b, 0, 10, kvcaches=dst2, slot_mapping=slots)
    assert all(torch.equal(x, y) for x, y in zip(dst1, dst2))
    assert int((dst1[0] != 0).sum()) == 10 * 2 * 2 * 4  # 10 slots x K,V x heads x head size
    conn.validate_kvcaches(kv)  # cached: a second identical call passes
    with pytest.raises(ValueError, match="kvcaches"):
        conn.validate_kvcaches(kv[:1])
    a.ref_count_down()
    b.ref_count_down()


def test_backend_and_transfer_values_are_checked():
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == ("cupy" if cupy_available() else "torch")
    with pytest.raises(ValueError, match="backend"):
        _setup(backend="gpu")
    with pytest.raises(ValueError, match="transfer"):
        _setup(backend="torch", transfer="zero-copy")
    with pytest.raises(ValueError, match="staging_mib"):
        _setup(backend="torch", staging_mib=0)
    if not cupy_available():
        with pytest.raises(RuntimeError, match="cupy"):
            _setup(backend="cupy")


def test_kernel_sources_ship_and_inline_their_header():
    assert (csrc_dir() / "vllm_paged.cu").is_file()
    for name, entry in (("vllm_paged", "multi_layer_kv_to_paged_w"),
                        ("vllm_layerwise", "single_layer_kv_from_paged_w")):
        src = kernel_source(name)
        assert "#include \"" not in src and entry in src and "lmc_paged_kv_transfer" in src
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel_source("nope")
