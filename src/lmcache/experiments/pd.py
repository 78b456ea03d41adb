"""Disaggregated prefill (PD) through real vLLM servers against one plain instance.

Starts four processes: a plain vLLM server (no KV connector), a prefiller (``kv_producer``,
lmcache ``deployment=pd_prefiller``), a decoder (``kv_consumer``, ``deployment=pd_decoder``) and
the proxy (:mod:`lmcache.experiments.disagg_proxy`). Every long-document request (documents x
questions, prompts as token ids) goes to the plain server and through the proxy, alternating which
goes first; both stream ``max_tokens`` greedy tokens. Reported per request and as medians: TTFT
(client side), time between tokens, the proxy's prefill and decode seconds, the decoder's
``cached_tokens`` (what it did not prefill); and the prefiller's push throughput (its PD tier's
``pushed_bytes / push_seconds`` from lmcache's internal API server). Outputs must be identical.

Run ``python -m lmcache.experiments.pd [overrides]``. Exit status: 0 success, 2 configuration
error, 3 outputs differ, 4 a run failed, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lmcache.config.compose import register_resolvers
from lmcache.experiments import report
from lmcache.experiments.app_exit import EXIT_MISMATCH, EXIT_OK, exit_after, job_status
from lmcache.experiments.console import Reporter
from lmcache.experiments.long_doc_qa import make_requests, prepare_model
from lmcache.experiments.multi_round_qa import server_args
from lmcache.experiments.runner import ENGINE_ENV
from lmcache.experiments.serve import VLLMServer, free_port, stream_completion

CONFIG_PATH = "pkg://lmcache.conf"
CONFIG_NAME = "experiment/pd"
log = logging.getLogger(__name__)
register_resolvers()
_statuses: list[int] = []
CONNECTOR = {"kv_connector": "LMCacheConnectorV1Dynamic",
             "kv_connector_module_path": "lmcache.integration.vllm.lmcache_connector_v1",
             "kv_load_failure_policy": "recompute"}
COLUMNS = ["request_key", "prompt_tokens", "single_ttft_s", "pd_ttft_s", "single_tbt_s", "pd_tbt_s",
           "pd_prefill_s", "pd_decode_s", "decoder_cached_tokens", "same_output"]


def lmcache_overrides(cfg: DictConfig, role: str, init_port: int, alloc_port: int,
                      api_port: int) -> list[str]:
    """lmcache overrides of the prefiller (role sender) or the decoder (receiver)."""
    pd = cfg.pd
    return [f"deployment={'pd_prefiller' if role == 'sender' else 'pd_decoder'}",
            f"transfer_channel={pd.transfer_channel}", f"chunk_size={int(pd.chunk_size)}",
            f"max_local_cpu_size={float(pd.buffer_gib)}",
            f"storage.backends.pd.pd_peer_host={cfg.server.host}",
            f"storage.backends.pd.pd_peer_init_port={init_port}",
            f"storage.backends.pd.pd_peer_alloc_port={alloc_port}",
            "internal_api_server_enabled=true", f"internal_api_server_port_start={api_port}",
            *[str(o) for o in pd.lmcache_overrides]]


def start_pd(cfg: DictConfig, model: str, out: Path, say: Reporter, with_single: bool = True):
    """Start (single or None, prefiller, decoder, proxy process, proxy URL, prefiller API URL);
    servers start side by side. The caller stops them (:func:`stop_all`)."""
    init_port = int(cfg.pd.init_port) or free_port()
    alloc_port = int(cfg.pd.alloc_port) or free_port()
    env = {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    host = str(cfg.server.host)
    api = {r: free_port() for r in ("sender", "receiver")}

    def kv(role: str) -> dict:
        return {**CONNECTOR, "kv_role": "kv_producer" if role == "sender" else "kv_consumer",
                "kv_connector_extra_config": {"lmcache.overrides": lmcache_overrides(
                    cfg, role, init_port, alloc_port, api[role])}}

    servers = {"decoder": VLLMServer(model, server_args(cfg, kv("receiver")), out / "vllm_decoder.log",
                                     host=host, env=env),
               "prefiller": VLLMServer(model, server_args(cfg, kv("sender")), out / "vllm_prefiller.log",
                                       host=host, env=env)}
    if with_single:
        servers["single"] = VLLMServer(model, server_args(cfg, None), out / "vllm_single.log",
                                       host=host, env=env)
    errors: dict[str, BaseException] = {}

    def start(name: str) -> None:
        try:
            say.line(f"{name} ready at {servers[name].url} in "
                     f"{servers[name].start(float(cfg.server.startup_timeout_s)):.1f} s")
        except BaseException as e:  # reported below
            errors[name] = e

    threads = [threading.Thread(target=start, args=(n,)) for n in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proxy_port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "lmcache.experiments.disagg_proxy",
                              "--prefiller", servers["prefiller"].url, "--decoder",
                              servers["decoder"].url, "--host", host, "--port", str(proxy_port)],
                             stdout=(out / "proxy.log").open("ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    parts = (servers.get("single"), servers["prefiller"], servers["decoder"], proxy,
             f"http://{host}:{proxy_port}", f"http://{host}:{api['sender'] + 1}")
    if errors:
        stop_all(parts)
        raise next(iter(errors.values()))
    wait_http(parts[4] + "/health", 120, proxy)
    return parts


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s")


def stop_all(parts) -> None:
    single, prefiller, decoder, proxy = parts[:4]
    if proxy.poll() is None:
        proxy.terminate()
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
    for s in (single, prefiller, decoder):
        if s is not None:
            s.stop()


def pd_tier_stats(api_url: str) -> dict[str, Any]:
    """The prefiller's PD tier counters from lmcache's internal API server (``/health``)."""
    import requests

    doc = requests.get(api_url + "/health", timeout=10).json()
    for tier in doc.get("tiers", []):
        if tier.get("class") == "PDBackend":
            return tier.get("stats") or {}
    return {}


def prefiller_death_check(parts, model: str) -> dict[str, Any]:
    """Stop the prefiller, send one request through the proxy: (status, seconds, message)."""
    import requests

    parts[1].stop()
    t0 = time.perf_counter()
    r = requests.post(parts[4] + "/v1/completions", timeout=120,
                      json={"model": model, "prompt": [1, 2, 3], "max_tokens": 2})
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:500]
    return {"status": r.status_code, "seconds": time.perf_counter() - t0, "message": message}


def _median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def run(cfg: DictConfig, output_dir) -> int:
    import requests

    say = Reporter(progress=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = prepare_model(cfg)
    docs, reqs, _ = make_requests(cfg, model)
    say.line(f"model {model}; {len(docs)} documents, {len(reqs)} requests; starting the plain "
             f"server, the prefiller and the decoder (logs under {out})")
    parts = start_pd(cfg, model, out, say)
    single, _, _, _, proxy_url, api_url = parts
    rows = []
    try:
        n = int(cfg.max_tokens)
        for i, r in enumerate(reqs):
            prompt = r["prompt_token_ids"]
            order = ("single", "pd") if i % 2 == 0 else ("pd", "single")
            got = {}
            for which in order:
                got[which] = stream_completion(single.url if which == "single" else proxy_url,
                                               model, prompt, n)
            tbt = {w: (g["latency_s"] - g["ttft_s"]) / max(n - 1, 1) for w, g in got.items()}
            rows.append({"pd_prefill_s": None, "pd_decode_s": None,
                         "request_key": r["request_key"], "prompt_tokens": len(prompt),
                         "single_ttft_s": got["single"]["ttft_s"], "pd_ttft_s": got["pd"]["ttft_s"],
                         "single_tbt_s": tbt["single"], "pd_tbt_s": tbt["pd"],
                         "decoder_cached_tokens": got["pd"]["cached_tokens"],
                         "same_output": got["single"]["text"] == got["pd"]["text"]})
            say.line(f"{r['request_key']}: TTFT single {rows[-1]['single_ttft_s']:.3f} s, "
                     f"PD {rows[-1]['pd_ttft_s']:.3f} s; decoder prefilled "
                     f"{len(prompt) - rows[-1]['decoder_cached_tokens']} of {len(prompt)} tokens")
        timings = requests.get(proxy_url + "/pd/stats", timeout=10).json()["timings"]
        for row, t in zip(rows, timings):
            row["pd_prefill_s"], row["pd_decode_s"] = t["prefill_s"], t["decode_s"]
        stats = pd_tier_stats(api_url)
        death = prefiller_death_check(parts, model) if bool(cfg.fault_check) else None
    finally:
        stop_all(parts)
    csv_path = report.write_csv(rows, out / str(cfg.output.csv), COLUMNS)
    gbps = (stats.get("pushed_bytes", 0) / stats["push_seconds"] / 1e9
            if stats.get("push_seconds") else float("nan"))
    summary = {"requests": len(rows), "single_ttft_s": _median(rows, "single_ttft_s"),
               "pd_ttft_s": _median(rows, "pd_ttft_s"), "single_tbt_s": _median(rows, "single_tbt_s"),
               "pd_tbt_s": _median(rows, "pd_tbt_s"), "pd_prefill_s": _median(rows, "pd_prefill_s"),
               "pushed_bytes": stats.get("pushed_bytes", 0), "push_seconds": stats.get("push_seconds"),
               "transfer_gbps": gbps, "pd_stats": stats,
               "identical_outputs": all(r["same_output"] for r in rows), "prefiller_death": death}
    (out / "pd_summary.json").write_text(json.dumps(summary, indent=1))
    say.table("\n".join([
        f"{'median over ' + str(len(rows)) + ' requests':32s} {'single':>10s} {'PD':>10s}",
        f"{'TTFT (s)':32s} {summary['single_ttft_s']:10.3f} {summary['pd_ttft_s']:10.3f}",
        f"{'time between tokens (s)':32s} {summary['single_tbt_s']:10.4f} {summary['pd_tbt_s']:10.4f}",
        f"{'PD prefill incl. push (s)':32s} {'':>10s} {summary['pd_prefill_s']:10.3f}",
        f"PD transfer: {summary['pushed_bytes'] / 2**20:.1f} MiB pushed in "
        f"{(summary['push_seconds'] or 0):.3f} s = {gbps:.2f} GB/s (prefiller's PD tier)"]))
    say.line(f"per-request CSV: {csv_path}")
    if death is not None:
        say.line(f"prefiller stopped: the proxy answered {death['status']} in "
                 f"{death['seconds']:.2f} s: {death['message']}")
    if summary["identical_outputs"]:
        say.line("greedy outputs are identical through PD and on the single instance")
        return EXIT_OK
    bad = [r["request_key"] for r in rows if not r["same_output"]]
    say.line(f"ERROR: outputs differ for {len(bad)} of {len(rows)} requests: {', '.join(bad)}",
             error=True)
    return EXIT_MISMATCH if bool(cfg.check_outputs) else EXIT_OK


def _job(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    out = HydraConfig.get().runtime.output_dir
    return job_status("pd", log, lambda: run(cfg, out))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def hydra_app(cfg: DictConfig) -> int:
    status = _job(cfg)
    _statuses.append(status)
    return status


def main() -> None:
    exit_after(hydra_app, _statuses)


if __name__ == "__main__":
    main()
