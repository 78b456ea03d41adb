"""RAG with CacheBlend: TTFT and quality when documents come back in any subset and order.

K documents (4 license texts of ~1k tokens by default) are cached alone, each at position 0,
as CacheBlend users fill the cache. Each query is ``system prompt + a random subset of the
documents in random order + a question``, joined by ``blend_special_str``
(:mod:`lmcache.experiments.rag_blend_prompts`). Passes (:mod:`~lmcache.experiments.rag_blend_engine`):

* ``no_cache`` — plain vLLM: the reference for TTFT and quality;
* ``prefix_only`` — lmcache as composed (prefix chunks: hits only where queries share a start);
* ``blend_<r>`` — CacheBlend at each of ``blend_recompute_ratios`` (default 0, 0.15, 0.3, 1.0).

Per pass: TTFT (median, p25-p75, mean; paired speedup against no cache, measured back to back,
A B A), hit / reused / recomputed tokens, and quality against the no-cache greedy output of 32
tokens: teacher-forced greedy agreement and the output's NLL under the pass's KV
(:mod:`~lmcache.experiments.rag_blend_forced`, :mod:`~lmcache.experiments.rag_blend_report`).
Ratio 1.0 must reproduce full prefill (checked: exit 3 when not, with ``check_outputs``);
ratio 0 must recompute only the uncached tokens (reported).

Output under Hydra's run directory: ``rag_blend.csv`` (per pass), ``rag_blend_requests.csv``,
``rag_blend.png`` (TTFT vs quality), ``rag_blend.log``; the table is printed.

Run ``python -m lmcache.experiments.rag_blend [overrides]``; exit status as
:mod:`lmcache.experiments.app_exit` (0 ok, 2 configuration, 3 ratio 1.0 not identical,
4 a run failed, 130 interrupted).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lmcache.config.compose import register_resolvers
from lmcache.experiments import lmcache_config, rag_blend_report as report
from lmcache.experiments.app_exit import (EXIT_MISMATCH, EXIT_OK, exit_after,  # noqa: F401
                                          job_status)
from lmcache.experiments.console import Reporter
from lmcache.experiments.lmcache_config import ExperimentConfigError
from lmcache.experiments.rag_blend_run import (Inputs, build_jobs, pass_specs, run_plan,
                                               step_line)
from lmcache.experiments.runner import EngineProcess

CONFIG_PATH = "pkg://lmcache.conf"
CONFIG_NAME = "experiment/rag_blend"
PASSES = ("no_cache", "prefix_only", "cacheblend")
#: lmcache groups / keys the CacheBlend passes set themselves (cacheblend.yaml's defaults)
BLEND_OWNS = ("blend", "token_database", "gpu_connector", "save_unfull_chunk")

log = logging.getLogger(__name__)
register_resolvers()
_statuses: list[int] = []


def _quote(text: str) -> str:
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _int_list(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def blend_overrides(prefix: list[str], cfg: DictConfig) -> list[str]:
    """The CacheBlend engine's lmcache overrides: the prefix pass's (``prefix``) without
    what ``blend=cacheblend`` sets (:data:`BLEND_OWNS`), plus the blend option and its keys
    (one ratio: the engine switches it per pass)."""
    def owned(o: str) -> bool:
        key = o.split("=", 1)[0].lstrip("+~")
        return key.split(".")[0] in BLEND_OWNS

    return [o for o in prefix if not owned(o)] + [
        "blend=cacheblend",
        f"token_database.blend_special_str={_quote(cfg.blend_special_str)}",
        f"blend.blend_check_layers={_int_list(int(x) for x in cfg.blend_check_layers)}",
        f"blend.blend_recompute_ratios=[{float(cfg.blend_recompute_ratios[0])}]",
        f"blend.blend_min_tokens={int(cfg.blend_min_tokens)}"]


def check_config(cfg: DictConfig, choices, task_overrides) -> dict[str, dict[str, Any]]:
    """Check the experiment's keys and both lmcache configs before any engine starts; return
    ``{"prefix_only": fields, "cacheblend": fields}`` (``KVTransferConfig`` fields).

    Raises:
        ExperimentConfigError / ValueError: naming the bad key.
    """
    from lmcache.config.checks import check_config as check_lmcache
    from lmcache.integration.vllm.engine_builder import compose_from_vllm

    passes = [str(p) for p in cfg.passes]
    if not passes or any(p not in PASSES for p in passes) or len(set(passes)) != len(passes):
        raise ExperimentConfigError(
            f"passes={passes}: expected distinct names from {list(PASSES)}")
    ratios = list(cfg.blend_recompute_ratios)
    if "cacheblend" in passes and (not ratios or len(set(ratios)) != len(ratios) or not all(
            isinstance(r, (int, float)) and 0.0 <= float(r) <= 1.0 for r in ratios)):
        raise ExperimentConfigError(f"blend_recompute_ratios={ratios}: expected distinct "
                                    "numbers in [0, 1]")
    if int(cfg.repeats) < 1:
        raise ExperimentConfigError(f"repeats={cfg.repeats}: expected an integer >= 1")
    if str(cfg.engine_start) not in ("spawn", "fork"):
        raise ExperimentConfigError(f"engine_start={cfg.engine_start!r}: expected spawn or fork")
    if int(cfg.max_tokens) < 1:
        raise ExperimentConfigError(f"max_tokens={cfg.max_tokens}: expected an integer >= 1")
    if cfg.get("blend") is not None:
        raise ExperimentConfigError("blend=cacheblend at the root would make prefix_only a "
                                    "blend pass too; the CacheBlend passes set it themselves: "
                                    "leave blend=none and use blend_recompute_ratios")
    prefix = lmcache_config.engine_kv_transfer(cfg, choices, task_overrides, CONFIG_NAME,
                                               check_lmcache=True)
    overrides = blend_overrides(list(prefix["kv_connector_extra_config"]["lmcache.overrides"]),
                                cfg)
    blend = lmcache_config.kv_transfer_fields(cfg.kv_transfer, overrides)
    blend_cfg = compose_from_vllm(blend["kv_connector_extra_config"])
    check_lmcache(blend_cfg)
    return {"prefix_only": prefix, "cacheblend": blend}


def prepare_model(cfg: DictConfig) -> str:
    """``model.path`` when set (a directory), else the tiny model ``model.kind``."""
    from lmcache.experiments.trained_model import tiny_model_path

    if cfg.model.path:
        path = Path(str(cfg.model.path))
        if not path.is_dir():
            raise ExperimentConfigError(f"model.path={str(path)!r} is not a directory")
        return str(path)
    return str(tiny_model_path(str(cfg.model.kind), cfg.model.cache_dir))


def run_experiment(cfg: DictConfig, output_dir: str | os.PathLike,
                   kv_transfer: dict[str, dict]) -> int:
    """Start the engines, run the plan, write CSV + plot, print the table; return the exit
    status (:data:`EXIT_MISMATCH` when ratio 1.0 differs from full prefill and
    ``check_outputs`` is on)."""
    say = Reporter(progress=bool(cfg.progress), width=130)
    os.environ["VLLM_LOGGING_LEVEL"] = str(cfg.vllm_logging_level)
    model = prepare_model(cfg)
    inputs = Inputs(cfg, model)
    specs = pass_specs(cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say.line(f"model {model}; {len(inputs.docs)} documents ("
             + ", ".join(f"{n}:{t}" for n, t in inputs.docs) + f" tokens); {len(inputs.queries)}"
             f" queries x {cfg.repeats} repeats; passes {', '.join(specs)}")
    jobs = build_jobs(cfg, model, specs, inputs, kv_transfer, out)
    if str(cfg.engine_start) == "fork":  # imported once, inherited by every engine
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams  # noqa: F401
    engines = {name: EngineProcess(job) for name, job in jobs.items()}
    try:
        say.line(f"starting vLLM for {', '.join(engines)} (model load, warm-up, documents "
                 f"cached alone); their messages go to {out}/vllm_<engine>.log")
        for engine in engines.values():
            engine.start()
        for name, engine in engines.items():
            say.line(f"vLLM ready for {name} in {engine.wait_ready():.1f} s")
        results = run_plan(inputs, specs, int(cfg.repeats),
                           lambda p, r: engines[specs[p]["engine"]].run(r),
                           (lambda rows: say.line(step_line(rows))) if cfg.progress else None)
    finally:
        for engine in engines.values():
            engine.close()
    report.add_quality(results)
    summary = report.summarize(results)
    csv_path = write_rows(summary, out / str(cfg.output.csv), report.PASS_COLUMNS)
    req_path = write_rows(report.request_rows(results), out / str(cfg.output.requests_csv),
                          report.REQUEST_COLUMNS)
    png = report.plot(summary, out / str(cfg.output.plot),
                      title=f"RAG blend: {len(inputs.docs)} documents, "
                      f"{len(inputs.queries)} queries x {cfg.repeats} repeats, {Path(model).name}")
    say.table(report.render_table(summary))
    say.line(f"per-pass CSV: {csv_path}")
    say.line(f"per-request CSV: {req_path}")
    say.line(f"plot: {png}")
    return outcome(summary, bool(cfg.check_outputs), say)


def write_rows(rows, path, columns) -> Path:
    from lmcache.experiments.report import write_csv

    return write_csv(rows, path, columns)


def outcome(summary: list[dict], check: bool, say: Reporter) -> int:
    """Report the ratio-1.0 and ratio-0 checks; the exit status."""
    status = EXIT_OK
    for s in summary:
        if not s["check"] or s["check"] == "reference":
            continue
        bad = s["check"].startswith("NOT")
        say.line(f"{s['pass']}: {s['check']}", error=bad and check)
        if bad and s["ratio"] == 1.0 and check:
            status = EXIT_MISMATCH
    return status


def _job(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()

    def body() -> int:
        fields = check_config(cfg, hc.runtime.choices, list(hc.overrides.task))
        return run_experiment(cfg, hc.runtime.output_dir, fields)

    return job_status("rag_blend", log, body)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def hydra_app(cfg: DictConfig) -> int:
    """Hydra's task function: run one job and record its exit status."""
    status = _job(cfg)
    _statuses.append(status)
    return status


def main() -> None:
    """Entry point: run the Hydra app and exit with one status per outcome."""
    exit_after(hydra_app, _statuses)


if __name__ == "__main__":
    main()
