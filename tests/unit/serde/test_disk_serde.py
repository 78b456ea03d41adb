"""Serdes on the local_disk tier (``local_disk_serde``, beyond LMCache), with real files: each
serde round-trips through the tier as it does on its own, naive keeps today's bytes, a file is
decoded by its own header's codec whatever the reader is configured with, and a foreign or
newer stream is a miss."""

from __future__ import annotations

import os

import pytest
import torch

from lmcache.config import compose_config
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.keys import CacheEngineKey
from lmcache.memory.memory_format import MemoryFormat
from lmcache.metadata import LMCacheMetadata
from lmcache.serde import compressed
from lmcache.serde.cachegen import CacheGenSerde
from lmcache.serde.fp8 import FP8Serde
from lmcache.serde.kivi import KIVISerde
from lmcache.serde.naive import NaiveSerde
from lmcache.serde.wire.chunk_file import FILE_HEADER_SIZE
from lmcache.storage.backends import disk_files
from lmcache.storage.backends.disk_names import key_to_filename
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.policy.lru import LRUCachePolicy

SHAPE = (2, 3, 64, 32)  # [2, L, T, D], D = 2 heads x 16
SERDES = {"naive": NaiveSerde(), "cachegen": CacheGenSerde(), "kivi": KIVISerde(),
          "fp8": FP8Serde(head_size=16)}


def stated_bound(name, x):
    """Per-element error bound of each serde (as in test_compressed_serdes) for ``x``
    ``[2, 3, 64, 32]``, plus the bf16 rounding of the decoded values."""
    x = x.float()
    if name == "naive":
        return torch.zeros_like(x)
    if name == "kivi":  # 2 bits: half a step of (max - min) / 3 per group of 32
        keys = x[0].reshape(3, 2, 32, 32)  # groups of 32 tokens, per channel
        k = (keys.amax(2) - keys.amin(2))[:, :, None, :].expand_as(keys).reshape(3, 64, 32)
        v = (x[1].amax(-1, keepdim=True) - x[1].amin(-1, keepdim=True)).expand(3, 64, 32)
        b = torch.stack([k, v]) / 6 * 1.002 + 2e-3 * x.abs().amax()
    elif name == "fp8":  # e4m3: 3 mantissa bits; one scale per (K/V, layer, head)
        heads = x.reshape(2, 3, 64, 2, 16)
        scale = heads.abs().amax(dim=(2, 4), keepdim=True).expand_as(heads).reshape(x.shape)
        b = x.abs() / 16 + scale / 448 * 2 ** -9
    else:  # cachegen, LMCache's bins: keys 32 in layers < 10, values 32 in layer 0-1, else 16
        c_k = torch.tensor([15.0, 15.0, 15.0])[:, None, None]
        c_v = torch.tensor([15.0, 15.0, 7.0])[:, None, None]
        bk = (x[0].abs().amax(1, keepdim=True) / (2 * c_k)).expand(3, 64, 32)
        bv = (x[1].abs().amax(2, keepdim=True) / (2 * c_v)).expand(3, 64, 32)
        b = torch.stack([bk, bv]) * 1.002
    return b + x.abs() * 2 ** -8 + 1e-6


@pytest.fixture
def cpu(make_cpu_backend):
    return make_cpu_backend(16)


