"""Runs real vLLM (CPU) over rounds of prompts, with or without lmcache, and writes a JSON report.

Used by the integration tests as a child process (each vLLM engine in its own process):

    python vllm_driver.py SPEC.json OUT.json

or as a fork server (``python vllm_driver.py --serve``): it imports torch and vLLM once (~13 s of
a ~22 s run on 2 cores), then reads lines ``SPEC.json<TAB>OUT.json<TAB>LOG`` on stdin and runs
each spec in a forked child (a fresh process: its own engine and an empty lmcache), answering
``pid <PID>`` when the child starts and ``rc <STATUS>`` when it ended. The child's stdout and
stderr go to LOG. The server itself runs no torch op, so no thread pool exists at fork time.

SPEC keys: model (path), rounds (list of lists of prompts: a string, or a dict such as
{"prompt": str, "cache_salt": str} — vLLM's TextPrompt), lmcache (bool),
extra_config (dict of ``lmcache.*`` keys), connector ("dynamic": LMCacheConnectorV1Dynamic by
module path, the default; "stock": vLLM's built-in LMCacheConnectorV1 by name only), max_tokens, multiprocess (bool: scheduler and worker
in different processes), corrupt_after_round (int or null: after that round, overwrite every KV
chunk in the worker's CPU tier with noise — the negative control), clear_cpu_after_round.
OUT: {"rounds": [[{"token_ids": [...], "text": str, "num_cached_tokens": int}, ...], ...]}.
"""

import json
import os
import sys
import traceback


def _lmcache_engine():
    """The worker's LMCacheEngine (in-process executor only)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    group = get_kv_transfer_group()
    impl = getattr(group, "_impl", None) or group._lmcache_engine  # dynamic | stock connector
    return impl.container.engine()


def _corrupt_cpu_tier() -> int:
    import torch

    engine = _lmcache_engine()
    n = 0
    for backend in engine.storage_manager.backends:
        for obj in list(getattr(backend, "hot_cache", {}).values()):
            gen = torch.Generator().manual_seed(n)
            obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=gen).to(obj.tensor.dtype))
            n += 1
    return n


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("multiprocess") else "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs = dict(model=spec["model"], enforce_eager=True, enable_prefix_caching=False,
                  kv_cache_memory_bytes=int(spec.get("kv_cache_memory_bytes", 64 << 20)),
                  max_model_len=int(spec.get("max_model_len", 4096)), seed=0,
                  distributed_executor_backend="mp" if spec.get("multiprocess") else "uni",
                  max_num_batched_tokens=int(spec.get("max_num_batched_tokens", 4096)))
    if spec.get("lmcache"):
        if spec.get("connector", "dynamic") == "stock":
            named = dict(kv_connector="LMCacheConnectorV1")  # vLLM's own class, no module path
        else:
            named = dict(kv_connector="LMCacheConnectorV1Dynamic",
                         kv_connector_module_path="lmcache.integration.vllm.lmcache_connector_v1")
        kwargs["kv_transfer_config"] = KVTransferConfig(
            **named,
            kv_role=spec.get("kv_role", "kv_both"), kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec.get("extra_config", {}))
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=int(spec.get("max_tokens", 8)))
    report = {"rounds": [], "corrupted": 0}
    for i, prompts in enumerate(spec["rounds"]):
        outs = llm.generate(prompts, params, use_tqdm=False)
        report["rounds"].append([{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                                  "num_cached_tokens": int(o.num_cached_tokens or 0),
                                  "prompt_len": len(o.prompt_token_ids)} for o in outs])
        if spec.get("corrupt_after_round") == i:
            report["corrupted"] = _corrupt_cpu_tier()
        if spec.get("clear_cpu_after_round") == i:
            _lmcache_engine().clear()
    json.dump(report, open(out_path, "w"))
    del llm


def _child(spec_path: str, out_path: str, log_path: str) -> int:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        main(spec_path, out_path)
        return 0
    except BaseException:  # noqa: BLE001 - the status and the traceback go back to the test
        traceback.print_exc()
        return 1


def serve() -> int:
    """The fork server (see the module docstring); returns the exit status of this process."""
    import torch  # noqa: F401 - imported once, before the forks
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.config import KVTransferConfig  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        spec_path, out_path, log_path = line.rstrip("\n").split("\t")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return _child(spec_path, out_path, log_path)  # the child exits as a normal process
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"rc {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.exit(serve())
    main(sys.argv[1], sys.argv[2])
