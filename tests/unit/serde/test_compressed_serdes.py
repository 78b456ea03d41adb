"""CacheGen, KIVI and fp8 serdes: error bounds, lossless pass-through, cross-serde reads, and
foreign / newer / corrupt streams as misses (CPU)."""

from __future__ import annotations

import struct

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

SHAPE = (2, 3, 64, 32)  # [2, L, T, D], D = 2 heads x 16


@pytest.fixture
def cpu(make_cpu_backend):
    return make_cpu_backend(8)


def kv(seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.linspace(0.2, 3.0, shape[-1])  # outlier channels
    return x.to(dtype)


def round_trip(serde, cpu, x, fmt=MemoryFormat.KV_2LTD, reader=None):
    obj = cpu.allocate(x.shape, x.dtype, fmt)
    obj.tensor.copy_(x)
    meta, payload = serde.serialize(obj)
    wire = bytes(payload)
    obj.ref_count_down()
    assert meta.fmt == MemoryFormat.BINARY and meta.length == len(wire) and meta.dtype is None
    back = (reader or serde).deserialize(meta, wire, cpu)
    assert (back.shape, back.dtype, back.fmt) == (x.shape, x.dtype, fmt)
    out = back.tensor.clone()
    back.ref_count_down()
    return out, wire


def test_kivi_error_within_group_bound(cpu):
    x = kv(1)
    out, wire = round_trip(KIVISerde(group_size=32), cpu, x)
    err = (out - x).abs()
    keys = x[0].reshape(3, 2, 32, 32)  # [L, token groups, 32 tokens, D]: per channel
    krange = (keys.amax(2) - keys.amin(2))[:, :, None, :].expand_as(keys).reshape(3, 64, 32)
    vals = x[1].reshape(3, 64, 1, 32)  # per token, one group of 32 channels
    vrange = (vals.amax(-1) - vals.amin(-1)).expand(3, 64, 32)
    bound = torch.stack([krange, vrange]) / 6 * 1.002 + 2e-3 * x.abs().amax() + 1e-6
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0  # lossy
    # 2 bits + 2 x fp16 per 32 elements, plus 36 bytes of headers
    assert len(wire) == x.numel() * 3 // 8 + compressed.HEADER_SIZE + 4


def test_kivi_pads_odd_token_counts_and_group_64_is_smaller(cpu):
    x = kv(2, (2, 2, 250, 128), torch.bfloat16)
    out32, w32 = round_trip(KIVISerde(group_size=32), cpu, x)
    out64, w64 = round_trip(KIVISerde(group_size=64), cpu, x)
    rng = (x.float().amax() - x.float().amin())
    assert (out32.float() - x.float()).abs().max() <= rng / 6 + 0.05
    assert len(w64) < len(w32)
    assert x.numel() * 2 / len(w64) > 5.5


def test_fp8_error_bound_and_size(cpu):
    x = kv(3)
    out, wire = round_trip(FP8Serde(head_size=16), cpu, x)
    heads = x.reshape(2, 3, 64, 2, 16)
    scale = heads.abs().amax(dim=(2, 4), keepdim=True).expand_as(heads).reshape(x.shape) / 448
    assert ((out - x).abs() <= x.abs() / 16 + scale * 2 ** -9 + 1e-7).all()
    assert len(wire) == x.numel() + 4 * 2 * 3 * 2 + compressed.HEADER_SIZE + 8


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kv_passes_through_bit_exactly(cpu, dtype):
    x = kv(4).to(dtype)
    out, wire = round_trip(FP8Serde(head_size=16), cpu, x)
    assert torch.equal(out.view(torch.uint8), x.view(torch.uint8))


def test_cachegen_error_within_bin_bound(cpu):
    x = kv(5)
    serde = CacheGenSerde(key_bins=[32, 16], value_bins=[32, 16], key_early_layers=2,
                          value_early_layers=1, channel_group=8)
    out, wire = round_trip(serde, cpu, x)
    c_k = torch.tensor([15.0, 15.0, 7.0])[:, None, None]
    c_v = torch.tensor([15.0, 7.0, 7.0])[:, None, None]
    bk = x[0].abs().amax(1, keepdim=True) / (2 * c_k)  # per channel
    bv = x[1].abs().amax(2, keepdim=True) / (2 * c_v)  # per token
    bound = torch.stack([bk.expand(3, 64, 32), bv.expand(3, 64, 32)]) * 1.002 + 1e-6
    assert ((out - x).abs() <= bound).all()
    assert len(wire) < x.numel() * 2 / 3  # well under bf16 even on Gaussian noise


def test_cachegen_token_delta_shrinks_smooth_kv(cpu):
    g = torch.Generator().manual_seed(6)
    smooth = torch.randn(SHAPE, generator=g).cumsum(2) * 0.05  # neighbouring tokens alike
    shuffled = smooth[:, :, torch.randperm(64, generator=g)]  # same values, no token order
    _, wire = round_trip(CacheGenSerde(), cpu, smooth)
    _, wire_shuffled = round_trip(CacheGenSerde(), cpu, shuffled)
    assert compressed.parse_header(wire)[0] == "cachegen"
    assert len(wire) < 0.8 * len(wire_shuffled)


@pytest.mark.parametrize("fmt, shape", [
    (MemoryFormat.KV_T2D, (40, 2, 32)),
    (MemoryFormat.KV_2TD, (2, 40, 32)),
    (MemoryFormat.KV_MLA_FMT, (1, 2, 40, 32)),
])
@pytest.mark.parametrize("serde", [CacheGenSerde(), KIVISerde(), FP8Serde(head_size=16)],
                         ids=["cachegen", "kivi", "fp8"])
def test_every_kv_format_round_trips(cpu, serde, fmt, shape):
    x = kv(7, shape, torch.bfloat16)
    out, _ = round_trip(serde, cpu, x, fmt)
    if fmt == MemoryFormat.KV_MLA_FMT:
        assert (out.float() - x.float()).norm() / x.float().norm() < 0.6
        return
    canonical = compressed.to_canonical(x, fmt).contiguous()  # [2, 1, T, D]
    ref, _ = round_trip(serde, cpu, canonical)
    assert torch.equal(out, compressed.from_canonical(ref, fmt))


@pytest.mark.parametrize("writer", [CacheGenSerde(), KIVISerde(), FP8Serde(head_size=16)],
                         ids=["cachegen", "kivi", "fp8"])
def test_a_stream_is_decoded_by_its_own_header_whatever_the_reader(cpu, writer):
    x = kv(8, dtype=torch.bfloat16)
    own, _ = round_trip(writer, cpu, x)
    for reader in (CacheGenSerde(), KIVISerde(group_size=64), FP8Serde()):
        out, _ = round_trip(writer, cpu, x, reader=reader)
        assert torch.equal(out, own)


def test_compressing_serde_reads_naive_payloads_and_writes_raw_bytes_naively(cpu):
    x = kv(9, dtype=torch.float16)
    obj = cpu.allocate(x.shape, x.dtype, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(x)
    meta, payload = NaiveSerde().serialize(obj)
    back = KIVISerde().deserialize(meta, bytes(payload), cpu)
    assert torch.equal(back.tensor, x)
    back.ref_count_down()
    obj.ref_count_down()
    raw = cpu.allocate((10,), torch.uint8, MemoryFormat.BINARY)
    raw.tensor.copy_(torch.arange(10, dtype=torch.uint8))
    meta, payload = CacheGenSerde().serialize(raw)
    assert meta.fmt == MemoryFormat.BINARY and bytes(payload) == bytes(range(10))
    raw.ref_count_down()


def _stream(cpu):
    x = kv(10, dtype=torch.bfloat16)
    obj = cpu.allocate(x.shape, x.dtype, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(x)
    meta, payload = KIVISerde().serialize(obj)
    obj.ref_count_down()
    return meta, bytearray(payload)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b.__setitem__(4, compressed.VERSION + 1), "version 2 is not supported"),
    (lambda b: b.__setitem__(5, 9), "unknown codec 9"),
    (lambda b: b.__setitem__(7, 6), "not a KV tensor"),  # dtype code uint8
    (lambda b: b.__delitem__(slice(-5, None)), "KIVI body"),
    (lambda b: b.extend(b"xyz"), "trailing bytes"),
    (lambda b: b.__delitem__(slice(20, None)), "shorter than its header"),
])
@pytest.mark.parametrize("reader", [CacheGenSerde()], ids=["cachegen"])
def test_newer_foreign_or_corrupt_streams_raise_value_error(cpu, damage, match, reader):
    meta, stream = _stream(cpu)
    damage(stream)
    meta = type(meta)(len(stream), meta.fmt, None, (len(stream),))
    with pytest.raises(ValueError, match=match):
        reader.deserialize(meta, bytes(stream), cpu)


