"""The interop checks (one function per check, registered with ``@check(group)``).

Groups: ``keys`` (key strings), ``hashes`` (token database chains), ``remote`` (every remote
scheme both accept, both directions), ``config`` (LMCache's example configs).
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import torch

from interop_base import Ctx, Row, check

ROOT = Path(__file__).resolve().parents[2]
MODEL = "org/model"
L, H, D, C = 2, 4, 16, 16  # layers, KV heads, head size, chunk size (hidden 64)


def _meta(dtype: torch.dtype):
    from lmcache.metadata import LMCacheMetadata

    return LMCacheMetadata(MODEL, 1, 0, dtype, (L, 2, C, H, D))


def _side_geometry(dtype: torch.dtype) -> dict:
    return dict(layers=L, heads=H, head_size=D, chunk_size=C, model=MODEL,
                dtype=str(dtype).removeprefix("torch."))


# ---- keys ------------------------------------------------------------------------------------
KEY_CASES = [
    ("plain bf16", dict(model_name="meta-llama/Llama-3.1-8B", world_size=1, worker_id=0,
                        chunk_hash=0xB8A960CFCC69E7A5, dtype=torch.bfloat16)),
    ("fp16 (half), TP rank 1 of 2", dict(model_name="org/model", world_size=2, worker_id=1,
                                         chunk_hash=0x5EED, dtype=torch.float16)),
    ("user tag", dict(model_name="m", world_size=1, worker_id=0, chunk_hash=255,
                      dtype=torch.bfloat16, request_configs={"lmcache.tag.user": "alice"})),
    ("two tags in insertion order", dict(
        model_name="m", world_size=1, worker_id=0, chunk_hash=1, dtype=torch.float32,
        request_configs={"lmcache.tag.zone": "b", "lmcache.tag.app": "a"})),
]


@check("keys")
def check_key_strings(ctx: Ctx) -> list[Row]:
    from lmcache.keys import CacheEngineKey

    rows = []
    for name, fields in KEY_CASES:
        ours = CacheEngineKey(**fields).to_string()
        req = dict(action="key", model=fields["model_name"], world_size=fields["world_size"],
                   worker_id=fields["worker_id"], chunk_hash=fields["chunk_hash"],
                   dtype=str(fields["dtype"]).removeprefix("torch."),
                   request_configs=fields.get("request_configs"))
        theirs = ctx.side(req)["key"]
        rows.append(Row(f"key string: {name}", "PASS" if ours == theirs else "FAIL",
                        f"`{ours}`" if ours == theirs else f"lmcache `{ours}` LMCache `{theirs}`"))
    return rows


# ---- hashes ----------------------------------------------------------------------------------
def _vllm_shim(ctx: Ctx, seed: str | None) -> str:
    """A ``vllm`` package for the LMCache side (which has no vLLM): vLLM 0.32's own
    ``vllm/utils/hashing.py`` file (copied verbatim from lmcache's venv) and a
    ``kv_cache_utils.init_none_hash`` that sets the NONE_HASH real vLLM computes here."""
    import importlib

    from vllm.utils import hashing
    from vllm.v1.core import kv_cache_utils

    root = ctx.tmp / f"vllm-shim-{seed}"
    if root.exists():
        return str(root)
    (root / "vllm" / "utils").mkdir(parents=True)
    (root / "vllm" / "v1" / "core").mkdir(parents=True)
    for init in ("vllm", "vllm/v1"):
        (root / init / "__init__.py").write_text("")
    shutil.copy(hashing.__file__, root / "vllm" / "utils" / "hashing.py")
    (root / "vllm" / "utils" / "__init__.py").write_text(
        "from vllm.utils.hashing import get_hash_fn_by_name  # noqa: F401\n")
    (root / "vllm" / "v1" / "core" / "__init__.py").write_text("")
    values = {}
    for algo in ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"):
        try:
            kv_cache_utils.init_none_hash(hashing.get_hash_fn_by_name(algo))
            values[algo] = bytes(kv_cache_utils.NONE_HASH).hex()
        except Exception:
            continue
    importlib.reload(kv_cache_utils)
    (root / "vllm" / "v1" / "core" / "kv_cache_utils.py").write_text(textwrap.dedent(f"""\
        # NONE_HASH values computed by the real vLLM 0.32 (lmcache's venv) for this seed
        _VALUES = {values!r}
        NONE_HASH = None

        def init_none_hash(hash_fn):
            global NONE_HASH
            name = getattr(hash_fn, "__name__", "")
            NONE_HASH = bytes.fromhex(_VALUES[name])
        """))
    return str(root)


@check("hashes")
def check_hash_chains(ctx: Ctx) -> list[Row]:
    from lmcache.token_database.chunked import ChunkedTokenDatabase

    tokens = list(range(1000, 1000 + 3 * C + 5))  # 3 full chunks and a partial one
    rows = []
    for algo in ("sha256_cbor", "sha256", "xxhash", "xxhash_cbor"):
        for seed in (None, "0"):
            old = os.environ.get("PYTHONHASHSEED")
            if seed is None:
                os.environ.pop("PYTHONHASHSEED", None)
            else:
                os.environ["PYTHONHASHSEED"] = seed
            try:
                shim = _vllm_shim(ctx, seed)
                name = f"{algo}, PYTHONHASHSEED={seed or 'unset'}"
                try:
                    db = ChunkedTokenDatabase(_meta(torch.bfloat16), chunk_size=C,
                                              hash_algorithm=algo, save_unfull_chunk=True)
                    ours = [k.to_string() for _, _, k in db.process_tokens(tokens)]
                except Exception as e:
                    rows.append(Row(f"chain: {name}", "FAIL", f"lmcache: {e}"[:200]))
                    continue
                env = {"PYTHONPATH": shim}
                if seed is not None:
                    env["PYTHONHASHSEED"] = seed
                theirs = ctx.side(dict(action="hashes", algo=algo, tokens=tokens,
                                       save_unfull_chunk=True, **_side_geometry(torch.bfloat16)),
                                  env=env)["keys"]
                if seed is None and algo.startswith("xxhash"):
                    rows.append(Row(f"chain: {name}", "N/A", "vLLM 0.32 seeds non-crypto hashes "
                                    "randomly per process without PYTHONHASHSEED: no value can "
                                    "match (lmcache keeps a deterministic root)"))
                    continue
                same = ours == theirs
                rows.append(Row(f"chain: {name}", "PASS" if same else "FAIL",
                                f"{len(ours)} keys equal" if same else
                                f"lmcache {ours[:1]} LMCache {theirs[:1]}"))
            finally:
                if old is None:
                    os.environ.pop("PYTHONHASHSEED", None)
                else:
                    os.environ["PYTHONHASHSEED"] = old
    return rows


# ---- remote schemes --------------------------------------------------------------------------
CASES = [  # name, dtype, layerwise, tokens
    ("full chunk bf16", torch.bfloat16, False, C),
    ("full chunk fp16", torch.float16, False, C),
    ("partial chunk bf16", torch.bfloat16, False, 5),
    ("layerwise KV_T2D bf16", torch.bfloat16, True, C),
]


def _chunk(dtype, layerwise, tokens, seed):
    from lmcache.memory.memory_format import MemoryFormat

    gen = torch.Generator().manual_seed(seed)
    if layerwise:
        shape, fmt = (tokens, 2, H * D), MemoryFormat.KV_T2D
    else:
        shape, fmt = (2, L, tokens, H * D), MemoryFormat.KV_2LTD
    return torch.randn(shape, generator=gen).to(dtype), fmt


def _key(seed: int, dtype, layerwise: bool) -> str:
    name = "half" if dtype == torch.float16 else "bfloat16"
    return f"{MODEL}@1@0@{0xA000 + seed:x}@{name}" + ("@1" if layerwise else "")


def _our_remote(url: str, dtype):
    from lmcache.memory.cpu import CPUMemoryAllocator
    from lmcache.serde.naive import NaiveSerde
    from lmcache.storage.backends.local_cpu import LocalCPUBackend
    from lmcache.storage.backends.remote import RemoteBackend
    from lmcache.storage.connectors.fs import FSConnector
    from lmcache.storage.connectors.valkey import ValkeyConnector
    from lmcache.storage.connectors.valkey_cluster import ValkeyClusterConnector
    from lmcache.storage.policy.lru import LRUCachePolicy

    meta = _meta(dtype)
    if url.startswith("fs://"):
        conn = FSConnector(url)
    elif "-cluster://" in url:
        conn = ValkeyClusterConnector(url, metadata=meta)
    else:
        conn = ValkeyConnector(url, metadata=meta)
    alloc = CPUMemoryAllocator(8 << 20, pin_memory=False)
    cpu = LocalCPUBackend(alloc, LRUCachePolicy(), max_local_cpu_size=8 / 1024)
    remote = RemoteBackend(cpu, NaiveSerde(), conn, metadata=meta)

    def close():
        remote.close()
        cpu.close()
        alloc.close()

    return cpu, remote, close


def _both_ways(ctx: Ctx, scheme: str, ours_url: str, theirs_url: str, extra: dict,
               partial_ok: bool, layerwise_ok: bool) -> list[Row]:
    from lmcache.keys import CacheEngineKey

    rows = []
    for i, (case, dtype, layerwise, tokens) in enumerate(CASES):
        value, fmt = _chunk(dtype, layerwise, tokens, 100 + i)
        if (tokens < C and not partial_ok) or (layerwise and not layerwise_ok):
            rows.append(Row(f"{scheme} {case}", "N/A", "LMCache's GLIDE connector refuses "
                            "save_unfull_chunk and reads every value as a full KV_2LTD chunk"))
            rows.append(_lmcache_only_value_is_a_miss_for_lmcache(
                ctx, scheme, ours_url, theirs_url, extra, case, dtype, layerwise, value, fmt, i))
            continue
        raw = value.view(torch.uint8).numpy().tobytes()
        data = ctx.tmp / "chunk.bin"
        data.write_bytes(raw)
        side = dict(url=theirs_url, fmt=int(fmt), shape=list(value.shape), layerwise=layerwise,
                    save_unfull_chunk=partial_ok, **_side_geometry(dtype), **extra)
        cpu, remote, close = _our_remote(ours_url, dtype)
        try:
            # lmcache writes, LMCache reads
            key = _key(2 * i, dtype, layerwise)
            obj = cpu.allocate(value.shape, dtype, fmt)
            obj.tensor.copy_(value)
            remote.put(CacheEngineKey.from_string(key), obj)
            obj.ref_count_down()
            assert remote.flush(timeout=60)
            got = ctx.side(dict(side, action="get", key=key, out=str(ctx.tmp / "out.bin")))
            ok = got["hit"] and (ctx.tmp / "out.bin").read_bytes() == raw and \
                got["shape"] == list(value.shape) and got["fmt"] == int(fmt)
            rows.append(Row(f"{scheme} {case}: lmcache writes, LMCache reads",
                            "PASS" if ok else "FAIL",
                            "bit-identical" if ok else f"LMCache got {got}"))
            # LMCache writes, lmcache reads
            key = _key(2 * i + 1, dtype, layerwise)
            ctx.side(dict(side, action="put", key=key, data=str(data)))
            back = remote.get_blocking(CacheEngineKey.from_string(key))
            ok = back is not None and bytes(back.byte_array) == raw and \
                tuple(back.tensor.shape) == tuple(value.shape) and back.fmt == fmt
            detail = "bit-identical" if ok else (
                "miss" if back is None else f"shape {tuple(back.tensor.shape)} fmt {back.fmt}")
            if back is not None:
                back.ref_count_down()
            rows.append(Row(f"{scheme} {case}: LMCache writes, lmcache reads",
                            "PASS" if ok else "FAIL", detail))
        finally:
            close()
    return rows


def _lmcache_only_value_is_a_miss_for_lmcache(ctx, scheme, ours_url, theirs_url, extra, case,
                                              dtype, layerwise, value, fmt, i) -> Row:
    """A chunk only lmcache can store there (partial, layerwise): LMCache must miss, never
    load bytes of another shape."""
    from lmcache.keys import CacheEngineKey

    cpu, remote, close = _our_remote(ours_url, dtype)
    try:
        key = _key(50 + i, dtype, layerwise)
        obj = cpu.allocate(value.shape, dtype, fmt)
        obj.tensor.copy_(value)
        remote.put(CacheEngineKey.from_string(key), obj)
        obj.ref_count_down()
        assert remote.flush(timeout=60)
        back = remote.get_blocking(CacheEngineKey.from_string(key))
        ours_ok = back is not None and bytes(back.byte_array) == \
            value.view(torch.uint8).numpy().tobytes()
        if back is not None:
            back.ref_count_down()
        side = dict(url=theirs_url, fmt=int(fmt), shape=list(value.shape), layerwise=False,
                    save_unfull_chunk=False, **_side_geometry(dtype), **extra)
        got = ctx.side(dict(side, action="get", key=key, out=str(ctx.tmp / "out.bin")))
    finally:
        close()
    ok = ours_ok and not got["hit"]
    return Row(f"{scheme} {case}: lmcache-only value", "PASS" if ok else "FAIL",
               "lmcache round-trips it; LMCache misses (never wrong KV)" if ok else
               f"lmcache hit={ours_ok}, LMCache {got}")


@check("remote")
def check_redis(ctx: Ctx) -> list[Row]:
    url = f"redis://127.0.0.1:{ctx.valkey.port}"
    return _both_ways(ctx, "redis://", url, url, {}, True, True)


@check("remote")
def check_valkey(ctx: Ctx) -> list[Row]:
    url = f"valkey://127.0.0.1:{ctx.valkey.port}"
    return _both_ways(ctx, "valkey://", url, url, {}, False, False)


@check("remote")
def check_fs(ctx: Ctx) -> list[Row]:
    url = f"fs://127.0.0.1:1{ctx.tmp}/fs"  # LMCache's parser needs host:port; both ignore it
    return _both_ways(ctx, "fs://", url, url, {}, True, True)


@check("remote")
def check_redis_cluster(ctx: Ctx) -> list[Row]:
    url = ctx.cluster.url.replace("valkey-cluster://", "redis-cluster://")
    return _both_ways(ctx, "redis-cluster://", url, url, {}, True, True)


@check("remote")
def check_valkey_cluster(ctx: Ctx) -> list[Row]:
    """lmcache's valkey-cluster:// = LMCache's valkey:// with ``valkey_mode: cluster``."""
    ours = ctx.cluster.url
    theirs = f"valkey://127.0.0.1:{ctx.cluster.ports[0]}"
    return _both_ways(ctx, "valkey-cluster://", ours, theirs,
                      {"extra_config": {"valkey_mode": "cluster"}}, False, False)


# ---- configs ---------------------------------------------------------------------------------
# lmcache's refusals that name a feature it does not have yet (tests/unit/config/
# test_lmcache_examples.py holds the same list per file)
MISSING_FEATURES = ("CacheBlend", "the cache controller", "P2P KV-cache sharing",
                    "disaggregated prefill (PD)", "unknown scheme")


@check("config")
def check_example_configs(ctx: Ctx) -> list[Row]:
    from lmcache.config import compose_config
    from lmcache.config.checks import check_config
    from lmcache.config.legacy import overrides_from_legacy

    examples = sorted((ROOT / "tests/unit/config/lmcache_examples").glob("*.yaml"))
    if not examples:
        return [Row("LMCache example configs", "N/A", "no examples stored")]
    rows = []
    for path in examples:
        theirs = ctx.side(dict(action="config", path=str(path)))
        try:
            cfg = compose_config(overrides_from_legacy(str(path), {}, {}))
            check_config(cfg)
            ours, why = True, ""
        except Exception as e:
            ours, why = False, " ".join(str(e).split())
            why = why[why.find("): ") + 3:][:160] if "): " in why else why[:160]
        name = path.name.replace("__", "/").removesuffix(".yaml")
        if ours == theirs["accepted"]:
            rows.append(Row(f"config {name}", "PASS",
                            "both accept" if ours else "both refuse"))
        elif not ours and any(w in why for w in MISSING_FEATURES):
            rows.append(Row(f"config {name}", "GAP", f"lmcache names the missing feature: {why}"))
        else:
            rows.append(Row(f"config {name}", "FAIL",
                            f"LMCache {'accepts' if theirs['accepted'] else 'refuses'}, lmcache "
                            f"{'accepts' if ours else 'refuses: ' + why}"))
    return rows


# ---- lm:// (its checks live in lm_interop.py and register themselves, group remote) ----------
import lm_interop  # noqa: E402,F401
