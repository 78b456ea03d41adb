"""Real processes for the controller / P2P tests: the controller (``python -m
lmcache.controller``) and instances (``p2p_instance.py``), with bounded waits everywhere."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import httpx

HERE = Path(__file__).resolve().parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}


class _Child:
    """A child process (``self.proc``) of a test: killed or asked to exit, with bounded waits."""

    proc: subprocess.Popen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _end(self, ask: Callable[[], None]) -> None:
        """``ask()`` the running child to exit, wait up to 10 s for it, then kill it."""
        if self.proc.poll() is None:
            ask()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class Controller(_Child):
    """``python -m lmcache.controller`` on free ports; ``extra`` = more Hydra overrides."""

    def __init__(self, extra: tuple[str, ...] = (), timeout: float = 5.0, log: Optional[Path] = None,
                 ports: Optional[tuple[int, int, int]] = None) -> None:
        self.http, self.pull, self.reply = ports or (free_port(), free_port(), free_port())
        args = [PY, "-m", "lmcache.controller", "controller_host=127.0.0.1",
                f"controller_port={self.http}", f"controller_monitor_ports.pull={self.pull}",
                f"controller_monitor_ports.reply={self.reply}",
                f"lmcache_worker_timeout={timeout}", "command_timeout_secs=3", "chunk_size=16",
                *extra]
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=_env())
        self.url = f"http://127.0.0.1:{self.http}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("controller did not start within 60 s")

    def post(self, path: str, body: dict, status: int = 200) -> dict:
        r = httpx.post(self.url + path, json=body, timeout=30)
        assert r.status_code == status, (path, r.status_code, r.text)
        return r.json()

    def get(self, path: str) -> dict:
        return httpx.get(self.url + path, timeout=10).json()

    def stop(self) -> None:
        self._end(lambda: self.proc.send_signal(signal.SIGINT))


def p2p_overrides(instance_id: str, ctl: Controller, heartbeat: float = 0.3) -> list[str]:
    """deployment=p2p for a test instance: free ports (0), fast heartbeats."""
    return ["deployment=p2p", f"lmcache_instance_id={instance_id}",
            f"controller_pull_url=127.0.0.1:{ctl.pull}",
            f"controller_reply_url=127.0.0.1:{ctl.reply}", "lmcache_worker_ports=[0]",
            "p2p_host=127.0.0.1", "p2p_init_ports=[0]", "p2p_lookup_ports=[0]",
            f"lmcache_worker_heartbeat_time={heartbeat}",
            "storage.backends.p2p.blocking_timeout_secs=2.0",
            "storage.backends.p2p.lookup_timeout_secs=0.5",
            "storage.backends.p2p.lookup_cache_secs=0.2"]


class Instance(_Child):
    """``p2p_instance.py`` with ``overrides``; :meth:`call` sends one command, waits for its reply."""

    def __init__(self, overrides: list[str], log: Optional[Path] = None) -> None:
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([PY, str(HERE / "p2p_instance.py"), json.dumps(overrides)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=_env())
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.info = self._reply(120)

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict:
        try:
            reply = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"instance gave no reply within {timeout} s") from None
        if reply is None:
            raise RuntimeError(f"instance exited with {self.proc.wait(timeout=10)}")
        return reply

    def call(self, cmd: str, timeout: float = 60, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def close(self) -> None:
        self._end(self._quit)

    def _quit(self) -> None:
        try:
            self.call("quit", timeout=30)
        except (RuntimeError, OSError):
            pass


def eventually(check, timeout: float = 10.0, delay: float = 0.05):
    """Poll ``check`` until truthy (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(delay)
    return check()
