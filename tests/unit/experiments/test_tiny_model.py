"""The tiny random Llama generator: tokenizer, config values, idempotency, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcache.experiments.tiny_model import (
    MARKER_FILE, TinyModelSpec, build_tokenizer, corpus_files, ensure_tiny_model, is_valid)

CORPUS = "/usr/share/common-licenses"
SMALL = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, TinyModelSpec]:
    spec = TinyModelSpec(**SMALL, corpus_dir=CORPUS)
    path = ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model", spec)
    return path, spec


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        TinyModelSpec(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size=100"):
        TinyModelSpec(hidden_size=100, num_attention_heads=8)
    with pytest.raises(ValueError, match="float16"):
        TinyModelSpec(dtype="float16")
    with pytest.raises(ValueError, match="vocab_size=100"):
        TinyModelSpec(vocab_size=100)
    with pytest.raises(ValueError, match="num_hidden_layers=0"):
        TinyModelSpec(num_hidden_layers=0)
    assert TinyModelSpec().head_dim == 64


def test_corpus_files_rejects_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        corpus_files(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no regular files"):
        corpus_files(tmp_path)


def test_tokenizer_round_trips_text_with_bos(built):
    from transformers import AutoTokenizer

    path, spec = built
    tok = AutoTokenizer.from_pretrained(str(path))
    text = "Everyone is permitted to copy and distribute verbatim copies — ünïcode ✓\n\tend."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1
    assert tok.eos_token_id == 2 and tok.unk_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    # the BPE learned merges from the corpus: common words are single tokens
    assert len(tok.encode(" the", add_special_tokens=False)) == 1
    assert len(tok) <= spec.vocab_size


def test_model_config_matches_spec(built):
    path, spec = built
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        assert cfg[key] == SMALL[key], key
    assert cfg["head_dim"] == 16
    assert cfg["dtype"] == "float32"
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    tok = json.loads((path / "tokenizer.json").read_text())
    assert cfg["vocab_size"] == len(tok["model"]["vocab"])
    assert json.loads((path / MARKER_FILE).read_text()) == spec.to_dict()


def test_weights_are_seeded_and_loadable(built, tmp_path):
    import torch
    from safetensors.torch import load_file

    path, spec = built
    weights = load_file(str(path / "model.safetensors"))
    emb = weights["model.embed_tokens.weight"]
    assert emb.dtype == torch.float32
    assert emb.shape == (json.loads((path / "config.json").read_text())["vocab_size"], 64)
    assert 0.5 * spec.initializer_range < float(emb.std()) < 2 * spec.initializer_range
    again = ensure_tiny_model(tmp_path / "again", spec)  # same seed → same weights
    assert torch.equal(load_file(str(again / "model.safetensors"))["model.embed_tokens.weight"], emb)


def test_ensure_is_idempotent(built):
    path, spec = built
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert ensure_tiny_model(path, spec) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_partial_or_other_spec_is_rebuilt(tmp_path):
    spec = TinyModelSpec(**SMALL, corpus_dir=CORPUS)
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # a torn earlier build: no marker
    assert not is_valid(target, spec)
    ensure_tiny_model(target, spec)
    assert is_valid(target, spec)
    other = TinyModelSpec(**{**SMALL, "num_hidden_layers": 1}, corpus_dir=CORPUS)
    assert not is_valid(target, other)
    ensure_tiny_model(target, other)
    assert is_valid(target, other) and not is_valid(target, spec)
    assert json.loads((target / "config.json").read_text())["num_hidden_layers"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_build_tokenizer_vocab_bound():
    tok = build_tokenizer(TinyModelSpec(**SMALL, corpus_dir=CORPUS))
    assert 259 < len(tok) <= 600
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
