"""Multi-instance KV sharing: the cache controller and two vLLM instances (A, B) as separate
processes; B pulls from A over P2P what A computed.

Phases (every query streamed, greedy, ``answer_tokens`` tokens):

1. ``A cold``  — A serves the long-document queries (nothing cached: A's prefill; its outputs are
   the no-cache reference) and stores their KV in its CPU tier; the controller learns of it.
2. ``B no P2P`` — B serves same-length queries of *other* documents, cached nowhere: B's TTFT
   without P2P.
3. ``B P2P``  — B serves A's queries: its lookup finds nothing locally, the controller names A,
   the P2P tier pulls the chunks from A's CPU tier through NIXL.
4. ``A warm`` — A serves its queries again from its own CPU tier (a local hit).

Printed and written (CSV under Hydra's output directory): TTFT per phase (median), B-with-P2P /
A-local-hit ratio (target <= 1.5), hit tokens by source (from each server's /metrics:
``lmcache:num_tier_read_chunks_total{tier=local_cpu|p2p}`` x chunk_size), and whether B's outputs
equal A's cold ones. Needs ``deployment=p2p`` (or the p2p tier, controller=lmcache_worker and a
transfer channel). Exit statuses as :mod:`lmcache.experiments.app_exit` (3: outputs differ).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from lmcache.config.checks import option_name
from lmcache.config.compose import register_resolvers
from lmcache.experiments import lmcache_config, report
from lmcache.experiments.app_exit import EXIT_FAILED, EXIT_MISMATCH, EXIT_OK, exit_after, job_status
from lmcache.experiments.console import Reporter
from lmcache.experiments.documents import load_documents, question_text
from lmcache.experiments.lmcache_config import ExperimentConfigError
from lmcache.experiments.long_doc_qa import prepare_model
from lmcache.experiments.multi_round_qa import server_args
from lmcache.experiments.runner import ENGINE_ENV

CONFIG_PATH = "pkg://lmcache.conf"
CONFIG_NAME = "experiment/multi_instance"
INSTANCE_KEYS = ("lmcache_instance_id", "controller_pull_url", "controller_reply_url",
                 "lmcache_worker_ports", "p2p_host", "p2p_init_ports", "p2p_lookup_ports")
log = logging.getLogger(__name__)
register_resolvers()
_statuses: list[int] = []


class ControllerProcess:
    """``python -m lmcache.controller`` on free ports, hashing as the instances do."""

    def __init__(self, cfg: DictConfig, log_file: Path, env: dict[str, str]) -> None:
        from lmcache.experiments.serve import free_port

        self.http, self.pull, self.reply = free_port(), free_port(), free_port()
        args = [sys.executable, "-m", "lmcache.controller", "controller_host=127.0.0.1",
                f"controller_port={self.http}", f"controller_monitor_ports.pull={self.pull}",
                f"controller_monitor_ports.reply={self.reply}", f"chunk_size={cfg.chunk_size}",
                f"hash_algorithm={cfg.hash_algorithm}", "lmcache_worker_timeout=30"]
        if cfg.hash_seed is not None:
            args.append(f"hash_seed={json.dumps(str(cfg.hash_seed))}")
        self.log = log_file.open("w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.http}"

    def wait(self, timeout_s: float) -> float:
        import requests

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the controller exited with {self.proc.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the controller did not answer within {timeout_s:.0f} s")

    def health(self) -> dict[str, Any]:
        import requests

        return requests.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def instance_fields(base: dict[str, Any], instance_id: str, ctl: ControllerProcess) -> dict:
    """The KV-transfer fields of one instance: the experiment's lmcache overrides with this
    instance's id, free ports and the controller's URLs."""
    overrides = [o for o in base["kv_connector_extra_config"]["lmcache.overrides"]
                 if o.split("=", 1)[0].lstrip("+") not in INSTANCE_KEYS]
    overrides += [f"lmcache_instance_id={instance_id}",
                  f"controller_pull_url='127.0.0.1:{ctl.pull}'",
                  f"controller_reply_url='127.0.0.1:{ctl.reply}'", "lmcache_worker_ports=[0]",
                  "p2p_host='127.0.0.1'", "p2p_init_ports=[0]", "p2p_lookup_ports=[0]"]
    return {**base, "kv_connector_extra_config": {"lmcache.overrides": overrides}}


def hits_by_source(metrics: dict[str, float], chunk_size: int) -> dict[str, int]:
    """Tokens read per tier label (``local_cpu``, ``p2p``, ...) from a server's /metrics."""
    out: dict[str, int] = {}
    for name, value in metrics.items():
        if name.startswith("lmcache:num_tier_read_chunks_total{") and "tier=" in name:
            tier = name.split("tier=", 1)[1].split(",")[0].rstrip("}")
            out[tier] = out.get(tier, 0) + int(value) * chunk_size
    return out


WARMUP_PROMPT = "Hello"
LMCACHE_SECONDS = {"lookup": "lmcache:time_to_lookup_sum", "retrieve": "lmcache:time_to_retrieve_sum"}


