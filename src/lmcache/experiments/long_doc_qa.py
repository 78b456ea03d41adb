"""Long-document QA: time-to-first-token through a real vLLM engine, without and with lmcache.

Several documents (license texts, a few thousand tokens each) get several questions each; a
prompt is the document's tokens followed by the question's, so the document is a shared prefix.
Round 1 asks every document's first question (cold), round ``r`` its ``r``-th question (warm).
Each pass (no KV connector / lmcache's ``LMCacheConnectorV1Dynamic``; vLLM's own prefix caching
off in both) has its own engine process (:mod:`lmcache.experiments.runner`); every request goes
to both passes back to back, alternating which goes first, and every round is repeated
``repeats`` times on salted documents (:mod:`lmcache.experiments.interleave`). The app prints
the median TTFTs, the median of the paired speedups and their spread (p25-p75) per round, a note
where the spread includes 1.0, lmcache's own cost per request (lookup, hashing, load, store),
writes two CSV files under Hydra's output directory and checks that the greedy outputs of the
passes are identical.

lmcache's own config tree composes into the app's config at the root
(:mod:`lmcache.experiments.lmcache_config`): ``deployment=cpu_disk local_disk=/nvme/kv``.

Run ``python -m lmcache.experiments.long_doc_qa [overrides]`` (or ``scripts/long_doc_qa.py``);
``-m`` sweeps end with one combined table, CSV and plot (:mod:`lmcache.experiments.sweep`).

Exit status (one per outcome): 0 success; 2 configuration error (Hydra's own override errors
included; the message names the key); 3 greedy outputs differ between the passes; 4 a run
failed (an engine crashed; the message holds its traceback); 130 interrupted. In a sweep the
status is the highest of its jobs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmcache.experiments import interleave, lmcache_config, report
from lmcache.experiments.app_exit import (EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED,  # noqa: F401
                                          EXIT_MISMATCH, EXIT_OK, exit_after, job_status)
from lmcache.experiments.console import Reporter
from lmcache.experiments.documents import build_requests, load_documents
from lmcache.config.compose import register_resolvers
from lmcache.experiments.lmcache_config import ExperimentConfigError
from lmcache.experiments.runner import ENGINE_ENV, EngineProcess
from lmcache.experiments.tiny_model import TinyModelSpec, ensure_tiny_model

CONFIG_PATH = "pkg://lmcache.conf"
CONFIG_NAME = "experiment/long_doc_qa"
PASSES = ("without_lmcache", "with_lmcache")

log = logging.getLogger(__name__)
register_resolvers()  # lmcache's OmegaConf resolvers, for --cfg job --resolve too
_statuses: list[int] = []  # one per job run by Hydra in this process (main() exits with max)

__all__ = ["ExperimentConfigError", "main", "run_experiment"]


def prepare_model(cfg: DictConfig) -> str:
    """The model directory: ``model.path`` when set (must be a directory), else the tiny model
    (built on first use by :func:`ensure_tiny_model` into ``model.cache_dir``)."""
    if cfg.model.path:
        path = Path(str(cfg.model.path))
        if not path.is_dir():
            raise ExperimentConfigError(f"model.path={str(path)!r} is not a directory")
        return str(path)
    spec = TinyModelSpec(**OmegaConf.to_container(cfg.model.tiny, resolve=True))
    return str(ensure_tiny_model(cfg.model.cache_dir, spec))


def kv_transfer_fields(cfg: DictConfig, lmcache_overrides: list[str]) -> dict[str, Any]:
    """``KVTransferConfig`` fields of the with_lmcache pass: ``kv_transfer.*`` and, in
    ``kv_connector_extra_config``, ``lmcache.overrides`` = ``lmcache_overrides``."""
    return lmcache_config.kv_transfer_fields(cfg.kv_transfer, lmcache_overrides)


def check_config(cfg: DictConfig, choices, task_overrides) -> dict[str, Any]:
    """Check the experiment's keys and lmcache's config (before any engine starts) and return
    the with_lmcache pass's KV-transfer fields.

    Raises:
        ExperimentConfigError / ValueError: naming the bad key.
    """
    passes = [str(p) for p in cfg.passes]
    unknown = [p for p in passes if p not in PASSES]
    if not passes or unknown or len(set(passes)) != len(passes):
        raise ExperimentConfigError(
            f"passes={passes}: expected a non-empty list of distinct names from {list(PASSES)}")
    if int(cfg.repeats) < 1:
        raise ExperimentConfigError(f"repeats={cfg.repeats}: expected an integer >= 1")
    return lmcache_config.engine_kv_transfer(cfg, choices, task_overrides, CONFIG_NAME,
                                             check_lmcache="with_lmcache" in passes)


def build_jobs(cfg: DictConfig, model: str, kv_transfer: dict[str, Any],
               log_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """One engine job (see :class:`lmcache.experiments.runner.PassEngine`) per pass of
    ``cfg.passes``, in that order; only ``with_lmcache`` gets ``kv_transfer``; with
    ``log_dir``, each engine's output goes to ``<log_dir>/vllm_<pass>.log``."""
    llm_kwargs = OmegaConf.to_container(cfg.vllm, resolve=True)
    return {str(name): {"name": str(name), "model": model, "llm": llm_kwargs,
                        "kv_transfer": kv_transfer if name == "with_lmcache" else None,
                        "max_tokens": int(cfg.max_tokens), "warmup_tokens": int(cfg.warmup_tokens),
                        "log_file": None if log_dir is None else str(Path(log_dir) / f"vllm_{name}.log")}
            for name in cfg.passes}


