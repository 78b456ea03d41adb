"""The long-document QA app's packaged config, lmcache's tree inside it, and the jobs it turns
into (no engine runs here)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

from lmcache.experiments import long_doc_qa as app
from lmcache.experiments import lmcache_config as lmc
from lmcache.integration.vllm.engine_builder import compose_from_vllm


def compose_app(overrides=()):
    """(config without the hydra node, Hydra's runtime choices)."""
    with initialize_config_module(config_module="lmcache.conf", version_base="1.3"):
        cfg = compose(config_name=app.CONFIG_NAME, overrides=list(overrides),
                      return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def test_packaged_config_defaults():
    cfg, choices = compose_app()
    assert cfg.documents.dir == "/usr/share/common-licenses"
    assert list(cfg.passes) == ["without_lmcache", "with_lmcache"] and cfg.repeats == 3
    v = OmegaConf.to_container(cfg.vllm, resolve=True)
    assert v["enable_prefix_caching"] is False
    assert v["distributed_executor_backend"] == "uni"
    assert v["enforce_eager"] is True and v["disable_log_stats"] is False
    assert v["dtype"] == cfg.model.tiny.dtype == "float32"
    assert v["kv_cache_memory_bytes"] == 256 * 2**20
    # lmcache's tree at the root: its keys, tiers and policy; the experiment's CPU size wins
    assert cfg.chunk_size == 256 and cfg.max_local_cpu_size == 1.0
    assert list(cfg.storage.backends) == ["local_cpu"]
    assert cfg.storage.policy._target_.endswith("LRUCachePolicy")
    assert choices["storage/policy"] == "lru" and choices["deployment"] is None


def test_lmcache_groups_and_keys_are_plain_overrides(tmp_path):
    cfg, choices = compose_app(["deployment=cpu_disk", f"local_disk={tmp_path}/kv",
                                "chunk_size=512", "storage/policy=fifo",
                                "storage.backends.local_disk.num_writers=2"])
    assert list(cfg.storage.backends) == ["local_cpu", "local_disk"]
    assert cfg.storage.backends.local_disk.local_disk == f"{tmp_path}/kv"
    assert cfg.storage.backends.local_disk.num_writers == 2
    assert cfg.max_local_disk_size == 20.0 and cfg.token_database.chunk_size == 512
    task = ["deployment=cpu_disk", "storage.backends.local_disk.num_writers=2"]
    overrides = lmc.connector_overrides(cfg, choices, task)
    assert "storage/backends=[local_cpu,local_disk]" in overrides
    assert "storage/policy=fifo" in overrides and "chunk_size=512" in overrides
    assert f"local_disk='{tmp_path}/kv'" in overrides
    assert overrides[-1] == "storage.backends.local_disk.num_writers=2"
    assert not any(o.startswith("deployment=") for o in overrides)
    # the engine process composes exactly the experiment's lmcache config from them
    fields = app.kv_transfer_fields(cfg, overrides)
    assert fields["kv_connector_extra_config"] == {"lmcache.overrides": overrides}
    engine = compose_from_vllm(fields["kv_connector_extra_config"])
    lmc.check_same_config(cfg, engine)
    assert engine.storage.policy._target_.endswith("FIFOCachePolicy")
    with open_dict(engine):
        engine.chunk_size = 128
    with pytest.raises(lmc.ExperimentConfigError, match="chunk_size: experiment 512, engine 128"):
        lmc.check_same_config(cfg, engine)


def test_check_config_returns_kv_transfer_fields():
    cfg, choices = compose_app(["chunk_size=128"])
    fields = app.check_config(cfg, choices, ["chunk_size=128"])
    assert fields["kv_connector"] == "LMCacheConnectorV1Dynamic"
    assert fields["kv_connector_module_path"] == "lmcache.integration.vllm.lmcache_connector_v1"
    assert fields["kv_role"] == "kv_both" and fields["kv_load_failure_policy"] == "recompute"
    assert "chunk_size=128" in fields["kv_connector_extra_config"]["lmcache.overrides"]


@pytest.mark.parametrize("override, name", [("+chunk_sise=128", "chunk_sise"),
                                            ("+lmcache.local_disk=/tmp/kv", "lmcache")])
def test_unknown_top_level_key_is_refused(override, name):
    cfg, choices = compose_app([override])
    with pytest.raises(lmc.ExperimentConfigError, match=rf"unknown top-level key\(s\) \['{name}'\]"):
        app.check_config(cfg, choices, [override])
    if name == "lmcache":
        with pytest.raises(lmc.ExperimentConfigError, match="not lmcache.local_disk=/x"):
            app.check_config(cfg, choices, [override])


@pytest.mark.parametrize("overrides, match", [
    (["passes=[]"], "passes="), (["passes=[with_lmcache,with_lmcache]"], "passes="),
    (["passes=[lmcache]"], "passes="), (["repeats=0"], "repeats=0"),
    (["max_local_cpu_size=-1"], "max_local_cpu_size")])
def test_check_config_rejects_bad_values(overrides, match):
    cfg, choices = compose_app(overrides)
    with pytest.raises(ValueError, match=match):
        app.check_config(cfg, choices, overrides)


def test_build_jobs_one_per_pass(tmp_path):
    cfg, _ = compose_app(["max_tokens=4", "warmup_tokens=0"])
    kv = app.kv_transfer_fields(cfg, ["chunk_size=256"])
    jobs = app.build_jobs(cfg, "/m", kv, tmp_path)
    assert list(jobs) == ["without_lmcache", "with_lmcache"]
    plain, lm = jobs["without_lmcache"], jobs["with_lmcache"]
    assert plain["kv_transfer"] is None and lm["kv_transfer"] == kv
    assert plain["max_tokens"] == 4 and plain["warmup_tokens"] == 0 and plain["model"] == "/m"
    assert plain["llm"]["enable_prefix_caching"] is False
    assert lm["log_file"] == str(tmp_path / "vllm_with_lmcache.log")
    only = app.build_jobs(compose_app(["passes=[with_lmcache]"])[0], "/m", kv)
    assert list(only) == ["with_lmcache"] and only["with_lmcache"]["log_file"] is None


def test_prepare_model_rejects_missing_path(tmp_path):
    cfg, _ = compose_app([f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(app.ExperimentConfigError, match="model.path="):
        app.prepare_model(cfg)


def test_output_check_statuses():
    a = [{"request_key": "d0#q0", "repeat": 0, "output_token_ids": [1, 2]},
         {"request_key": "d0#q1", "repeat": 0, "output_token_ids": [3, 4]},
         {"request_key": "d0#q1", "repeat": 1, "output_token_ids": [3, 7]}]
    b = [dict(a[0]), {"request_key": "d0#q1", "repeat": 0, "output_token_ids": [3, 4]},
         {"request_key": "d0#q1", "repeat": 1, "output_token_ids": [3, 5]}]
    assert app.output_check(a, [dict(r) for r in a], True) == (
        0, "greedy outputs are identical with and without lmcache")
    status, msg = app.output_check(a, b, True)
    assert status == app.EXIT_MISMATCH == 3
    assert msg == ("ERROR: greedy outputs differ with and without lmcache for 1 of 3 requests: "
                   "d0#q1@r1")
    assert app.output_check(a, b, False) == (0, msg.replace("ERROR", "WARNING"))
    assert app.output_check(a, None, True) == (0, "")


def test_exit_codes_are_distinct():
    codes = [app.EXIT_OK, app.EXIT_CONFIG, app.EXIT_MISMATCH, app.EXIT_FAILED, app.EXIT_INTERRUPTED]
    assert codes == [0, 2, 3, 4, 130]


def test_stock_connector_name_without_module_path():
    """LMCache's stock form: vLLM's built-in LMCacheConnectorV1 found by name, no module path."""
    cfg, _ = compose_app(["kv_transfer.kv_connector=LMCacheConnectorV1",
                          "kv_transfer.kv_connector_module_path=null"])
    kv = app.kv_transfer_fields(cfg, ["chunk_size=256"])
    assert kv["kv_connector"] == "LMCacheConnectorV1" and "kv_connector_module_path" not in kv
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    cls = KVConnectorFactory.get_connector_class(KVTransferConfig(**kv))
    assert cls.__name__ == "LMCacheConnectorV1"
