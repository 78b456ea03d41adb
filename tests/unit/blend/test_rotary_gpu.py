"""csrc/rotary_k.cu against the torch path of FusedRotaryEmb, bit for bit, on a real GPU."""

import pytest
import torch

from lmcache.blend import FusedRotaryEmb
from lmcache.gpu_connector.cupy_kernels import cupy_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()),
                       reason="needs CUDA and CuPy"),
]

LLAMA3 = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params,neox", [({"rope_theta": 10000.0}, True),
                                         ({"rope_theta": 10000.0}, False),
                                         ({"partial_rotary_factor": 0.5}, True),
                                         (LLAMA3, True)])
@pytest.mark.parametrize("three_d", [False, True])
def test_kernel_equals_torch_path_bit_for_bit(dtype, params, neox, three_d):
    gen = torch.Generator().manual_seed(3)
    n, heads, head = 1000, 8, 128
    k = torch.randn(n, heads * head, generator=gen).to(dtype)
    old = torch.randint(0, 30000, (n,), generator=gen)
    new = torch.randint(0, 30000, (n,), generator=gen)
    shape = (n, heads, head) if three_d else (n, heads * head)
    torch_path = FusedRotaryEmb.from_rope_parameters(head, params, neox, use_cuda_kernel=False)
    kernel = FusedRotaryEmb.from_rope_parameters(head, params, neox)
    want = torch_path(old.cuda(), new.cuda(), k.cuda().view(shape).clone())
    got_in = k.cuda().view(shape).clone()
    got = kernel(old.cuda(), new.cuda(), got_in)
    torch.cuda.synchronize()
    assert got is got_in
    assert torch.equal(got, want)
    cpu = torch_path(old, new, k.view(shape).clone())   # CPU and GPU torch paths agree closely
    assert (cpu.float() - got.cpu().float()).abs().max().item() < (1e-4 if dtype == torch.float32
                                                                   else 0.05)


def test_kernel_on_strided_token_rows():
    """K rows inside a wider buffer (e.g. the K half of a [T, 2, D] chunk) are rotated in place
    and the V half stays untouched."""
    n, heads, head = 64, 4, 64
    buf = torch.randn(n, 2, heads * head, device="cuda")
    v_before = buf[:, 1].clone()
    ref = buf[:, 0].clone()
    fused = FusedRotaryEmb(head)
    fused(torch.arange(n, device="cuda"), torch.arange(n, device="cuda") + 100, buf[:, 0])
    FusedRotaryEmb(head, use_cuda_kernel=False)(torch.arange(n, device="cuda"),
                                                torch.arange(n, device="cuda") + 100, ref)
    torch.cuda.synchronize()
    assert torch.equal(buf[:, 0], ref) and torch.equal(buf[:, 1], v_before)
