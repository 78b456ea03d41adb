"""A Llama/Qwen3-shaped causal LM of plain torch modules with vLLM's attribute names and call
signatures (``qkv_proj(x) -> (out, bias)``, ``input_layernorm(x, residual) -> (x, residual)``,
``rotary_emb(positions, q, k) -> (q, k)``), so the Blender can be tested where vLLM is absent
(the GPU device) and in fast unit tests. Not a reimplementation of vLLM: only what
:class:`lmcache.blend.layerwise_model.LayerwiseModel` calls. Random weights, seeded.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + 0.1 * torch.randn(dim)), eps

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
            residual = x
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        return y if residual is None else (y, residual)


class Linear(nn.Linear):
    def forward(self, x):
        return super().forward(x), None


class Rope(nn.Module):
    def __init__(self, head_size: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_size, self.base, self.is_neox_style = head_size, base, True
        self.inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float) / head_size)

    def forward(self, positions, q, k):
        ang = positions.float()[:, None] * self.inv_freq.to(positions.device)[None]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]

        def rot(x):
            h = x.view(x.shape[0], -1, self.head_size).float()
            a, b = h.chunk(2, dim=-1)
            return torch.cat((a * cos - b * sin, b * cos + a * sin), -1).to(x.dtype).view(x.shape)

        return rot(q), rot(k)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.scaling = head_dim ** -0.5
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = Linear(self.q_size, hidden, bias=False)
        self.rotary_emb = Rope(head_dim)
        self.attn = types.SimpleNamespace(sliding_window=None)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(hidden, 2 * inter, bias=False), nn.Linear(inter, hidden,
                                                                                 bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(a) * b)


class Layer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, inter, qk_norm):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim, qk_norm)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = MLP(hidden, inter)


class Inner(nn.Module):
    def __init__(self, vocab, hidden, layers, **kw) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden, **kw) for _ in range(layers))
        self.start_layer, self.end_layer = 0, layers


def build(arch: str = "LlamaForCausalLM", vocab: int = 256, hidden: int = 64, layers: int = 4,
          heads: int = 4, kv_heads: int = 2, inter: int = 128, seed: int = 0,
          dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A random model whose class is named ``arch`` (qk-norm for Qwen3ForCausalLM)."""
    torch.manual_seed(seed)
    cls = type(arch, (nn.Module,), {})
    model = cls()
    model.model = Inner(vocab, hidden, layers, heads=heads, kv_heads=kv_heads,
                        head_dim=hidden // heads, inter=inter, qk_norm=arch == "Qwen3ForCausalLM")
    model.config = types.SimpleNamespace(rope_parameters={"rope_theta": 10000.0,
                                                          "rope_type": "default"})
    return model.to(device=device, dtype=dtype).eval()


# The shared blend scenario of the engine and runner tests: 3 documents stored as prompt A
# (joined by the separator ids SEP), then reused in another order inside prompt B.
L, H, D, BS, BLOCKS = 4, 2, 16, 4, 40
SEP = [1, 2]
META = LMCacheMetadata("org/tiny", 1, 0, torch.float32, (L, 2, 16, H, D))
LAYOUT = KVCacheLayout("cpu_packed", BS, H, D)
_GEN = torch.Generator().manual_seed(3)
DOCS = [torch.randint(10, 256, (n,), generator=_GEN).tolist() for n in (17, 12, 21)]
SYSTEM, QUESTION = [5, 6, 7], [8, 9, 10, 11]


def join(*parts: list[int]) -> list[int]:
    """Token lists joined by SEP, as CacheBlend prompts are built."""
    out: list[int] = []
    for i, part in enumerate(parts):
        out += (SEP if i else []) + part
    return out


PROMPT_A, PROMPT_B = join(*DOCS), join(SYSTEM, DOCS[2], DOCS[0], QUESTION)
