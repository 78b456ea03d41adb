"""A tiny random-weight Llama model and BPE tokenizer, built locally with no hub access.

The model exists so that experiments (``long_doc_qa``) can run a real vLLM engine on a CPU:
its weights are random (seeded), so its text is gibberish, but its prefill cost is real and
its greedy output is deterministic — enough to measure time-to-first-token and to check that a
KV cache loaded by lmcache gives exactly the same tokens as a recomputed one.

Layout of the directory written by :func:`ensure_tiny_model` (what vLLM / transformers read):

- ``config.json``, ``generation_config.json``, ``model.safetensors`` — ``LlamaForCausalLM``
  saved by ``save_pretrained`` (safetensors, dtype ``TinyModelSpec.dtype``).
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` (when transformers
  writes it) — a byte-level BPE tokenizer trained with the ``tokenizers`` library on the text
  files of ``TinyModelSpec.corpus_dir``; ``<s>`` (bos) is prepended to every encoding.
- ``lmcache_tiny_model.json`` — the spec that built the directory; written last, so its presence
  with an equal spec means the directory is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKER_FILE = "lmcache_tiny_model.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DEFAULT_CORPUS_DIR = "/usr/share/common-licenses"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny Llama model and its tokenizer.

    The defaults (~20 M parameters, ~80 MB in float32) make a 1000-token prefill take about a
    second on one x86 core (vLLM's CPU worker) while the model loads in a few seconds. float32
    is the default dtype because vLLM's CPU attention runs it on every x86 ISA (bf16 is
    emulated on AVX2-only machines). ``initializer_range`` 0.1 (not Llama's 0.02) makes the
    random model's greedy output depend on the prompt and keeps top-2 logit gaps well above
    float32 rounding, so identical outputs with and without a KV cache are a meaningful check
    (with 0.02 the model repeats one token whatever the prompt).

    Raises:
        ValueError: a size is not positive, the heads do not divide the hidden size,
            ``num_attention_heads`` is not a multiple of ``num_key_value_heads``, the dtype is
            not one of float32/bfloat16, or the vocabulary is too small for byte-level BPE.
    """

    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    initializer_range: float = 0.1
    dtype: str = "float32"
    seed: int = 0
    corpus_dir: str = DEFAULT_CORPUS_DIR

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyModelSpec.{name}={value!r}: expected a positive int")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError(
                f"TinyModelSpec.vocab_size={self.vocab_size}: expected at least "
                f"{256 + len(SPECIAL_TOKENS) + 1} (256 byte tokens + specials + one merge)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinyModelSpec.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinyModelSpec.num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"TinyModelSpec.dtype={self.dtype!r}: expected one of {_DTYPES}")

    @property
    def head_dim(self) -> int:
        """Size of one attention head (hidden_size / num_attention_heads)."""
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict (what the marker file holds)."""
        return dataclasses.asdict(self)


def default_cache_dir() -> Path:
    """``$LMCACHE_TINY_MODEL_DIR`` if set, else ``<repo>/.cache/lmcache-tiny-llama``.

    ``<repo>`` is the directory three levels above this file's package (``src/lmcache/..``)
    when that looks like a source checkout, else the current working directory.
    """
    env = os.environ.get("LMCACHE_TINY_MODEL_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    base = repo if (repo / "pyproject.toml").exists() or (repo / ".git").exists() else Path.cwd()
    return base / ".cache" / "lmcache-tiny-llama"


def corpus_files(corpus_dir: str | os.PathLike) -> list[Path]:
    """Sorted regular, non-symlink text files of ``corpus_dir`` (one level).

    Raises:
        ValueError: the directory does not exist or holds no readable file.
    """
    root = Path(corpus_dir)
    if not root.is_dir():
        raise ValueError(f"corpus_dir={str(root)!r} is not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        raise ValueError(f"corpus_dir={str(root)!r} holds no regular files")
    return files


def is_valid(path: str | os.PathLike, spec: TinyModelSpec) -> bool:
    """True when ``path`` holds a complete model built from exactly ``spec``."""
    root = Path(path)
    marker = root / MARKER_FILE
    if not marker.is_file() or not all((root / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        return json.loads(marker.read_text()) == spec.to_dict()
    except (OSError, ValueError):
        return False


def build_tokenizer(spec: TinyModelSpec):
    """Train a byte-level BPE tokenizer on ``spec.corpus_dir``.

    Returns a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``) with
    ``<unk>``/``<s>``/``</s>`` as ids 0/1/2, ``<s>`` prepended to every encoding and a
    vocabulary of at most ``spec.vocab_size`` entries. Byte-level BPE round-trips any text
    exactly (``decode(encode(t), skip_special_tokens=True) == t``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in corpus_files(spec.corpus_dir)]
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=spec.max_position_embeddings,
    )


def build_model(spec: TinyModelSpec, tokenizer):
    """A seeded random-init ``LlamaForCausalLM`` (CPU, ``spec.dtype``) matching ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, spec.dtype)).eval()
    model.config.dtype = spec.dtype
    return model


def ensure_tiny_model(path: str | os.PathLike | None = None,
                      spec: TinyModelSpec | None = None) -> Path:
    """Make sure ``path`` holds the tiny model of ``spec``; build it if not. Returns the path.

    Idempotent: a directory already built from an equal spec is left untouched. Atomic: the
    model is written to a temporary sibling directory and renamed into place, so a reader never
    sees a half-written model; a stale or partial directory at ``path`` is replaced. Safe when
    several processes race (the loser discards its copy).

    Args:
        path: target directory; ``None`` → :func:`default_cache_dir`.
        spec: sizes; ``None`` → ``TinyModelSpec()``.

    Raises:
        ValueError: bad spec or unreadable corpus (see :class:`TinyModelSpec`, :func:`corpus_files`).
    """
    spec = spec or TinyModelSpec()
    target = Path(path) if path is not None else default_cache_dir()
    if is_valid(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)
        tokenizer = build_tokenizer(spec)
        tokenizer.save_pretrained(tmp)
        model = build_model(spec, tokenizer)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the app's output
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        (tmp / MARKER_FILE).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
        if is_valid(target, spec):  # another process finished first
            return target
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_valid(target, spec):
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
