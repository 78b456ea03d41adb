"""lm:// both ways against real LMCache 0.5.6 (not part of ``make test``).

    .venv/bin/python scripts/interop/lm_interop.py [--interop-python .venv-interop/bin/python]

Four checks, each with full and partial chunks of bf16 and fp16, KV_2LTD and layerwise KV_T2D:

1. LMCache's client (``LMCServerConnector``) writes to lmcache's server (``python -m
   lmcache.server``); lmcache's ``LMConnector`` reads every value back byte-identical, with
   LMCache's shape/dtype/format (28-byte metadata: LMCache writes no checksum).
2. lmcache's connector writes to lmcache's server; LMCache's client reads them byte-identical;
   lmcache reads them back with its trailer and checksum over key, header and payload (kept
   by its server beside the entry, never sent to LMCache's client).
3. LMCache's client writes to LMCache's server (``python -m lmcache.v1.server``); lmcache's
   connector reads them.
4. lmcache's connector writes to LMCache's server; LMCache's client reads them.

The two packages are both named ``lmcache``, so LMCache's side runs in the interop venv as a
subprocess (``lm_lmcache_side.py``). :func:`run_lm_checks` returns one (name, passed, detail)
per check; ``main`` prints them as a table (exit 1 if any failed). Imported by the interop
suite (``run.py``: ``import lm_interop``), :func:`check_lm` registers them as group "remote".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.wire.metadata import encode_metadata, verify_payload
from lmcache.serde.wire.remote_metadata import LEGACY_METADATA_SIZE, RemoteMetadata
from lmcache.storage.connectors.lm import LMConnector

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _spec(tag: int) -> list[dict]:
    """Full (16-token) and partial (5-token) KV_2LTD [2, L=2, T, D=32] chunks, bf16 and fp16,
    and layerwise KV_T2D [T, 2, D] ones (3 dims: the header pads the 4th slot with 0)."""
    out = []
    for i, (dtype, tokens, fmt) in enumerate([
            ("bfloat16", 16, MemoryFormat.KV_2LTD), ("bfloat16", 5, MemoryFormat.KV_2LTD),
            ("float16", 16, MemoryFormat.KV_2LTD), ("float16", 5, MemoryFormat.KV_2LTD),
            ("bfloat16", 16, MemoryFormat.KV_T2D), ("float16", 5, MemoryFormat.KV_T2D)]):
        shape = [2, 2, tokens, 32] if fmt == MemoryFormat.KV_2LTD else [tokens, 2, 32]
        out.append({"key": f"m@1@0@{tag:x}{i:04x}@{'half' if dtype == 'float16' else dtype}",
                    "shape": shape, "dtype": dtype, "fmt": int(fmt)})
    return out


def _expected(key: str, nbytes: int) -> bytes:
    return hashlib.shake_256(key.encode()).digest(nbytes)


def _nbytes(item: dict) -> int:
    return int(torch.Size(item["shape"]).numel()) * DTYPES[item["dtype"]].itemsize


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd}: nothing listens on {port}")


def _lmcache_side(python: str, op: str, port: int, spec: list[dict]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, str(HERE / "lm_lmcache_side.py"), op, str(port),
                          json.dumps(spec)], capture_output=True, text=True, timeout=300, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"LMCache side {op} failed ({out.returncode}): {out.stderr[-2000:]}")


def _our_put(conn: LMConnector, spec: list[dict]) -> None:
    for item in spec:
        payload = _expected(item["key"], _nbytes(item))
        meta = RemoteMetadata(len(payload), MemoryFormat(item["fmt"]),
                                 DTYPES[item["dtype"]], tuple(item["shape"]))
        assert conn.put(item["key"], encode_metadata(meta, payload, item["key"]), payload)
    # answered requests after the (possibly unanswered) PUTs: the server has them all
    assert conn.batched_exists([item["key"] for item in spec]) == [True] * len(spec)


def _our_get(conn: LMConnector, spec: list[dict], checksum: bool) -> dict:
    out = {}
    for item in spec:
        got = conn.get(item["key"])
        if got is None:
            out[item["key"]] = "miss"
            continue
        metadata, payload = got
        try:
            meta = verify_payload(metadata, payload, key=item["key"])
        except ValueError as e:
            out[item["key"]] = f"metadata rejected: {e}"
            continue
        want = (tuple(item["shape"]), DTYPES[item["dtype"]], MemoryFormat(item["fmt"]))
        has_checksum = len(metadata) > LEGACY_METADATA_SIZE
        if (meta.shape, meta.dtype, meta.fmt) != want:
            out[item["key"]] = f"metadata {(meta.shape, meta.dtype, meta.fmt)} != {want}"
        elif bytes(payload) != _expected(item["key"], _nbytes(item)):
            out[item["key"]] = "payload bytes differ"
        elif has_checksum != checksum:
            out[item["key"]] = f"checksum present: {has_checksum}, expected {checksum}"
        else:
            out[item["key"]] = "ok"
    return out


def _check(name: str, fn: Callable[[], dict]) -> tuple[str, bool, str]:
    try:
        result = fn()
    except Exception as e:  # a check that cannot run is a failed check, with its reason
        return name, False, f"{type(e).__name__}: {e}"
    bad = {k: v for k, v in result.items() if v != "ok"}
    return name, not bad, f"{len(result) - len(bad)}/{len(result)} ok" + (f"; {bad}" if bad
                                                                           else "")


def run_lm_checks(interop_python: str) -> list[tuple[str, bool, str]]:
    """Run the four lm:// checks; ``interop_python`` is the interpreter of the venv with
    lmcache==0.5.6. Returns (name, passed, detail) per check."""
    results = []
    for server_name, cmd in (("lmcache-server", [sys.executable, "-m", "lmcache.server"]),
                             ("LMCache server", [interop_python, "-m", "lmcache.v1.server"])):
        port = _free_port()
        proc = _start(cmd + ["127.0.0.1", str(port)], port)
        ours = server_name == "lmcache-server"
        conn = LMConnector(f"lm://127.0.0.1:{port}", blocking_timeout_secs=30)
        try:
            theirs_spec, our_spec = _spec(0xA1 if ours else 0xB1), _spec(0xA2 if ours else 0xB2)

            def lmcache_writes() -> dict:
                _lmcache_side(interop_python, "put", port, theirs_spec)
                return _our_get(conn, theirs_spec, checksum=False)

            def lmcache_reads() -> dict:
                _our_put(conn, our_spec)
                result = _lmcache_side(interop_python, "get", port, our_spec)
                if ours:  # and lmcache still gets its checksum back
                    again = _our_get(conn, our_spec, checksum=True)
                    result.update({k + " (lmcache re-read)": v for k, v in again.items()})
                return result

            results.append(_check(f"lm:// LMCache client writes, lmcache reads ({server_name})",
                                  lmcache_writes))
            results.append(_check(f"lm:// lmcache writes, LMCache client reads ({server_name})",
                                  lmcache_reads))
        finally:
            conn.close()
            proc.kill()
            proc.wait(timeout=10)
    return results


try:  # registered in the interop suite when it imports this module
    from interop_base import Row, check
except ImportError:  # run on its own
    check = None

if check is not None:
    @check("remote")
    def check_lm(ctx) -> list:
        """lm:// both ways (see the module docstring), as rows of the interop report."""
        return [Row(name, "PASS" if ok else "FAIL", detail)
                for name, ok, detail in run_lm_checks(ctx.interop_python)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interop-python", default=str(ROOT / ".venv-interop/bin/python"))
    args = parser.parse_args()
    results = run_lm_checks(args.interop_python)
    width = max(len(r[0]) for r in results)
    for name, passed, detail in results:
        print(f"{'PASS' if passed else 'FAIL'}  {name:<{width}}  {detail}")
    return 0 if all(r[1] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
