"""Shared pieces of the interop suite: Row, the check registry, Ctx (servers, LMCache side)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple


class Row(NamedTuple):
    name: str
    status: str  # PASS, FAIL, N/A
    detail: str = ""


CHECKS: list[tuple[str, Callable[["Ctx"], list[Row]]]] = []


def check(group: str):
    """Register ``fn(ctx) -> list[Row]`` as a check of ``group``."""

    def register(fn):
        CHECKS.append((group, fn))
        return fn

    return register


class Ctx:
    """What checks share: the interop Python, a temp dir, lazily started servers."""

    def __init__(self, interop_python: str, tmp: Path) -> None:
        self.interop_python = interop_python
        self.tmp = tmp
        self._valkey = None
        self._cluster = None
        self.env: dict[str, str] = {}

    def side(self, req: dict, env: dict[str, str] | None = None, timeout: float = 180) -> dict:
        """Run one LMCache-side action; its JSON answer (RuntimeError with its stderr on
        failure)."""
        full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        full_env.update(self.env)
        full_env.update(env or {})
        proc = subprocess.run(
            [self.interop_python, str(Path(__file__).with_name("lmcache_side.py")),
             json.dumps(req)], capture_output=True, text=True, timeout=timeout, env=full_env)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"LMCache side {req['action']} failed: {proc.stderr[-1500:]}")
        return json.loads(lines[-1])

    @property
    def valkey(self):
        if self._valkey is None:
            from storage_servers import start_valkey

            self._valkey = start_valkey()
        return self._valkey

    @property
    def cluster(self):
        if self._cluster is None:
            from storage_servers import ValkeyClusterProcesses

            self._cluster = ValkeyClusterProcesses(self.tmp / "cluster").start()
        return self._cluster

    def close(self) -> None:
        if self._valkey is not None:
            self._valkey.terminate()
        if self._cluster is not None:
            self._cluster.stop()


