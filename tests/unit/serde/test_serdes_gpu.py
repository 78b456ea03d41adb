"""CUDA paths of the compressing serdes (device=cuda): the GPU's bytes decode on the CPU and
the CPU's on the GPU, to the same KV within each serde's stated bound. Run on the device."""

from __future__ import annotations

import pytest
import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.memory.memory_obj import MemoryObj
from lmcache.serde import compressed, fp8, kivi
from lmcache.serde.cachegen import CacheGenSerde
from lmcache.serde.fp8 import FP8Serde
from lmcache.serde.kivi import KIVISerde

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class Heap:
    def allocate(self, shape, dtype, fmt):
        n = torch.Size(shape).numel() * dtype.itemsize
        return MemoryObj(torch.empty(n, dtype=torch.uint8), shape, dtype, fmt)


def obj_of(x):
    return MemoryObj(x.contiguous().view(-1).view(torch.uint8).clone(), x.shape, x.dtype,
                     MemoryFormat.KV_2LTD)


def kv(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 256, 128), generator=g) * torch.linspace(0.2, 3.0, 128)
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("make", [
    lambda d: CacheGenSerde(device=d), lambda d: KIVISerde(device=d),
    lambda d: KIVISerde(group_size=64, device=d), lambda d: FP8Serde(head_size=64, device=d)],
    ids=["cachegen", "kivi", "kivi-g64", "fp8"])
def test_gpu_and_cpu_read_each_others_bytes(make):
    x = kv(1)
    cpu, gpu = make("cpu"), make("cuda")
    errors = []
    for writer in (cpu, gpu):
        meta, payload = writer.serialize(obj_of(x))
        wire = bytes(payload)
        on_cpu = cpu.deserialize(meta, wire, Heap()).tensor.float()
        on_gpu = gpu.deserialize(meta, wire, Heap()).tensor.float()
        # the same bytes decode to the same KV on both devices (bf16 rounding of a float32
        # product computed on two devices: at most one bf16 step apart, almost always equal)
        assert float((on_cpu != on_gpu).float().mean()) < 1e-3
        torch.testing.assert_close(on_cpu, on_gpu, rtol=2 ** -7, atol=1e-6)
        errors.append(float((on_cpu - x.float()).norm() / x.float().norm()))
    # both encoders quantize to the same precision (ties at .5 may round apart)
    assert abs(errors[0] - errors[1]) < 0.01 * max(errors) + 1e-6, errors


def test_gpu_resident_decode_equals_host_decode():
    x = kv(2)
    for serde, mod in ((KIVISerde(device="cuda"), kivi), (FP8Serde(head_size=64, device="cuda"),
                                                         fp8)):
        _, payload = serde.serialize(obj_of(x))
        body = bytes(payload)[compressed.HEADER_SIZE:]
        host = mod.decode_body(memoryview(body), 2, 4, 256, 128, "cuda", torch.bfloat16)
        dev = torch.frombuffer(bytearray(body), dtype=torch.uint8).cuda()
        resident = mod.decode_body(dev, 2, 4, 256, 128, "cuda", torch.bfloat16)
        assert resident.is_cuda and torch.equal(host, resident)


@pytest.mark.parametrize("shape, group", [((2, 4, 256, 128), 16), ((2, 8, 256, 1024), 16),
                                          ((2, 3, 100, 40), 16), ((1, 2, 64, 96), 64)])
def test_cachegen_cuda_table_decoder_equals_constriction(shape, group):
    from lmcache.serde import cachegen, cachegen_cuda

    assert cachegen_cuda.available()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * torch.linspace(0.2, 3.0, shape[-1])
    x[..., : shape[-1] // 2] = x[..., : shape[-1] // 2].cumsum(2) * 0.1  # delta and raw tables
    x = x.to(torch.bfloat16)
    obj = MemoryObj(x.contiguous().view(-1).view(torch.uint8).clone(), x.shape, x.dtype,
                    MemoryFormat.KV_MLA_FMT if shape[0] == 1 else MemoryFormat.KV_2LTD)
    _, payload = CacheGenSerde(channel_group=group).serialize(obj)
    body = memoryview(bytes(payload))[compressed.HEADER_SIZE:]
    parts = cachegen.parse_body(bytes(body), *shape)
    assert set(parts["directory"]["mode"].tolist()) == {0, 1}
    on_cpu = cachegen.decode_body(body, *shape, "cpu", torch.bfloat16)
    on_gpu = cachegen.decode_body(body, *shape, "cuda", torch.bfloat16)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-6, atol=0)
