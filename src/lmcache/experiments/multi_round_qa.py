"""Multi-round QA through a served model, the way LMCache's multi-round QA benchmark drives it.

``users`` users chat ``rounds`` rounds each. A user's prompt is one system prompt shared by
every user, then that user's own context, then the conversation so far (questions and the
model's answers), then the new question, so each round repeats a longer prefix. In ``serve``
mode the app starts ``python -m vllm.entrypoints.openai.api_server`` with lmcache as its KV
connector (:class:`lmcache.experiments.serve.VLLMServer`), sends streamed ``/v1/completions``
requests at ``qps`` starts per second at most (a user's next question waits for its previous
answer), measures TTFT as a user sees it, and reads lmcache's metrics from the server's
``/metrics`` at the end. ``offline`` mode runs the same conversations one request at a time
through ``vllm.LLM`` in this process (fast, for tests).

Prints a table per round (TTFT median and p25-p75, tokens the server did not prefill) and
lmcache's counters from ``/metrics``; writes per-round and per-request CSV files into Hydra's
output directory. Exit status as :mod:`lmcache.experiments.long_doc_qa` (0, 2 configuration
error, 4 failed run, 130 interrupted).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmcache.experiments import lmcache_config, report
from lmcache.experiments.console import Reporter
from lmcache.experiments.documents import load_documents, question_text
from lmcache.config.compose import register_resolvers
from lmcache.experiments.lmcache_config import ExperimentConfigError
from lmcache.experiments.app_exit import EXIT_OK, exit_after, job_status
from lmcache.experiments.long_doc_qa import prepare_model
from lmcache.experiments.runner import ENGINE_ENV

CONFIG_PATH = "pkg://lmcache.conf"
CONFIG_NAME = "experiment/multi_round_qa"
MODES = ("serve", "offline")
LMCACHE_METRICS = ("lmcache:num_lookup_requests_total", "lmcache:num_lookup_tokens_total",
                   "lmcache:num_lookup_hits_total", "lmcache:num_retrieve_requests_total",
                   "lmcache:num_requested_tokens_total", "lmcache:num_hit_tokens_total",
                   "lmcache:num_store_requests_total", "lmcache:num_stored_tokens_total",
                   "lmcache:retrieve_hit_rate", "lmcache:lookup_hit_rate")
log = logging.getLogger(__name__)
register_resolvers()  # lmcache's OmegaConf resolvers, for --cfg job --resolve too
_statuses: list[int] = []


class Conversations:
    """The prompts of every user: ``prompt(user, round)`` once the answers of that user's
    earlier rounds are known (:meth:`answer`). Texts come from the documents' tokens, decoded."""

    def __init__(self, cfg: DictConfig, tokenizer) -> None:
        users = int(cfg.users)
        docs = load_documents(cfg.documents.dir, lambda t: tokenizer.encode(t, add_special_tokens=False),
                              count=min(users + 1, 4), max_tokens=max(int(cfg.system_prompt_tokens),
                                                                      int(cfg.user_info_tokens),
                                                                      int(cfg.documents.min_tokens)),
                              min_tokens=int(cfg.documents.min_tokens))
        if len(docs) < 2:
            raise ExperimentConfigError(f"documents.dir={cfg.documents.dir}: expected 2 documents "
                                        f"of at least {cfg.documents.min_tokens} tokens")
        cut = lambda d, n: tokenizer.decode(list(d.token_ids[:n]))  # noqa: E731
        self.system = cut(docs[0], int(cfg.system_prompt_tokens))
        self.context = [cut(docs[1 + u % (len(docs) - 1)], int(cfg.user_info_tokens))
                        for u in range(users)]
        self.answers: list[list[str]] = [[] for _ in range(users)]

    def prompt(self, user: int, rnd: int) -> str:
        history = "".join(f"\n\nQuestion: {question_text(i)}\nAnswer:{self.answers[user][i]}"
                          for i in range(rnd))
        return (f"{self.system}\n\nUser {user}: {self.context[user]}{history}"
                f"\n\nQuestion: {question_text(rnd)}\nAnswer:")

    def answer(self, user: int, rnd: int, text: str) -> None:
        if len(self.answers[user]) != rnd:
            raise RuntimeError(f"user {user}: answer of round {rnd} out of order")
        self.answers[user].append(text)


