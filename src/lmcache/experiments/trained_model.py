"""The trained tiny Llama: committed weights + tokenizer, materialized as a model directory.

The random tiny model (:mod:`lmcache.experiments.tiny_model`) is right for speed runs but its
text is gibberish, so quality (CacheBlend, lossy serdes) cannot be judged on it. This module
ships a model of the same family (``LlamaForCausalLM``, the same byte-level BPE tokenizer
trained on ``/usr/share/common-licenses``, vocabulary 8192, GQA) trained on those license texts
by ``scripts/train_tiny_model.py``; it continues license sentences sensibly.

Assets (``src/lmcache/experiments/assets/trained_tiny_llama/``, committed):

- ``model.safetensors`` — the weights in bfloat16 (tied input/output embeddings).
- ``config.json`` — the ``LlamaConfig`` (``torch_dtype`` float32: vLLM's CPU worker upcasts).
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` — the tokenizer.
- ``train_meta.json`` — the training command, sizes and final losses;
  ``loss_curve.csv`` / ``loss_curve.png`` — train and held-out loss per evaluation step.

:func:`tiny_model_path` is the one entry point for experiments and tests: ``"trained"`` gives
this model, ``"random"`` the seeded random one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "trained_tiny_llama"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("special_tokens_map.json", "generation_config.json", "train_meta.json")
KINDS = ("trained", "random")


@dataclass(frozen=True)
class TrainedShape:
    """Sizes of the trained model (the random model's family, smaller so its weights are a few
    MB): hidden 256, 4 heads of 64, 2 KV heads, 4 layers, MLP 768, tied embeddings."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        """hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads


def llama_config(shape: TrainedShape, tokenizer):
    """A ``LlamaConfig`` of ``shape`` for ``tokenizer`` (float32 compute dtype, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )


def has_assets(asset_dir: str | os.PathLike = ASSET_DIR) -> bool:
    """True when ``asset_dir`` holds every file of :data:`MODEL_FILES`."""
    root = Path(asset_dir)
    return all((root / f).is_file() for f in MODEL_FILES)


def ensure_trained_model(path: str | os.PathLike | None = None,
                         asset_dir: str | os.PathLike = ASSET_DIR) -> Path:
    """Copy the committed trained model into a model directory; return its path.

    ``path`` None → the asset directory itself (already a complete HF model directory, read
    only). Otherwise the files are copied atomically (temp sibling + rename) unless ``path``
    already holds identical files.

    Raises:
        FileNotFoundError: the assets are missing (run ``scripts/train_tiny_model.py``).
    """
    src = Path(asset_dir)
    if not has_assets(src):
        raise FileNotFoundError(
            f"trained tiny model assets missing under {str(src)!r} (expected {MODEL_FILES}); "
            "train it with scripts/train_tiny_model.py")
    if path is None:
        return src
    target = Path(path)
    names = [f for f in MODEL_FILES + OPTIONAL_FILES if (src / f).is_file()]
    if target.is_dir() and all(
            (target / f).is_file() and (target / f).read_bytes() == (src / f).read_bytes()
            for f in names):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for f in names:
            shutil.copyfile(src / f, tmp / f)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_model_path(kind: str = "trained", cache_dir: str | os.PathLike | None = None) -> Path:
    """Model directory of the tiny model ``kind``: ``"trained"`` (committed weights, see module
    doc) or ``"random"`` (:func:`lmcache.experiments.tiny_model.ensure_tiny_model`).

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
        FileNotFoundError: trained assets missing.
    """
    if kind == "trained":
        return ensure_trained_model(cache_dir)
    if kind == "random":
        from lmcache.experiments.tiny_model import ensure_tiny_model

        return ensure_tiny_model(cache_dir)
    raise ValueError(f"tiny_model={kind!r}: expected one of {KINDS}")
