"""Starts a real ``python -m lmcache.mp_server`` process for the MP tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Optional

import zmq

SHARED_CHUNK = 16  # chunk size of the session server of conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0, proc: Optional[subprocess.Popen] = None) -> int:
    """Block until the server at ``url`` answers GET_CHUNK_SIZE; returns the chunk size.
    RuntimeError when ``proc`` exits first or ``timeout`` seconds pass."""
    from lmcache.v1.multiprocess.mq import MessageQueueClient
    from lmcache.v1.multiprocess.protocol import RequestType

    deadline = time.monotonic() + timeout
    client = MessageQueueClient(url, zmq.Context.instance(), timeout=None)
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"lmcache MP server exited with {proc.returncode}")
            future = client.submit_request(RequestType.GET_CHUNK_SIZE, [])
            if future.wait(0.5):
                return future.result()
        raise RuntimeError(f"lmcache MP server at {url} not ready after {timeout} s")
    finally:
        client.close()


def start_server(port: int, overrides: list[str] = (), extra_args: list[str] = (),
                 wait: bool = True, log_path: Optional[str] = None) -> subprocess.Popen:
    """Start the server on ``port`` (its own process; stdout/stderr to ``log_path`` or
    inherited) and, with ``wait``, block until it answers."""
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(__file__), "..", "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), os.path.abspath(src)) if p)
    out = open(log_path, "ab") if log_path else None
    proc = subprocess.Popen([sys.executable, "-m", "lmcache.mp_server", "--port", str(port),
                             *extra_args, *overrides], env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    if wait:
        try:
            wait_ready(f"tcp://localhost:{port}", proc=proc)
        except BaseException:
            stop_server(proc)
            raise
    return proc


def stop_server(proc: subprocess.Popen, sig_kill: bool = False) -> int:
    """Stop ``proc`` (SIGTERM, or SIGKILL for a crash); returns its exit status."""
    if proc.poll() is None:
        proc.kill() if sig_kill else proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.01):
    """Poll ``predicate()`` until it returns a truthy value (returned) or ``timeout`` passes
    (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def finished(worker, request_id: str, store: bool, timeout: float = 20.0) -> None:
    """Wait until ``worker.get_finished`` reports ``request_id``'s store/retrieve finished."""
    def done():
        stores, retrieves = worker.get_finished({request_id} if store else set())
        return request_id in (stores if store else retrieves)
    wait_until(done, timeout)


def lookup(scheduler, request_id: str, token_ids, timeout: float = 20.0, **kw) -> int:
    """Tokens the scheduler adapter's lookup of ``token_ids`` hit (waits for the answer)."""
    scheduler.maybe_submit_lookup_request(request_id, token_ids=list(token_ids), **kw)
    return wait_until(lambda: (lambda r: None if r is None else ("hit", r))(
        scheduler.check_lookup_result(request_id)), timeout)[1]