def server_args(cfg: DictConfig, kv_transfer: dict[str, Any] | None) -> list[str]:
    """The api_server flags of ``cfg.vllm`` (+ ``--kv-transfer-config`` when given)."""
    v = cfg.vllm
    args = ["--dtype", str(v.dtype), "--max-model-len", str(v.max_model_len),
            "--kv-cache-memory-bytes", str(v.kv_cache_memory_bytes), "--seed", str(v.seed),
            "--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching",
            "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]
    if v.enforce_eager:
        args.append("--enforce-eager")
    if kv_transfer:
        args += ["--kv-transfer-config", json.dumps(kv_transfer)]
    return args + [str(a) for a in cfg.server.extra_args]


def run_serve(cfg, conv: Conversations, model: str, kv_transfer, out: Path, say: Reporter):
    """Serve mode: (per-request rows, lmcache's metrics from /metrics)."""
    from lmcache.experiments.serve import VLLMServer, metric_sum, stream_completion

    server = VLLMServer(model, server_args(cfg, kv_transfer), out / "vllm_server.log",
                        host=str(cfg.server.host), port=int(cfg.server.port),
                        env={**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    with server:
        say.line(f"starting vLLM server at {server.url} (its log: {server.log_file})")
        say.line(f"vLLM server ready in {server.start(float(cfg.server.startup_timeout_s)):.1f} s")

        def one(user: int, rnd: int) -> None:
            res = stream_completion(server.url, model, conv.prompt(user, rnd), int(cfg.answer_tokens))
            res["answer"] = res.pop("text")
            conv.answer(user, rnd, res["answer"])
            with lock:
                rows.append({"user": user, "round": rnd, **res})

        gap = 1.0 / float(cfg.qps)
        with ThreadPoolExecutor(max_workers=int(cfg.users)) as pool:
            last: dict[int, Future] = {}
            next_start = time.perf_counter()
            for rnd in range(int(cfg.rounds)):
                for user in range(int(cfg.users)):
                    if user in last:
                        last[user].result()  # its previous answer first (raises its error)
                    time.sleep(max(0.0, next_start - time.perf_counter()))
                    next_start = time.perf_counter() + gap
                    last[user] = pool.submit(one, user, rnd)
                say.line(f"round {rnd + 1}: {cfg.users} requests started")
            for fut in last.values():
                fut.result()
        metrics = server.metrics()
        if kv_transfer and cfg.internal_api_server_enabled:  # the worker's (rank 0) health
            api = f"http://{cfg.internal_api_server_host}:{int(cfg.internal_api_server_port_start) + 1}"
            health = {path: requests_json(f"{api}/{path}") for path in ("health", "conf")}
            (out / "lmcache_health.json").write_text(json.dumps(health, indent=1))
            (out / "lmcache_worker_metrics.txt").write_text(requests_json(f"{api}/metrics", text=True))
            tiers = ", ".join(f"{t['name']} {t['state']} ({t['chunks']} chunks)"
                              for t in health["health"].get("tiers", []))
            say.line(f"lmcache health at {api}/health: "
                     f"{'healthy' if health['health'].get('healthy') else 'NOT healthy'}; {tiers}")
    totals = {name: metric_sum(metrics, name) for name in LMCACHE_METRICS}
    return rows, {**totals, **tier_series(metrics)}


def tier_series(metrics: dict[str, float]) -> dict[str, float]:
    """lmcache's per-tier series of ``/metrics`` (``lmcache:num_tier_*``, ``lmcache:tier_hit_rate``)
    as ``{"name{tier=<tier>}": value}``, summed over vLLM's engines."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name, _, labels = key.partition("{")
        tier = dict(kv.split("=", 1) for kv in labels.rstrip("}").split(",") if "=" in kv).get("tier")
        if tier and (name.startswith("lmcache:num_tier_") and name.endswith("_total")
                     or name == "lmcache:tier_hit_rate"):
            out[f"{name}{{tier={tier}}}"] = out.get(f"{name}{{tier={tier}}}", 0.0) + value
    return out


def requests_json(url: str, text: bool = False):
    """GET ``url`` and parse its JSON body (any status; an error as ``{"error": ...}``); with
    ``text`` its body as text (an error as a ``# error: ...`` line)."""
    import requests

    try:
        r = requests.get(url, timeout=30)
        return r.text if text else r.json()
    except (requests.RequestException, ValueError) as exc:
        return f"# error: {exc!r}\n" if text else {"error": f"{type(exc).__name__}: {exc}"}


def run_offline(cfg, conv: Conversations, model: str, kv_transfer, say: Reporter):
    """Offline mode: the same conversations through vllm.LLM here, one request at a time."""
    from lmcache.experiments.runner import PassEngine

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # in-process engine: keep the table clear
    engine = PassEngine({"name": "offline", "model": model, "max_tokens": int(cfg.answer_tokens),
                         "kv_transfer": kv_transfer, "warmup_tokens": 0,
                         "llm": {**OmegaConf.to_container(cfg.vllm, resolve=True),
                                 "distributed_executor_backend": "uni",
                                 "disable_log_stats": False}})
    tok = engine.llm.get_tokenizer()
    rows = []
    for rnd in range(int(cfg.rounds)):
        for user in range(int(cfg.users)):
            ids = tok.encode(conv.prompt(user, rnd))
            res = engine.run({"request_key": f"u{user}#r{rnd}", "prompt_token_ids": ids})
            conv.answer(user, rnd, res["output_text"])
            rows.append({"user": user, "round": rnd, "ttft_s": res["ttft_s"],
                         "latency_s": res["ttft_s"], "prompt_tokens": res["prompt_tokens"],
                         "cached_tokens": res["hit_tokens"], "answer": res["output_text"]})
        say.line(f"round {rnd + 1}: {cfg.users} requests done")
    return rows, {}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: requests, TTFT median/p25/p75 (s), prompt and cached tokens (mean), hit rate."""
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        rs = [r for r in rows if r["round"] == rnd]
        p25, med, p75 = report.quartiles([r["ttft_s"] for r in rs])
        prompt = sum(r["prompt_tokens"] for r in rs)
        cached = sum(r["cached_tokens"] for r in rs)
        out.append({"round": rnd + 1, "requests": len(rs), "ttft_s": med, "ttft_p25_s": p25,
                    "ttft_p75_s": p75, "prompt_tokens_mean": prompt / len(rs),
                    "cached_tokens_mean": cached / len(rs),
                    "hit_rate": cached / prompt if prompt else 0.0})
    return out


def render(summary, metrics):
    from rich.table import Table

    table = Table(title="multi-round QA: TTFT per round", caption="TTFT: median ms (p25-p75); "
                  "cached: mean tokens per request the server did not prefill")
    for name in ("round", "n", "TTFT ms", "p25-p75", "prompt", "cached", "hit rate"):
        table.add_column(name, justify="right", no_wrap=True)
    for s in summary:
        table.add_row(str(s["round"]), str(s["requests"]), f"{s['ttft_s'] * 1e3:.1f}",
                      f"{s['ttft_p25_s'] * 1e3:.0f}-{s['ttft_p75_s'] * 1e3:.0f}",
                      f"{s['prompt_tokens_mean']:.0f}", f"{s['cached_tokens_mean']:.0f}",
                      f"{100 * s['hit_rate']:.1f}%")
    tables = [table]
    if metrics:
        mt = Table(title="lmcache's metrics on the server's /metrics")
        mt.add_column("metric", no_wrap=True)
        mt.add_column("value", justify="right", no_wrap=True)
        for name, value in metrics.items():
            mt.add_row(name, f"{value:.3f}" if "rate" in name else f"{value:.0f}")
        tables.append(mt)
    return tables


def run(cfg: DictConfig, output_dir, kv_transfer: dict[str, Any] | None) -> int:
    """Run the conversations (serve or offline), print and write the results; returns 0."""
    from transformers import AutoTokenizer

    say = Reporter(progress=bool(cfg.progress))
    os.environ.update(ENGINE_ENV)
    model = prepare_model(cfg)
    conv = Conversations(cfg, AutoTokenizer.from_pretrained(model))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say.line(f"model {model}; {cfg.users} users x {cfg.rounds} rounds, shared system prompt of "
             f"{cfg.system_prompt_tokens} tokens, mode {cfg.mode}, lmcache "
             f"{'on' if kv_transfer else 'off'}")
    if str(cfg.mode) == "serve":
        rows, metrics = run_serve(cfg, conv, model, kv_transfer, out, say)
    else:
        rows, metrics = run_offline(cfg, conv, model, kv_transfer, say)
    rows.sort(key=lambda r: (r["round"], r["user"]))
    summary = summarize(rows)
    csv_path = report.write_csv(summary, out / str(cfg.output.csv), list(summary[0]))
    req_path = report.write_csv(rows, out / str(cfg.output.requests_csv), list(rows[0]))
    if metrics:
        (out / "lmcache_metrics.json").write_text(json.dumps(metrics, indent=1))
    for table in render(summary, metrics):
        say.table(table)
    say.line(f"per-round CSV: {csv_path}")
    say.line(f"per-request CSV: {req_path}")
    return EXIT_OK


def _job(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()

    def body() -> int:
        if str(cfg.mode) not in MODES:
            raise ExperimentConfigError(f"mode={cfg.mode}: expected one of {list(MODES)}")
        for key in ("users", "rounds", "answer_tokens"):
            if int(cfg[key]) < 1:
                raise ExperimentConfigError(f"{key}={cfg[key]}: expected an integer >= 1")
        if not float(cfg.qps) > 0:
            raise ExperimentConfigError(f"qps={cfg.qps}: expected a number > 0")
        fields = lmcache_config.engine_kv_transfer(
            cfg, hc.runtime.choices, list(hc.overrides.task), CONFIG_NAME,
            check_lmcache=bool(cfg.lmcache_enabled))
        return run(cfg, hc.runtime.output_dir, fields if cfg.lmcache_enabled else None)

    return job_status("multi_round_qa", log, body)


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
