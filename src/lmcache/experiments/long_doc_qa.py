"""Long-document QA: time-to-first-token through a real vLLM engine, without and with lmcache.

Several documents (license texts, a few thousand tokens each) get several questions each; a
prompt is the document's tokens followed by the question's, so the document is a shared prefix.
Round 1 asks every document's first question (cold), round ``r`` its ``r``-th question (warm).
The same prompts run through vLLM twice, each pass in its own child process
(:mod:`lmcache.experiments.runner`): once with no KV connector and once with lmcache's
``LMCacheConnectorV1Dynamic``; vLLM's own prefix caching is off in both, so the difference is
lmcache's. The app prints a rich table and writes two CSV files under Hydra's output directory
(per round: TTFT without/with lmcache, speedup, hit tokens; per request: every measurement and
the output token ids), then checks that the greedy outputs of the two passes are identical.

Run ``python -m lmcache.experiments.long_doc_qa [overrides]`` (or ``scripts/long_doc_qa.py``);
the config is ``experiment/long_doc_qa`` of the installed ``lmcache.conf`` package, e.g.
``documents.count=2 questions.per_document=2 passes=[without_lmcache]``.

Exit status: 0 on success; 1 when greedy outputs differ between the passes (the message names
the requests); 2 on a configuration error (the message names the key). A failing pass raises.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmcache.experiments import report
from lmcache.experiments.documents import build_requests, load_documents
from lmcache.experiments.runner import ENGINE_ENV, run_pass
from lmcache.experiments.tiny_model import TinyModelSpec, ensure_tiny_model

CONFIG_PATH = "pkg://lmcache.conf"
CONFIG_NAME = "experiment/long_doc_qa"
PASSES = ("without_lmcache", "with_lmcache")
EXIT_MISMATCH = 1
EXIT_CONFIG = 2

log = logging.getLogger(__name__)


class ExperimentConfigError(ValueError):
    """A bad value in the experiment's configuration (the message names the key)."""


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


def kv_transfer_fields(cfg: DictConfig) -> dict[str, Any]:
    """``KVTransferConfig`` fields of the with_lmcache pass; ``lmcache.extra_config`` keys get the
    ``lmcache.`` prefix unless they already have it."""
    lm = cfg.lmcache
    extra = OmegaConf.to_container(lm.extra_config, resolve=True) or {}
    extra = {(k if str(k).startswith("lmcache.") else f"lmcache.{k}"): v for k, v in extra.items()}
    return {"kv_connector": str(lm.kv_connector),
            "kv_connector_module_path": str(lm.kv_connector_module_path),
            "kv_role": str(lm.kv_role),
            "kv_load_failure_policy": str(lm.kv_load_failure_policy),
            "kv_connector_extra_config": extra}


def build_jobs(cfg: DictConfig, model: str, requests) -> dict[str, dict[str, Any]]:
    """One job dict (see :func:`lmcache.experiments.runner.run_pass_here`) per pass of
    ``cfg.passes``, in that order.

    Raises:
        ExperimentConfigError: ``passes`` is empty, repeats a pass, or names an unknown one.
    """
    passes = [str(p) for p in cfg.passes]
    unknown = [p for p in passes if p not in PASSES]
    if not passes or unknown or len(set(passes)) != len(passes):
        raise ExperimentConfigError(
            f"passes={passes}: expected a non-empty list of distinct names from {list(PASSES)}")
    llm_kwargs = OmegaConf.to_container(cfg.vllm, resolve=True)
    reqs = [{"request_key": r.request_key, "round": r.round, "doc_index": r.doc_index,
             "question_index": r.question_index, "prompt_token_ids": list(r.prompt_token_ids)}
            for r in requests]
    jobs = {}
    for name in passes:
        jobs[name] = {
            "name": name, "model": model, "llm": llm_kwargs, "requests": reqs,
            "kv_transfer": kv_transfer_fields(cfg) if name == "with_lmcache" else None,
            "max_tokens": int(cfg.max_tokens), "warmup_tokens": int(cfg.warmup_tokens),
            "progress": bool(cfg.progress),
        }
    return jobs


def make_requests(cfg: DictConfig, model: str):
    """The documents and the list of QARequest of the experiment, tokenized by ``model``'s
    tokenizer."""
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
    return docs, requests


def run_experiment(cfg: DictConfig, output_dir: str | os.PathLike) -> int:
    """Run every pass, write the CSV files into ``output_dir``, print the table; return the exit
    status (0, or :data:`EXIT_MISMATCH` when outputs differ and ``check_outputs`` is on)."""
    from rich.console import Console

    console = Console()
    os.environ["VLLM_LOGGING_LEVEL"] = str(cfg.vllm_logging_level)
    if "with_lmcache" in cfg.passes:
        # Fail fast, before any engine starts, on a bad lmcache configuration (exit 2).
        from lmcache.integration.vllm.engine_builder import compose_from_vllm

        compose_from_vllm(kv_transfer_fields(cfg)["kv_connector_extra_config"])
    model = prepare_model(cfg)
    docs, requests = make_requests(cfg, model)
    console.print(f"model [bold]{model}[/]; {len(docs)} documents "
                  f"({', '.join(f'{d.name}:{d.num_tokens}' for d in docs)} tokens), "
                  f"{len(requests)} requests per pass")
    results: dict[str, list[dict[str, Any]] | None] = {p: None for p in PASSES}
    for name, job in build_jobs(cfg, model, requests).items():
        results[name] = run_pass(job)
    summary = report.summarize_rounds(results["without_lmcache"], results["with_lmcache"])
    out = Path(output_dir)
    csv_path = report.write_csv(summary, out / str(cfg.output.csv))
    req_path = report.write_csv(report.request_rows(results), out / str(cfg.output.requests_csv),
                                report.REQUEST_COLUMNS)
    console.print(report.render_table(summary))
    console.print(f"per-round CSV: {csv_path}\nper-request CSV: {req_path}")
    status, message = output_check(results["without_lmcache"], results["with_lmcache"],
                                   bool(cfg.check_outputs))
    if message:
        (Console(stderr=True) if status else console).print(message, markup=False, highlight=False)
    return status


def output_check(without, with_, check: bool) -> tuple[int, str]:
    """Compare the greedy outputs of the two passes.

    Returns ``(exit status, message)``: ``(0, "greedy outputs are identical ...")`` when they
    match; ``(EXIT_MISMATCH, "ERROR: ...")`` naming the differing requests when they do not and
    ``check`` is on (``(0, "WARNING: ...")`` when it is off); ``(0, "")`` when a pass was not run.
    """
    if not without or not with_:
        return 0, ""
    bad = report.mismatched_outputs(without, with_)
    if not bad:
        return 0, "greedy outputs are identical with and without lmcache"
    total = len({r["request_key"] for r in without} | {r["request_key"] for r in with_})
    msg = (f"greedy outputs differ with and without lmcache for {len(bad)} of {total} "
           f"requests: {', '.join(bad)}")
    return (EXIT_MISMATCH, f"ERROR: {msg}") if check else (0, f"WARNING: {msg}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run the experiment in Hydra's output directory's terms; exit non-zero
    on an output mismatch or a configuration error."""
    from hydra.core.hydra_config import HydraConfig

    try:
        status = run_experiment(cfg, HydraConfig.get().runtime.output_dir)
    except (ExperimentConfigError, ValueError) as exc:
        print(f"long_doc_qa: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
