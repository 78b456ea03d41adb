"""Serde sweep: size and quality of each serde on real KV, through lmcache's remote tier.

One job = one serde (LMCache's key ``remote_serde``: naive | cachegen | kivi | fp8). The
trained tiny Llama (:mod:`lmcache.experiments.trained_model`) prefills ``documents.count``
license passages of ``documents.tokens`` tokens; each passage's KV (bf16, LMCache's
``KV_2LTD`` chunks of ``chunk_size`` tokens) is stored through the remote tier built by the
container (``storage/backends=[local_cpu,remote] serde=<remote_serde>
remote_connector=<remote_connector>``; by default ``fs://`` in the job's folder) and retrieved
as a full hit; then ``gen_tokens`` tokens are generated greedily from the retrieved KV.

Per job (one CSV row, :data:`COLUMNS`): payload bytes per token and times smaller than bf16;
greedy agreement with the naive pass (the same passages from the unmodified bf16 KV,
computed in every job) over ``gen_tokens`` tokens; teacher-forced top-1; NLL of the naive
pass's tokens under the retrieved KV; TTFT = retrieve (fetch, verify, decode) + one forward
step to the first token, median over passages and ``repeats``, against recomputing the
prefill (median of ``repeats``, after an untimed warm-up of each); the largest relative
error of the retrieved KV.

Run ``python -m lmcache.experiments.serde_sweep -m remote_serde=naive,cachegen,kivi,fp8``:
:class:`lmcache.experiments.serde_report.SerdeSweepReport` ends the multirun with one table,
CSV and plot (size vs quality). Exit statuses as :mod:`lmcache.experiments.app_exit`.
"""

from __future__ import annotations

import csv
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from lmcache.config.compose import register_resolvers
from lmcache.experiments import kv_quality as kvq
from lmcache.experiments.app_exit import exit_after, job_status
from lmcache.experiments.lmcache_config import ExperimentConfigError

CONFIG_PATH = "pkg://lmcache.conf"
CONFIG_NAME = "experiment/serde_sweep"
COLUMNS = ("remote_serde", "serde_overrides", "bytes_per_token", "x_smaller_than_bf16",
           "greedy_agreement_pct",
           "teacher_forced_top1_pct", "nll_naive_output", "ttft_ms", "ttft_prefill_ms",
           "max_rel_error", "documents", "tokens_per_document", "gen_tokens")

log = logging.getLogger(__name__)
register_resolvers()
_statuses: list[int] = []
_cache: dict[Any, Any] = {}  # model and naive references, shared by the jobs of one process


def _model(kind: str):
    if ("model", kind) not in _cache:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lmcache.experiments.trained_model import tiny_model_path

        path = tiny_model_path(kind)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        _cache[("model", kind)] = (model, AutoTokenizer.from_pretrained(path))
    return _cache[("model", kind)]


def references(cfg: DictConfig) -> list[dict]:
    """Per passage: ids, bf16 KV ``[2, L, T, D]``, recompute TTFT (s) and the naive pass's
    greedy tokens (cached per model, corpus and sizes)."""
    d = cfg.documents
    key = ("ref", str(cfg.model), str(d.dir), int(d.count), int(d.tokens), int(cfg.gen_tokens))
    if key not in _cache:
        model, tok = _model(str(cfg.model))
        refs = []
        passages = kvq.load_passages(tok, str(d.dir), int(d.count), int(d.tokens))
        kvq.prefill_kv(model, passages[0])  # untimed warm-up (thread pools, allocator)
        for ids in passages:
            runs = [kvq.prefill_kv(model, ids) for _ in range(int(cfg.repeats))]
            kv = runs[0][0].to(torch.bfloat16)
            refs.append({"ids": ids, "kv": kv,
                         "ttft_prefill": statistics.median(t for _, t in runs),
                         "tokens": kvq.greedy_from_kv(model, kv, int(ids[-1]),
                                                      int(cfg.gen_tokens))})
        _cache[key] = refs
    return _cache[key]


def check(cfg: DictConfig) -> None:
    """Raises ExperimentConfigError naming a bad value."""
    from lmcache.config.compose import list_options

    serdes = list_options("serde")
    if str(cfg.remote_serde) not in serdes:
        raise ExperimentConfigError(f"remote_serde={cfg.remote_serde!r}: expected one of the "
                                    f"serde options {serdes}")
    d = cfg.documents
    if int(d.tokens) < 1 or int(d.tokens) % int(cfg.chunk_size):
        raise ExperimentConfigError(f"documents.tokens={d.tokens}: expected a positive "
                                    f"multiple of chunk_size={cfg.chunk_size}")
    for name in ("count", "gen_tokens", "repeats"):
        value = d.count if name == "count" else cfg[name]
        if int(value) < 1:
            raise ExperimentConfigError(f"{'documents.' if name == 'count' else ''}{name}="
                                        f"{value}: expected an integer >= 1")