def lmcache_seconds(metrics: dict[str, float]) -> dict[str, float]:
    """Seconds lmcache spent so far in lookups and retrieves (sums of the ``time_to_lookup`` /
    ``time_to_retrieve`` histograms of a server's /metrics, over every label set)."""
    out = dict.fromkeys(LMCACHE_SECONDS, 0.0)
    for name, value in metrics.items():
        for key, prefix in LMCACHE_SECONDS.items():
            if name.startswith(prefix + "{"):
                out[key] += value
    return out


def run(cfg: DictConfig, output_dir: str, fields: dict[str, Any]) -> int:
    from transformers import AutoTokenizer

    from lmcache.experiments.serve import VLLMServer, stream_completion

    say = Reporter(progress=bool(cfg.progress))
    os.environ.update(ENGINE_ENV)
    model = prepare_model(cfg)
    tok = AutoTokenizer.from_pretrained(model)
    count, tokens = int(cfg.documents.count), int(cfg.documents.tokens)
    docs = load_documents(cfg.documents.dir, lambda t: tok.encode(t, add_special_tokens=False),
                          count=2 * count, max_tokens=tokens, min_tokens=tokens)
    if len(docs) < 2 * count:
        raise ExperimentConfigError(f"documents.dir={cfg.documents.dir}: expected {2 * count} "
                                    f"documents of at least {tokens} tokens, found {len(docs)}")
    prompts = [tok.decode(list(d.token_ids)) + f"\n\nQuestion: {question_text(0)}\nAnswer:"
               for d in docs]
    shared, control = prompts[:count], prompts[count:]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    ctl = ControllerProcess(cfg, out / "controller.log", env)
    servers: dict[str, VLLMServer] = {}
    rows: list[dict[str, Any]] = []
    try:
        say.line(f"controller ready in {ctl.wait(float(cfg.controller_process.startup_timeout_s)):.1f} s "
                 f"at {ctl.url}")
        for name in ("A", "B"):
            servers[name] = VLLMServer(model, server_args(cfg, instance_fields(fields, name, ctl)),
                                       out / f"vllm_{name}.log", host=str(cfg.server.host),
                                       env=env)
        with ThreadPoolExecutor(2) as pool:  # both start at once
            took = dict(zip(servers, pool.map(
                lambda s: s.start(float(cfg.server.startup_timeout_s)), servers.values())))
        for name, s in servers.items():
            say.line(f"instance {name} ready in {took[name]:.1f} s at {s.url}")
        deadline = time.monotonic() + 60  # both workers registered with the controller
        while ctl.health()["workers"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        if ctl.health()["workers"] < 2:
            raise RuntimeError(f"the instances' workers did not register with the controller "
                               f"(see {out / 'controller.log'})")

        def phase(label: str, name: str, queries: list[str]) -> None:
            # an idle vLLM-CPU instance answers its first request late (its worker leaves
            # the busy loop after 1 s idle): a short unrelated request first, not measured
            stream_completion(servers[name].url, model, WARMUP_PROMPT, 1)
            for i, prompt in enumerate(queries):
                before = lmcache_seconds(servers[name].metrics())
                res = stream_completion(servers[name].url, model, prompt, int(cfg.answer_tokens))
                time.sleep(0.2)  # the request's last step stats reach /metrics
                after = lmcache_seconds(servers[name].metrics())
                rows.append({"phase": label, "instance": name, "query": i, **res,
                             **{f"lmcache_{k}_s": after[k] - before[k] for k in after}})
            say.line(f"{label}: {len(queries)} queries, median TTFT "
                     f"{statistics.median(r['ttft_s'] for r in rows if r['phase'] == label):.3f} s")

        phase("A cold", "A", shared)
        deadline = time.monotonic() + 30  # A's admit events reach the controller (batched)
        while ctl.health()["index_entries"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        phase("B no P2P", "B", control)
        phase("B P2P", "B", shared)
        phase("A warm", "A", shared)
        hits = {name: hits_by_source(s.metrics(), int(cfg.chunk_size))
                for name, s in servers.items()}
        controller_exit = ctl.proc.poll()  # None: it served the whole run
    finally:
        for s in servers.values():
            s.stop()
        ctl.stop()
    return report_results(cfg, rows, hits, out, say, controller_exit)


def report_results(cfg, rows, hits, out: Path, say: Reporter,
                   controller_exit: Optional[int] = None) -> int:
    """Print the TTFT table and the verdicts; write the CSV and ``multi_instance.json``.

    ``controller_exit``: the controller's exit status when it died during the run (its P2P
    hits stop there), None when it was up throughout. Returns EXIT_OK, EXIT_FAILED when the
    controller died, else EXIT_MISMATCH when an output differs from the no-cache outputs."""
    med = {p: statistics.median(r["ttft_s"] for r in rows if r["phase"] == p)
           for p in ("A cold", "B no P2P", "B P2P", "A warm")}
    ref = [r["text"] for r in rows if r["phase"] == "A cold"]
    same = {p: [r["text"] for r in rows if r["phase"] == p] == ref for p in ("B P2P", "A warm")}
    def spread(p: str, key: str) -> str:
        values = sorted(r[key] * 1e3 for r in rows if r["phase"] == p)
        return f"{values[0]:.0f}-{values[-1]:.0f}"

    table = [{"phase": p, "median_ttft_s": round(v, 4), "ttft_range_ms": spread(p, "ttft_s"),
              "lmcache_lookup_ms": round(1e3 * statistics.median(
                  r["lmcache_lookup_s"] for r in rows if r["phase"] == p), 2),
              "lmcache_retrieve_ms": round(1e3 * statistics.median(
                  r["lmcache_retrieve_s"] for r in rows if r["phase"] == p), 2),
              "cached_tokens": sum(r["cached_tokens"] for r in rows if r["phase"] == p),
              "outputs_equal_no_cache": same.get(p, "")} for p, v in med.items()]
    from rich.table import Table

    t = Table(title="multi-instance: TTFT per phase (median over the phase's queries)",
              caption="cached: tokens the server did not prefill (lmcache hits); lookup / "
                      "retrieve: lmcache's own time per request (its /metrics), median; same: "
                      "greedy outputs equal the no-cache (A cold) outputs")
    for name in ("phase", "TTFT ms", "range ms", "lookup ms", "retrieve ms", "cached",
                 "same"):  # (fits 80 columns: piped output is not cut)
        t.add_column(name, justify="right", no_wrap=True)
    for row in table:
        t.add_row(row["phase"], f"{row['median_ttft_s'] * 1e3:.1f}", row["ttft_range_ms"],
                  f"{row['lmcache_lookup_ms']:.1f}", f"{row['lmcache_retrieve_ms']:.1f}",
                  str(row["cached_tokens"]), str(row["outputs_equal_no_cache"]))
    say.table(t)
    ratio = med["B P2P"] / med["A warm"]
    say.line(f"B with P2P vs without: {med['B no P2P'] / med['B P2P']:.2f}x faster; "
             f"B P2P / A local hit TTFT = {ratio:.2f} (target <= 1.5)")
    say.line("hit tokens by source: " + "; ".join(
        f"{name}: {', '.join(f'{t} {n}' for t, n in sorted(h.items())) or 'none'}"
        for name, h in hits.items()))
    if controller_exit is None:
        say.line("controller: up for the whole run")
    else:
        say.line(f"ERROR: the controller exited with status {controller_exit} during the run "
                 f"(see {out / 'controller.log'}): later P2P lookups could not be answered")
    report.write_csv(table, out / str(cfg.output.csv), list(table[0]))
    (out / "multi_instance.json").write_text(json.dumps(
        {"median_ttft_s": med, "hits_by_source": hits, "outputs_equal": same,
         "b_p2p_over_a_warm": ratio, "controller_exit": controller_exit, "requests": rows},
        indent=1))
    if not all(same.values()):
        say.line("ERROR: greedy outputs differ from the no-cache (A cold) outputs: "
                 + ", ".join(p for p, ok in same.items() if not ok))
        return EXIT_FAILED if controller_exit is not None else EXIT_MISMATCH
    say.line("greedy outputs are identical to the no-cache outputs")
    return EXIT_OK if controller_exit is None else EXIT_FAILED


def check_documents(documents: Any, chunk_size: int) -> None:
    """``documents.count`` >= 1 and ``documents.tokens`` >= 2 chunks, both integers.

    Raises:
        ExperimentConfigError: naming the key, its value and what was expected."""
    for key, least, what in (("count", 1, "at least 1"),
                             ("tokens", 2 * chunk_size, f"at least 2 chunks ({2 * chunk_size})")):
        value = documents.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ExperimentConfigError(f"documents.{key}={value!r}: expected an integer {what}")


def _job(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()

    def body() -> int:
        tiers = [option_name(n) for n in cfg.storage.backends.values()]
        if "p2p" not in tiers or cfg.get("controller") is None:
            raise ExperimentConfigError(f"the multi-instance experiment needs deployment=p2p (the "
                                        f"p2p tier and controller=lmcache_worker); tiers {tiers}")
        check_documents(cfg.documents, int(cfg.chunk_size))
        fields = lmcache_config.engine_kv_transfer(cfg, hc.runtime.choices,
                                                   list(hc.overrides.task), CONFIG_NAME)
        return run(cfg, hc.runtime.output_dir, fields)

    return job_status("multi_instance", log, body)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def hydra_app(cfg: DictConfig) -> int:
    status = _job(cfg)
    _statuses.append(status)
    return status


def main() -> None:
    """Entry point; exit statuses as in :mod:`lmcache.experiments.app_exit`."""
    exit_after(hydra_app, _statuses)


if __name__ == "__main__":
    main()
