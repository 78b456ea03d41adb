"""The vLLM engines of the long-document QA experiment, one per pass, each in a child process.

Every pass (``without_lmcache``, ``with_lmcache``) gets its own engine process started with
multiprocessing's ``spawn`` method (a vLLM engine does not always give back its memory and
threads when deleted). The engines of all passes are alive at the same time, so the parent can
send the same request to one pass and then the other (:class:`EngineProcess`): the passes are
interleaved request by request and machine load lands on both alike.

How vLLM 0.32 is configured on a CPU here (see vllm/platforms/cpu.py):
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` + ``distributed_executor_backend="uni"`` keep the engine
core (scheduler and worker, so lmcache's engine too) in the child process itself;
``kv_cache_memory_bytes`` sizes the CPU KV cache directly; ``enforce_eager=True`` skips
torch.compile; ``enable_prefix_caching=False`` so that only lmcache can skip prefill work;
``disable_log_stats=False`` so that every ``RequestOutput`` carries ``metrics``.

TTFT of a request (seconds) is vLLM's own ``RequestOutput.metrics.first_token_latency``: the
time from the request's arrival in the engine front end to the engine-core step that produced
its first token (vllm/v1/metrics/stats.py). Requests are sent one ``generate`` call at a time, so
no request queues behind another. Hit tokens are ``RequestOutput.num_cached_tokens`` = local
prefix-cache hits + tokens loaded by the KV connector; with prefix caching off, exactly the
tokens lmcache supplied. lmcache's own cost of a request comes from its engine's timers
(:class:`lmcache.observability.stats.LMCStatsMonitor`, every engine of the child process):
the increase, over the request, of ``lookup_seconds``, ``process_tokens_seconds`` (chunking and
hashing), ``retrieve_seconds`` (load) and ``store_seconds``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from typing import Any

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
COST_KEYS = {  # result key -> lmcache histogram (seconds)
    "lookup_ms": "lookup_seconds",
    "hash_ms": "process_tokens_seconds",
    "load_ms": "retrieve_seconds",
    "store_ms": "store_seconds",
}
_POLL_S = 1.0
_EXIT_WAIT_S = 60.0


class PassEngine:
    """One pass's ``vllm.LLM`` in this process.

    ``job`` keys: ``name`` (str), ``model`` (directory), ``llm`` (dict of ``vllm.LLM`` keyword
    arguments), ``kv_transfer`` (dict of ``KVTransferConfig`` fields, or None for no KV
    connector), ``max_tokens`` (int), ``warmup_tokens`` (int; a prompt of that many tokens is run
    once at start and not measured; 0 = none). Sampling is greedy (temperature 0) with
    ``ignore_eos``, so every request returns exactly ``max_tokens`` tokens. Optional
    ``log_file``: where the engine process writes its stdout/stderr (see :func:`_serve`).
    """

    def __init__(self, job: dict[str, Any]) -> None:
        os.environ.update(ENGINE_ENV)
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig

        t0 = time.perf_counter()
        kwargs = dict(job["llm"])
        if job.get("kv_transfer"):
            kwargs["kv_transfer_config"] = KVTransferConfig(**job["kv_transfer"])
        self.llm = LLM(model=job["model"], tokenizer=job["model"], **kwargs)
        self.params = SamplingParams(temperature=0.0, max_tokens=int(job["max_tokens"]),
                                     ignore_eos=True)
        if int(job.get("warmup_tokens", 0)) > 0:
            vocab = len(self.llm.get_tokenizer())
            # a fixed token pattern unrelated to the documents, so it seeds no cache hit
            warm = [3 + (i * 7919) % (vocab - 3) for i in range(int(job["warmup_tokens"]))]
            self.llm.generate([{"prompt_token_ids": warm}], self.params, use_tqdm=False)
        self.startup_s = time.perf_counter() - t0

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        """Run one request (keys ``request_key``, ``prompt_token_ids`` and any others, copied).

        Returns the request's fields (without the prompt) plus ``prompt_tokens`` (int),
        ``ttft_s`` (float, seconds), ``prefill_s`` (float, seconds from first scheduling to first
        token), ``hit_tokens`` (int), ``output_token_ids`` (list[int]), ``output_text`` (str) and
        lmcache's cost in this request, ms (keys of :data:`COST_KEYS`; 0.0 without lmcache).

        Raises:
            RuntimeError: vLLM returned no metrics (stats logging is off).
        """
        from lmcache.observability.stats import LMCStatsMonitor

        before = LMCStatsMonitor.process_totals()
        out = self.llm.generate([{"prompt_token_ids": list(req["prompt_token_ids"])}],
                                self.params, use_tqdm=False)[0]
        after = LMCStatsMonitor.process_totals()
        m = out.metrics
        if m is None:
            raise RuntimeError(f"vLLM returned no metrics for {req['request_key']}: pass "
                               "disable_log_stats=False to vllm.LLM")
        row = {k: v for k, v in req.items() if k != "prompt_token_ids"}
        row.update(
            prompt_tokens=len(req["prompt_token_ids"]),
            ttft_s=float(m.first_token_latency),
            prefill_s=float(m.first_token_ts - m.scheduled_ts),
            hit_tokens=int(out.num_cached_tokens or 0),
            output_token_ids=[int(t) for t in out.outputs[0].token_ids],
            output_text=out.outputs[0].text,
        )
        for key, hist in COST_KEYS.items():
            row[key] = 1e3 * (after.get(hist, 0.0) - before.get(hist, 0.0))
        return row


def engine_class(job: dict[str, Any]):
    """The engine class of ``job``: ``job["engine"]`` (``"<module>:<class>"``, e.g. the RAG
    blend experiment's), default :class:`PassEngine`. Its constructor takes the job; it has
    ``startup_s`` and ``run(request) -> row``."""
    name = job.get("engine")
    if not name:
        return PassEngine
    import importlib

    module, _, cls = str(name).partition(":")
    return getattr(importlib.import_module(module), cls)


def _serve(job: dict[str, Any], conn) -> None:
    """Child process: build the engine (:func:`engine_class`), answer ("ready", startup_s),
    then one ("ok", row) per
    request received until None (or the pipe closes); errors are sent as ("error", traceback).
    With ``job["log_file"]`` set, the process's stdout and stderr (vLLM's and torch's messages
    included) go to that file instead of the terminal."""
    if job.get("log_file"):
        fd = os.open(job["log_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        engine = engine_class(job)(job)
        conn.send(("ready", engine.startup_s))
        while True:
            try:
                req = conn.recv()
            except EOFError:
                break
            if req is None:
                break
            try:
                conn.send(("ok", engine.run(req)))
            except Exception:  # noqa: BLE001 - the parent re-raises it with the traceback
                conn.send(("error", traceback.format_exc()))
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


class EngineProcess:
    """A :class:`PassEngine` in a fresh ``spawn`` child process (``job["start_method"]``
    ``"fork"``: a forked one, which inherits the parent's imports: faster to start when the
    parent has imported vLLM already).

    :meth:`start` launches it (several can start at once); :meth:`wait_ready` returns its
    start-up time; :meth:`run` sends one request and returns its result row; :meth:`close`
    stops it. Usable as a context manager (closes on exit).

    Raises (from :meth:`wait_ready` and :meth:`run`):
        RuntimeError: the engine failed (the message holds the child's traceback) or the child
            died without answering (the message gives its exit code).
    """

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.name = str(job["name"])
        self._proc = None
        self._conn = None

    def start(self) -> "EngineProcess":
        os.environ.update(ENGINE_ENV)  # inherited by the child before it imports vLLM
        ctx = mp.get_context(str(self.job.get("start_method") or "spawn"))
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_serve, args=(self.job, child), name=f"qa-{self.name}")
        self._proc.start()
        child.close()
        return self

    def _receive(self, expected: str):
        try:
            while not self._conn.poll(_POLL_S):
                if not self._proc.is_alive():
                    raise RuntimeError(f"pass {self.name!r}: engine process exited with code "
                                       f"{self._proc.exitcode} without a result")
            status, payload = self._conn.recv()
        except EOFError:
            self._proc.join(_EXIT_WAIT_S)
            raise RuntimeError(f"pass {self.name!r}: engine process closed its pipe (exit code "
                               f"{self._proc.exitcode})") from None
        if status != expected:
            where = f" (its log: {self.job['log_file']})" if self.job.get("log_file") else ""
            raise RuntimeError(f"pass {self.name!r} failed in the engine process{where}:\n{payload}")
        return payload

    def wait_ready(self) -> float:
        """Seconds the engine took to start (model load, KV cache, warm-up prompt)."""
        return float(self._receive("ready"))

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        """:meth:`PassEngine.run` in the child."""
        self._conn.send(req)
        return self._receive("ok")

    def close(self) -> None:
        """Ask the child to exit; terminate it when it does not within a minute. Idempotent."""
        if self._proc is None:
            return
        try:
            self._conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self._proc.join(_EXIT_WAIT_S)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(_EXIT_WAIT_S)
        self._conn.close()
        self._proc = None

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
