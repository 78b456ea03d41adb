"""Multi-round QA: conversations, server flags, per-round summary (no engine runs here)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict
from transformers import AutoTokenizer

from lmcache.experiments import multi_round_qa as app
from lmcache.experiments.documents import question_text
from lmcache.experiments.tiny_model import TinyModelSpec, ensure_tiny_model

SMALL = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def compose_app(overrides=()):
    with initialize_config_module(config_module="lmcache.conf", version_base="1.3"):
        cfg = compose(config_name=app.CONFIG_NAME, overrides=list(overrides))
    return cfg


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinyModelSpec(**SMALL))
    return AutoTokenizer.from_pretrained(str(path))


def test_conversations_share_the_system_prompt_and_grow(tokenizer):
    cfg = compose_app(["users=3", "rounds=2", "system_prompt_tokens=200", "user_info_tokens=50"])
    conv = app.Conversations(cfg, tokenizer)
    firsts = [conv.prompt(u, 0) for u in range(3)]
    assert all(p.startswith(conv.system) for p in firsts)
    assert len(tokenizer.encode(conv.system, add_special_tokens=False)) >= 150
    assert firsts[0] != firsts[1] and conv.context[0] != conv.context[1]
    assert firsts[0].endswith(f"\n\nQuestion: {question_text(0)}\nAnswer:")
    conv.answer(0, 0, " forty-two")
    second = conv.prompt(0, 1)
    assert second.startswith(firsts[0] + " forty-two")
    assert second.endswith(f"\n\nQuestion: {question_text(1)}\nAnswer:")
    with pytest.raises(RuntimeError, match="out of order"):
        conv.answer(1, 1, "x")


def test_server_args_and_kv_transfer():
    cfg = compose_app(["vllm.max_model_len=4096", "server.extra_args=[--max-num-seqs,4]"])
    kv = {"kv_connector": "LMCacheConnectorV1Dynamic", "kv_connector_extra_config": {}}
    args = app.server_args(cfg, kv)
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert "--no-enable-prefix-caching" in args and "--enable-prompt-tokens-details" in args
    assert "--enforce-eager" in args and args[-2:] == ["--max-num-seqs", "4"]
    assert json.loads(args[args.index("--kv-transfer-config") + 1]) == kv
    assert "--kv-transfer-config" not in app.server_args(cfg, None)


def test_summarize_rounds():
    rows = [{"user": 0, "round": 0, "ttft_s": 1.0, "prompt_tokens": 800, "cached_tokens": 0},
            {"user": 1, "round": 0, "ttft_s": 0.5, "prompt_tokens": 800, "cached_tokens": 512},
            {"user": 0, "round": 1, "ttft_s": 0.25, "prompt_tokens": 1000, "cached_tokens": 768}]
    first, second = app.summarize(rows)
    assert first["requests"] == 2 and first["ttft_s"] == pytest.approx(0.75)
    assert first["cached_tokens_mean"] == 256 and first["hit_rate"] == pytest.approx(512 / 1600)
    assert second["round"] == 2 and second["hit_rate"] == pytest.approx(0.768)


def test_packaged_config_composes_lmcache_tree():
    cfg = compose_app(["deployment=cpu_disk", "local_disk=/tmp/kv"])
    assert cfg.mode == "serve" and cfg.users == 4 and cfg.rounds == 3
    assert list(cfg.storage.backends) == ["local_cpu", "local_disk"]
    assert OmegaConf.select(cfg, "vllm.enable_prefix_caching") is False
    with open_dict(cfg):
        cfg.bogus = 1
    from lmcache.experiments.lmcache_config import ExperimentConfigError, check_known_keys

    with pytest.raises(ExperimentConfigError, match=r"\['bogus'\]"):
        check_known_keys(cfg, app.CONFIG_NAME)
