"""LayerwiseModel: runs a vLLM model object's decoder layers one at a time, for chosen tokens.

CacheBlend (LMCache's ``LMCBaseModel`` / ``infer_model_from_vllm``) recomputes only some tokens
of a prompt in most layers while the others keep their cached K/V. vLLM's own ``forward`` needs
its paged attention metadata, so this module drives the pieces of each decoder layer itself,
with the vLLM module's own weights: ``embed_tokens``, ``input_layernorm`` (fused residual add),
``self_attn.qkv_proj``, the optional per-head ``q_norm``/``k_norm`` (Qwen3, Qwen2 with
``qk_norm``), ``rotary_emb``, ``o_proj``, ``post_attention_layernorm`` and ``mlp``. Attention is
torch's ``scaled_dot_product_attention`` with an explicit mask: each query token attends to every
key whose position is not after its own (causal over the full K/V of the layer, which may hold
cached rows of tokens that are not recomputed).

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` (the families LMCache
blends), without tensor/pipeline parallelism (a tensor-parallel shard, ``num_heads <
total_num_heads``, is refused) or sliding windows, and with a RoPE that
:class:`~lmcache.blend.rotary.FusedRotaryEmb` can re-position (its instance is
:attr:`LayerwiseModel.fused_rotary_emb`, for moving cached K to new positions). Anything else is
refused at construction with a ValueError naming the architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lmcache.blend.rotary import FusedRotaryEmb

#: architecture (class name of the vLLM model) -> whether its attention has q_norm/k_norm
#: (None: per instance, Qwen2's ``qk_norm`` flag).
SUPPORTED_ARCHITECTURES: dict[str, Optional[bool]] = {
    "LlamaForCausalLM": False, "Qwen2ForCausalLM": None, "Qwen3ForCausalLM": True}
_ATTN_ATTRS = ("qkv_proj", "o_proj", "rotary_emb", "q_size", "kv_size", "num_heads",
               "num_kv_heads", "head_dim", "scaling")
_LAYER_ATTRS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class LayerwiseModel:
    """A vLLM causal LM (Llama/Qwen2/Qwen3) run one decoder layer at a time.

    Args:
        vllm_model: the model object of a vLLM worker (``LLM.apply_model(lambda m: m)[0]``, or
            the worker's ``model_runner.model``), or any ``nn.Module`` with the same attribute
            names (``.model.embed_tokens``, ``.model.layers[i]...``, ``.config``) and class name.
            Its weights are used as they are (device, dtype); nothing is copied.

    Attributes:
        num_layers, num_heads, num_kv_heads, head_size: the attention sizes (per worker).
        kv_size: ``num_kv_heads * head_size``, the width of one token's K (and V) row.
        dtype, device: of the model's weights; all activations are in this dtype.
        fused_rotary_emb: a :class:`FusedRotaryEmb` matching the model's RoPE.

    Raises:
        ValueError: an architecture other than :data:`SUPPORTED_ARCHITECTURES` (named), a model
            split by pipeline or tensor parallelism, missing attributes, sliding-window
            attention, or a RoPE that cannot be re-positioned (named, with the architecture).
    """

    def __init__(self, vllm_model: Any) -> None:
        arch = type(vllm_model).__name__
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"CacheBlend cannot run architecture {arch!r}: its layers are not known to the "
                f"layerwise model; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        self.architecture = arch
        inner = getattr(vllm_model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(inner, "embed_tokens"):
            raise ValueError(f"{arch}: expected .model.embed_tokens and .model.layers")
        start, end = getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(layers))
        if (start, end) != (0, len(layers)):
            raise ValueError(f"{arch}: pipeline-parallel shards (layers {start}..{end} of "
                             f"{len(layers)}) cannot be blended")
        for i, layer in enumerate(layers):
            missing = [a for a in _LAYER_ATTRS if not hasattr(layer, a)] + [
                f"self_attn.{a}" for a in _ATTN_ATTRS if not hasattr(layer.self_attn, a)]
            if missing:
                raise ValueError(f"{arch}: layer {i} lacks {missing}")
            window = getattr(getattr(layer.self_attn, "attn", None), "sliding_window", None)
            if window is not None:
                raise ValueError(f"{arch}: layer {i} uses sliding-window attention "
                                 f"(window {window}), which CacheBlend cannot recompute")
        self.vllm_model, self.layers, self.embed_tokens = vllm_model, layers, inner.embed_tokens
        #: SDPA backends for masked attention on CUDA (``torch.nn.attention.SDPBackend`` list);
        #: None = torch's choice (cuDNN's on the H200).
        self.masked_attention_backends: Optional[list] = None
        self._bias_cache: Optional[tuple] = None
        attn = layers[0].self_attn
        self.num_layers = len(layers)
        self.num_heads, self.num_kv_heads = int(attn.num_heads), int(attn.num_kv_heads)
        total = getattr(attn, "total_num_heads", self.num_heads)
        if total != self.num_heads:
            raise ValueError(
                f"{arch}: a tensor-parallel shard ({self.num_heads} of {total} attention heads) "
                "cannot be blended: each rank would select tokens from its own heads only; "
                "run with tensor_parallel_size 1")
        self.head_size, self.kv_size = int(attn.head_dim), int(attn.kv_size)
        qk_norm = SUPPORTED_ARCHITECTURES[arch]
        self.qk_norm = bool(getattr(attn, "qk_norm", False)) if qk_norm is None else qk_norm
        if self.qk_norm and not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            raise ValueError(f"{arch}: attention with qk-norm lacks q_norm/k_norm")
        weight = self.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        config = getattr(vllm_model, "config", None)
        rope_parameters = getattr(config, "rope_parameters", None)
        if rope_parameters is None:
            rope_parameters = getattr(config, "rope_scaling", None) or {}
            rope_parameters = {"rope_theta": getattr(config, "rope_theta", 10000.0),
                               **rope_parameters}
        try:
            self.fused_rotary_emb = FusedRotaryEmb.from_rope_parameters(
                self.head_size, rope_parameters,
                is_neox_style=bool(getattr(attn.rotary_emb, "is_neox_style", True)))
        except ValueError as exc:
            raise ValueError(f"{arch}: CacheBlend cannot re-position its RoPE: {exc}") from exc

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[T, hidden_size]`` (model dtype/device) of int64 ``token_ids [T]``."""
        return self.embed_tokens(token_ids.to(self.device))

    def qkv(self, layer_id: int, hidden: torch.Tensor, residual: Optional[torch.Tensor],
            positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The pre-attention half of layer ``layer_id`` for ``T`` tokens.

        Args:
            hidden: ``[T, hidden_size]``, the previous layer's output (the embeddings at layer 0).
            residual: ``[T, hidden_size]`` or None (layer 0).
            positions: int64 ``[T]``, the tokens' positions (RoPE).

        Returns:
            ``(q [T, num_heads*head_size], k [T, kv_size], v [T, kv_size], residual
            [T, hidden_size])``; q and k after qk-norm and RoPE — k is what vLLM stores in its
            KV cache.
        """
        layer = self.layers[layer_id]
        if residual is None:
            residual = hidden
            hidden = layer.input_layernorm(hidden)
        else:
            hidden, residual = layer.input_layernorm(hidden, residual)
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(hidden)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        if self.qk_norm:
            n = q.shape[0]
            q = attn.q_norm(q.reshape(n, -1, self.head_size)).reshape(n, attn.q_size)
            k = attn.k_norm(k.reshape(n, -1, self.head_size)).reshape(n, attn.kv_size)
        q, k = attn.rotary_emb(positions.to(self.device), q.contiguous(), k.contiguous())
        return q, k, v.contiguous(), residual

    def attention(self, layer_id: int, q: torch.Tensor, q_positions: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``Tq`` query tokens over ``T`` key/value tokens.

        Query ``i`` sees key ``j`` iff ``kv_positions[j] <= q_positions[i]``.

        Args:
            q: ``[Tq, num_heads*head_size]``; k, v: ``[T, kv_size]``.
            q_positions: int64 ``[Tq]``; kv_positions: int64 ``[T]`` (strictly increasing,
                as :func:`check_tokens` makes them). Passing the *same* tensor for both (every
                token queries: a prefill) takes the plain causal path (FlashAttention on CUDA,
                no mask is built). Otherwise an additive ``[Tq, T]`` bias (0 / -inf, q's dtype)
                is built and kept while the same two position tensor objects come back (every
                layer after a blend's check layer; positions must not be modified in place
                meanwhile); :meth:`release_attention_cache` drops it.

        Returns:
            ``[Tq, num_heads*head_size]``, the attention output (before ``o_proj``).
        """
        scale = float(self.layers[layer_id].self_attn.scaling)
        qh = q.view(q.shape[0], self.num_heads, self.head_size).transpose(0, 1)
        kh = k.view(k.shape[0], self.num_kv_heads, self.head_size).transpose(0, 1)
        vh = v.view(v.shape[0], self.num_kv_heads, self.head_size).transpose(0, 1)
        gqa = True
        if q.is_cuda and self.num_heads != self.num_kv_heads:
            # not every CUDA kernel takes GQA (the masked memory-efficient one does not): repeat
            # the KV heads rather than fall back to the math kernel's [H, Tq, T] scores.
            groups = self.num_heads // self.num_kv_heads
            kh, vh, gqa = kh.repeat_interleave(groups, 0), vh.repeat_interleave(groups, 0), False
        if q_positions is kv_positions and q.shape[0] == k.shape[0]:
            out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True,
                                                 scale=scale, enable_gqa=gqa)
        else:
            bias = self._attention_bias(q_positions, kv_positions, q)
            backends = self.masked_attention_backends
            ctx = contextlib.nullcontext()
            if backends and q.is_cuda:
                from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

                ctx = sdpa_kernel(backends)
            with ctx:
                out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None],
                                                     attn_mask=bias, scale=scale,
                                                     enable_gqa=gqa)
        return out[0].transpose(0, 1).reshape(q.shape[0], self.num_heads * self.head_size)

    def _attention_bias(self, q_positions: torch.Tensor, kv_positions: torch.Tensor,
                        q: torch.Tensor) -> torch.Tensor:
        key = (q.dtype, q.device)  # positions: the same objects (inference tensors have no
        # version counter; callers do not modify positions in place)
        cached = self._bias_cache
        if cached is not None and cached[0] is q_positions and cached[1] is kv_positions \
                and cached[2] == key:
            return cached[3]
        allowed = kv_positions.to(q.device)[None, :] <= q_positions.to(q.device)[:, None]
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~allowed, float("-inf"))
        self._bias_cache = (q_positions, kv_positions, key, bias)
        return bias

    def release_attention_cache(self) -> None:
        """Drop the attention bias kept between layers (``[Tq, T]``, e.g. 80 MB at 2.5k
        recomputed tokens of a 16k prompt in bf16)."""
        self._bias_cache = None

    def finish(self, layer_id: int, attn_out: torch.Tensor,
               residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The post-attention half of layer ``layer_id``: ``o_proj``, residual norm, MLP.

        Returns:
            ``(hidden [T, hidden_size], residual [T, hidden_size])`` for the next layer.
        """
        layer = self.layers[layer_id]
        hidden, _ = layer.self_attn.o_proj(attn_out)
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        return layer.mlp(hidden), residual

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> list[tuple[torch.Tensor, ...]]:
        """A plain full prefill: every layer's K and V for all tokens (no cache, no blend).

        Args:
            token_ids: int64 ``[T]``.
            positions: int64 ``[T]`` (strictly increasing); None = ``0..T-1``.

        Returns:
            ``num_layers`` pairs ``(k [T, kv_size], v [T, kv_size])`` in the model's dtype, on
            its device — the K/V that vLLM writes into its paged cache for these tokens.
        """
        token_ids, positions = check_tokens(token_ids, positions, self.device)
        hidden, residual = self.embed(token_ids), None
        out = []
        for i in range(self.num_layers):
            q, k, v, residual = self.qkv(i, hidden, residual, positions)
            out.append((k, v))
            if i + 1 < self.num_layers:
                hidden, residual = self.finish(
                    i, self.attention(i, q, positions, k, v, positions), residual)
        return out


def check_tokens(token_ids: Any, positions: Optional[Any],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(token_ids, positions)`` as int64 tensors on ``device``.

    Raises:
        ValueError: not 1-D integer, empty, lengths differ, or positions not strictly
            increasing / negative.
    """
    ids = torch.as_tensor(token_ids) if isinstance(token_ids, Sequence) else token_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0 or (
            ids.dtype.is_floating_point or ids.dtype == torch.bool):
        raise ValueError(f"token_ids must be a non-empty 1-D integer tensor, got "
                         f"{getattr(ids, 'shape', ids)!r} {getattr(ids, 'dtype', '')}")
    ids = ids.to(device=device, dtype=torch.long)
    if positions is None:
        return ids, torch.arange(ids.numel(), device=device)
    pos = torch.as_tensor(positions) if isinstance(positions, Sequence) else positions
    if not isinstance(pos, torch.Tensor) or pos.shape != ids.shape or (
            pos.dtype.is_floating_point or pos.dtype == torch.bool):
        raise ValueError(f"positions must be a 1-D integer tensor of {ids.numel()} positions "
                         f"(one per token), got {getattr(pos, 'shape', pos)!r}")
    pos = pos.to(device=device, dtype=torch.long)
    if int(pos[0]) < 0 or (pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all())):
        raise ValueError("positions must be non-negative and strictly increasing, got "
                         f"{pos[:8].tolist()}...")
    return ids, pos