def test_cachegen_corrupt_table_is_an_error_not_wrong_kv(cpu):
    x = kv(11, dtype=torch.bfloat16)
    obj = cpu.allocate(x.shape, x.dtype, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(x)
    meta, payload = CacheGenSerde().serialize(obj)
    obj.ref_count_down()
    stream = bytearray(payload)
    # header 32 | params 8 | bins 6 + 2 pad | scales 2 x (3 x 32 + 3 x 64) | directory
    first_table = compressed.HEADER_SIZE + 8 + 8 + 2 * (3 * 32 + 3 * 64)
    mode, lo, n, nwords = struct.unpack_from("<BBBxI", stream, first_table)
    struct.pack_into("<BBBxI", stream, first_table, mode, lo, n, nwords + 1000)
    with pytest.raises(ValueError):
        CacheGenSerde().deserialize(meta, bytes(stream), cpu)


def key(i):
    return CacheEngineKey("org/model", 1, 0, 0xC0DE00 + i, torch.bfloat16)


@pytest.mark.parametrize("serde", [CacheGenSerde(), KIVISerde(), FP8Serde(head_size=16)],
                         ids=["cachegen", "kivi", "fp8"])
def test_remote_tier_stores_compressed_and_another_instance_reads_it(cpu, tmp_path, serde):
    x = kv(12, dtype=torch.bfloat16)
    writer = RemoteBackend(cpu, serde, FSConnector(f"fs://{tmp_path}/r"), blocking_timeout_secs=30)
    reader = RemoteBackend(cpu, FP8Serde(), FSConnector(f"fs://{tmp_path}/r"),
                           blocking_timeout_secs=30)
    try:
        obj = cpu.allocate(x.shape, x.dtype, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(x)
        writer.put(key(0), obj)
        obj.ref_count_down()
        assert writer.flush(timeout=60)
        size = sum(p.stat().st_size for p in (tmp_path / "r").iterdir())
        assert size < x.numel() * 2 * (0.6 if serde.name == "fp8" else 0.4)
        got = reader.get_blocking(key(0))
        ref, _ = round_trip(serde, cpu, x)
        assert torch.equal(got.tensor, ref)
        got.ref_count_down()
        path = next((tmp_path / "r").iterdir())
        data = bytearray(path.read_bytes())
        at = data.find(compressed.MAGIC)
        data[at + 4] = compressed.VERSION + 1  # a newer writer's stream
        path.write_bytes(bytes(data))
        assert reader.get_blocking(key(0)) is None  # a miss, never a crash
        assert reader.stats["corrupt"] == 1
    finally:
        writer.close()
        reader.close()


def test_bad_config_values_name_the_value():
    with pytest.raises(ValueError, match="group_size=5"):
        KIVISerde(group_size=5)
    with pytest.raises(ValueError, match="bits=3"):
        KIVISerde(bits=3)
    with pytest.raises(ValueError, match="key_bins"):
        CacheGenSerde(key_bins=[33, 16])
    with pytest.raises(ValueError, match="device='tpu'"):
        FP8Serde(device="tpu")
