"""An instance configured with serde=naive reads compressed streams by their own header and
turns newer or foreign streams into errors (the remote tier's misses)."""

from __future__ import annotations

import pytest
import torch

from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde import compressed
from lmcache.serde.cachegen import CacheGenSerde
from lmcache.serde.fp8 import FP8Serde
from lmcache.serde.kivi import KIVISerde
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.fs import FSConnector

SHAPE = (2, 2, 32, 32)


@pytest.fixture
def cpu(make_cpu_backend):
    return make_cpu_backend(4)


def kv_obj(cpu, seed):
    obj = cpu.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)))
    return obj


@pytest.mark.parametrize("writer", [CacheGenSerde(), KIVISerde(), FP8Serde(head_size=16)],
                         ids=["cachegen", "kivi", "fp8"])
def test_naive_decodes_each_codec_like_the_writer(cpu, writer):
    obj = kv_obj(cpu, 1)
    meta, payload = writer.serialize(obj)
    obj.ref_count_down()
    own = writer.deserialize(meta, bytes(payload), cpu)
    naive = NaiveSerde().deserialize(meta, bytes(payload), cpu)
    assert (naive.shape, naive.dtype, naive.fmt) == (own.shape, own.dtype, own.fmt)
    assert torch.equal(naive.tensor, own.tensor)
    own.ref_count_down()
    naive.ref_count_down()


@pytest.mark.parametrize("byte, value, match", [(4, compressed.VERSION + 1, "version"),
                                                (5, 77, "unknown codec 77")])
def test_naive_rejects_newer_or_unknown_streams(cpu, byte, value, match):
    obj = kv_obj(cpu, 2)
    meta, payload = KIVISerde().serialize(obj)
    obj.ref_count_down()
    stream = bytearray(payload)
    stream[byte] = value
    with pytest.raises(ValueError, match=match):
        NaiveSerde().deserialize(meta, bytes(stream), cpu)


def test_naive_remote_instance_reads_a_cachegen_store(cpu, tmp_path):
    key = CacheEngineKey("org/model", 1, 0, 0xABC, torch.bfloat16)
    writer = RemoteBackend(cpu, CacheGenSerde(), FSConnector(f"fs://{tmp_path}/r"),
                           blocking_timeout_secs=30)
    reader = RemoteBackend(cpu, NaiveSerde(), FSConnector(f"fs://{tmp_path}/r"),
                           blocking_timeout_secs=30)
    try:
        obj = kv_obj(cpu, 3)
        ref = obj.tensor.float().clone()
        writer.put(key, obj)
        obj.ref_count_down()
        assert writer.flush(timeout=60)
        got = reader.get_blocking(key)
        assert got.shape == torch.Size(SHAPE) and got.dtype == torch.bfloat16
        assert (got.tensor.float() - ref).norm() / ref.norm() < 0.1
        got.ref_count_down()
    finally:
        writer.close()
        reader.close()