def make_requests(cfg: DictConfig, model: str):
    """(documents, request dicts, vocabulary size) of the experiment, tokenized by ``model``'s
    tokenizer. A request dict has ``request_key``, ``round``, ``doc_index``,
    ``question_index`` and ``prompt_token_ids``."""
    os.environ.update(ENGINE_ENV)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    d = cfg.documents
    names = list(d.names) if d.names is not None else None
    docs = load_documents(d.dir, encode, count=int(d.count), max_tokens=int(d.max_tokens),
                          min_tokens=int(d.min_tokens), names=names, bos_token_id=tok.bos_token_id)
    requests = build_requests(docs, encode, int(cfg.questions.per_document),
                              template=str(cfg.questions.template))
    if max(len(r.prompt_token_ids) for r in requests) + int(cfg.max_tokens) > int(cfg.vllm.max_model_len):
        raise ExperimentConfigError(
            f"documents.max_tokens={d.max_tokens} + question + max_tokens={cfg.max_tokens} exceeds "
            f"vllm.max_model_len={cfg.vllm.max_model_len}")
    reqs = [{"request_key": r.request_key, "round": r.round, "doc_index": r.doc_index,
             "question_index": r.question_index, "prompt_token_ids": list(r.prompt_token_ids)}
            for r in requests]
    return docs, reqs, len(tok)


