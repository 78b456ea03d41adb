"""The measuring part of the RAG blend experiment: inputs, engine jobs and the interleaved plan.

Every (repeat, query) is one step: the ``no_cache`` pass first, free greedy (its output ``O``
is the reference), then every other pass teacher-forced with ``O`` (their order reversed every
other step), then ``no_cache`` again (A B A, as long_doc_qa: its two TTFTs are merged into
their geometric mean, :func:`lmcache.experiments.interleave.merge_bracket`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from lmcache.experiments.interleave import merge_bracket
from lmcache.experiments.lmcache_config import ExperimentConfigError
from lmcache.experiments.rag_blend_engine import ENGINE
from lmcache.experiments.rag_blend_prompts import (RagQuery, build_queries, question_tokens,
                                                   salted)
from lmcache.experiments.runner import ENGINE_ENV

REFERENCE = "no_cache"


def blend_pass_name(ratio: float) -> str:
    """``blend_<ratio>``, e.g. ``blend_0.15``."""
    return f"blend_{float(ratio):g}"


def pass_specs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """``{pass name: {"engine", "ratio", "salt"}}`` in measuring order: ``no_cache``, then
    ``prefix_only`` and one ``blend_<r>`` per ratio when their names are in ``cfg.passes``."""
    passes = [str(p) for p in cfg.passes]
    out = {REFERENCE: {"engine": "no_cache", "ratio": None, "salt": None}}
    if "prefix_only" in passes:
        out["prefix_only"] = {"engine": "prefix_only", "ratio": None, "salt": None}
    if "cacheblend" in passes:
        for r in cfg.blend_recompute_ratios:
            out[blend_pass_name(r)] = {"engine": "cacheblend", "ratio": float(r),
                                       "salt": f"rag-blend-{float(r):g}"}
    return out


class Inputs:
    """Tokenized inputs: ``queries`` (:class:`RagQuery`), ``warm_prompts`` (each document
    alone), ``warm_query`` (an unmeasured query), ``separator``, ``vocab_size``, ``docs``
    (``(name, token count)``)."""

    def __init__(self, cfg: DictConfig, model: str) -> None:
        os.environ.update(ENGINE_ENV)
        from transformers import AutoTokenizer

        from lmcache.experiments.documents import load_documents

        tok = AutoTokenizer.from_pretrained(model)

        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False)

        d = cfg.documents
        names = list(d.names) if d.names is not None else None
        docs = load_documents(d.dir, encode, count=int(d.count), max_tokens=int(d.max_tokens),
                              min_tokens=int(d.min_tokens), names=names)
        self.docs = [(doc.name, doc.num_tokens) for doc in docs]
        self.separator = encode(str(cfg.blend_special_str))
        if not self.separator:
            raise ExperimentConfigError(f"blend_special_str={cfg.blend_special_str!r} has no tokens")
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        system = head + encode(str(cfg.system_prompt))
        q = cfg.queries
        doc_ids = [list(doc.token_ids) for doc in docs]
        questions = question_tokens(encode, str(q.template), int(q.count))
        self.queries: list[RagQuery] = build_queries(
            doc_ids, system, self.separator, questions, int(q.count), int(q.min_docs),
            int(q.max_docs), int(q.seed))
        self.warm_prompts = doc_ids
        warm_q = question_tokens(encode, str(q.template), int(q.count) + 1)[-1:]
        order = list(range(len(doc_ids)))[::-1][:max(int(q.min_docs), 1)]
        self.vocab_size = len(tok)
        warm = build_queries([doc_ids[i] for i in order], system, self.separator, warm_q, 1,
                             len(order), len(order), 0)[0]
        # a system prompt of its own (no measured query shares its prefix or segment)
        self.warm_query = salted(warm.prompt_token_ids, 1000, self.vocab_size, self.separator)
        longest = max(len(x.prompt_token_ids) for x in self.queries)
        if longest + int(cfg.max_tokens) > int(cfg.vllm.max_model_len):
            raise ExperimentConfigError(
                f"the longest query ({longest} tokens) + max_tokens={cfg.max_tokens} exceeds "
                f"vllm.max_model_len={cfg.vllm.max_model_len}")


def build_jobs(cfg: DictConfig, model: str, specs: dict[str, dict], inputs: Inputs,
               kv_transfer: dict[str, dict], log_dir: str | os.PathLike) -> dict[str, dict]:
    """One :class:`~lmcache.experiments.rag_blend_engine.RagPassEngine` job per engine used
    by ``specs``; ``kv_transfer`` maps ``prefix_only`` / ``cacheblend`` to their fields."""
    llm = OmegaConf.to_container(cfg.vllm, resolve=True)
    jobs: dict[str, dict] = {}
    for name, spec in specs.items():
        engine = spec["engine"]
        job = jobs.setdefault(engine, {
            "name": engine, "engine": ENGINE, "model": model, "llm": llm,
            "kv_transfer": kv_transfer.get(engine), "max_tokens": int(cfg.max_tokens),
            "warmup_tokens": int(cfg.warmup_tokens), "passes": {},
            "warm_prompts": inputs.warm_prompts, "warm_query": inputs.warm_query,
            "log_file": str(Path(log_dir) / f"vllm_{engine}.log"),
            "start_method": str(cfg.engine_start)})
        job["passes"][name] = {"salt": spec["salt"], "ratio": spec["ratio"]}
    return jobs


def run_plan(inputs: Inputs, specs: dict[str, dict], repeats: int,
             run: Callable[[str, dict], dict],
             on_step: Callable[[dict[str, dict]], None] | None = None) -> dict[str, list[dict]]:
    """Run every (repeat, query) step (module docstring) with ``run(pass, request)``; returns
    ``{pass: [rows]}`` (the no-cache rows bracket-merged), ``on_step(rows of the step)``
    after each step."""
    others = [p for p in specs if p != REFERENCE]
    results: dict[str, list[dict]] = {p: [] for p in specs}
    step = 0
    for rep in range(repeats):
        for q in inputs.queries:
            ids = salted(q.prompt_token_ids, rep, inputs.vocab_size, inputs.separator)
            base = {"request_key": q.request_key, "repeat": rep, "prompt_token_ids": ids}
            rows = {REFERENCE: run(REFERENCE, {**base, "pass": REFERENCE, "forced": None})}
            forced = list(rows[REFERENCE]["output_token_ids"])
            for name in (others if step % 2 == 0 else others[::-1]):
                rows[name] = run(name, {**base, "pass": name, "forced": forced})
            if others:
                again = run(REFERENCE, {**base, "pass": REFERENCE, "forced": forced})
                rows[REFERENCE] = merge_bracket(rows[REFERENCE], again)
            for name, row in rows.items():
                row["ratio"] = specs[name]["ratio"]
                results[name].append(row)
            if on_step is not None:
                on_step(rows)
            step += 1
    return results


def step_line(rows: dict[str, dict]) -> str:
    """One progress line of a step: each pass's TTFT and reused / recomputed tokens."""
    ref = rows[REFERENCE]
    parts = [f"{name} {1e3 * r['ttft_s']:.0f} ms ({r['reused_tokens']} reused, "
             f"{r['recomputed_tokens']} computed)" for name, r in rows.items()]
    return (f"repeat {ref['repeat'] + 1} {ref['request_key']} ({ref['prompt_tokens']} tokens): "
            + ", ".join(parts))
