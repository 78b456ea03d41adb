"""The long-document QA app's packaged config and the jobs it turns into (no engine runs here)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lmcache.experiments import long_doc_qa as app
from lmcache.experiments.documents import Document, build_requests


def compose_app(overrides=()):
    with initialize_config_module(config_module="lmcache.conf", version_base="1.3"):
        return compose(config_name=app.CONFIG_NAME, overrides=list(overrides))


def test_packaged_config_defaults():
    cfg = compose_app()
    assert cfg.documents.dir == "/usr/share/common-licenses"
    assert list(cfg.passes) == ["without_lmcache", "with_lmcache"]
    v = OmegaConf.to_container(cfg.vllm, resolve=True)
    assert v["enable_prefix_caching"] is False
    assert v["distributed_executor_backend"] == "uni"
    assert v["enforce_eager"] is True and v["disable_log_stats"] is False
    assert v["dtype"] == cfg.model.tiny.dtype == "float32"
    assert v["kv_cache_memory_bytes"] == 256 * 2**20


def test_kv_transfer_fields_prefix_extra_keys():
    cfg = compose_app(["lmcache.extra_config.chunk_size=64", "+lmcache.extra_config.save_unfull_chunk=true"])
    kv = app.kv_transfer_fields(cfg)
    assert kv["kv_connector"] == "LMCacheConnectorV1Dynamic"
    assert kv["kv_connector_module_path"] == "lmcache.integration.vllm.lmcache_connector_v1"
    assert kv["kv_role"] == "kv_both" and kv["kv_load_failure_policy"] == "recompute"
    assert kv["kv_connector_extra_config"] == {
        "lmcache.chunk_size": 64, "lmcache.local_cpu": True, "lmcache.max_local_cpu_size": 1.0,
        "lmcache.overrides": [], "lmcache.save_unfull_chunk": True}


def _encode(text):
    return [b + 10 for b in text.encode()]


def test_build_jobs_passes_and_requests():
    cfg = compose_app(["max_tokens=4", "warmup_tokens=0"])
    reqs = build_requests([Document("d0", (1, 11)), Document("d1", (1, 21))], _encode, 2)
    jobs = app.build_jobs(cfg, "/m", reqs)
    assert list(jobs) == ["without_lmcache", "with_lmcache"]
    plain, lm = jobs["without_lmcache"], jobs["with_lmcache"]
    assert plain["kv_transfer"] is None and lm["kv_transfer"] == app.kv_transfer_fields(cfg)
    assert plain["requests"] == lm["requests"] and len(plain["requests"]) == 4
    first = plain["requests"][0]
    assert first["request_key"] == "d0#q0" and first["prompt_token_ids"][:2] == [1, 11]
    assert plain["max_tokens"] == 4 and plain["warmup_tokens"] == 0 and plain["model"] == "/m"
    assert plain["llm"]["enable_prefix_caching"] is False
    only = app.build_jobs(compose_app(["passes=[with_lmcache]"]), "/m", reqs)
    assert list(only) == ["with_lmcache"]


@pytest.mark.parametrize("passes", ["[]", "[with_lmcache,with_lmcache]", "[lmcache]"])
def test_build_jobs_rejects_bad_passes(passes):
    cfg = compose_app([f"passes={passes}"])
    reqs = build_requests([Document("d0", (1, 11))], _encode, 1)
    with pytest.raises(app.ExperimentConfigError, match="passes="):
        app.build_jobs(cfg, "/m", reqs)


def test_prepare_model_rejects_missing_path(tmp_path):
    cfg = compose_app([f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(app.ExperimentConfigError, match="model.path="):
        app.prepare_model(cfg)


def test_output_check_statuses():
    a = [{"request_key": "d0#q0", "output_token_ids": [1, 2]},
         {"request_key": "d0#q1", "output_token_ids": [3, 4]}]
    b = [dict(a[0]), {"request_key": "d0#q1", "output_token_ids": [3, 5]}]
    assert app.output_check(a, [dict(r) for r in a], True) == (
        0, "greedy outputs are identical with and without lmcache")
    status, msg = app.output_check(a, b, True)
    assert status == app.EXIT_MISMATCH == 1
    assert msg == "ERROR: greedy outputs differ with and without lmcache for 1 of 2 requests: d0#q1"
    assert app.output_check(a, b, False) == (0, msg.replace("ERROR", "WARNING"))
    assert app.output_check(a, None, True) == (0, "")