def run_experiment(cfg: DictConfig, output_dir: str | os.PathLike, kv_transfer: dict[str, Any],
                   extra_columns: dict[str, str] | None = None) -> int:
    """Start one engine per pass, run the interleaved plan, write the CSV files into
    ``output_dir`` (``extra_columns`` first in every per-round row, e.g. a sweep's values),
    print the tables; return the exit status (:data:`EXIT_OK`, or :data:`EXIT_MISMATCH` when
    outputs differ and ``check_outputs`` is on)."""
    say = Reporter(progress=bool(cfg.progress))
    os.environ["VLLM_LOGGING_LEVEL"] = str(cfg.vllm_logging_level)
    model = prepare_model(cfg)
    docs, reqs, vocab = make_requests(cfg, model)
    passes = [str(p) for p in cfg.passes]
    bracket = ("without_lmcache" if "without_lmcache" in passes and len(passes) > 1
               and not cfg.vllm.get("enable_prefix_caching", False) else None)  # A B A
    steps = interleave.plan(reqs, int(cfg.repeats), passes, vocab, bracket)
    say.line(f"model {model}; {len(docs)} documents "
             f"({', '.join(f'{d.name}:{d.num_tokens}' for d in docs)} tokens), {len(reqs)} "
             f"requests x {cfg.repeats} repeats = {len(steps)} per pass, passes interleaved"
             + (f" ({bracket} before and after each request: A B A)" if bracket else ""))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(cfg, model, kv_transfer, out)
    engines = {n: EngineProcess(job) for n, job in jobs.items()}
    try:
        say.line(f"starting vLLM for {', '.join(engines)} (model load, KV cache, warm-up); "
                 f"their own messages go to {out}/vllm_<pass>.log")
        for engine in engines.values():
            engine.start()
        for name, engine in engines.items():
            say.line(f"vLLM ready for {name} in {engine.wait_ready():.1f} s")
        results = interleave.run_plan(steps, lambda n, r: engines[n].run(r), say.on_result)
    finally:
        for engine in engines.values():
            engine.close()
    say.flush_round()
    by_pass = {p: results.get(p) for p in PASSES}
    summary = report.summarize_rounds(by_pass["without_lmcache"], by_pass["with_lmcache"])
    extra = dict(extra_columns or {})
    csv_path = report.write_csv([{**extra, **s} for s in summary], out / str(cfg.output.csv),
                                [*extra, *report.ROUND_COLUMNS])
    req_path = report.write_csv(report.request_rows(by_pass), out / str(cfg.output.requests_csv),
                                report.REQUEST_COLUMNS)
    say.table(report.render_table(summary))
    if by_pass["with_lmcache"]:
        say.table(report.render_costs(summary))
    for note in report.noise_notes(summary):
        say.line(note)
    say.line(f"per-round CSV: {csv_path}")
    say.line(f"per-request CSV: {req_path}")
    status, message = output_check(by_pass["without_lmcache"], by_pass["with_lmcache"],
                                   bool(cfg.check_outputs))
    if message:
        say.line(message, error=bool(status))
    return status


def output_check(without, with_, check: bool) -> tuple[int, str]:
    """Compare the greedy outputs of the two passes (request and repeat by request and repeat).

    Returns ``(exit status, message)``: ``(0, "greedy outputs are identical ...")`` when they
    match; ``(EXIT_MISMATCH, "ERROR: ...")`` naming the differing requests when they do not and
    ``check`` is on (``(0, "WARNING: ...")`` when it is off); ``(0, "")`` when a pass was not run.
    """
    if not without or not with_:
        return 0, ""

    def keyed(rows):
        return [{**r, "request_key": (f"{r['request_key']}@r{r['repeat']}" if r.get("repeat")
                                      else r["request_key"])} for r in rows]

    bad = report.mismatched_outputs(keyed(without), keyed(with_))
    if not bad:
        return 0, "greedy outputs are identical with and without lmcache"
    total = len({r["request_key"] for r in keyed(without)} | {r["request_key"] for r in keyed(with_)})
    msg = (f"greedy outputs differ with and without lmcache for {len(bad)} of {total} "
           f"requests: {', '.join(bad)}")
    return (EXIT_MISMATCH, f"ERROR: {msg}") if check else (0, f"WARNING: {msg}")


def _job(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()

    def body() -> int:
        fields = check_config(cfg, hc.runtime.choices, list(hc.overrides.task))
        swept = {}
        if str(hc.mode) == "RunMode.MULTIRUN":
            swept = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in hc.overrides.task
                     if "=" in o}
        return run_experiment(cfg, hc.runtime.output_dir, fields, swept)

    return job_status("long_doc_qa", log, body)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def hydra_app(cfg: DictConfig) -> int:
    """Hydra's task function: run one job and record its exit status."""
    status = _job(cfg)
    _statuses.append(status)
    return status


def main() -> None:
    """Entry point: run the Hydra app and exit with one status per outcome
    (:mod:`lmcache.experiments.app_exit`)."""
    exit_after(hydra_app, _statuses)


if __name__ == "__main__":
    main()