def _container(cfg: DictConfig, url: str, model):
    from lmcache.config import compose_config
    from lmcache.config.overrides import override_value
    from lmcache.containers import build_worker_container
    from lmcache.gpu_connector.kv_layout import KVCacheLayout
    from lmcache.metadata import LMCacheMetadata

    c = model.config
    heads, head_size = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    chunk = int(cfg.chunk_size)
    lmcfg = compose_config([
        f"chunk_size={chunk}", "max_local_cpu_size=0.25", "storage/backends=[local_cpu,remote]",
        f"serde={cfg.remote_serde}", f"remote_connector={cfg.remote_connector}",
        "remote_url=" + override_value(url), *[str(o) for o in cfg.serde_overrides]],
        sources=["serde_sweep"] * 6 + ["serde_overrides"] * len(cfg.serde_overrides))
    meta = LMCacheMetadata("lmcache/serde-sweep", 1, 0, torch.bfloat16,
                           (c.num_hidden_layers, 2, chunk, heads, head_size))
    layout = KVCacheLayout("cpu_packed", block_size=16, num_kv_heads=heads, head_size=head_size)
    return build_worker_container(lmcfg, meta, layout), meta


def run_job(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Run one serde (module doc); write ``output.csv`` into ``output_dir``; return the row."""
    from lmcache.containers import shutdown
    from lmcache.keys import CacheEngineKey
    from lmcache.memory.memory_format import MemoryFormat
    from lmcache.storage.backends.remote import RemoteBackend

    check(cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = _model(str(cfg.model))
    refs = references(cfg)
    fs_dir = out / "remote_fs"
    url = str(cfg.remote_url) if cfg.remote_url else f"fs://{fs_dir.resolve()}"
    container, meta = _container(cfg, url, model)
    stored = elems = 0
    ttfts, agree, top1, nll, err = [], [], [], [], 0.0
    try:
        tiers = container.backends()
        cpu, remote = tiers[0], next(t for t in tiers if isinstance(t, RemoteBackend))
        serde = container.serde()
        for d, ref in enumerate(refs):
            chunks = list(ref["kv"].split(int(cfg.chunk_size), dim=2))
            keys = [CacheEngineKey(meta.model_name, 1, 0, (d << 20) + i, torch.bfloat16)
                    for i in range(len(chunks))]
            for key, c in zip(keys, chunks):
                obj = cpu.allocate(c.shape, c.dtype, MemoryFormat.KV_2LTD)
                obj.tensor.copy_(c)
                stored += len(memoryview(serde.serialize(obj)[1]).cast("B"))
                elems += c.numel()
                remote.put(key, obj)
                obj.ref_count_down()
            if not remote.flush(timeout=60):
                raise RuntimeError(f"remote_serde={cfg.remote_serde}: uploads did not finish")
            last = int(ref["ids"][-1])
            for rep in range(int(cfg.repeats) + 1):  # the first retrieve is an untimed warm-up
                t0 = time.perf_counter()
                got = remote.batched_get_blocking(keys)
                missed = sum(o is None for o in got)
                if missed:
                    raise RuntimeError(f"remote_serde={cfg.remote_serde}: {missed} of "
                                       f"{len(keys)} chunks missed")
                kv = torch.cat([o.tensor for o in got], dim=2)
                with torch.no_grad():
                    model(torch.tensor([[last]]), past_key_values=kvq.cache_from_kv(model, kv),
                          use_cache=True).logits[0, -1].argmax()
                if rep:
                    ttfts.append(time.perf_counter() - t0)
                for o in got:
                    o.ref_count_down()
            base = ref["kv"].float()
            err = max(err, float((kv.float() - base).norm() / base.norm()))
            tokens = kvq.greedy_from_kv(model, kv, last, int(cfg.gen_tokens))
            agree.append(kvq.agreement(tokens, ref["tokens"]))
            n, t1 = kvq.teacher_forced(model, kv, last, ref["tokens"])
            nll.append(n)
            top1.append(t1)
    finally:
        shutdown(container)
        shutil.rmtree(fs_dir, ignore_errors=True)
    row = {"remote_serde": str(cfg.remote_serde),
           "serde_overrides": " ".join(str(o) for o in cfg.serde_overrides),
           "bytes_per_token": round(stored / (elems / refs[0]["kv"][:, :, :1].numel()), 1),
           "x_smaller_than_bf16": round(2 * elems / stored, 2),
           "greedy_agreement_pct": round(100 * statistics.mean(agree), 1),
           "teacher_forced_top1_pct": round(100 * statistics.mean(top1), 1),
           "nll_naive_output": round(statistics.mean(nll), 4),
           "ttft_ms": round(statistics.median(ttfts) * 1e3, 2),
           "ttft_prefill_ms": round(statistics.median(r["ttft_prefill"] for r in refs) * 1e3, 2),
           "max_rel_error": round(err, 4), "documents": len(refs),
           "tokens_per_document": int(cfg.documents.tokens), "gen_tokens": int(cfg.gen_tokens)}
    with (out / str(cfg.output.csv)).open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    print(f"serde_sweep: remote_serde={row['remote_serde']}: {row['x_smaller_than_bf16']}x "
          f"smaller, greedy agreement {row['greedy_agreement_pct']} %, NLL "
          f"{row['nll_naive_output']}, TTFT {row['ttft_ms']} ms", flush=True)
    return row


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def hydra_app(cfg: DictConfig) -> int:
    """Hydra's task function: run one job and record its exit status."""
    from hydra.core.hydra_config import HydraConfig

    out = HydraConfig.get().runtime.output_dir
    status = job_status("serde_sweep", log, lambda: (run_job(cfg, out), 0)[1])
    _statuses.append(status)
    return status


def main() -> None:
    """Entry point: run the Hydra app, exit with the highest job status."""
    exit_after(hydra_app, _statuses)


if __name__ == "__main__":
    main()