def kv(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * torch.linspace(0.2, 3.0, SHAPE[-1])
    return x.to(torch.bfloat16)


def key(i):
    return CacheEngineKey("org/model", 1, 0, 0xD15C00 + i, torch.bfloat16)


def disk(cpu, path, serde=None):
    return LocalDiskBackend(cpu, LRUCachePolicy(), local_disk=str(path), max_local_disk_size=0.01,
                            local_disk_serde=serde)


def put(cpu, tier, k, x):
    obj = cpu.allocate(x.shape, x.dtype, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(x)
    tier.put(k, obj)
    obj.ref_count_down()
    assert tier.flush(timeout=60)


def serde_round_trip(cpu, serde, x):
    """What the serde alone gives back for ``x`` (the disk tier must give the same)."""
    obj = cpu.allocate(x.shape, x.dtype, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(x)
    meta, payload = serde.serialize(obj)
    wire = bytes(payload)
    obj.ref_count_down()
    back = serde.deserialize(meta, wire, cpu)
    out = back.tensor.clone()
    back.ref_count_down()
    return out, len(wire)


def files(path):
    return [p for p in path.iterdir() if p.name.endswith(disk_files.SUFFIX)]


@pytest.mark.parametrize("name", list(SERDES))
def test_each_serde_round_trips_through_the_disk_tier(cpu, tmp_path, name):
    serde, x = SERDES[name], kv(1)
    tier = disk(cpu, tmp_path / "d", serde)
    try:
        put(cpu, tier, key(0), x)
        (f,) = files(tmp_path / "d")
        ref, nbytes = serde_round_trip(cpu, serde, x)
        assert f.stat().st_size == FILE_HEADER_SIZE + nbytes == tier.used_bytes
        got = tier.get_blocking(key(0))
        assert (got.shape, got.dtype, got.fmt) == (x.shape, x.dtype, MemoryFormat.KV_2LTD)
        assert torch.equal(got.tensor, ref)  # the tier is a byte store: exactly the serde's output
        err = (got.tensor.float() - x.float()).abs()
        assert (err <= stated_bound(name, x)).all(), float((err - stated_bound(name, x)).max())
        assert (err.max() > 0) == (name != "naive")
        got.ref_count_down()
        if name != "naive":
            assert nbytes < x.numel() * 2 * 0.6
        assert tier.stats["hits"] == 1 and tier.stats["corrupt"] == 0
    finally:
        tier.close()


def test_naive_serde_writes_todays_bytes(cpu, tmp_path):
    x = kv(2)
    for sub, serde in (("none", None), ("naive", NaiveSerde())):
        tier = disk(cpu, tmp_path / sub, serde)
        put(cpu, tier, key(0), x)
        tier.close()
    (a,), (b,) = files(tmp_path / "none"), files(tmp_path / "naive")
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == FILE_HEADER_SIZE + x.numel() * 2


@pytest.mark.parametrize("writer, reader", [("cachegen", "naive"), ("fp8", "kivi"),
                                            ("naive", "cachegen"), ("kivi", "fp8")])
def test_a_file_is_decoded_by_its_own_header_whatever_the_reader(cpu, tmp_path, writer, reader):
    x = kv(3)
    w = disk(cpu, tmp_path / "d", SERDES[writer])
    put(cpu, w, key(0), x)
    w.close()
    r = disk(cpu, tmp_path / "d", SERDES[reader])  # restarted with another serde: index rebuilt
    try:
        got = r.get_blocking(key(0))
        ref, _ = serde_round_trip(cpu, SERDES[writer], x)
        assert torch.equal(got.tensor, ref)
        got.ref_count_down()
    finally:
        r.close()


def test_a_newer_or_foreign_stream_is_a_miss_and_deleted(cpu, tmp_path):
    x, tier = kv(4), disk(cpu, tmp_path / "d", KIVISerde())
    try:
        put(cpu, tier, key(0), x)
        obj = cpu.allocate(x.shape, x.dtype, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(x)
        meta, payload = KIVISerde().serialize(obj)
        obj.ref_count_down()
        stream = bytearray(payload)
        stream[4] = compressed.VERSION + 1  # a newer writer's stream, with a valid checksum
        name = key_to_filename(key(1).to_string(), disk_files.SUFFIX)
        disk_files.write_file(str(tmp_path / "d" / name), meta, memoryview(bytes(stream)),
                              key(1).to_string(), tier.layout)
    finally:
        tier.close()
    tier = disk(cpu, tmp_path / "d", KIVISerde())
    try:
        assert tier.contains(key(1))
        assert tier.get_blocking(key(1)) is None  # a miss, never a crash or wrong KV
        assert tier.stats["corrupt"] == 1 and not (tmp_path / "d" / name).exists()
        got = tier.get_blocking(key(0))  # the good file still reads
        assert got is not None
        got.ref_count_down()
    finally:
        tier.close()


def test_config_key_reaches_the_disk_tier_through_the_container(tmp_path):
    cfg = compose_config(["storage/backends=[local_cpu,local_disk]", f"local_disk={tmp_path}/d",
                          "max_local_disk_size=0.01", "max_local_cpu_size=0.02",
                          "local_disk_serde=kivi", "local_disk_serde.group_size=64"])
    meta = LMCacheMetadata("org/model", 1, 0, torch.bfloat16, (3, 2, 256, 2, 16))
    container = build_worker_container(cfg, meta, KVCacheLayout(
        "cpu_packed", block_size=16, num_kv_heads=2, head_size=16))
    try:
        cpu, tier = container.backends()
        assert isinstance(tier.serde, KIVISerde) and tier.serde.group_size == 64
        assert isinstance(container.serde(), NaiveSerde)  # the remote serde is its own key
        put(cpu, tier, key(0), kv(5))
        (f,) = files(tmp_path / "d")
        _, nbytes = serde_round_trip(cpu, KIVISerde(group_size=64), kv(5))
        assert os.path.getsize(f) == FILE_HEADER_SIZE + nbytes < kv(5).numel() * 2 / 4
    finally:
        shutdown(container)


def test_default_config_keeps_raw_disk_files():
    assert compose_config([]).local_disk_serde["_target_"] == "lmcache.serde.naive.NaiveSerde"
