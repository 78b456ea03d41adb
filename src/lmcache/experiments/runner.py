"""One pass of the long-document QA experiment through a real vLLM engine, in a child process.

Every pass runs in its own process started with multiprocessing's ``spawn`` method, because a
vLLM engine does not always give back its memory and threads when deleted; the child sends its
results back through a pipe and exits.

How vLLM 0.32 is configured on a CPU here (see vllm/platforms/cpu.py):
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` + ``distributed_executor_backend="uni"`` keep the engine
core in the child process itself (with multiprocessing on, the CPU platform switches "uni" to
"mp"); ``kv_cache_memory_bytes`` sizes the CPU KV cache directly; ``enforce_eager=True`` skips
torch.compile; ``enable_prefix_caching=False`` so that only lmcache can skip prefill work;
``disable_log_stats=False`` so that every ``RequestOutput`` carries ``metrics``.

TTFT of a request (seconds) is vLLM's own ``RequestOutput.metrics.first_token_latency``: the
time from the request's arrival in the engine front end to the engine-core step that produced
its first token (vllm/v1/metrics/stats.py). Requests are sent one ``generate`` call at a time, so
no request queues behind another and the TTFT is the request's prefill (plus one step of
scheduling and sampling). Hit tokens are ``RequestOutput.num_cached_tokens`` = local prefix-cache
hits + tokens loaded by the KV connector (vllm/v1/metrics/stats.py ``PrefillStats``); with prefix
caching off, that is exactly the tokens lmcache supplied.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_RESULT_WAIT_S = 1.0
_EXIT_WAIT_S = 60.0


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"))


def run_pass_here(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one pass in this process and return one result dict per request.

    ``job`` keys: ``name`` (str, shown on the progress bar), ``model`` (directory), ``llm``
    (dict of ``vllm.LLM`` keyword arguments), ``kv_transfer`` (dict of ``KVTransferConfig``
    fields, or None for no KV connector), ``max_tokens`` (int), ``warmup_tokens`` (int; a prompt
    of that many tokens is run once first and not measured; 0 = none), ``progress`` (bool),
    ``requests`` (list of dicts with ``request_key``, ``round``, ``doc_index``,
    ``question_index``, ``prompt_token_ids``). Sampling is greedy (temperature 0) with
    ``ignore_eos``, so every request returns exactly ``max_tokens`` tokens.

    Each result has the request's fields (without the prompt) plus ``prompt_tokens`` (int),
    ``ttft_s`` (float, seconds), ``prefill_s`` (float, seconds from first scheduling to first
    token, engine-core clock), ``hit_tokens`` (int), ``output_token_ids`` (list[int]) and
    ``output_text`` (str).

    Raises:
        RuntimeError: vLLM returned no metrics for a request (stats logging is off).
    """
    os.environ.update(ENGINE_ENV)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs = dict(job["llm"])
    if job.get("kv_transfer"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**job["kv_transfer"])
    llm = LLM(model=job["model"], tokenizer=job["model"], **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=int(job["max_tokens"]), ignore_eos=True)
    if job.get("warmup_tokens", 0) > 0:
        vocab = len(llm.get_tokenizer())
        # a fixed token pattern unrelated to the documents, so it seeds no cache hit
        warm = [3 + (i * 7919) % (vocab - 3) for i in range(int(job["warmup_tokens"]))]
        llm.generate([{"prompt_token_ids": warm}], params, use_tqdm=False)
    results: list[dict[str, Any]] = []
    progress = _progress() if job.get("progress", True) else None
    if progress is not None:
        progress.start()
        task = progress.add_task(job["name"], total=len(job["requests"]), info="")
    try:
        for req in job["requests"]:
            out = llm.generate([{"prompt_token_ids": list(req["prompt_token_ids"])}], params,
                               use_tqdm=False)[0]
            m = out.metrics
            if m is None:
                raise RuntimeError(
                    f"vLLM returned no metrics for {req['request_key']}: pass "
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
            results.append(row)
            if progress is not None:
                progress.update(task, advance=1, info=(
                    f"round {req['round'] + 1} ttft {row['ttft_s']:.3f}s hit {row['hit_tokens']}"))
    finally:
        if progress is not None:
            progress.stop()
        del llm
    return results


def _child(job: dict[str, Any], conn) -> None:
    try:
        conn.send(("ok", run_pass_here(job)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_pass(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Run :func:`run_pass_here` in a fresh ``spawn`` child process and return its results.

    Raises:
        RuntimeError: the pass failed in the child (the message holds the child's traceback),
            or the child died without answering (the message gives its exit code).
    """
    os.environ.update(ENGINE_ENV)  # inherited by the child before it imports vLLM
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(job, child_conn), name=f"long_doc_qa-{job['name']}")
    proc.start()
    child_conn.close()
    try:
        while not parent_conn.poll(_RESULT_WAIT_S):
            if not proc.is_alive():
                raise RuntimeError(
                    f"pass {job['name']!r}: engine process exited with code {proc.exitcode} "
                    "without a result")
        status, payload = parent_conn.recv()
    except EOFError:
        proc.join(_EXIT_WAIT_S)
        raise RuntimeError(
            f"pass {job['name']!r}: engine process closed its pipe (exit code {proc.exitcode})"
        ) from None
    finally:
        proc.join(_EXIT_WAIT_S)
        if proc.is_alive():
            proc.terminate()
            proc.join(_EXIT_WAIT_S)
        parent_conn.close()
    if status != "ok":
        raise RuntimeError(f"pass {job['name']!r} failed in the engine process:\n{payload}")
    return payload
