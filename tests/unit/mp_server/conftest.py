"""One real MP server process (chunk 16 tokens) shared by the CPU tests of this folder that do
not stop or restart it (starting one costs a few seconds: torch, Hydra)."""

from __future__ import annotations

import pytest

from mp_server_proc import SHARED_CHUNK, free_port, start_server, stop_server


@pytest.fixture(scope="session")
def mp_url():
    port = free_port()
    proc = start_server(port, [f"chunk_size={SHARED_CHUNK}", "max_local_cpu_size=0.05"])
    yield f"tcp://localhost:{port}"
    assert stop_server(proc) == 0
